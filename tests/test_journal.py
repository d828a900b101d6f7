"""The delivery journal: a worker killed while it holds still has that request closed.

The end-to-end test runs ``nullworker serve`` as a real process in Vast mode against
the local engine (``vast_engine``), holds it with a real signed reservation, kills it
with SIGKILL and starts it again on the same port and lock directory. The file-level
tests read damaged journals from real files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from nullworker.worker.journal import Journal

from .helpers import open_serve, reserved_port, stop_process
from .test_startup import worker_env


async def _delivered_everything(env: dict[str, str], *, sent: int) -> None:
    """The worker itself says ``sent`` delete entries were accepted and none is left.

    Stopping it before then could cut a delete POST the engine already took short of
    its answer, and the final flush would send it again (at-least-once, by design).
    """
    url = f"http://127.0.0.1:{env['NULLWORKER_CONTROL_PORT']}/status"
    async with httpx.AsyncClient() as http:
        with trio.fail_after(30):
            while True:
                try:
                    engine = (await http.get(url)).json().get("engine") or {}
                except httpx.HTTPError:
                    engine = {}
                if engine.get("deletes_sent") == sent and engine.get("pending_deletes") == 0:
                    return
                await trio.sleep(0.05)


def _ends_of(engine: Any, idx: int) -> list[Any]:
    return [f for f in engine.finished if f.request_idx == idx]


async def _ready_again(engine: Any, reports_before: int) -> None:
    """A new process has reported ready (after ``reports_before`` reports in all).

    Leftover delete entries go right after the first delivered report, before the
    ready one; the graceful stop that follows flushes anything still pending.
    """

    def seen(e: Any) -> bool:
        new = e.counters["worker_status"] - reports_before
        recent = list(e.worker_status_reports)[-new:] if new > 0 else []
        return any(r.body["max_perf"] > 0 for r in recent)

    await engine.wait_for(seen, timeout=30)


async def test_a_killed_worker_s_held_request_is_reported_failed_once_after_restart(
    vast_engine: Any, tmp_path: Path, nursery: trio.Nursery
) -> None:
    env = worker_env(tmp_path, vast_engine)
    log_path = tmp_path / "worker.log"
    proc = await open_serve(env, log_path)
    try:
        await vast_engine.wait_for(lambda e: 11 in e.workers and e.workers[11].ready, timeout=30)
        auth = vast_engine.route({"endpoint": "test"})
        idx = auth["request_idx"]
        answered: list[int] = []

        async def reserve() -> None:
            try:
                async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
                    response = await http.post(
                        auth["url"] + "/reserve",
                        json={"auth_data": auth, "payload": {"duration": 300}},
                    )
                    answered.append(response.status_code)
            except httpx.HTTPError:
                pass  # the worker is killed mid-hold

        nursery.start_soon(reserve)
        await vast_engine.wait_for(lambda e: idx in e.workers[11].working_request_idxs, timeout=30)
        proc.kill()  # SIGKILL while holding: nothing runs on the way out
        await proc.wait()
    finally:
        await stop_process(proc)
    assert answered == []
    assert _ends_of(vast_engine, idx) == []

    reports = vast_engine.counters["worker_status"]
    proc = await open_serve(env, log_path)
    try:
        await vast_engine.wait_for(lambda e: _ends_of(e, idx), timeout=30)
        await _ready_again(vast_engine, reports)
        await _delivered_everything(env, sent=1)
    finally:
        await stop_process(proc)
    [end] = _ends_of(vast_engine, idx)
    assert end.success is False and end.status == "Error"

    # A second restart sends nothing more for it.
    reports = vast_engine.counters["worker_status"]
    proc = await open_serve(env, log_path)
    try:
        await _ready_again(vast_engine, reports)
        await _delivered_everything(env, sent=0)
    finally:
        await stop_process(proc)
    assert len(_ends_of(vast_engine, idx)) == 1
    output = log_path.read_text()
    assert output.count("left open by a previous worker process") == 1, output


def test_a_damaged_journal_is_one_warning_and_its_readable_lines_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "nullworker-3000.journal"
    path.write_bytes(b"+5\n+6\ngarbage\n-5\n+\xff\xfe\n+7\n+12345678901234567890123\n+8")
    caplog.set_level(logging.WARNING, logger="nullworker.journal")
    journal, leftover = Journal.open(str(path))
    assert leftover == [6, 7, 8]  # the torn last line "+8" is whole enough
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "3 unreadable line(s)" in warnings[0], warnings
    # Rewritten clean: the next start reads the same entries, without a warning.
    caplog.clear()
    journal.remove([7])
    assert Journal.open(str(path))[1] == [6, 8]
    assert caplog.records == []


def test_an_unreadable_journal_is_one_warning_and_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "nullworker-3000.journal"
    path.mkdir()  # a directory where the file should be: it can be neither read nor written
    caplog.set_level(logging.WARNING, logger="nullworker.journal")
    journal, leftover = Journal.open(str(path))
    assert leftover == []
    journal.add([1, 2])
    journal.remove([1])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # cannot read it; cannot write it (then silent)
    assert "cannot read" in messages[0] and "cannot write" in messages[1]


def test_the_journal_is_compacted_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "nullworker-3000.journal"
    journal, _ = Journal.open(str(path))
    for idx in range(30_000):
        journal.add([idx])
        journal.remove([idx])
    journal.add([99_999])
    assert path.stat().st_size < 200_000  # 60,000 lines written, at most 10,000 kept
    assert Journal.open(str(path))[1] == [99_999]


def test_an_index_given_twice_is_written_and_struck_out_once(tmp_path: Path) -> None:
    """A client may reuse its request_idx: one batch can then carry it twice."""
    path = tmp_path / "nullworker-3000.journal"
    journal, _ = Journal.open(str(path))
    journal.add([4, 4, 5])
    journal.remove([4, 4])
    assert path.read_text() == "+4\n+5\n-4\n"
    assert Journal.open(str(path))[1] == [5]


async def test_cancelling_serve_reports_the_held_request_once_and_lets_go_of_the_port(
    vast_engine: Any, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A library caller cancels ``serve()`` while a request is held: the engine hears
    it end once, and the port's lock and journal are let go (the next ``serve()`` on the
    port starts, and finds nothing left to report)."""
    from nullworker.worker.config import WorkerConfig
    from nullworker.worker.server import ServeInfo, serve

    from .conftest import vast_settings

    port = reserved_port()
    config = WorkerConfig(
        host="127.0.0.1",
        port=port,
        control_port=0,
        lock_dir=str(tmp_path),
        public_url=f"http://127.0.0.1:{port}",
        **vast_settings(vast_engine),
    )
    async with trio.open_nursery() as caller:
        info: ServeInfo = await caller.start(serve, config)
        await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
        auth = vast_engine.route({"endpoint": "test"})
        idx = auth["request_idx"]

        async def reserve() -> None:
            try:
                async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
                    await http.post(
                        f"{info.url}/reserve",
                        json={"auth_data": auth, "payload": {"duration": 300}},
                    )
            except httpx.HTTPError:
                pass  # the worker is cancelled mid-hold: the connection drops

        caller.start_soon(reserve)
        await vast_engine.wait_for(lambda e: idx in e.workers[7].working_request_idxs)
        caller.cancel_scope.cancel()
    await vast_engine.wait_for(lambda e: _ends_of(e, idx))

    again: ServeInfo = await nursery.start(serve, config)  # the port's lock was let go
    await again.wait_ready()
    with trio.fail_after(30):
        while (engine := again.status()["engine"])["pending_deletes"] or not (
            engine["ready"] and engine["reports_sent"]
        ):
            await trio.sleep(0.05)
    assert engine["deletes_sent"] == 0  # the journal had nothing left open
    assert len(_ends_of(vast_engine, idx)) == 1
