"""The local engine's HTTP layer: the Quart-Trio routes over :class:`~.core.Engine`.

* ``GET /pubkey/``, ``POST /route/``, ``POST /worker_status/``, ``POST /delete_requests/``
  -- the engine's side of the wire protocol (see :mod:`nullworker.engine.core`);
* ``GET /workers`` -- the engine's state as JSON (:meth:`~.core.Engine.snapshot`);
* ``GET /`` -- the page (``static/index.html`` with the tables filled in on the server,
  see :mod:`.view`); ``GET /static/<file>`` -- its script and style sheet;
* ``GET /dashboard`` -- the page's tables as display rows plus the new timeline samples,
  which the script fetches every second; ``GET /timeline`` -- the samples alone. Both
  take ``?since=<wall-clock time>`` to get only the samples after it.

:func:`serve_engine` also samples the engine once a second for the timeline.

Each route parses the JSON body, calls the core, maps
:class:`~.core.EngineRequestError` to a JSON error status and logs one access line
(``nullworker.engine.access``; never the query string, where clients put ``api_key``).
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from importlib.resources import files
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart import Response, g, request
from quart_trio import QuartTrio

from .core import Engine, EngineRequestError
from .timeline import SAMPLE_INTERVAL_S
from .view import dashboard, render_page

__all__ = ["create_engine_app", "serve_engine"]

log = logging.getLogger("nullworker.engine")
access_log = logging.getLogger("nullworker.engine.access")

MAX_BODY_BYTES = 1024 * 1024


#: The page's files (package data in ``nullworker/engine/static/``) and their types.
STATIC_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
#: The page loads nothing from elsewhere: a user's machine may be offline.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"


def _read_static() -> dict[str, tuple[str, str]]:
    """The page's files by name, with their media types, read once from the package."""
    found: dict[str, tuple[str, str]] = {}
    for entry in (files("nullworker.engine") / "static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if suffix in STATIC_TYPES:
            found[entry.name] = (entry.read_text(encoding="utf-8"), STATIC_TYPES[suffix])
    return found


def _since() -> float | None:
    raw = request.args.get("since")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise EngineRequestError(400, {"error": "since must be a number"}) from None
    if not math.isfinite(value):
        raise EngineRequestError(400, {"error": "since must be finite"})
    return value


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


async def _json_object() -> dict[str, Any]:
    raw = await request.get_data(cache=False)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise EngineRequestError(400, {"error": "invalid JSON"}) from None
    if not isinstance(data, dict):
        raise EngineRequestError(400, {"error": "the body must be a JSON object"})
    return data


def create_engine_app(engine: Engine) -> QuartTrio:
    """The Quart-Trio app serving ``engine`` (see the module docstring for routes)."""
    static = _read_static()
    template = static.pop("index.html")[0]
    # Quart's own static folder is off: the files are read through importlib.resources
    # (so they are found in any installed form) and served from memory below.
    app = QuartTrio("nullworker.engine", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.before_request
    async def _start_timer() -> None:
        g.nullworker_started = trio.current_time()

    @app.after_request
    async def _log_access(response: Response) -> Response:
        started = getattr(g, "nullworker_started", None)
        elapsed_ms = 0.0 if started is None else (trio.current_time() - started) * 1000
        # request.path never includes the query string, where clients put api_key.
        access_log.info(
            "%s %s %d %.1fms", request.method, request.path, response.status_code, elapsed_ms
        )
        return response

    @app.errorhandler(EngineRequestError)
    async def _refused(exc: EngineRequestError) -> Response:
        return _json(exc.detail, exc.status)

    @app.get("/pubkey/")
    async def _pubkey() -> Response:
        engine.counters["pubkey"] += 1
        return Response(engine.public_key_pem, mimetype="text/plain")

    @app.post("/route/")
    async def _route() -> Response:
        body = await _json_object()
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        key = body.get("api_key")
        candidates = [key if isinstance(key, str) else None, bearer, request.args.get("api_key")]
        if not engine.check_api_key(candidates):
            engine.counters["route_rejected"] += 1
            return _json({"error": "invalid api_key"}, 401)
        return _json(engine.route(body))

    @app.post("/worker_status/")
    async def _worker_status() -> Response:
        engine.worker_status(await _json_object())
        return _json({"ok": True})

    @app.post("/delete_requests/")
    async def _delete_requests() -> Response:
        finished = engine.delete_requests(await _json_object())
        return _json({"ok": True, "deleted": len(finished)})

    @app.get("/workers")
    async def _workers() -> Response:
        return _json(engine.snapshot())

    @app.get("/")
    async def _page() -> Response:
        page = render_page(template, dashboard(engine))
        response = Response(page, mimetype="text/html")
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/static/<name>")
    async def _static(name: str) -> Response:
        if name not in static:
            return _json({"error": "not found"}, 404)
        text, mimetype = static[name]
        response = Response(text, mimetype=mimetype)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/dashboard")
    async def _dashboard() -> Response:
        since = _since()
        return _json({"view": dashboard(engine), "timeline": engine.timeline_json(since)})

    @app.get("/timeline")
    async def _timeline() -> Response:
        return _json(engine.timeline_json(_since()))

    return app


def _bind(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def serve_engine(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``engine`` over HTTP until cancelled.

    Calls ``task_status.started(url)`` with the bound base URL (e.g.
    ``"http://127.0.0.1:43121"``) once the socket listens, so ``port=0`` works:
    ``url = await nursery.start(partial(serve_engine, engine))``. The URL is also
    stored in ``engine.url``.
    """
    config = HypercornConfig()
    config.bind = [_bind(host, port)]
    config.accesslog = None  # the app logs one line per request itself
    config.errorlog = logging.getLogger("nullworker.engine.http")
    config.graceful_timeout = 1.0
    app = create_engine_app(engine)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(hypercorn.trio.serve, app, config))
        engine.url = binds[0]
        engine.started_at = trio.current_time()
        log.info("engine listening on %s", engine.url)
        nursery.start_soon(_sample_forever, engine)
        task_status.started(engine.url)


async def _sample_forever(engine: Engine) -> None:
    """One timeline sample a second, on a fixed grid (a slow sample does not drift it)."""
    next_at = trio.current_time()
    while True:
        engine.sample()
        # After a stall, start a new grid instead of catching up in a burst.
        next_at = max(next_at + SAMPLE_INTERVAL_S, trio.current_time())
        await trio.sleep_until(next_at)
