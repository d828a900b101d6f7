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
import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from nullworker.client import reserve

from .conftest import StartWorker, vast_settings

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
        async with reserve("test", duration=60, api_key="k", engine_url=vast_engine.url):
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
    assert "last 1 min" in _element(dom, "small", "window")


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
