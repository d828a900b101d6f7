"""Latency benchmark: start-up, disconnect hand-off, and engine busy/idle signalling.

    .venv/bin/python bench/latency.py [--runs 10]

Everything runs on 127.0.0.1 against the local engine emulator; every loop is bounded by
``--runs`` and by a per-step deadline. It prints one line per measurement (median, p90,
max over the runs), so results from one run of this script can be compared with each other
(shared machines are noisy: compare ratios, not absolute numbers across days).

Measures:
  start_to_ready   `python -m nullworker serve` spawned -> the engine holds a ready report
  start_to_health  spawned -> GET /health answers 200
  handoff          the holder's socket closes -> the queued reservation starts (in-process
                   worker, the slot's own "started" event)
  busy_report      /reserve sent -> the engine has a report showing the worker busy
  idle_report      the hold elapsed (response received) -> the engine shows the worker idle

The busy/idle pair starts after a quiet second, as a reservation on a worker does: the
worker paces its report rounds (4 back to back, then 5 a second), and the hand-off
before it makes five changes in a fraction of a second. Without the pause these rows
measure the pacing (about 0.2 s) instead of the signalling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import trio

from nullworker.engine import Engine, serve_engine
from nullworker.vast.signing import sign_url
from nullworker.worker.config import WorkerConfig
from nullworker.worker.reservations import ReservationEvent
from nullworker.worker.server import ServeInfo, serve

STEP_LIMIT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    return (
        f"{name:<16} n={len(samples):<3} median {statistics.median(ordered) * 1000:8.1f} ms"
        f"   p90 {p90 * 1000:8.1f} ms   max {ordered[-1] * 1000:8.1f} ms"
    )


async def bench_startup(engine: Engine, runs: int) -> tuple[list[float], list[float]]:
    to_ready: list[float] = []
    to_health: list[float] = []
    async with httpx.AsyncClient() as http:
        for i in range(runs):
            port = _free_port()
            container = 1000 + i
            env = os.environ | {
                "REPORT_ADDR": engine.url or "",
                "CONTAINER_ID": str(container),
                "MASTER_TOKEN": "tok",
                "WORKER_PORT": str(port),
                "NULLWORKER_PUBLIC_URL": f"http://127.0.0.1:{port}",
                "NULLWORKER_HOST": "127.0.0.1",
                "NULLWORKER_CONTROL_PORT": "off",
            }
            start = time.monotonic()
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "nullworker", "serve"],
                env=env,
                stdout=subprocess.DEVNULL,
            )
            try:
                with trio.fail_after(STEP_LIMIT_S):
                    while True:
                        try:
                            r = await http.get(f"http://127.0.0.1:{port}/health")
                            if r.status_code == 200:
                                to_health.append(time.monotonic() - start)
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.002)
                await engine.wait_for(
                    lambda e, c=container: c in e.workers and e.workers[c].ready,
                    timeout=STEP_LIMIT_S,
                )
                # wait_for wakes on the report itself, so this is when the engine had it
                # (at most a few ms after the health answer, measured separately).
                to_ready.append(time.monotonic() - start)
            finally:
                proc.terminate()
                with trio.fail_after(STEP_LIMIT_S):
                    await proc.wait()
    return to_ready, to_health


async def _raw_reserve(url: str, envelope: dict[str, Any]) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    data = json.dumps(envelope).encode()
    head = (
        "POST /reserve HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + data)
    return stream


def _envelope(engine: Engine, url: str, idx: int, duration: float) -> dict[str, Any]:
    return {
        "auth_data": {
            "signature": sign_url(engine.private_key, url),
            "url": url,
            "cost": 100,
            "endpoint": "bench",
            "reqnum": idx,
            "request_idx": idx,
        },
        "payload": {"duration": duration},
    }


async def _until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(STEP_LIMIT_S):
        while not predicate():
            await trio.sleep(0.001)


async def bench_in_process(engine: Engine, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"handoff": [], "busy_report": [], "idle_report": []}
    config = WorkerConfig(
        port=0,
        control_port=None,
        report_addrs=(engine.url or "",),
        container_id=1,
        master_token="tok",
        unsecured=False,
    )
    started: dict[int, float] = {}

    def note(event: ReservationEvent) -> None:
        if event.kind == "started":
            started[event.reservation.tag.get("request_idx") or 0] = time.monotonic()

    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=60) as http:
        info: ServeInfo = await nursery.start(serve, config)
        # White-box: the benchmark times the slot's own events (ServeInfo keeps the
        # runtime private; see tests/conftest.py runtime()).
        slot = info._runtime.slot
        slot.add_observer(note)
        await engine.wait_for(lambda e: 1 in e.workers and e.workers[1].ready, timeout=30)
        url = info.public_url or ""
        idx = 0
        for _ in range(runs):
            # Hand-off: a holder disconnects while another reservation waits in the queue.
            idx += 2
            holder = await _raw_reserve(info.url, _envelope(engine, url, idx, 600))
            await _until(lambda: slot.statistics().busy)
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    partial(
                        http.post, f"{info.url}/reserve", json=_envelope(engine, url, idx + 1, 0)
                    )
                )
                await _until(lambda: slot.statistics().waiting == 1)
                closed = time.monotonic()
                await holder.aclose()
                await _until(lambda i=idx + 1: i in started)
                out["handoff"].append(started[idx + 1] - closed)
            await engine.wait_for(lambda e: not e.workers[1].busy, timeout=STEP_LIMIT_S)

            # Busy and idle signalling to the engine for a short hold, after a quiet
            # second (the report pacing's bucket is full again after 0.8 s).
            await trio.sleep(1.0)
            idx += 2
            async with trio.open_nursery() as inner:
                result: dict[str, float] = {}

                async def hold(i: int = idx, result: dict[str, float] = result) -> None:
                    await http.post(f"{info.url}/reserve", json=_envelope(engine, url, i, 0.2))
                    result["returned"] = time.monotonic()

                sent = time.monotonic()
                inner.start_soon(hold)
                await engine.wait_for(
                    lambda e, i=idx: i in e.workers[1].working_request_idxs, timeout=STEP_LIMIT_S
                )
                out["busy_report"].append(time.monotonic() - sent)
            await engine.wait_for(lambda e: not e.workers[1].busy, timeout=STEP_LIMIT_S)
            out["idle_report"].append(max(time.monotonic() - result["returned"], 0.0))
        nursery.cancel_scope.cancel()
    return out


async def main(runs: int) -> None:
    engine = Engine(master_token="tok")
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_engine, engine))
        to_ready, to_health = await bench_startup(engine, runs)
        in_process = await bench_in_process(engine, runs)
        nursery.cancel_scope.cancel()
    print(f"nullworker latency benchmark, {runs} runs each, Python {sys.version.split()[0]}")
    print(_summary("start_to_ready", to_ready))
    print(_summary("start_to_health", to_health))
    for name, samples in in_process.items():
        print(_summary(name, samples))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if not 1 <= args.runs <= 200:
        parser.error("--runs must be between 1 and 200")
    trio.run(main, args.runs)
