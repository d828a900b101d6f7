"""The composition root: bind, build the app, serve it with Hypercorn's HTTP/1.1 stack.

:func:`serve` follows the ``trio.serve_tcp`` convention: run it in a nursery with
``await nursery.start(serve, config)`` and it returns a :class:`ServeInfo` once the
sockets listen; cancel the surrounding scope (or fire ``shutdown_trigger``) to stop.

The listening sockets are made here rather than by Hypercorn so that

* a port in use fails at once, before any background work starts, with a clear error;
* port 0 works: the bound port is known before the app (and its engine reports, whose
  ``url`` must be the real one) is created;
* accepted connections inherit kernel TCP keepalive from the listener, so a client
  that vanished without a FIN frees the slot in seconds rather than the Linux default
  of two hours.

Connections are handled by :mod:`nullworker.worker.http_server`, which hardens Hypercorn's
per-connection server for a port that anyone on the internet can reach.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app

from ..errors import ConfigError, StartupFailed
from .app import create_app
from .config import WorkerConfig
from .http_server import (
    ConnectionLimits,
    connection_limits,
    listen,
    raise_nofile_limit,
    serve_http,
)
from .runtime import Worker

__all__ = ["ServeInfo", "serve"]

log = logging.getLogger("nullworker")


@dataclass(frozen=True)
class ServeInfo:
    """What :func:`serve` hands to ``task_status.started()``."""

    #: Base URL of the main port as bound (``http://127.0.0.1:43121``).
    url: str
    #: Base URL of the control listener, or ``None`` when it is off.
    control_url: str | None
    #: The URL reported to the engine (what clients are routed to).
    public_url: str | None
    #: The running worker (slot, readiness event, status) for embedding programs.
    worker: Worker


def _hypercorn_config(config: WorkerConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("nullworker.hypercorn")
    hc.graceful_timeout = config.graceful_timeout_s
    if config.use_ssl:
        hc.certfile = config.ssl_certfile
        hc.keyfile = config.ssl_keyfile
    return hc


def _check_tls(config: WorkerConfig) -> None:
    if not config.use_ssl:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"USE_SSL=true but the certificate {config.ssl_certfile} / key {config.ssl_keyfile} "
            f"cannot be loaded: {exc}"
        ) from None


def _bound_config(config: WorkerConfig, sock: socket.socket) -> WorkerConfig:
    port = sock.getsockname()[1]
    if config.port == port:
        return config
    changes: dict[str, object] = {"port": port}
    if config.reporting and (config.public_url is None or config.public_url.endswith(":0")):
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        scheme = "https" if config.use_ssl else "http"
        changes["public_url"] = f"{scheme}://{host}:{port}"
    return config.replace(**changes)


async def serve(
    config: WorkerConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    started_at: float | None = None,
    task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the worker until cancelled or until ``shutdown_trigger`` returns.

    Args:
      config: the worker's settings. ``port=0`` binds an ephemeral port; the real one
        is in the :class:`ServeInfo` passed to ``task_status.started()``.
      shutdown_trigger: an async callable; when it returns, the worker ends every
        held reservation with the ``shutdown`` outcome (holders get a 503 they can
        read) and stops within ``graceful_timeout_s``.
      started_at: ``time.monotonic()`` at process start, for the reported ``loadtime``.

    Raises:
      StartupFailed: the main or the control port cannot be bound (in use,
        permission), or another process serves the same port (an :class:`OSError`).
      ConfigError: TLS files unusable, or ``lock_dir`` unusable.
      WorkerFailed: the background work (engine reporter, readiness, control
        listener) failed after start-up; the worker stopped after reporting it.

    Resource handling: the listening socket, the control listener, the engine reporter
    and its HTTP client all live inside this call and are closed when it returns.
    Cancelling it cancels held reservations (outcome ``cancelled``), which are still
    reported to the engine under a short shielded deadline.
    """
    _check_tls(config)
    try:
        sock = listen(
            config.host,
            config.port,
            keepalive=(config.tcp_keepidle_s, config.tcp_keepintvl_s, config.tcp_keepcnt),
        )
    except OSError as exc:
        raise StartupFailed(f"main port (WORKER_PORT): {exc.strerror or exc}") from None
    log.info("file descriptor limit: %d", raise_nofile_limit())
    try:
        config = _bound_config(config, sock)
        worker = Worker(config, started_at=started_at)
        app = create_app(worker=worker)
        hc = _hypercorn_config(config)
        sockets = Sockets([sock], [], []) if config.use_ssl else Sockets([], [sock], [])

        worker.on_fatal = lambda: None  # serve() stops below, through the trigger

        async def _trigger() -> None:
            async with trio.open_nursery() as race:

                async def first(wait: Callable[[], Awaitable[object]]) -> None:
                    await wait()
                    race.cancel_scope.cancel()

                race.start_soon(first, worker.failed.wait)
                if shutdown_trigger is not None:
                    race.start_soon(first, shutdown_trigger)
            # Release holders before Hypercorn starts its graceful wait, so they are
            # answered (503 shutdown) instead of being cut off at the deadline.
            worker.begin_shutdown()

        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    _worker_serve, app, hc, sockets, _trigger, connection_limits(config)
                )
                task_status.started(
                    ServeInfo(
                        url=binds[0],
                        control_url=worker.control_url,
                        public_url=config.public_url,
                        worker=worker,
                    )
                )
        except BaseException:
            # Hypercorn reports a failed start as "Lifespan failure in startup" around
            # the message; the caller gets the worker's own error, which says what failed.
            if worker.startup_failure is not None:
                raise worker.startup_failure from None
            raise
        if worker.failure is not None:
            raise worker.failure
    finally:
        sock.close()


async def _worker_serve(
    app: object,
    hc: HypercornConfig,
    sockets: Sockets,
    trigger: Callable[[], Awaitable[None]],
    limits: ConnectionLimits,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    await serve_http(
        wrap_app(app, hc.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
        hc,
        sockets,
        limits=limits,
        shutdown_trigger=trigger,
        task_status=task_status,
    )
