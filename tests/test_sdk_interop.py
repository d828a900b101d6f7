"""Interoperability with the official Vast SDK (``vastai`` 1.9.1).

A null worker built on the official SDK (``tests/sdk_worker/worker.py``) runs as a
child process, configured by the Vast environment contract to report to our engine
emulator. The tests check, over real sockets:

1. our engine sees it become ready from the SDK's own ``/worker_status/`` reports and
   routes to it, and the SDK's signature check accepts our engine's signature;
2. our client holds a reservation on it (unwrapping the SDK's ``{"result": ...}``
   answer) and the outcome is ``duration_elapsed``; the SDK reports the request to our
   engine as a Success through its 1.9.1 ``/delete_requests/`` body;
3. the SDK refuses a signature made with another key (401, our ``ReservationFailed``),
   and our client's early exit (dropping the connection) ends the SDK's hold, which it
   reports as Cancelled.

The SDK is installed once per machine and Python version into a virtual environment
kept in pytest's cache directory (``pytest --cache-clear`` removes it; with the cache
plugin off, in the system temporary directory) by ``tests/sdk_worker/install.py``, which
the README's test command runs before pytest. If it cannot be installed for want of a
network to PyPI, these tests are skipped and say why, except in CI (``CI`` set), where
that is a failure; any other install failure always fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from nullworker.client import hold, reserve
from nullworker.engine import Engine, serve_engine
from nullworker.errors import ReservationFailed

from .helpers import PortTaken, free_port, port_in_use, start_on_free_port, stop_process
from .sdk_worker import install

API_KEY = "interop-key"
MASTER_TOKEN = "interop-master-token"


@pytest.fixture(scope="session")
def sdk_python(request: pytest.FixtureRequest) -> Path:
    """The Python of a virtual environment with ``vastai==1.9.1`` installed: built by
    ``tests/sdk_worker/install.py`` (ahead of the tests by the README's test command, or
    here on first use), in pytest's cache directory."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        venv = Path(cache.mkdir(install.VENV_NAME))
    else:
        venv = Path(tempfile.gettempdir()) / f"nullworker-{install.VENV_NAME}"
    try:
        return install.ensure_sdk(venv)
    except install.InstallError as error:
        install.fail_or_skip(error)


@dataclass
class SdkWorker:
    container_id: int
    url: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
async def engine(nursery: trio.Nursery) -> Engine:
    e = Engine(master_token=MASTER_TOKEN)
    await nursery.start(partial(serve_engine, e))
    return e


@pytest.fixture
async def sdk_worker(sdk_python: Path, engine: Engine, tmp_path: Path) -> AsyncIterator[SdkWorker]:
    """The official-SDK null worker, reporting to ``engine``; ready when yielded.

    The SDK must be given port numbers: they come from :func:`free_port`, and the start
    is tried again on fresh ones when the SDK exits saying a port was taken meanwhile.
    """
    assert engine.url is not None
    engine_url = engine.url
    container_id = 77
    workdir = tmp_path / "sdk-worker"  # the SDK writes .has_benchmark into its CWD
    workdir.mkdir()
    log_path = tmp_path / "sdk-worker.log"

    async def start(port: int) -> tuple[trio.Process, SdkWorker]:
        http_port = free_port()
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("VAST_", "REPORT_ADDR", "CONTAINER_ID", "WORKER_"))
        }
        env.update(
            REPORT_ADDR=engine_url,
            CONTAINER_ID=str(container_id),
            WORKER_PORT=str(port),
            WORKER_HTTP_PORT=str(http_port),
            PUBLIC_IPADDR="127.0.0.1",
            MASTER_TOKEN=MASTER_TOKEN,
            UNSECURED="false",
            USE_SSL="false",
            SDK_WORKER_HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
        )
        env[f"VAST_TCP_PORT_{port}"] = str(port)
        with log_path.open("wb") as log:
            process = await trio.lowlevel.open_process(
                [str(sdk_python), str(install.WORKER_SCRIPT)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = SdkWorker(container_id, f"http://127.0.0.1:{port}", log_path)
        try:
            with trio.move_on_after(20):
                while engine.worker_state(container_id) != "idle":
                    if process.returncode is not None:
                        if port_in_use(worker.log_tail()):
                            raise PortTaken(worker.log_tail())
                        break
                    await trio.sleep(0.05)
            if engine.worker_state(container_id) != "idle":
                pytest.fail(
                    f"the SDK worker never reported ready; state "
                    f"{engine.worker_state(container_id)}; exit {process.returncode}; log:\n"
                    f"{worker.log_tail()}"
                )
        except BaseException:
            await stop_process(process, within_s=5)
            raise
        return process, worker

    process, worker = await start_on_free_port(start)
    try:
        yield worker
    finally:
        await stop_process(process, within_s=5)


def _finished(engine: Engine, request_idx: int | None) -> set[str | None]:
    """Statuses the worker reported for ``request_idx`` (the impostor engine of one test
    issues the same small numbers, hence a set)."""
    return {f.status for f in engine.finished if f.request_idx == request_idx}


async def test_engine_routes_to_the_sdk_worker_and_the_client_holds_it(
    engine: Engine, sdk_worker: SdkWorker
) -> None:
    # (1) Ready from the SDK's own reports, in the 1.9.1 shape, with our master token.
    record = engine.workers[sdk_worker.container_id]
    assert record.url == sdk_worker.url
    assert record.max_perf == 100.0 and record.loadtime > 0 and record.error_msg == ""
    report = next(
        r.body for r in engine.worker_status_reports if r.body["id"] == sdk_worker.container_id
    )
    assert report["mtoken"] == MASTER_TOKEN and "disk_usage" in report

    # (2) Our client, routed by our engine, holds it; the SDK checked our signature
    # (UNSECURED=false) and answered in its remote-function shape.
    assert engine.url is not None
    r = await hold("ep", duration_s=1, api_key=API_KEY, engine_url=engine.url)
    assert r.worker_url == sdk_worker.url, sdk_worker.log_tail()
    assert r.status == 200, sdk_worker.log_tail()
    assert r.outcome == "duration_elapsed"
    assert r.body["released"] == "duration_elapsed" and r.body["duration"] == 1.0
    assert 0.9 <= r.held_s < 3
    assert [x.worker_id for x in engine.ready_replies] == [sdk_worker.container_id]
    await engine.wait_for(lambda e: "Success" in _finished(e, r.request_idx), timeout=5)
    body = next(
        b.body
        for b in engine.delete_requests_reports
        if any(x["request_idx"] == r.request_idx for x in b.body.get("requests", []))
    )
    assert body["worker_id"] == sdk_worker.container_id and body["mtoken"] == MASTER_TOKEN


async def test_sdk_worker_checks_signatures_and_sees_our_disconnect(
    engine: Engine, sdk_worker: SdkWorker, nursery: trio.Nursery
) -> None:
    # (3a) An engine with another key: the SDK refuses its signature.
    impostor = Engine()
    await nursery.start(partial(serve_engine, impostor))
    impostor.worker_status(
        next(r.body for r in engine.worker_status_reports if r.body["loadtime"] > 0)
    )
    assert impostor.url is not None
    with pytest.raises(ReservationFailed) as refused:
        await hold("ep", duration_s=1, api_key=API_KEY, engine_url=impostor.url)
    assert refused.value.status == 401, sdk_worker.log_tail()

    # (3b) Leaving the block drops the connection; the SDK cancels the hold at once.
    assert engine.url is not None
    with trio.fail_after(10):
        async with reserve("ep", duration_s=60, api_key=API_KEY, engine_url=engine.url) as r:
            assert r.worker_url == sdk_worker.url
            await engine.wait_for(
                lambda e: r.request_idx in e.workers[sdk_worker.container_id].working_request_idxs,
                timeout=5,
            )
        await engine.wait_for(lambda e: "Cancelled" in _finished(e, r.request_idx), timeout=5)
    assert r.outcome == "client_released"
    statuses = [json.dumps(b.body) for b in engine.delete_requests_reports]
    assert any('"Rejected"' in s for s in statuses), "the 401 is reported as Rejected"
