"""The /pyworker/update guard's policy on a MockClock: windows, log lines, the table bound.

The guard over real HTTP (429 after ten failures, the log lines, another address) is
tested in test_http.py.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from nullworker.worker.update_guard import UpdateGuard

LOGGER = "nullworker.test_update_guard"


def guard_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def guard(caplog: pytest.LogCaptureFixture) -> UpdateGuard:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return UpdateGuard(logger=logging.getLogger(LOGGER))


async def test_ten_failures_block_for_the_rest_of_the_window(
    autojump_clock: trio.testing.MockClock, guard: UpdateGuard
) -> None:
    for _ in range(9):
        assert guard.blocked_for("10.0.0.1") is None
        guard.failed("10.0.0.1")
        await trio.sleep(1.0)
    assert guard.blocked_for("10.0.0.1") is None
    guard.failed("10.0.0.1")  # the 10th, at t=9 of the window opened at t=0
    assert guard.blocked_for("10.0.0.1") == pytest.approx(51.0)
    assert guard.blocked_for("10.0.0.2") is None  # per address
    await trio.sleep(50.0)
    assert guard.blocked_for("10.0.0.1") == pytest.approx(1.0)
    await trio.sleep(1.0)
    # The window is over: the count starts again.
    assert guard.blocked_for("10.0.0.1") is None
    for _ in range(9):
        guard.failed("10.0.0.1")
    assert guard.blocked_for("10.0.0.1") is None


async def test_failures_spread_over_more_than_a_window_never_block(
    autojump_clock: trio.testing.MockClock, guard: UpdateGuard
) -> None:
    for _ in range(30):
        guard.failed("10.0.0.1")
        assert guard.blocked_for("10.0.0.1") is None
        await trio.sleep(7.0)  # 9 failures per 60 s window at most


async def test_the_right_token_clears_the_failures(
    autojump_clock: trio.testing.MockClock, guard: UpdateGuard
) -> None:
    for _ in range(9):
        guard.failed("10.0.0.1")
    guard.succeeded("10.0.0.1")
    guard.failed("10.0.0.1")
    assert guard.blocked_for("10.0.0.1") is None
    guard.succeeded("10.0.0.9")  # an address that never failed is not remembered
    assert len(guard) == 1


async def test_log_lines_are_at_most_one_per_address_every_ten_seconds(
    autojump_clock: trio.testing.MockClock,
    guard: UpdateGuard,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard.failed("10.0.0.1")  # t=0: logged at once
    guard.failed("10.0.0.2")  # another address has its own line
    for _ in range(5):
        await trio.sleep(1.9)
        guard.failed("10.0.0.1")  # t=1.9 .. 9.5: counted, not logged
    assert len(guard_lines(caplog)) == 2
    await trio.sleep(0.5)
    guard.failed("10.0.0.1")  # t=10: due, and says how many since the last line
    lines = guard_lines(caplog)
    assert len(lines) == 3
    assert "10.0.0.1: 1 request(s) refused" in lines[0]
    assert "10.0.0.2: 1 request(s) refused" in lines[1]
    assert "10.0.0.1: 6 request(s) refused" in lines[2]
    assert "6 wrong or missing token, 0 rate-limited" in lines[2]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == LOGGER)


async def test_a_flood_logs_the_block_and_then_stays_quiet(
    autojump_clock: trio.testing.MockClock,
    guard: UpdateGuard,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(10):
        guard.failed("10.0.0.1")
    for _ in range(2000):
        assert guard.blocked_for("10.0.0.1") is not None
    lines = guard_lines(caplog)
    assert len(lines) == 2  # the first refusal and the one that blocked the address
    assert "10 failures within 60 s: answering 429 for 60 s" in lines[1]
    await trio.sleep(10.0)
    assert guard.blocked_for("10.0.0.1") is not None
    lines = guard_lines(caplog)
    assert len(lines) == 3
    assert "2001 request(s) refused" in lines[2] and "2001 rate-limited" in lines[2]


async def test_the_table_is_bounded_and_forgets_the_least_recently_seen(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger=LOGGER)  # 5,000 first lines: not the point
    guard = UpdateGuard(logger=logging.getLogger(LOGGER))
    for _ in range(10):
        guard.failed("victim")
        guard.failed("kept")
    for i in range(5000):
        if i % 100 == 0:
            assert guard.blocked_for("kept") is not None  # seen recently: stays
        guard.failed(f"10.1.{i // 256}.{i % 256}")
        assert len(guard) <= 1024
    assert len(guard) == 1024
    assert guard.blocked_for("victim") is None  # forgotten
    assert guard.blocked_for("kept") is not None


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        UpdateGuard(max_failures=0)
    with pytest.raises(ValueError):
        UpdateGuard(max_addresses=0)
