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

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>nullworker engine</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}
.idle{color:#070}.busy,.leased{color:#a50}.error,.stale{color:#b00}
.starting,.loading{color:#666}
#err{color:#b00}
</style></head><body>
<h1>nullworker engine</h1>
<p>Waiting requests: <b id="waiting">?</b> &middot; <span id="summary"></span>
<span id="err"></span></p>
<h2>Workers</h2>
<table><thead><tr><th>id</th><th>state</th><th>url</th><th>requests</th>
<th>reservation age (s)</th><th>idle (s)</th><th>last report (s)</th><th>reports</th>
<th>routed</th><th>error</th></tr></thead><tbody id="workers"></tbody></table>
<h2>Recently finished requests</h2>
<table><thead><tr><th>request_idx</th><th>worker</th><th>status</th><th>success</th>
</tr></thead><tbody id="finished"></tbody></table>
<script>
"use strict";
function row(cells, cls) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  if (cls) tr.className = cls;
  return tr;
}
async function refresh() {
  try {
    const r = await fetch("workers", {cache: "no-store"});
    const s = await r.json();
    document.getElementById("waiting").textContent = s.waiting;
    document.getElementById("summary").textContent =
      Object.entries(s.breakdown).map(([k, v]) => v + " " + k).join(", ");
    const w = document.getElementById("workers");
    w.replaceChildren(...s.workers.map(x => row([x.id, x.state, x.url,
      x.num_requests_working, x.reservation_age_s, x.idle_age_s, x.last_report_age_s,
      x.report_count, x.routed_count, x.error], x.state)));
    const f = document.getElementById("finished");
    f.replaceChildren(...s.finished.map(x => row([x.request_idx, x.worker_id,
      x.status, x.success])));
    document.getElementById("err").textContent = "";
  } catch (e) {
    document.getElementById("err").textContent = "(engine unreachable)";
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body></html>
"""


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
    app = QuartTrio("nullworker.engine")
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
        return Response(_PAGE, mimetype="text/html")

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
