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


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        (("PUBLIC_IPADDR",), "PUBLIC_IPADDR not set"),
        (("VAST_TCP_PORT_3000",), "VAST_TCP_PORT_3000 not set"),
        (("PUBLIC_IPADDR", "VAST_TCP_PORT_3000"), "PUBLIC_IPADDR and VAST_TCP_PORT_3000 not set"),
    ],
)
def test_vast_mode_without_a_public_address_refuses_to_start(
    drop: tuple[str, ...], missing: str
) -> None:
    """No guessed loopback URL: the engine would route clients to an address that cannot work."""
    env = {k: v for k, v in VAST.items() if k not in drop}
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env(env)
    message = str(caught.value)
    assert message.startswith(missing) and "\n" not in message
    assert "NULLWORKER_PUBLIC_URL" in message


def test_a_local_engine_opts_in_to_a_loopback_url() -> None:
    local = {k: v for k, v in VAST.items() if k != "PUBLIC_IPADDR"}
    url = "http://127.0.0.1:3000"
    assert WorkerConfig.from_env(local | {"NULLWORKER_PUBLIC_URL": url + "/"}).public_url == url
    # The explicit URL wins over Vast's pair, which a local engine may have inherited.
    assert WorkerConfig.from_env(VAST | {"NULLWORKER_PUBLIC_URL": url}).public_url == url
    host = local | {"NULLWORKER_PUBLIC_HOST": "::1"}
    assert WorkerConfig.from_env(host).public_url == "http://[::1]:3000"
    with pytest.raises(ConfigError, match="NULLWORKER_PUBLIC_URL"):
        WorkerConfig.from_env(local | {"NULLWORKER_PUBLIC_URL": "127.0.0.1:3000"})
    # Standalone advertises nothing, whatever is set.
    assert WorkerConfig.from_env({"NULLWORKER_PUBLIC_URL": url}).public_url is None


def test_flags_override_the_environment() -> None:
    config = WorkerConfig.from_env({"MAX_QUEUE_TIME": "5"}, max_queue_time_s=0.0, port=0)
    assert config.max_queue_time_s == 0.0
    assert config.port == 0


def test_port_flag_decides_the_advertised_url() -> None:
    env = VAST | {"VAST_TCP_PORT_4000": "42000"}
    assert WorkerConfig.from_env(env, port=4000).public_url == "http://1.2.3.4:42000"
    local = {k: v for k, v in VAST.items() if k != "PUBLIC_IPADDR"}
    with pytest.raises(ConfigError, match="VAST_TCP_PORT_4000"):
        WorkerConfig.from_env(VAST, port=4000)
    local |= {"NULLWORKER_PUBLIC_HOST": "127.0.0.1"}
    assert WorkerConfig.from_env(local, port=4000).public_url == "http://127.0.0.1:4000"


def test_no_secret_in_repr_or_str() -> None:
    token = "mtoken-d1st1nct1ve-53cr3t"
    config = WorkerConfig.from_env(VAST | {"MASTER_TOKEN": token})
    assert config.master_token == token
    for shown in (repr(config), str(config), f"{config}", repr(config.replace(port=1))):
        assert token not in shown
        assert "container_id=4242" in shown  # the rest is still there


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
