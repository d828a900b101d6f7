"""The HTTP layer: the Quart-Trio apps for the main port and the control listener.

Routes only: requests become :class:`~nullworker.worker.reservations.ReservationSlot` calls and
outcomes become status codes. Errors are mapped to statuses here and nowhere else.

Main port (what the engine routes clients to)
  ``POST /reserve``          hold the worker (signed Vast envelope; standalone, also the
                             bare payload ``{"duration": S}``, ``{}`` or no body)
  ``GET  /health``           200 once ready, 503 before
  ``POST /pyworker/update``  the engine's rolling-update signal (bearer MASTER_TOKEN;
                             refusals are logged and rate-limited, see
                             :class:`~nullworker.worker.update_guard.UpdateGuard`)
  ``/session/*``             404: this worker holds reservations, not sessions

Control listener (127.0.0.1 only, for the consumer on the instance)
  ``POST /release``          end the reservation the body names (``{"id": N}`` or
                             ``{"started_before": T}``) now; 409 if another is held
  ``POST /hold``             keep the worker busy while the request stays open (a local
                             hold; served below Quart, see :func:`_serve_hold`)
  ``GET  /reservation``      whether a reservation is held; ``?wait=S`` waits up to S s
                             (at most :data:`MAX_RESERVATION_WAIT_S`) for one to start
  ``GET  /health``, ``GET /status``
  ``GET  /metrics``          Prometheus text format (:mod:`nullworker.worker.metrics`)

Quart-Trio runs each request handler in a nursery beside the task that reads the
connection; an ``http.disconnect`` cancels the handler. That cancellation is what
ends a hold the instant the client goes away.

``POST /hold`` is the one route that answers twice: its status line and headers as soon
as the hold is registered (that is how a holder knows it holds), its JSON body when the
hold ends. Quart sends a response's headers only once the handler has returned, after
which nothing would own the hold, so the route is a plain ASGI handler in front of the
control app, which watches for the disconnect itself.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from .._groups import only_leaf
from ..errors import (
    ConfigError,
    DuplicateRequest,
    EnvelopeError,
    QueueTimeout,
    ReleaseConflict,
    ShuttingDown,
    StartupFailed,
    WorkerFailed,
)
from ..vast.envelope import parse_duration, parse_envelope, signature_ok
from .config import WorkerConfig
from .http_server import connection_limits, listen, serve_http
from .local_holds import (
    MAX_HOLD_BODY_BYTES,
    HoldOutcome,
    HoldRequestError,
    LocalHold,
    parse_hold_request,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .reservations import (
    MAX_RELEASE_BODY_BYTES,
    Outcome,
    ReleaseRequestError,
    parse_release_request,
)
from .runtime import Worker
from .update_guard import UpdateGuard

__all__ = [
    "HOLD_DURATION_HEADER",
    "HOLD_ID_HEADER",
    "MAX_RESERVATION_WAIT_S",
    "create_app",
    "create_control_app",
    "create_main_app",
    "serve_control",
]

log = logging.getLogger("nullworker")

#: Headers of an accepted ``POST /hold``, sent at once: the hold's id and, when the body
#: gave one, its duration (s).
HOLD_ID_HEADER = "nullworker-hold-id"
HOLD_DURATION_HEADER = "nullworker-hold-duration"
#: The longest ``GET /reservation?wait=`` the control listener accepts (s): a client
#: that waits longer polls again, so a lost connection is noticed within this bound.
MAX_RESERVATION_WAIT_S = 300.0

_Receive = Callable[[], Awaitable[dict[str, Any]]]
_Send = Callable[[dict[str, Any]], Awaitable[None]]

_NO_SESSIONS = {
    "error": "this worker holds reservations, not sessions: use POST /reserve",
}


def _peer(scope: Mapping[str, object]) -> str:
    """The connection's peer address (ASGI ``client``); never taken from a header."""
    client = scope.get("client")
    if isinstance(client, tuple | list) and client:
        return str(client[0])
    return "unknown"


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    response: Response = Response(
        _dumps(body), status=status, mimetype="application/json", headers=headers
    )
    return response


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


class _HTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's per-request handler, with the request handled in the calling task.

    Quart-Trio runs each request as two tasks in a nursery: one reads the ASGI messages
    (the body, then the disconnect) and cancels the nursery at the disconnect, the other
    handles the request and cancels it when the response is sent. Here the second runs
    in the nursery's own body, which the same cancel scope covers: the same behaviour
    (a disconnect ends a hold at once), one task fewer per request.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, receive)
            await self.handle_request(nursery, request, send)


class _App(QuartTrio):
    def log_exception(
        self,
        exception_info: tuple[type[BaseException], BaseException, TracebackType]
        | tuple[None, None, None],
    ) -> None:
        """Quart logs a failed start with a traceback; ours are one line, said by the caller.

        (``nullworker serve`` prints it and tells the engine; Hypercorn's CLI prints it
        as its "Lifespan failure".) The traceback is logged at DEBUG.
        """
        if isinstance(exception_info[1], ConfigError | StartupFailed):
            log.debug("start-up failed: %s", exception_info[1], exc_info=exception_info)
            return
        super().log_exception(exception_info)


def _base_app(name: str, config: WorkerConfig) -> QuartTrio:
    app = _App(name)
    app.asgi_http_class = _HTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    # A hold may last an hour; Quart must not cut the response off.
    app.config["RESPONSE_TIMEOUT"] = None
    # The app answers 408 at this deadline; the connection layer closes the socket a
    # second later if the body still has not arrived (see http_server).
    app.config["BODY_TIMEOUT"] = config.body_timeout_s

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        headers = dict(error.get_headers()) if status == 405 else {}
        headers.pop("Content-Type", None)
        message = error.description or error.name
        if status == 413:
            message = f"request body too large: the limit is {config.max_body_bytes} bytes"
        return _json({"error": message, "status": status}, status, headers)

    return app


def create_app(config: WorkerConfig | None = None) -> QuartTrio:
    """Build the worker's main app for a server that is not ours.

    ``hypercorn --worker-class trio 'nullworker.app:create_app()'`` calls it with no
    arguments: the settings then come from the environment. :func:`nullworker.serve`
    does not use it; it is the adapter for Hypercorn's own CLI (or any ASGI server that
    runs Quart-Trio's lifespan), where nothing of ours owns a nursery: the runtime
    (:meth:`~nullworker.worker.runtime.Worker.run`) and the control listener start in
    the app's ``before_serving`` hook, inside Quart-Trio's nursery, and the holds end
    in ``after_serving``.

    A failure after start-up cannot propagate to that server's caller, so there, and
    only there, the process sends itself SIGTERM (see :func:`_run_under_lifespan`): a
    supervisor sees the worker stop rather than one that answers 503 forever.
    """
    worker = Worker(config if config is not None else WorkerConfig.from_env(os.environ))
    app = create_main_app(worker)

    @app.before_serving
    async def _start_background() -> None:
        await app.nursery.start(_run_under_lifespan, worker)

    @app.after_serving
    async def _stop() -> None:
        worker.begin_shutdown()

    return app


async def _run_under_lifespan(
    worker: Worker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The runtime and the control listener of a :func:`create_app` app, until cancelled.

    A start-up failure (the port's lock, the control port) is raised on its own, so
    Hypercorn's "Lifespan failure" names it in one line. A failure after start-up has
    been logged and reported by the runtime (:class:`~nullworker.errors.WorkerFailed`);
    Quart-Trio's nursery would end with it but the server would go on serving, so the
    process sends itself SIGTERM and the server stops as it does on any SIGTERM.
    """
    started = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            if worker.config.control_port is not None:
                await nursery.start(serve_control, worker)
            started = True
            task_status.started()
    except Exception as exc:  # a group of real errors; a Cancelled is not caught
        leaf = only_leaf(exc)
        if not started and isinstance(leaf, ConfigError | StartupFailed):
            raise leaf from None
        if not started:
            raise
        if not isinstance(leaf, WorkerFailed):  # the control listener failed
            await worker.report_failure(exc)
        _terminate_own_process()


def _terminate_own_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def create_main_app(worker: Worker) -> QuartTrio:
    """The main port's app: routes only, over ``worker``, which its caller runs.

    :func:`~nullworker.worker.server.serve` serves it beside the runtime it starts;
    :func:`create_app` adds the lifespan hooks that start the runtime for a server that
    is not ours.
    """
    cfg = worker.config
    app = _base_app("nullworker", cfg)

    url_mismatch = _UrlMismatchLog()

    async def admit(
        body: bytes | str,
    ) -> Response | tuple[float | None, int | None, int | None]:
        """The envelope's refusal, or what a hold needs: (duration, request_idx, reqnum).

        A function of its own, so that nothing of the request body (its bytes, the parsed
        JSON) stays referenced while the reservation waits and holds. It awaits only
        when a signature fails, for the engine's key to be refetched (bounded).
        """
        try:
            # Standalone (no engine: nothing signed, nothing reported), the bare payload
            # is enough; a Vast-mode worker needs the engine's ids and keeps refusing it.
            envelope = parse_envelope(body, bare_payload=cfg.standalone)
        except EnvelopeError as exc:
            return _json(exc.detail, 422)
        if not cfg.unsecured and not envelope.bare:
            key = worker.public_key
            if key is None:
                return _json({"error": "not ready: the engine's public key is not loaded"}, 401)
            if not signature_ok(envelope, key):
                # The engine may have rotated its key: check again with the new one.
                if not await worker.key_changed():
                    return _json({"error": "invalid signature"}, 401)
                key = worker.public_key
                if key is None or not signature_ok(envelope, key):
                    return _json({"error": "invalid signature"}, 401)
            if cfg.public_url:
                signed_url = envelope.auth_data["url"]
                if not _same_url(signed_url, cfg.public_url):
                    url_mismatch.refused(signed_url, cfg.public_url)
                    return _json({"error": "auth_data.url names another worker"}, 401)
                url_mismatch.matched()
        if envelope.session_id is not None:
            return _json({"error": "invalid session", **_NO_SESSIONS}, 410)
        try:
            duration = parse_duration(envelope.payload, bare=envelope.bare)
        except EnvelopeError as exc:
            return _json(exc.detail, 422)
        if not worker.ready.is_set():
            return _json({"error": "not ready yet"}, 503, {"Retry-After": "1"})
        return duration, envelope.request_idx, envelope.reqnum

    @app.post("/reserve")
    async def reserve() -> Response:
        if worker.consumer_error is not None:  # Vast replaces an errored instance
            return _json({"error": worker.consumer_error, "reason": "consumer_unhealthy"}, 503)
        admitted = await admit(await request.get_data(cache=False, as_text=False))
        if isinstance(admitted, Response):
            return admitted
        duration, idx, reqnum = admitted
        tag = {"request_idx": idx, "reqnum": reqnum}
        try:
            # A replayed envelope (same request_idx) must not hold twice, nor give the
            # engine two delete entries for one request: the core refuses it before
            # queueing or reporting anything.
            result = await worker.slot.hold(duration, tag=tag, key=idx)
        except DuplicateRequest:
            return _json(
                {
                    "error": f"request_idx {idx} is already held or queued on this worker",
                    "request_idx": idx,
                },
                409,
            )
        except QueueTimeout as exc:
            return _json({"error": f"busy: {exc}"}, 429, {"Retry-After": _retry_after(worker)})
        except ShuttingDown:
            return _json({"error": "shutting down", "released": Outcome.SHUTDOWN.value}, 503)
        body_out = {
            "released": result.outcome.value,
            "duration": result.duration_s,
            "held": round(result.held_s, 3),
        }
        if result.outcome is Outcome.SHUTDOWN:
            return _json(body_out, 503)
        return _json(body_out, 200)

    @app.get("/health")
    async def health() -> Response:
        return _health(worker)

    update_guard = UpdateGuard()

    @app.post("/pyworker/update")
    async def pyworker_update() -> Response:
        addr = _peer(request.scope)
        blocked = update_guard.blocked_for(addr)
        if blocked is not None:
            retry = max(1, math.ceil(blocked))
            return _json(
                {
                    "error": "too many failed attempts from this address: try again later",
                    "retry_after": retry,
                },
                429,
                {"Retry-After": str(retry)},
            )
        token = cfg.master_token
        given = request.headers.get("Authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else given
        if not token or not hmac.compare_digest(given.strip().encode(), token.encode()):
            update_guard.failed(addr)
            return _json({"error": "unauthorized"}, 401)
        update_guard.succeeded(addr)
        path = cfg.force_update_path
        try:
            await trio.Path(path).touch()
        except OSError as exc:
            return _json({"error": f"failed to write file: {exc}"}, 500)
        log.info("update requested by the engine (%s created)", path)
        return _json({"ok": True}, 200)

    @app.route("/session/<path:_rest>", methods=["GET", "POST"])
    async def sessions(_rest: str) -> Response:
        return _json(_NO_SESSIONS, 404)

    return app


def create_control_app(worker: Worker) -> QuartTrio:
    """The control listener's app: release, local holds, health, status and metrics."""
    app = _base_app("nullworker-control", worker.config)
    quart_asgi: Callable[..., Awaitable[None]] = app.asgi_app

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/hold":
            await _serve_hold(worker, scope, receive, send)
            return
        await quart_asgi(scope, receive, send)

    # Quart's documented place for middleware: the app stays a QuartTrio.
    app.asgi_app = asgi_app  # type: ignore[method-assign]

    @app.post("/release")
    async def release() -> Response:
        # Compare-and-release: the body names the reservation (by id, or by starting
        # before the sender's decision), so a release that races the end of one
        # reservation and the start of the next never ends the next.
        body = await request.get_data(cache=False, as_text=False)
        body = body.encode() if isinstance(body, str) else body
        if len(body) > MAX_RELEASE_BODY_BYTES:
            message = f"request body too large: the limit is {MAX_RELEASE_BODY_BYTES} bytes"
            return _json({"error": message, "status": 413}, 413)
        try:
            wanted = parse_release_request(body)
            info = worker.slot.release(id=wanted.id, started_before=wanted.started_before)
        except ReleaseRequestError as exc:
            return _json(exc.detail, exc.status)
        except ReleaseConflict as exc:
            active = exc.active
            return _json(
                {
                    "released": False,
                    "error": str(exc),
                    "active": {
                        "id": active.id,
                        "request_idx": active.tag.get("request_idx"),
                        "started_at": active.started_at,
                    },
                },
                409,
            )
        if info is None:
            return _json({"released": False, "reason": "no active reservation"}, 200)
        return _json(
            {
                "released": True,
                "reservation": info.id,
                "request_idx": info.tag.get("request_idx"),
                "duration": info.duration_s,
                "started_at": info.started_at,
            },
            200,
        )

    @app.get("/reservation")
    async def reservation() -> Response:
        # A consumer takes a job only while its worker is reserved: then one reservation
        # brings one machine for one job. It long-polls here, parked on the slot's event
        # (no polling); a disconnect cancels the handler, which leaves nothing behind.
        wait_s = _reservation_wait(request.args.to_dict(flat=False))
        if isinstance(wait_s, Response):
            return wait_s
        with trio.move_on_after(wait_s):
            try:
                info = await worker.slot.wait_held()
            except ShuttingDown:
                return _json({"error": "shutting down"}, 503)
            held = {
                "id": info.id,
                "request_idx": info.tag.get("request_idx"),
                "started_at": info.started_at,
                "duration": info.duration_s,
                "ends_at": info.ends_at,
            }
            return _json({"reserved": True, "reservation": held}, 200)
        return _json({"reserved": False}, 200)

    @app.get("/health")
    async def health() -> Response:
        return _health(worker)

    @app.get("/status")
    async def status() -> Response:
        return _json(worker.status(), 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        response: Response = Response(
            worker.metrics.render(), status=200, content_type=METRICS_CONTENT_TYPE
        )
        return response

    return app


async def _serve_hold(
    worker: Worker, scope: dict[str, Any], receive: _Receive, send: _Send
) -> None:
    """``POST /hold``: a local hold for as long as the request stays open.

    The status line and headers (200, :data:`HOLD_ID_HEADER`, and
    :data:`HOLD_DURATION_HEADER` when the body gave a duration) go out once the hold is
    registered; the body ``{"released", "label", "held", "id", "duration"}`` when it
    ends by its duration or the worker's shutdown. Without a duration the hold has no
    cap (see :mod:`~nullworker.worker.local_holds`): ``duration`` is then ``null``. A disconnect
    ends it at once (nothing is sent). Refusals are JSON: 422 naming the field, 413, 408,
    405, and 503 while shutting down.
    """
    if scope.get("method") != "POST":
        error = {"error": "The method is not allowed for the requested URL.", "status": 405}
        await _send_json(send, 405, error, [(b"allow", b"POST")])
        return
    cfg = worker.config
    body = bytearray()
    with trio.move_on_after(cfg.body_timeout_s) as body_deadline:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_HOLD_BODY_BYTES:
                message_413 = f"request body too large: the limit is {MAX_HOLD_BODY_BYTES} bytes"
                await _send_json(send, 413, {"error": message_413, "status": 413})
                return
            if not message.get("more_body", False):
                break
    if body_deadline.cancelled_caught:
        await _send_json(send, 408, {"error": "the request body did not arrive in time"})
        return
    try:
        wanted = parse_hold_request(bytes(body))
    except HoldRequestError as exc:
        await _send_json(send, 422, exc.detail)
        return
    try:
        async with worker.local_holds.open(wanted.duration_s, label=wanted.label) as hold:
            headers = [
                (b"content-type", b"application/json"),
                (b"cache-control", b"no-store"),
                (HOLD_ID_HEADER.encode(), str(hold.id).encode()),
            ]
            if hold.duration_s is not None:
                headers.append((HOLD_DURATION_HEADER.encode(), repr(hold.duration_s).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_end_on_disconnect, receive, hold)
                outcome = await hold.wait()
                nursery.cancel_scope.cancel()
    except ShuttingDown:
        await _send_json(send, 503, {"error": "shutting down", "released": HoldOutcome.SHUTDOWN})
        return
    if outcome is HoldOutcome.DISCONNECTED:
        return  # nobody is there to read an answer
    answer = {
        "released": outcome.value,
        "label": hold.label,
        "held": round(hold.held_s, 3),
        "id": hold.id,
        "duration": hold.duration_s,
    }
    await send({"type": "http.response.body", "body": _dumps(answer).encode(), "more_body": False})


async def _end_on_disconnect(receive: _Receive, hold: LocalHold) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    hold.end(HoldOutcome.DISCONNECTED)


async def _send_json(
    send: _Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    data = _dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def serve_control(
    worker: Worker, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control app on ``control_host:control_port``; ``started(url)`` once bound.

    Raises:
      StartupFailed: the port cannot be bound (in use, not ours to bind).
    """
    cfg = worker.config
    assert cfg.control_port is not None
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = logging.getLogger("nullworker.control")
    config.graceful_timeout = 1.0
    limits = connection_limits(cfg)
    try:
        sock = listen(cfg.control_host, cfg.control_port)
    except OSError as exc:  # the port is taken, or not ours to bind
        raise StartupFailed(
            f"control port (NULLWORKER_CONTROL_PORT): {exc.strerror or exc}"
        ) from None
    try:
        app = wrap_app(create_control_app(worker), config.wsgi_max_body_size, "asgi")
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve_http, app, config, Sockets([], [sock], []), limits=limits)
            )
            log.info(
                "control listener on %s (POST /release, POST /hold, GET /reservation, "
                "GET /health, GET /status, GET /metrics)",
                binds[0],
            )
            task_status.started(binds[0])
    finally:
        sock.close()


def _reservation_wait(query: dict[str, list[str]]) -> float | Response:
    """``GET /reservation``'s ``wait`` (seconds, default 0), or its 422 naming the field."""
    unknown = sorted(set(query) - {"wait"})
    if unknown:
        name = unknown[0][:100]  # a query string may be long; the answer stays short
        error = f"unknown parameter {name!r}: /reservation takes wait"
        return _json({"error": error, "field": name}, 422)
    given = query.get("wait", [])
    if not given:
        return 0.0
    problem = f"wait must be a number of seconds from 0 to {MAX_RESERVATION_WAIT_S:g}"
    if len(given) > 1:
        return _json({"error": f"{problem}, given once", "field": "wait"}, 422)
    try:
        wait_s = float(given[0])
    except ValueError:
        return _json({"error": problem, "field": "wait"}, 422)
    if not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_RESERVATION_WAIT_S):
        return _json({"error": problem, "field": "wait"}, 422)
    return wait_s


def _health(worker: Worker) -> Response:
    if worker.ready.is_set() and not worker.slot.closing and worker.consumer_error is None:
        return _json({"ready": True, "busy": worker.busy}, 200)
    reason = worker.error or ("shutting down" if worker.slot.closing else "starting")
    return _json({"ready": False, "reason": reason}, 503)


def _retry_after(worker: Worker) -> str:
    active = worker.slot.statistics().active
    if active is None:
        return "1"
    return str(max(1, math.ceil(active.remaining_s)))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _url_key(url: object) -> tuple[str, str, int | None, str] | None:
    """What identifies a worker URL: scheme, host, port (the default one spelled out), path.

    None for what is not an http(s) URL at all.
    """
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname  # lower case, IPv6 brackets removed
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        host = host.rstrip(".")
    return (
        scheme,
        host,
        port if port is not None else _DEFAULT_PORTS[scheme],
        parts.path.rstrip("/"),
    )


def _same_url(signed: object, own: str) -> bool:
    """Whether the engine's ``auth_data.url`` names this worker's ``own`` URL.

    Forms that reach the same place are equal: scheme and host in any case, a trailing
    slash, the default port (:80, :443) written or implied, IPv6 in any spelling.
    """
    key = _url_key(signed)
    return key is not None and key == _url_key(own)


class _UrlMismatchLog:
    """Says once per episode that signed requests name another URL than ours.

    The first refusal logs both URLs (a warning); later ones are only counted until a
    request names our URL again, which ends the episode. A flood of misaddressed
    requests thus costs one log line, not one per request.
    """

    def __init__(self) -> None:
        self._refused = 0

    def refused(self, signed: object, own: str) -> None:
        self._refused += 1
        if self._refused == 1:
            log.warning(
                "refusing /reserve (401): auth_data.url is %r but this worker's URL is %r; "
                "further refusals for this reason are not logged until the URLs match again",
                signed[:200] if isinstance(signed, str) else type(signed).__name__,
                own,
            )

    def matched(self) -> None:
        if self._refused:
            log.info(
                "auth_data.url matches this worker's URL again, after %d refused request(s)",
                self._refused,
            )
            self._refused = 0
