"""The engine page in a real browser.

A live engine (the in-process emulator) with a real worker in Vast mode and a reservation
held through the real client; headless Chromium loads the page, runs its script for a few
seconds of virtual time and dumps the DOM it leaves, which is checked: the busy worker is
in the workers table and the timeline chart has drawn points. The page as the
server sends it (what a browser without JavaScript shows) is checked on its own too.

Chromium is the Debian package ``chromium`` (``.ci/run`` installs it when missing): in CI
a missing browser fails the test; elsewhere the test is skipped, saying why.
"""

from __future__ import annotations

import html
import io
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from nullworker.client import reserve
from nullworker.engine.dev import DevOptions, _Console, _run_dev
from nullworker.engine.view import COLUMNS

from .conftest import StartWorker, vast_settings
from .test_dev import consumer_command

#: Seconds of page time Chromium runs before dumping the DOM: several polls of the page.
VIRTUAL_TIME_MS = 5000
#: Bound on one Chromium run (it takes 1-2 s here).
BROWSER_TIMEOUT_S = 60.0


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.access("/usr/bin/chromium", os.X_OK):
        path = "/usr/bin/chromium"
    if path is None:
        reason = "chromium is not installed (Debian package chromium): the page is not tested"
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason}, and CI must test it (.ci/run installs it)")
        pytest.skip(reason)
    return path


async def _dump_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after ``VIRTUAL_TIME_MS`` of page time in headless Chromium."""
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
    ]
    with trio.fail_after(BROWSER_TIMEOUT_S):
        result = await trio.run_process(
            [*command, "--dump-dom", url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    dom = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0 and "</html>" in dom, result.stderr.decode()[-2000:]
    return dom


def _element(dom: str, tag: str, element_id: str) -> str:
    match = re.search(rf'<{tag}\b[^>]*\bid="{element_id}"[^>]*>(.*?)</{tag}>', dom, re.S)
    assert match, f"no <{tag} id={element_id}> in:\n{dom}"
    return match.group(0)


def _rows(dom: str, table: str) -> list[list[str]]:
    """The text of each cell of ``<tbody id=table>``, row by row."""
    body = _element(dom, "tbody", table)
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
            for cell in re.findall(r"<td\b.*?</td>", row, re.S)
        ]
        for row in re.findall(r"<tr\b.*?</tr>", body, re.S)
    ]


def _points(polyline: str) -> list[tuple[float, float]]:
    match = re.search(r'\bpoints="([^"]*)"', polyline)
    assert match, polyline
    pairs = [pair.split(",") for pair in match.group(1).split()]
    return [(float(x), float(y)) for x, y in pairs]


@pytest.fixture
async def busy_engine(nursery: trio.Nursery, vast_engine: Any, start_worker: StartWorker) -> Any:
    """The engine with worker 7 holding a reservation for the real client, and two
    timeline samples taken while it did."""
    await start_worker(**vast_settings(vast_engine))
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    held = trio.Event()

    async def hold() -> None:
        async with reserve("test", duration_s=60, api_key="k", engine_url=vast_engine.url):
            held.set()
            await trio.sleep_forever()

    nursery.start_soon(hold)
    with trio.fail_after(10):
        await held.wait()
    await vast_engine.wait_for(lambda e: e.workers[7].busy)
    busy_column = 2  # after the time and "waiting"
    with trio.fail_after(5):
        while sum(1 for sample in vast_engine.timeline if sample[busy_column]) < 2:
            await trio.sleep(0.1)
    return vast_engine


async def test_the_page_shows_the_busy_worker_and_draws_the_timeline(
    busy_engine: Any, tmp_path: Path
) -> None:
    worker_url = busy_engine.workers[7].url
    dom = await _dump_dom(busy_engine.url + "/", tmp_path / "profile")

    (row,) = _rows(dom, "workers")
    assert row[0] == "7" and row[1] == worker_url and row[2] == "busy", row
    assert re.fullmatch(r"[\d.]+ s held \(request \d+\)", row[4]), row
    assert _element(dom, "b", "now-busy").endswith(">1</b>")
    assert "engine unreachable" not in _element(dom, "p", "link-state")

    # The script drew the chart: busy workers as an area, waiting requests as a line.
    chart = _element(dom, "svg", "chart")
    drawn = re.search(r'data-points="(\d+)"', chart)
    assert drawn and int(drawn.group(1)) >= 2, chart
    assert re.search(r'<path class="s-busy" d="M[^"]+Z"', chart), chart
    waiting = re.search(r'<polyline class="s-waiting"[^>]*>', chart)
    assert waiting, chart
    assert len(_points(waiting.group(0))) >= 2
    # The window is the last five minutes, however young the engine: not one that
    # grows with its uptime and squeezes the newest burst to the right edge.
    assert 'data-window-s="300"' in chart
    assert "last 5 min" in _element(dom, "small", "window")


async def test_the_chart_window_stays_five_minutes_with_a_long_history(
    busy_engine: Any, tmp_path: Path
) -> None:
    # Nine minutes of older samples (the engine keeps ten): two workers busy back then.
    oldest = busy_engine.timeline[0][0]
    for age in range(1, 9 * 60):
        busy_engine.timeline.appendleft((oldest - age, 0, 2, 0, 0, 0))
    recent = sum(1 for sample in busy_engine.timeline if sample[0] > time.time() - 240)
    dom = await _dump_dom(busy_engine.url + "/", tmp_path / "profile")

    chart = _element(dom, "svg", "chart")
    assert 'data-window-s="300"' in chart, chart
    assert "last 5 min" in _element(dom, "small", "window")
    # Only the samples of the last five minutes are drawn, not the whole history.
    drawn = re.search(r'data-points="(\d+)"', chart)
    assert drawn and recent <= int(drawn.group(1)) <= 5 * 60 + VIRTUAL_TIME_MS // 1000 + 2, chart


async def test_without_javascript_the_server_rendered_tables_show(busy_engine: Any) -> None:
    # Chromium's --dump-dom needs scripts, so the page is read as the server sends it:
    # that is all a browser without JavaScript has (it reloads it every 5 s).
    async with httpx.AsyncClient(timeout=5.0) as http:
        dom = (await http.get(busy_engine.url + "/")).text
    assert '<meta http-equiv="refresh" content="5">' in dom
    (row,) = _rows(dom, "workers")
    assert row[1] == busy_engine.workers[7].url and row[2] == "busy", row
    assert _rows(dom, "pending") == [["no request is waiting"]]
    assert 'data-points="0"' in _element(dom, "svg", "chart")


async def test_local_holds_consumers_and_a_release_on_the_page(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``nullworker dev --consumer``: worker 1's consumer holds it locally (``job 5``),
    a client holds worker 2 and lets go. The page names the local hold, shows each
    worker's control listener and consumer, and the release as a normal end."""
    options = DevOptions(
        port=0,
        min_workers=1,
        max_workers=2,
        consumer=consumer_command(tmp_path, "job 5", 60.0, once=True),
    )
    url = await nursery.start(_run_dev, options, _Console(io.StringIO(), tty=False))
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:

        async def wait_view(predicate: Any) -> dict[str, Any]:
            with trio.fail_after(20):
                while not predicate(view := (await http.get("/workers")).json()):
                    await trio.sleep(0.1)
            return view

        await wait_view(lambda v: any(w["local_holds"] for w in v["workers"]))
        # Worker 1 is held locally, so the client's demand starts worker 2; its consumer
        # takes no hold. The client holds it, then lets go (as a scale-down does).
        async with reserve("dev", duration_s=60, api_key="dev", engine_url=url):
            pass
        view = await wait_view(
            lambda v: (
                v["finished"] and all(w["consumer"]["state"] == "running" for w in v["workers"])
            )
        )
    (finished,) = view["finished"]
    assert (finished["status"], finished["ended"]) == ("Cancelled", "released by client")
    workers = {w["id"]: w for w in view["workers"]}

    dom = await _dump_dom(url + "/", tmp_path / "profile")
    rows = {
        row[0]: dict(zip(COLUMNS["workers"], row, strict=True)) for row in _rows(dom, "workers")
    }
    held = rows["1"]
    assert held["state"] == "busy"
    assert re.fullmatch(r"job 5 \u00b7 [\d.]+ s", held["hold"]), held
    assert held["control"] == workers[1]["control_url"]
    assert held["consumer"] == f"running (pid {workers[1]['consumer']['pid']})"
    assert rows["2"]["consumer"].startswith("running (pid ")
    assert rows["2"]["control"] == workers[2]["control_url"] != workers[1]["control_url"]
    # The release reads as a normal end, not as a failure or a warning.
    body = _element(dom, "tbody", "finished")
    assert re.search(r'<td class="end-ok"[^>]*>released by client</td>', body), body
    assert "end-note" not in body and "end-bad" not in body
