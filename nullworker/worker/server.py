"""The composition root: bind, start the runtime, serve the apps with Hypercorn's HTTP/1.1 stack.

:func:`serve` follows the ``trio.serve_tcp`` convention: run it in a nursery with
``await nursery.start(serve, config)`` and it returns a :class:`ServeInfo` once the
sockets listen; cancel the surrounding scope (or fire ``shutdown_trigger``) to stop.

It owns one nursery, and starts in it, in this order, with ``nursery.start``:

1. the runtime (:meth:`~nullworker.worker.runtime.Worker.run`: the port's lock, the
   engine reporter and its journal, readiness, the consumer health check, key refreshes);
2. the control listener (:func:`~nullworker.worker.app.serve_control`), when enabled;
3. the main port (:func:`~nullworker.worker.http_server.serve_http`).

An error in any of them cancels the others and propagates out of :func:`serve`; nothing
is signalled and no other task is watched for it. When ``shutdown_trigger`` returns, the
main port stops gracefully and then the nursery is cancelled, which ends the runtime
(its final report to the engine) and the control listener.

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
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app

from .._groups import only_leaf
from ..errors import ConfigError, StartupFailed, WorkerFailed
from .app import create_main_app, serve_control
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
    """What :func:`serve` hands to ``task_status.started()``: where the worker listens,
    and read-only views of its state.

    The runtime itself (the slot, the reporter) stays inside :func:`serve`: a program
    that embeds the worker observes it as an HTTP client would, through :meth:`status`
    (the body of the control listener's ``GET /status``) and :meth:`wait_ready`.
    """

    #: Base URL of the main port as bound (``http://127.0.0.1:43121``).
    url: str
    #: Base URL of the control listener, or ``None`` when it is off.
    control_url: str | None
    #: The URL reported to the engine (what clients are routed to).
    public_url: str | None
    #: The runtime, for white-box tests and benchmarks of this package only: not part
    #: of the public API, and not shown in the repr.
    _runtime: Worker = field(repr=False, compare=False)

    def status(self) -> dict[str, Any]:
        """A snapshot of the worker's state: the body ``GET /status`` answers now.

        A new dict at each call (``ready``, ``busy``, ``active``, ``queue_length``,
        ``local_holds``, ``counts``, ``error``, ``mode``, and ``engine`` when reporting);
        changing it changes nothing in the worker.
        """
        return self._runtime.status()

    async def wait_ready(self) -> None:
        """Return once the worker is ready (``GET /health`` answers 200 from then on,
        unless it errors or stops later)."""
        await self._runtime.ready.wait()


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
      WorkerFailed: after start-up, the background work (engine reporter, readiness,
        consumer health check) or a listener failed; the worker ended every hold and
        told the engine (``error_msg``) before stopping. Its ``__cause__`` is the error.

    Each of these comes on its own, not inside an exception group. Any other error (a
    bug) propagates as Trio's nursery raises it.

    Resource handling: the listening sockets, the runtime (the port's lock, the engine
    reporter and its HTTP client, the journal) all live inside this call and are closed
    when it returns. Cancelling it cancels held reservations (outcome ``cancelled``),
    which are still reported to the engine under a short shielded deadline.
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
        app = create_main_app(worker)
        hc = _hypercorn_config(config)
        sockets = Sockets([sock], [], []) if config.use_ssl else Sockets([], [sock], [])

        async def trigger() -> None:
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            # Release holders before Hypercorn starts its graceful wait, so they are
            # answered (503 shutdown) instead of being cut off at the deadline.
            worker.begin_shutdown()

        started = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                control_url: str | None = None
                if config.control_port is not None:
                    control_url = await nursery.start(serve_control, worker)
                binds: list[str] = await nursery.start(
                    partial(
                        _serve_main,
                        app,
                        hc,
                        sockets,
                        trigger,
                        connection_limits(config),
                        then=nursery.cancel_scope.cancel,
                    )
                )
                task_status.started(
                    ServeInfo(
                        url=binds[0],
                        control_url=control_url,
                        public_url=config.public_url,
                        _runtime=worker,
                    )
                )
                started = True
        except BaseExceptionGroup as group:
            # The known errors say what failed in one line: the caller gets them alone.
            leaf = only_leaf(group)
            if isinstance(leaf, ConfigError | StartupFailed):
                raise leaf from None
            if isinstance(leaf, WorkerFailed):
                raise leaf from leaf.__cause__
            if started and isinstance(group, ExceptionGroup):
                # A listener failed after start-up: told and stopped as the runtime's own.
                raise await worker.report_failure(group) from leaf
            raise
    finally:
        sock.close()


async def _serve_main(
    app: object,
    hc: HypercornConfig,
    sockets: Sockets,
    trigger: Callable[[], Awaitable[None]],
    limits: ConnectionLimits,
    *,
    then: Callable[[], None],
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Serve the main port until ``trigger`` returns and its graceful stop ends; then
    call ``then`` (cancel the rest: nothing is served any more)."""
    await serve_http(
        wrap_app(app, hc.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
        hc,
        sockets,
        limits=limits,
        shutdown_trigger=trigger,
        task_status=task_status,
    )
    then()
