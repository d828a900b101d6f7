"""WorkerConfig.from_env: the Vast environment contract, standalone default, validation."""

from __future__ import annotations

import pytest

from nullworker.errors import ConfigError
from nullworker.worker.config import WorkerConfig

VAST = {
    "REPORT_ADDR": "https://run.vast.ai/, https://backup.example",
    "CONTAINER_ID": "4242",
    "WORKER_PORT": "3000",
    "PUBLIC_IPADDR": "1.2.3.4",
    "VAST_TCP_PORT_3000": "41234",
    "MASTER_TOKEN": "tok",
}


def test_no_vast_variables_means_standalone_on_loopback() -> None:
    config = WorkerConfig.from_env({})
    assert config.standalone and not config.reporting
    assert config.host == "127.0.0.1"
    assert config.port == 3000
    assert config.unsecured is True
    assert config.control_port == 18999
    assert config.max_reservation_s == 3600.0
    assert config.max_queue_time_s == 30.0
    assert config.public_url is None


def test_vast_contract() -> None:
    config = WorkerConfig.from_env(VAST)
    assert config.reporting
    assert config.report_addrs == ("https://run.vast.ai", "https://backup.example")
    assert config.container_id == 4242
    assert config.host == "0.0.0.0"
    assert config.unsecured is False
    assert config.public_url == "http://1.2.3.4:41234"
    assert config.master_token == "tok"


def test_use_ssl_is_exactly_true_and_changes_the_scheme() -> None:
    assert WorkerConfig.from_env(VAST | {"USE_SSL": "true"}).public_url == "https://1.2.3.4:41234"
    assert WorkerConfig.from_env(VAST | {"USE_SSL": "True"}).use_ssl is False
    assert WorkerConfig.from_env(VAST | {"USE_SSL": "1"}).use_ssl is False


def test_without_public_address_the_url_is_local() -> None:
    env = {k: v for k, v in VAST.items() if k != "PUBLIC_IPADDR"}
    assert WorkerConfig.from_env(env).public_url == "http://127.0.0.1:3000"


def test_flags_override_the_environment() -> None:
    config = WorkerConfig.from_env({"MAX_QUEUE_TIME": "5"}, max_queue_time_s=0.0, port=0)
    assert config.max_queue_time_s == 0.0
    assert config.port == 0


def test_port_flag_decides_the_advertised_url() -> None:
    env = VAST | {"VAST_TCP_PORT_4000": "42000"}
    assert WorkerConfig.from_env(env, port=4000).public_url == "http://1.2.3.4:42000"
    local = {k: v for k, v in VAST.items() if k != "PUBLIC_IPADDR"}
    assert WorkerConfig.from_env(local, port=4000).public_url == "http://127.0.0.1:4000"


def test_control_port_off_and_legacy_name() -> None:
    assert WorkerConfig.from_env({"NULLWORKER_CONTROL_PORT": "off"}).control_port is None
    assert WorkerConfig.from_env({"NULL_CONTROL_PORT": "19000"}).control_port == 19000


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REPORT_ADDR": "http://e"}, "CONTAINER_ID"),
        ({"CONTAINER_ID": "1"}, "REPORT_ADDR"),
        ({"CONTAINER_ID": "x", "REPORT_ADDR": "http://e"}, "CONTAINER_ID"),
        ({"MAX_RESERVATION_SECONDS": "0"}, "MAX_RESERVATION_SECONDS"),
        ({"MAX_RESERVATION_SECONDS": "inf"}, "MAX_RESERVATION_SECONDS"),
        ({"MAX_RESERVATION_SECONDS": "nan"}, "MAX_RESERVATION_SECONDS"),
        ({"MAX_QUEUE_TIME": "-0.5"}, "MAX_QUEUE_TIME"),
        ({"WORKER_PORT": "http"}, "WORKER_PORT"),
        ({"WORKER_PORT": "65536"}, "WORKER_PORT"),
        ({"NULLWORKER_CONTROL_PORT": "3000"}, "control port"),
        ({"UNSECURED": "false"}, "UNSECURED"),
        ({"NULLWORKER_DELETE_REQUESTS_FORMAT": "2.0"}, "DELETE_REQUESTS_FORMAT"),
        ({"REPORT_ADDR": "http://h:abc", "CONTAINER_ID": "1"}, "REPORT_ADDR"),
        ({"REPORT_ADDR": "run.vast.ai", "CONTAINER_ID": "1"}, "REPORT_ADDR"),
        ({"REPORT_ADDR": "ftp://run.vast.ai", "CONTAINER_ID": "1"}, "REPORT_ADDR"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        WorkerConfig.from_env(env)


def test_unknown_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        WorkerConfig.from_env({}, no_such_setting=1)


@pytest.mark.parametrize("overrides", [{"port": 70000}, {"port": -1}, {"control_port": 99999}])
def test_flag_ports_are_range_checked(overrides: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="between 0 and 65535"):
        WorkerConfig.from_env({}, **overrides)
