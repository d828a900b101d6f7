"""Shared fixtures: real servers on 127.0.0.1 ephemeral ports, real RSA keys.

Servers are started with ``await nursery.start(...)`` in pytest-trio's ``nursery``
fixture, which is cancelled after the test: nothing has to be stopped by hand.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from nullworker.vast.signing import generate_private_key, sign_url
from nullworker.worker.config import WorkerConfig
from nullworker.worker.runtime import Worker
from nullworker.worker.server import ServeInfo, serve

StartWorker = Callable[..., Awaitable[ServeInfo]]


def runtime(info: ServeInfo) -> Worker:
    """The runtime behind a worker that ``serve()`` runs, for white-box checks.

    :class:`ServeInfo` keeps it private: a program that embeds the worker observes it
    through ``info.status()`` (the ``GET /status`` body) and ``info.wait_ready()``. Tests
    that must reach inside (an observer on the slot, a reporter's statistics, a hold's
    outcome the instant it ends) do it here, in one place.
    """
    return info._runtime


# Nothing in the suite may fetch Vast's root certificate from the internet: a reservation
# to an https:// worker would (nullworker.client.transport). The tests that exercise the
# fetch point it at a loopback server; child processes inherit the empty setting.
os.environ["NULLWORKER_VAST_ROOT_CERT_URL"] = ""

#: Every field of ``/worker_status/`` (docs/protocol.md §6.2 plus 1.9.1's ``disk_usage``)
#: and the JSON type the official worker sends.
STATUS_FIELDS = {
    "id": int,
    "mtoken": str,
    "version": str,
    "loadtime": float,
    "new_load": float,
    "cur_load": float,
    "rej_load": float,
    "max_perf": float,
    "cur_perf": float,
    "error_msg": str,
    "num_requests_working": int,
    "num_requests_recieved": int,
    "additional_disk_usage": float,
    "disk_usage": float,
    "working_request_idxs": list,
    "cur_capacity": int,
    "max_capacity": int,
    "url": str,
}


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return generate_private_key()


@pytest.fixture(scope="session", autouse=True)
def _lock_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The workers' per-port start locks go to this run's temporary directory, not the
    system temp dir: worker processes the tests start inherit ``NULLWORKER_LOCK_DIR``."""
    path = tmp_path_factory.mktemp("locks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NULLWORKER_LOCK_DIR", str(path))
        yield path


@pytest.fixture(autouse=True)
def _logging_record_switches() -> Iterator[None]:
    """Restore what ``nullworker.logs.configure()`` switches off in records (caller,
    thread, process) after each test: a command run in-process calls it, and pytest's
    own log lines print the caller's file and line."""
    saved = (
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
        logging._srcfile,
    )
    yield
    (
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
        logging._srcfile,
    ) = saved


@pytest.fixture
def start_worker(nursery: trio.Nursery, tmp_path: Path) -> StartWorker:
    """Start a real worker (Hypercorn on 127.0.0.1:0) with ``WorkerConfig(**overrides)``."""

    async def start(**overrides: Any) -> ServeInfo:
        settings: dict[str, Any] = {
            "port": 0,
            "control_port": 0,
            "graceful_timeout_s": 1.0,
            "lock_dir": str(tmp_path),
        }
        settings.update(overrides)
        info: ServeInfo = await nursery.start(serve, WorkerConfig(**settings))
        with trio.fail_after(10):
            await info.wait_ready()
        return info

    return start


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=30.0)) as client:
        yield client


def envelope(
    url: str,
    *,
    key: rsa.RSAPrivateKey | None = None,
    payload: dict[str, Any] | None = None,
    request_idx: int = 1,
    reqnum: int = 1,
    **auth_overrides: Any,
) -> dict[str, Any]:
    """A Vast envelope as a client sends it, signed with ``key`` when given."""
    auth = {
        "signature": sign_url(key, url) if key is not None else "",
        "url": url,
        "cost": 100,
        "endpoint": "test",
        "reqnum": reqnum,
        "request_idx": request_idx,
    }
    auth.update(auth_overrides)
    return {"auth_data": auth, "payload": payload if payload is not None else {}}


def body(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


@pytest.fixture(autouse=True)
def _quiet_http_logs() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)


@pytest.fixture
async def vast_engine(nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey) -> Any:
    """The local engine emulator (nullworker.engine) on 127.0.0.1:0, signing with ``rsa_key``."""
    from functools import partial

    from nullworker.engine import Engine, serve_engine

    engine = Engine(private_key=rsa_key, master_token="tok")
    await nursery.start(partial(serve_engine, engine))
    return engine


def vast_settings(engine: Any, **overrides: Any) -> dict[str, Any]:
    """WorkerConfig settings for a worker in Vast mode that reports to ``engine``."""
    settings: dict[str, Any] = {
        "report_addrs": (engine.url,),
        "container_id": 7,
        "master_token": "tok",
        "unsecured": False,
        # The engine is torn down with the worker; don't let the final flush linger.
        "engine_retry_s": 0.05,
        "engine_timeout_s": 1.0,
        # Reports paced faster than the default (a burst of 2, then 1 a second), so a
        # test sees a short reservation's changes while they last, on a busy machine
        # too. The pacing itself is tested with its defaults in test_reporter.py.
        "report_interval_s": 0.05,
    }
    settings.update(overrides)
    return settings
