"""Shared fixtures: real servers on 127.0.0.1 ephemeral ports, real RSA keys.

Servers are started with ``await nursery.start(...)`` in pytest-trio's ``nursery``
fixture, which is cancelled after the test: nothing has to be stopped by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app

from nullworker.vast.signing import generate_private_key, sign_url
from nullworker.worker.app import create_main_app, serve_control
from nullworker.worker.config import WorkerConfig
from nullworker.worker.http_server import connection_limits, serve_http
from nullworker.worker.runtime import Worker
from nullworker.worker.server import ServeInfo, serve

from .helpers import MemoryListener, memory_http

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


@dataclass
class MemoryWorker:
    """A real worker (its app and HTTP server) served over in-memory streams.

    ``info.url`` is a placeholder (no socket is bound): ``http`` sends every request to
    this worker whatever the host, and :meth:`connect` opens a raw connection to it.
    """

    info: ServeInfo
    http: httpx.AsyncClient
    listener: MemoryListener

    async def connect(self) -> trio.abc.Stream:
        return await self.listener.connect()

    async def exchange(self, data: bytes, *, then: bytes = b"", within_s: float = 10) -> bytes:
        """Send ``data`` (and ``then``, after the first answer bytes); read to EOF."""
        stream = await self.connect()
        received = b""
        try:
            with trio.fail_after(within_s):
                await stream.send_all(data)
                if then:
                    received = await stream.receive_some(65536)
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(then)
                while chunk := await stream.receive_some(65536):
                    received += chunk
        except trio.BrokenResourceError:
            pass  # the server closed while we were sending: a close too
        finally:
            await trio.aclose_forcefully(stream)
        return received


StartMemoryWorker = Callable[..., Awaitable[MemoryWorker]]

#: The host of a memory worker's URL: no socket, so any name does.
MEMORY_URL = "http://memory-worker"


@pytest.fixture
def start_memory_worker(nursery: trio.Nursery, tmp_path: Path) -> StartMemoryWorker:
    """Start the worker's real app and HTTP server on in-memory streams, with
    ``WorkerConfig(**overrides)`` (no control listener unless asked for).

    What ``nullworker serve`` binds to a socket (the app, Hypercorn's settings, the
    connection limits) is the same; use it for the cases about how bytes are parsed
    and answered, and :func:`start_worker` where the socket matters.
    """

    async def start(**overrides: Any) -> MemoryWorker:
        settings: dict[str, Any] = {
            "port": 0,
            "control_port": None,
            "graceful_timeout_s": 1.0,
            "lock_dir": str(tmp_path),
        }
        settings.update(overrides)
        config = WorkerConfig(**settings)
        worker = Worker(config)
        # As serve() composes it: the runtime, the control listener when asked for,
        # then the main app on the HTTP server (here, on the in-memory listener).
        await nursery.start(worker.run)
        control_url: str | None = None
        if config.control_port is not None:
            control_url = await nursery.start(serve_control, worker)
        hc = HypercornConfig()
        hc.accesslog = None
        hc.errorlog = logging.getLogger("nullworker.hypercorn")
        hc.graceful_timeout = config.graceful_timeout_s
        listener = MemoryListener()
        await nursery.start(
            partial(
                serve_http,
                wrap_app(create_main_app(worker), hc.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                hc,
                Sockets([], [], []),
                limits=connection_limits(config),
                listeners=[listener],
            )
        )
        with trio.fail_after(10):
            await worker.ready.wait()
        http = await nursery_client(nursery, listener)
        info = ServeInfo(
            url=MEMORY_URL,
            control_url=control_url,
            public_url=config.public_url,
            _runtime=worker,
        )
        return MemoryWorker(info=info, http=http, listener=listener)

    return start


async def nursery_client(nursery: trio.Nursery, listener: MemoryListener) -> httpx.AsyncClient:
    """An in-memory httpx client (:func:`memory_http`) open until ``nursery`` ends."""
    ready: trio.Event = trio.Event()
    box: list[httpx.AsyncClient] = []

    async def hold() -> None:
        async with memory_http(listener, timeout=httpx.Timeout(10.0, read=30.0)) as client:
            box.append(client)
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(hold)
    await ready.wait()
    return box[0]


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
