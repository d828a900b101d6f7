"""Log output: the JSON format, ``configure()``, the worker's structured fields, and secrets.

The secrets test runs the real commands (``nullworker serve`` in Vast mode with a master
token, ``nullworker reserve`` with an API key, ``nullworker hold``) through a full
reservation against the local engine, in both formats, and greps everything they wrote.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from nullworker import logs
from nullworker.engine import Engine, serve_engine
from nullworker.vast.signing import generate_private_key
from nullworker.worker.config import WorkerConfig

from .conftest import StartWorker, runtime
from .helpers import closed_url, open_serve, reserved_port, stop_process, wait_until
from .test_http import reserve

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("nullworker.test").makeRecord(
        "nullworker.test", logging.INFO, __file__, 1, message, args or ("world",), None
    )
    for key, val in extra.items():
        setattr(record, key, val)
    return record


def test_json_lines_have_time_level_logger_message_and_the_extra_fields() -> None:
    line = logs.JsonFormatter().format(
        _record(reservation_id=3, request_idx=4242, outcome="duration_elapsed", held_s=1.5)
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert ISO_UTC.match(entry.pop("time")), line
    assert entry == {
        "level": "INFO",
        "logger": "nullworker.test",
        "message": "hello world",
        "reservation_id": 3,
        "request_idx": 4242,
        "outcome": "duration_elapsed",
        "held_s": 1.5,
    }


def test_json_lines_keep_tracebacks_and_odd_values_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    record.path = Path("/tmp/a")
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: bad\nthing" in entry["exc_info"]
    assert entry["path"] == "/tmp/a"  # str() of what JSON cannot hold


def test_resolve_format() -> None:
    assert logs.resolve_format(None, {}) == "text"
    assert logs.resolve_format(None, {"NULLWORKER_LOG_FORMAT": " JSON "}) == "json"
    assert logs.resolve_format("text", {"NULLWORKER_LOG_FORMAT": "json"}) == "text"
    with pytest.raises(ValueError, match="NULLWORKER_LOG_FORMAT"):
        logs.resolve_format(None, {"NULLWORKER_LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="log format"):
        logs.resolve_format("xml")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (configure() changes it)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def test_configure_replaces_its_own_handler_and_leaves_others(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # An earlier test that ran a command in-process may have left configure()'s own
    # handler behind: that one is configure()'s to replace, not one of the "others".
    others = [h for h in root_logger.handlers if not getattr(h, logs._OWN_HANDLER_ATTR, False)]
    first, second = io.StringIO(), io.StringIO()
    assert logs.configure("info", "text", stream=first) == "text"
    assert logs.configure("DEBUG", "json", stream=second) == "json"
    assert [h for h in root_logger.handlers if h not in others] != []
    assert len(root_logger.handlers) == len(others) + 1  # the first one was replaced
    assert root_logger.level == logging.DEBUG
    logging.getLogger("nullworker.test").debug("one %d", 1, extra={"job": "j"})
    assert first.getvalue() == ""
    entry = json.loads(second.getvalue())
    assert entry["message"] == "one 1" and entry["job"] == "j" and entry["level"] == "DEBUG"
    # A bad value in the environment is said once, and text is used.
    stream = io.StringIO()
    fmt = logs.configure("INFO", None, stream=stream, env={"NULLWORKER_LOG_FORMAT": "yaml"})
    assert fmt == "text"
    assert "NULLWORKER_LOG_FORMAT" in capsys.readouterr().err
    logging.getLogger("nullworker.test").info("plain")
    assert stream.getvalue().endswith("INFO nullworker.test: plain\n")


def test_configured_records_skip_the_caller_lookup_and_thread_ids(
    root_logger: logging.Logger,
) -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root_logger.addHandler(Keep())
    logging.getLogger("nullworker.test").info("cheap", extra={"reservation_id": 3})
    [record] = seen
    assert (record.lineno, record.thread, record.process) == (0, None, None)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "cheap" and entry["reservation_id"] == 3


def test_the_worker_reads_the_format_from_its_environment() -> None:
    assert WorkerConfig.from_env({}).log_format == "text"
    assert WorkerConfig.from_env({"NULLWORKER_LOG_FORMAT": "JSON"}).log_format == "json"
    assert WorkerConfig.from_env({}, log_format="json").log_format == "json"
    with pytest.raises(ValueError, match="NULLWORKER_LOG_FORMAT"):
        WorkerConfig.from_env({"NULLWORKER_LOG_FORMAT": "xml"})


async def test_reservation_and_local_hold_lines_carry_structured_fields(
    start_worker: StartWorker, http: httpx.AsyncClient, root_logger: logging.Logger
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    worker_log = logging.getLogger("nullworker")
    old_level = worker_log.level
    worker_log.setLevel(logging.INFO)
    worker_log.addHandler(handler)
    try:
        info = await start_worker()
        assert (await reserve(http, info, duration=0.05)).status_code == 200
        answer = await http.post(f"{info.control_url}/hold", json={"duration": 0, "label": "j"})
        assert answer.json()["released"] == "duration_elapsed"
        await wait_until(lambda: runtime(info).local_holds.count == 0)
    finally:
        worker_log.removeHandler(handler)
        worker_log.setLevel(old_level)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_event = {e.get("event"): e for e in entries if "event" in e}
    started = by_event["reservation_started"]
    ended = by_event["reservation_ended"]
    assert started["reservation_id"] == ended["reservation_id"]
    assert isinstance(ended["request_idx"], int)
    assert ended["outcome"] == "duration_elapsed"
    assert 0.05 <= ended["held_s"] < 5
    assert ended["duration_s"] == 0.05
    local = by_event["local_hold_ended"]
    assert local["label"] == "j" and local["outcome"] == "duration_elapsed"
    assert local["local_holds"] == 0 and "held_s" in local


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REPORT_ADDR", "CONTAINER_ID", "MASTER_TOKEN", "VAST_", "NULLWORKER"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_secret_in_either_format(
    fmt: str,
    nursery: trio.Nursery,
    rsa_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    root_logger: logging.Logger,
) -> None:
    master_token = "mtoken-" + secrets.token_hex(16)
    api_key = "apikey-" + secrets.token_hex(16)
    # The engine runs here; its own lines are captured in the same format.
    engine_lines = io.StringIO()
    handler = logging.StreamHandler(engine_lines)
    handler.setFormatter(logs.make_formatter("json" if fmt == "json" else "text"))
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    engine = Engine(private_key=rsa_key, api_key=api_key, master_token=master_token)
    await nursery.start(partial(serve_engine, engine))
    assert engine.url is not None

    port, control_port = reserved_port(), reserved_port()
    worker_log = tmp_path / "worker.log"
    worker_env = _env(
        REPORT_ADDR=engine.url,
        CONTAINER_ID="11",
        MASTER_TOKEN=master_token,
        WORKER_PORT=str(port),
        NULLWORKER_PUBLIC_URL=f"http://127.0.0.1:{port}",
        NULLWORKER_CONTROL_PORT=str(control_port),
        NULLWORKER_HOST="127.0.0.1",
        NULLWORKER_LOCK_DIR=str(tmp_path),
        NULLWORKER_LOG_LEVEL="DEBUG",
    )
    worker = await open_serve(worker_env, worker_log, "--log-format", fmt)
    try:
        await engine.wait_for(lambda e: 11 in e.workers and e.workers[11].ready, timeout=20)
        with trio.fail_after(30):
            client = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "nullworker",
                    "reserve",
                    "--engine-url",
                    engine.url,
                    "--endpoint",
                    "test",
                    "--duration",
                    "0.3",
                    "--log-format",
                    fmt,
                ],
                env=_env(VAST_API_KEY=api_key),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert client.returncode == 0, client.stderr
            held = await trio.run_process(
                [sys.executable, "-m", "nullworker", "hold", "--log-format", fmt, "--", "true"],
                env=_env(NULLWORKER_CONTROL_URL=f"http://127.0.0.1:{control_port}"),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert held.returncode == 0, held.stderr
        await engine.wait_for(lambda e: len(e.finished) == 1)
    finally:
        await stop_process(worker)
    assert worker.returncode == 0
    worker_text = worker_log.read_text()
    everything = "\n".join(
        [
            worker_text,
            client.stdout.decode(),
            client.stderr.decode(),
            held.stdout.decode(),
            held.stderr.decode(),
            engine_lines.getvalue(),
        ]
    )
    assert master_token not in everything
    assert api_key not in everything
    # The secrets were there to leak: the engine checked both.
    assert engine.workers[11].ready and engine.finished[0].status == "Success"

    lines = worker_text.splitlines()
    assert len(lines) > 5
    if fmt == "json":
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        ended = [e for e in entries if e.get("event") == "reservation_ended"]
        assert len(ended) == 1
        [entry] = ended
        assert entry["outcome"] == "duration_elapsed"
        assert entry["request_idx"] == engine.finished[0].request_idx
        assert entry["held_s"] >= 0.3 and ISO_UTC.match(entry["time"])
        assert any(e.get("event") == "local_hold_ended" for e in entries)
        # The client's own lines are objects of the same shape, not text.
        said = [json.loads(line) for line in client.stdout.decode().splitlines()]
        assert [e["event"] for e in said][-2:] == ["held", "ended"], said
        assert said[-2]["worker_url"].startswith("http://") and said[-2]["reservation"] == 1
        assert all(e["logger"] == "nullworker.reserve" and ISO_UTC.match(e["time"]) for e in said)
        assert said[-1]["message"].startswith("elapsed after")
        # So are the hold command's (on stderr: the command's stdout stays its own).
        assert held.stdout == b""
        hold_said = [json.loads(line) for line in held.stderr.decode().splitlines()]
        assert [e["event"] for e in hold_said] == ["held"], hold_said
        assert all(e["logger"] == "nullworker.hold" and ISO_UTC.match(e["time"]) for e in hold_said)
        assert hold_said[0]["label"] == "true" and hold_said[0]["hold_id"] >= 1
        assert hold_said[0]["control_url"] == f"http://127.0.0.1:{control_port}"
    else:
        assert not lines[0].startswith("{")
        assert any("ended: duration_elapsed" in line for line in lines)


async def test_the_master_token_never_leaves_the_worker_in_vast_mode(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey, tmp_path: Path, root_logger: logging.Logger
) -> None:
    """Start, reports, an engine address that is down, an engine that refuses the token,
    refused requests and a failed start, all at DEBUG: the token (and a valid route
    signature) is in no log line and no response body (the engine checked the token,
    so it was sent)."""
    from nullworker.vast.signing import sign_url

    token = "mtoken-" + secrets.token_hex(16)
    wrong_token = "mtoken-wrong-" + secrets.token_hex(16)
    engine_lines = io.StringIO()
    handler = logging.StreamHandler(engine_lines)
    handler.setFormatter(logs.make_formatter("text"))
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    engine = Engine(private_key=rsa_key, master_token=token)
    await nursery.start(partial(serve_engine, engine))
    assert engine.url is not None
    dead = closed_url()  # tried first, never answers

    def worker_env(container: int, port: int, mtoken: str) -> dict[str, str]:
        return _env(
            REPORT_ADDR=f"{dead},{engine.url}",
            CONTAINER_ID=str(container),
            MASTER_TOKEN=mtoken,
            WORKER_PORT=str(port),
            NULLWORKER_PUBLIC_URL=f"http://127.0.0.1:{port}",
            NULLWORKER_CONTROL_PORT=str(reserved_port()),
            NULLWORKER_HOST="127.0.0.1",
            NULLWORKER_LOCK_DIR=str(tmp_path),
            NULLWORKER_LOG_LEVEL="DEBUG",
        )

    async def start(name: str, env: dict[str, str]) -> trio.Process:
        return await open_serve(env, tmp_path / name)

    port = reserved_port()
    good_env = worker_env(21, port, token)
    good = await start("good.log", good_env)
    refused = await start("refused.log", worker_env(23, reserved_port(), wrong_token))
    bodies: list[str] = []
    try:
        await engine.wait_for(lambda e: 21 in e.workers and e.workers[21].ready, timeout=30)
        own = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=10) as http:

            async def post(path: str, **kwargs: object) -> httpx.Response:
                response = await http.post(f"{own}{path}", **kwargs)  # type: ignore[arg-type]
                bodies.append(response.text + str(response.headers))
                return response

            def signed(url: str, signature: str, idx: int) -> dict[str, object]:
                auth = {"signature": signature, "url": url, "cost": 1, "endpoint": "e"}
                return {"auth_data": auth | {"reqnum": idx, "request_idx": idx}, "payload": {}}

            forged = signed(own, sign_url(generate_private_key(), own), 1)
            assert (await post("/reserve", json=forged)).status_code == 401
            other = "http://127.0.0.1:9"
            assert (
                await post("/reserve", json=signed(other, sign_url(rsa_key, other), 2))
            ).status_code == 401
            assert (await post("/reserve", content=b"{")).status_code == 422
            for bearer in (wrong_token, token[:-1]):
                update = await post(
                    "/pyworker/update", headers={"Authorization": f"Bearer {bearer}"}
                )
                assert update.status_code == 401
            signature = sign_url(rsa_key, own)
            ok = signed(own, signature, 3) | {"payload": {"duration": 0}}
            assert (await post("/reserve", json=ok)).status_code == 200
            control = good_env["NULLWORKER_CONTROL_PORT"]
            for path in ("/status", "/metrics", "/health"):
                answer = await http.get(f"http://127.0.0.1:{control}{path}")
                bodies.append(answer.text)
        # The engine refuses the other worker's token (401): it logs the refusal.
        await engine.wait_for(lambda e: e.counters["worker_status_rejected"] >= 2, timeout=30)
        # A failed start (the port is taken) prints a line and tells the engine.
        with trio.fail_after(60):
            failed = await trio.run_process(
                [sys.executable, "-m", "nullworker", "serve"],
                env=good_env
                | {"CONTAINER_ID": "22", "NULLWORKER_CONTROL_PORT": str(reserved_port())},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert failed.returncode == 1
        await engine.wait_for(lambda e: 22 in e.workers and e.workers[22].error_msg, timeout=20)
    finally:
        await stop_process(refused)
        await stop_process(good)
    everything = "\n".join(
        [
            (tmp_path / "good.log").read_text(),
            (tmp_path / "refused.log").read_text(),
            failed.stdout.decode(),
            failed.stderr.decode(),
            engine_lines.getvalue(),
            *bodies,
        ]
    )
    assert "worker_status" in everything and "cannot listen" in everything  # the logs are there
    assert token not in everything
    assert wrong_token not in everything
    assert signature not in everything
    # The token was sent: the engine took the good worker's reports and its beacon.
    assert engine.workers[21].ready and "cannot listen" in engine.workers[22].error_msg


def test_an_envelope_repr_has_no_signature(rsa_key: rsa.RSAPrivateKey) -> None:
    from nullworker.vast.envelope import parse_envelope
    from nullworker.vast.signing import sign_url

    from .conftest import envelope

    url = "http://127.0.0.1:41234"
    signature = sign_url(rsa_key, url)
    parsed = parse_envelope(json.dumps(envelope(url, key=rsa_key, request_idx=5)))
    assert parsed.auth_data["signature"] == signature
    for shown in (repr(parsed), str(parsed), f"{parsed!r}"):
        assert signature not in shown
        assert "request_idx': 5" in shown and url in shown
