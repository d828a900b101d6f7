"""The local engine's HTTP layer: the Quart-Trio routes over :class:`~.core.Engine`.

* ``GET /pubkey/``, ``POST /route/``, ``POST /worker_status/``, ``POST /delete_requests/``
  -- the engine's side of the wire protocol (see :mod:`nullworker.engine.core`);
* ``GET /workers`` and ``GET /`` -- a JSON and an HTML view for humans and tests.

Each route parses the JSON body, calls the core, maps
:class:`~.core.EngineRequestError` to a JSON error status and logs one access line
(``nullworker.engine.access``; never the query string, where clients put ``api_key``).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from importlib.resources import files
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart import Response, g, request
from quart_trio import QuartTrio

from .core import Engine, EngineRequestError

__all__ = ["create_engine_app", "serve_engine"]

log = logging.getLogger("nullworker.engine")
access_log = logging.getLogger("nullworker.engine.access")

MAX_BODY_BYTES = 1024 * 1024


def _read_page() -> str:
    """The live view served at ``GET /`` (a static page that polls ``GET /workers``), read
    from the package data: ``nullworker/engine/static/index.html``."""
    return (files("nullworker.engine") / "static" / "index.html").read_text(encoding="utf-8")


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
    page = _read_page()
    # No static folder: the page is served at GET / only, not under /static/.
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
        return Response(page, mimetype="text/html")

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
        log.info("engine listening on %s", engine.url)
        task_status.started(engine.url)
