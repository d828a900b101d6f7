"""Tests of ``nullworker autoscale --config FILE.toml`` (``nullworker.client.autoscale_config``).

* In-process: a good file's plan (``--check``, every password redacted, nothing
  connected), every kind of problem with its exact line (all of them at once), the
  options ``--config`` excludes, and the example file of docs/scaling.md.
* As a subprocess against the real local engine, real workers and a real
  ``redis-server`` (the fixtures of ``tests/test_autoscale_cli.py``): three endpoints
  from one file -- one the sum of two Redis lists, one a single list, one whose Redis is
  down -- each scaled by its own demand, with its own metrics and lines.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import redis
import trio

from nullworker.client.autoscale_cli import main
from nullworker.client.autoscale_config import ConfigFileError, load_config
from nullworker.client.demand import CombinedDemand, PostgresQuery, RedisList, RedisStream
from nullworker.engine import Engine

from .conftest import StartWorker
from .helpers import closed_port
from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .test_autoscale_cli import (  # noqa: F401  (run_autoscale is a fixture, used by name)
    KEY,
    RunAutoscale,
    run_autoscale_fixture,
    start_vast_worker,
    usage_error,
    wait_engine,
)

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
[endpoints.emails]
api_key_env = "NW_TEST_KEY_EMAILS"
engine_url = "http://127.0.0.1:9/"
max = 8
scale_down_delay = 60
duration = 600

[[endpoints.emails.sources]]
kind = "redis-list"
url = "redis://:hunter2@queue:6379/0"
key = "emails"
processing = "emails:processing"

[[endpoints.emails.sources]]
kind = "redis-list"
url_env = "NW_TEST_REDIS_URL"
key = "emails:retry"

[endpoints.emails.lease]
url = "redis://:hunter2@queue:6379/0"
name = "autoscale:emails"
ttl = 20
renew = 5

[endpoints.thumbnails]
api_key_env = "NW_TEST_KEY_THUMBS"
jobs_per_worker = 4
poll = 0.5
demand_timeout = 2
combine = "max"
sources = [
  { kind = "redis-queue", framework = "celery", url = "redis://queue:6379/1", queue = "thumbs" },
  { kind = "http-json", url = "http://stats/q", path = "depth", token_env = "NW_TEST_TOKEN" },
  { kind = "command", command = "echo 3" },
]
"""

GOOD_PLAN = """\
endpoint 'emails'
  sources (sum):
    redis list 'emails' + 'emails:processing' at redis://:***@queue:6379/0, timeout 5 s
    redis list 'emails:retry' at redis://:***@queue:6379/2, timeout 5 s
  policy: min 0, max 8, 1 job(s) per worker
  timing: poll 1 s, scale-down delay 60 s, each hold 600 s
  engine http://127.0.0.1:9/, API key from $NW_TEST_KEY_EMAILS
  lease: 'autoscale:emails' at redis://:***@queue:6379/0, ttl 20 s, renewed every 5 s
endpoint 'thumbnails'
  sources (max):
    celery queue 'thumbs' at redis://queue:6379/1, timeout 2 s
    JSON 'depth' at http://stats/q, timeout 2 s
    command 'echo 3', timeout 2 s
  policy: min 0, max 10, 4 job(s) per worker
  timing: poll 0.5 s, scale-down delay 30 s, each hold the worker's cap
  engine https://run.vast.ai, API key from $NW_TEST_KEY_THUMBS
  lease: none
"""

ENV = {
    "NW_TEST_KEY_EMAILS": "key-emails-5c1d",
    "NW_TEST_KEY_THUMBS": "key-thumbs-9a2e",
    "NW_TEST_REDIS_URL": "redis://:hunter3@queue:6379/2",
    "NW_TEST_TOKEN": "tok-3f8b",
}


@pytest.fixture(name="env")
def env_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("VAST_ENGINE_URL", raising=False)
    monkeypatch.delenv("VAST_API_KEY", raising=False)


def test_check_prints_the_plan_without_secrets(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "autoscale.toml"
    path.write_text(GOOD)
    assert main(["--config", str(path), "--check"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert _lines(captured.out) == _lines(GOOD_PLAN)
    secrets = ("hunter2", "hunter3", "key-emails-5c1d", "key-thumbs-9a2e", "tok-3f8b")
    assert not [secret for secret in secrets if secret in captured.out]
    # The API keys are read, kept out of every repr.
    emails, thumbnails = load_config(path)
    assert emails.api_key == ENV["NW_TEST_KEY_EMAILS"]
    assert ENV["NW_TEST_KEY_EMAILS"] not in repr(emails)
    assert thumbnails.source.describe().startswith("max of (")


def test_push_settings_of_the_sources(env: None, tmp_path: Path) -> None:
    path = tmp_path / "autoscale.toml"
    path.write_text(
        BASE.replace(
            '[{ kind = "command", command = "echo 1" }]',
            '[{ kind = "postgres", dsn = "postgresql://h/db", query = "SELECT 1", '
            'listen = "jobs" }, { kind = "redis-stream", url = "redis://q", stream = "s", '
            'group = "g", configure_notifications = true }, '
            '{ kind = "redis-list", url = "redis://q", key = "jobs" }]',
        )
    )
    (endpoint,) = load_config(path)
    assert isinstance(endpoint.source, CombinedDemand)
    postgres, stream, redis_list = endpoint.source.sources
    assert isinstance(postgres, PostgresQuery) and postgres.listen == "jobs"
    assert isinstance(stream, RedisStream) and stream.configure_notifications
    assert isinstance(redis_list, RedisList) and not redis_list.configure_notifications
    assert all(part.can_push() for part in endpoint.source.sources)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


BASE = """\
[endpoints.e]
api_key_env = "NW_TEST_KEY_EMAILS"
sources = [{ kind = "command", command = "echo 1" }]
"""


@pytest.mark.parametrize(
    ("toml", "lines"),
    [
        ("", ["endpoints: no endpoint: add an [endpoints.NAME] table"]),
        (
            BASE + "[other]\n",
            ["other: unknown setting; the file holds [endpoints.NAME] tables"],
        ),
        (
            BASE.replace('api_key_env = "NW_TEST_KEY_EMAILS"', 'api_key = "sk-inline-77"'),
            [
                "endpoints.e.api_key: an inline secret is refused; set api_key_env to the name "
                "of an environment variable holding it"
            ],
        ),
        (
            BASE.replace('"NW_TEST_KEY_EMAILS"', '"NW_TEST_UNSET"'),
            ["endpoints.e.api_key_env: $NW_TEST_UNSET is not set"],
        ),
        (
            BASE.replace('api_key_env = "NW_TEST_KEY_EMAILS"\n', ""),
            [
                "endpoints.e.api_key_env: required: the name of the environment variable "
                "holding the API key"
            ],
        ),
        (
            BASE + 'engine_url = "ftp://x"\n',
            ["endpoints.e.engine_url: must be an http(s) URL, got 'ftp://x'"],
        ),
        (BASE + "min = -1\n", ["endpoints.e.min: must be an integer >= 0, got -1"]),
        (BASE + "max = 0\n", ["endpoints.e.max: must be an integer >= 1, got 0"]),
        (BASE + "max = 2.5\n", ["endpoints.e.max: must be an integer >= 1, got 2.5"]),
        (BASE + "min = 3\nmax = 2\n", ["endpoints.e.min: must not be greater than max (2), got 3"]),
        (
            BASE + "jobs_per_worker = true\n",
            ["endpoints.e.jobs_per_worker: must be an integer >= 1, got True"],
        ),
        (BASE + "poll = 0\n", ["endpoints.e.poll: must be a finite number of seconds > 0, got 0"]),
        (
            BASE + "poll = nan\n",
            ["endpoints.e.poll: must be a finite number of seconds > 0, got nan"],
        ),
        (
            BASE + "scale_down_delay = -1\n",
            ["endpoints.e.scale_down_delay: must be a finite number of seconds >= 0, got -1"],
        ),
        (
            BASE + 'duration = "long"\n',
            ["endpoints.e.duration: must be a finite number of seconds > 0, got 'long'"],
        ),
        (
            BASE + "demand_timeout = inf\n",
            ["endpoints.e.demand_timeout: must be a finite number of seconds > 0, got inf"],
        ),
        (
            BASE + "jobs-per-worker = 2\n",
            ["endpoints.e.jobs-per-worker: unknown setting; did you mean jobs_per_worker?"],
        ),
        (BASE + 'combine = "avg"\n', ["endpoints.e.combine: must be 'sum' or 'max', got 'avg'"]),
        (
            BASE.replace('sources = [{ kind = "command", command = "echo 1" }]', "sources = []"),
            ["endpoints.e.sources: at least one source is required ([[endpoints.NAME.sources]])"],
        ),
        (
            BASE.replace('kind = "command"', 'kind = "kafka"'),
            [
                "endpoints.e.sources[0].kind: must be one of redis-list, redis-stream, "
                "nats-consumer, redis-queue, http-json, prometheus, sqs, rabbitmq, postgres, "
                "command; got 'kafka'"
            ],
        ),
        (
            BASE.replace('command = "echo 1"', 'cmd = "echo 1"'),
            [
                "endpoints.e.sources[0].cmd: unknown setting; did you mean command?",
                "endpoints.e.sources[0].command: required",
            ],
        ),
        (
            BASE.replace('command = "echo 1"', "command = 1"),
            ["endpoints.e.sources[0].command: must be a str, got 1"],
        ),
        (
            BASE.replace(
                '{ kind = "command", command = "echo 1" }',
                '{ kind = "redis-list", url = "http://:hunter2@q", key = "jobs" }',
            ),
            [
                "endpoints.e.sources[0].url: 'http://:***@q': the URL scheme must be one of "
                "redis, rediss, unix"
            ],
        ),
        (
            BASE.replace(
                '{ kind = "command", command = "echo 1" }',
                '{ kind = "redis-list", url = "redis://q", url_env = "X", key = "jobs" }',
            ),
            ["endpoints.e.sources[0].url: set url or url_env, not both"],
        ),
        (
            BASE.replace(
                '{ kind = "command", command = "echo 1" }',
                '{ kind = "prometheus", url = "http://p", query = "up", password = "pw" }',
            ),
            [
                "endpoints.e.sources[0].password: an inline secret is refused; set "
                "password_env to the name of an environment variable holding it"
            ],
        ),
        (
            BASE.replace(
                '{ kind = "command", command = "echo 1" }',
                '{ kind = "prometheus", url = "http://p", query = "up", '
                'token_env = "NW_TEST_TOKEN", user_env = "NW_TEST_TOKEN" }',
            ),
            ["endpoints.e.sources[0].token_env: set token_env or user_env, not both"],
        ),
        (
            BASE.replace(
                '{ kind = "command", command = "echo 1" }',
                '{ kind = "redis-list", url = "redis://q", key = "jobs", '
                'configure_notifications = "yes" }',
            ),
            ["endpoints.e.sources[0].configure_notifications: must be a bool, got 'yes'"],
        ),
        (
            BASE.replace(
                '{ kind = "command", command = "echo 1" }',
                '{ kind = "postgres", dsn = "postgresql://h/db", query = "SELECT 1", listen = 1 }',
            ),
            ["endpoints.e.sources[0].listen: must be a str, got 1"],
        ),
        (
            BASE + '[endpoints.e.lease]\nname = "l"\n',
            ["endpoints.e.lease.url: required"],
        ),
        (
            BASE + '[endpoints.e.lease]\nurl = "redis://q"\nname = "l"\nttl = 4\nrenew = 2\n',
            ["endpoints.e.lease.ttl: must be more than twice renew (4 s), got 4"],
        ),
        (
            BASE
            + '[endpoints.e.lease]\nurl = "redis://q"\nname = "l"\n'
            + BASE.replace("endpoints.e", "endpoints.f")
            + '[endpoints.f.lease]\nurl = "redis://q"\nname = "l"\n',
            ["endpoints.f.lease.name: the same lease as endpoints.e"],
        ),
        (
            # Every problem of the file at once, in the file's order.
            BASE + "max = 0\n" + BASE.replace("endpoints.e", "endpoints.f") + "poll = -1\n",
            [
                "endpoints.e.max: must be an integer >= 1, got 0",
                "endpoints.f.poll: must be a finite number of seconds > 0, got -1",
            ],
        ),
        ("[endpoints.e\n", None),
    ],
)
def test_every_problem_is_one_line_naming_the_setting(
    toml: str,
    lines: list[str] | None,
    env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "autoscale.toml"
    err = check_refuses(path, toml, capsys)
    if lines is None:  # not TOML: one line with the parser's reason
        assert re.fullmatch(rf"{re.escape(str(path))}: not valid TOML: .*\(at line 1.*\)\n", err)
    else:
        assert err == "".join(f"{path}: {line}\n" for line in lines)
    assert "hunter2" not in err and "sk-inline-77" not in err


def check_refuses(path: Path, toml: str, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``--config PATH --check`` prints on stderr for ``toml`` written to ``path``:
    it must exit 2 with nothing on stdout, and :func:`load_config` refuse the file too."""
    path.write_text(toml)
    assert main(["--config", str(path), "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    with pytest.raises(ConfigFileError):
        load_config(path)
    return captured.err


def test_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.toml"
    assert main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: cannot read it: No such file or directory\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "x.toml", "--endpoint", "ep"], "--config excludes --endpoint: set them"),
        (
            ["--config", "x.toml", "--max", "3", "--redis-list", "redis://q", "k"],
            "--config excludes --max, --redis-list: set them in the file",
        ),
        (
            ["--endpoint", "ep", "--demand-command", "echo 1", "--check"],
            "--check goes with --config",
        ),
        (["--demand-command", "echo 1"], "the following arguments are required: --endpoint"),
    ],
)
def test_config_excludes_the_options_of_one_endpoint(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert message in usage_error(argv, capsys, monkeypatch)


def test_the_docs_example_passes_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    page = (REPO / "docs" / "scaling.md").read_text()
    section = page.split("## One autoscaler for all your endpoints", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    for variable in sorted(set(re.findall(r'_env = "(\w+)"', example))):
        value = f"value-of-{variable.lower()}"
        monkeypatch.setenv(variable, f"redis://:{value}@queue" if "URL" in variable else value)
    path = tmp_path / "autoscale.toml"
    path.write_text(example)
    assert main(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nendpoint '") + out.startswith("endpoint '") >= 2
    assert "value-of-" not in out


# -- end to end: several endpoints in one process ------------------------------------------


async def test_three_endpoints_from_one_file(
    redis_server: ServerProcess,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``alpha`` = jobs + retry (sum), ``beta`` = one list, ``gamma`` = a Redis that is down."""
    workers = {i: await start_vast_worker(start_worker, vast_engine, i) for i in (1, 2, 3)}
    assert vast_engine.url is not None
    monkeypatch.setenv("NW_TEST_KEY_ALPHA", KEY)
    monkeypatch.setenv("NW_TEST_KEY_BETA", KEY)
    down = f"redis://:hunter2@127.0.0.1:{closed_port()}"
    config = tmp_path / "autoscale.toml"
    policy = f'engine_url = "{vast_engine.url}"\npoll = 0.2\nscale_down_delay = 1\n'
    config.write_text(
        f"""
[endpoints.alpha]
api_key_env = "NW_TEST_KEY_ALPHA"
{policy}
sources = [
  {{ kind = "redis-list", url = "{redis_server.url}", key = "alpha" }},
  {{ kind = "redis-list", url = "{redis_server.url}", key = "alpha:retry" }},
]

[endpoints.beta]
api_key_env = "NW_TEST_KEY_BETA"
{policy}
sources = [{{ kind = "redis-list", url = "{redis_server.url}", key = "beta" }}]

[endpoints.gamma]
api_key_env = "NW_TEST_KEY_BETA"
{policy}
sources = [{{ kind = "redis-list", url = "{down}", key = "gamma" }}]
"""
    )
    cli = await run_autoscale("--config", str(config), "--metrics-port", "0", endpoint=None)
    started = await cli.wait_events("started", 3)
    assert [e["endpoint"] for e in started] == ["alpha", "beta", "gamma"]
    assert started[0]["source"].startswith("sum of (redis list 'alpha' at ")
    client = redis.Redis.from_url(redis_server.url)
    try:
        await trio.to_thread.run_sync(client.lpush, "alpha", "1")
        await trio.to_thread.run_sync(client.lpush, "alpha:retry", "2")
        await trio.to_thread.run_sync(client.lpush, "beta", "3")

        def held(endpoint: str) -> list[str]:
            return [
                e["worker_url"]
                for e in cli.of_kind("reservation_started")
                if e["endpoint"] == endpoint
            ]

        # alpha: 1 + 1 jobs -> 2 workers; beta: 1 job -> 1 worker.
        await cli.wait_until(lambda: len(held("alpha")) == 2 and len(held("beta")) == 1)
        assert set(held("alpha") + held("beta")) == {w.public_url for w in workers.values()}
        await wait_engine(vast_engine, {1: "busy", 2: "busy", 3: "busy"})
        # gamma's Redis is down: its own source_error, the others unaffected.
        (error,) = await cli.wait_events("source_error")
        assert error["endpoint"] == "gamma" and "redis://:***@127.0.0.1:" in error["error"]
        assert all("endpoint" in e for e in cli.events if e["kind"] != "metrics")
        await cli.wait_until(
            lambda: any(e["endpoint"] == "alpha" and e["held"] == 2 for e in cli.of_kind("state"))
        )
        metrics = await cli.metrics()
        assert metrics['nullworker_autoscale_demand{endpoint="alpha"}'] == 2
        assert metrics['nullworker_autoscale_reservations_held{endpoint="alpha"}'] == 2
        assert metrics['nullworker_autoscale_demand{endpoint="beta"}'] == 1
        assert metrics['nullworker_autoscale_source_up{endpoint="gamma"}'] == 0
        assert metrics['nullworker_autoscale_source_up{endpoint="beta"}'] == 1

        # The retry queue drains: alpha goes down to 1 after its delay; beta keeps its one.
        await trio.to_thread.run_sync(client.delete, "alpha:retry")
        (ended,) = await cli.wait_events("reservation_ended")
        assert ended["endpoint"] == "alpha" and ended["cause"] == "scale_down"
        metrics = await cli.metrics()
        assert metrics['nullworker_autoscale_reservations_held{endpoint="alpha"}'] == 1
        assert metrics['nullworker_autoscale_reservations_held{endpoint="beta"}'] == 1
    finally:
        client.close()
    assert await cli.stop(signal.SIGINT) == 130, cli.err
    last = cli.events[-1]
    assert last["kind"] == "stopped" and last["released"] == 2
    await wait_engine(vast_engine, {1: "idle", 2: "idle", 3: "idle"})
    assert KEY not in cli.out + cli.err and "hunter2" not in cli.out + cli.err


async def test_text_lines_say_whose_they_are(
    run_autoscale: RunAutoscale, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NW_TEST_KEY_ALPHA", KEY)
    engine = f"http://127.0.0.1:{closed_port()}"
    config = tmp_path / "autoscale.toml"
    config.write_text(
        "".join(
            f'[endpoints.{name}]\napi_key_env = "NW_TEST_KEY_ALPHA"\nengine_url = "{engine}"\n'
            f'poll = 0.2\nsources = [{{ kind = "command", command = "echo 0" }}]\n'
            for name in ("alpha", "beta")
        )
    )
    cli = await run_autoscale("--config", str(config), json_lines=False, endpoint=None)
    await cli.wait_until(lambda: cli.out.count("demand 0, target 0") >= 2)
    assert await cli.stop(signal.SIGTERM) == 143, cli.err
    lines = [line.split(" ", 1)[1] for line in cli.out.splitlines()]  # without the time
    assert lines[0].startswith("[alpha] autoscaling endpoint 'alpha' on command 'echo 0': ")
    assert lines[1].startswith("[beta] autoscaling endpoint 'beta' on command 'echo 0': ")
    assert "[alpha] demand 0, target 0: 0 held, 0 waiting" in lines
    assert "[beta] demand 0, target 0: 0 held, 0 waiting" in lines
    assert lines[-1] == "interrupted: released 0 worker(s)"
