"""Side by side: nullworker against a null worker on the official ``vastai`` SDK.

    .venv/bin/python bench/compare.py [--tiny] [--reps N] [--out DIR]

Both workers run as child processes with the same Vast environment contract
(``REPORT_ADDR``, ``CONTAINER_ID``, ``WORKER_PORT``, ``PUBLIC_IPADDR``, ``MASTER_TOKEN``,
``UNSECURED=false``, ``MAX_QUEUE_TIME``) against one local engine served in this process,
so both check the engine's signature on every request and report to it. Reservations
carry the engine's signature of the worker's URL, as ``/route/`` gives it.

The official worker is ``tests/sdk_worker/worker.py`` in the virtual environment the
interop tests build (``vastai`` 1.9.1, built here if missing, with their installer).

Rows (medians over ``--reps`` unless said):
  ready        spawned -> the engine holds a ready report
  release      holder's socket closed -> the queued reservation's answer arrives (p50, p99)
  busy / idle  reservation sent -> the engine shows it working; answer received -> idle
  queue bound  a second request while one is held: what it gets within ``--queue-window``
  churn        duration-0 reservations per second: sequential keep-alive, a new connection
               each, 20 concurrent clients; worker CPU seconds per 1,000 (/proc/PID/stat).
               Measured last, with both workers running and their repetitions alternating
               (A B B A ...), from a minimal raw HTTP/1.1 client (see ``bench_churn``)
  memory       RSS idle, with ``--open`` open (1 held, the rest queued), after they close
  idle CPU     worker CPU over ``--idle-seconds`` doing nothing

Writes ``<out>/compare-<date>.json``, prints a markdown table (ratio nullworker/official)
and draws ``<out>/compare.png`` when matplotlib is installed (``pip install -e '.[bench]'``).
Exit status 3 means the SDK could not be installed for want of a network to PyPI.
Every loop is bounded in count and by a per-step deadline; everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import trio
from latency import STEP_LIMIT_S, _free_port, _raw_reserve

from nullworker.engine import Engine, serve_engine
from nullworker.vast.signing import sign_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.sdk_worker import install as interop  # noqa: E402  (the SDK venv installer)

MASTER_TOKEN = "bench-token"
MAX_QUEUE_TIME_S = 30.0
CONCURRENT_CLIENTS = 20
WORKERS = ("nullworker", "official")


@dataclass
class Sizes:
    reps: int = 3
    churn: int = 1000
    open: int = 500
    release_samples: int = 50
    queue_window_s: float = 60.0
    idle_s: float = 60.0
    settle_s: float = 3.0


def sdk_python() -> Path:
    """The interop tests' SDK venv (pytest's cache directory), built when missing."""
    tag = f"vastai-{interop.SDK_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    venv = ROOT / ".pytest_cache" / "d" / f"sdk-venv-{tag}"
    python = interop._venv_python(venv)
    marker = venv / "installed.ok"
    venv.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and python.exists()):
            import pytest

            try:
                interop._install_sdk(venv, python)
            except pytest.skip.Exception as skipped:
                print(f"cannot build the SDK venv: {skipped}", file=sys.stderr)
                raise SystemExit(3) from None
            except pytest.fail.Exception as failed:
                print(f"cannot build the SDK venv: {failed}", file=sys.stderr)
                raise SystemExit(2) from None
            marker.write_text(interop.SDK_VERSION + "\n")
    return python


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass
class Worker:
    kind: str
    engine: Engine
    sdk: Path
    logdir: Path
    container: int = 0
    port: int = 0
    process: trio.Process | None = None
    signature: str = ""
    signed_url: str = ""
    idx: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, container: int) -> float:
        """Spawn; return seconds until the engine holds its ready report."""
        self.container, self.port = container, _free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VAST_", "REPORT_ADDR", "CONTAINER_ID", "WORKER_"))
        }
        env.update(
            REPORT_ADDR=self.engine.url or "",
            CONTAINER_ID=str(container),
            WORKER_PORT=str(self.port),
            PUBLIC_IPADDR="127.0.0.1",
            MASTER_TOKEN=MASTER_TOKEN,
            UNSECURED="false",
            USE_SSL="false",
            MAX_QUEUE_TIME=str(MAX_QUEUE_TIME_S),
            PYTHONUNBUFFERED="1",
        )
        env[f"VAST_TCP_PORT_{self.port}"] = str(self.port)
        if self.kind == "official":
            env.update(WORKER_HTTP_PORT=str(_free_port()), SDK_WORKER_HOST="127.0.0.1")
            argv = [str(self.sdk), str(interop.WORKER_SCRIPT)]
        else:
            env.update(NULLWORKER_HOST="127.0.0.1", NULLWORKER_CONTROL_PORT="off")
            argv = [sys.executable, "-m", "nullworker", "serve"]
        workdir = self.logdir / f"{self.kind}-{container}"
        workdir.mkdir()
        with (workdir / "log").open("wb") as log:
            start = time.monotonic()
            self.process = await trio.lowlevel.open_process(
                argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        c = container
        await self.engine.wait_for(
            lambda e: c in e.workers and e.workers[c].ready, timeout=STEP_LIMIT_S
        )
        ready = time.monotonic() - start
        self.signed_url = self.engine.workers[c].url
        self.signature = sign_url(self.engine.private_key, self.signed_url)
        return ready

    async def stop(self) -> None:
        if self.process is None:
            return
        with trio.CancelScope(shield=True):
            self.process.terminate()
            with trio.move_on_after(5) as waited:
                await self.process.wait()
            if waited.cancelled_caught:
                self.process.kill()
                await self.process.wait()
        self.process = None

    def envelope(self, duration: float) -> dict[str, Any]:
        self.idx += 1
        return {
            "auth_data": {
                "signature": self.signature,
                "url": self.signed_url,
                "cost": 100,
                "endpoint": "bench",
                "reqnum": self.idx,
                "request_idx": self.idx,
            },
            "payload": {"duration": duration},
        }

    async def settle(self, http: httpx.AsyncClient) -> None:
        """Until a duration-0 reservation is answered 200 (the worker is free again)."""
        with trio.fail_after(STEP_LIMIT_S * 2):
            for _ in range(200):
                r = await http.post(f"{self.url}/reserve", json=self.envelope(0))
                if r.status_code == 200:
                    return
                await trio.sleep(0.2)
        raise RuntimeError(f"{self.kind} did not settle")


async def first_line(stream: trio.SocketStream) -> bytes:
    """The status line of the answer on ``stream`` (b"" when closed first)."""
    data = b""
    while b"\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


async def hold(w: Worker, duration: float) -> trio.SocketStream:
    return await _raw_reserve(w.url, w.envelope(duration))


async def bench_busy_idle(w: Worker, sizes: Sizes, http: httpx.AsyncClient) -> dict[str, Any]:
    busy: list[float] = []
    idle: list[float] = []
    c = w.container
    for _ in range(sizes.reps):
        env = w.envelope(1.0)
        i = env["auth_data"]["request_idx"]
        returned: dict[str, float] = {}
        async with trio.open_nursery() as nursery:

            async def post(env: dict[str, Any] = env, out: dict[str, float] = returned) -> None:
                await http.post(f"{w.url}/reserve", json=env)
                out["at"] = time.monotonic()

            sent = time.monotonic()
            nursery.start_soon(post)
            await w.engine.wait_for(
                lambda e, i=i: i in e.workers[c].working_request_idxs, timeout=STEP_LIMIT_S
            )
            busy.append(time.monotonic() - sent)
        await w.engine.wait_for(lambda e: not e.workers[c].busy, timeout=STEP_LIMIT_S)
        idle.append(max(0.0, time.monotonic() - returned["at"]))
    return {"busy_report_s": busy, "idle_report_s": idle}


async def bench_release(w: Worker, sizes: Sizes, http: httpx.AsyncClient) -> list[float]:
    samples: list[float] = []
    for _ in range(sizes.release_samples):
        holder = await hold(w, 600)
        await trio.sleep(0.05)
        queued = await hold(w, 0)
        await trio.sleep(0.05)
        with trio.fail_after(STEP_LIMIT_S):
            closed = time.monotonic()
            await holder.aclose()
            line = await first_line(queued)
            samples.append(time.monotonic() - closed)
        await queued.aclose()
        if b" 200 " not in line + b" ":
            w.errors.append(f"release: queued answer {line!r}")
    await w.settle(http)
    return samples


async def bench_queue_bound(w: Worker, sizes: Sizes, http: httpx.AsyncClient) -> dict[str, Any]:
    holder = await hold(w, 600)
    await trio.sleep(0.1)
    second = await hold(w, 0)
    sent = time.monotonic()
    line = b""
    with trio.move_on_after(sizes.queue_window_s):
        line = await first_line(second)
    waited = time.monotonic() - sent
    await second.aclose()
    await holder.aclose()
    await w.settle(http)
    status = line.split(b" ")[1].decode() if line.count(b" ") >= 1 else None
    return {
        "window_s": sizes.queue_window_s,
        "max_queue_time_s": MAX_QUEUE_TIME_S,
        "status": status,
        "after_s": round(waited, 3) if status else None,
        "summary": f"{status} after {waited:.1f} s"
        if status
        else f"still queued at {waited:.0f} s",
    }


def _post_bytes(port: int, body: bytes) -> bytes:
    """One ``POST /reserve`` as raw HTTP/1.1 (keep-alive is HTTP/1.1's default)."""
    head = (
        f"POST /reserve HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _read_answer(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read one response off ``sock`` (``buf`` keeps what follows it).

    Returns (status, whether the server closes the connection after it). Responses
    must carry a Content-Length, as both workers' JSON answers do.
    """
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    head = bytes(buf[: end + 4]).lower()
    match = re.search(rb"\r\ncontent-length: *(\d+)", head)
    if match is None:
        raise ConnectionError(f"a response without a Content-Length: {head[:200]!r}")
    total = end + 4 + int(match.group(1))
    while len(buf) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a response")
        buf += chunk
    del buf[:total]
    return int(head.split(b" ", 2)[1]), b"\r\nconnection: close" in head


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_LIMIT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _keepalive_client(port: int, requests: Iterator[bytes], statuses: list[int]) -> None:
    """Send ``requests`` one after another on one connection (reopened if the server
    closes it, as Hypercorn does after 1,000 requests)."""
    sock, buf = _connect(port), bytearray()
    try:
        for data in requests:
            sock.sendall(data)
            status, closes = _read_answer(sock, buf)
            statuses.append(status)
            if closes:
                sock.close()
                sock, buf = _connect(port), bytearray()
    finally:
        sock.close()


def _churn_keepalive(port: int, requests: list[bytes], statuses: list[int]) -> None:
    """One keep-alive client sending every request."""
    _keepalive_client(port, iter(requests), statuses)


def _churn_new_connections(port: int, requests: list[bytes], statuses: list[int]) -> None:
    """Each request on a connection of its own, closed by the client after the answer."""
    for data in requests:
        with _connect(port) as sock:
            sock.sendall(data)
            statuses.append(_read_answer(sock, bytearray())[0])


def _churn_concurrent(port: int, requests: list[bytes], statuses: list[int]) -> None:
    """``CONCURRENT_CLIENTS`` keep-alive clients taking requests from one list."""
    pending = iter(requests)
    lock = threading.Lock()

    def take() -> Iterator[bytes]:
        while True:
            with lock:
                data = next(pending, None)
            if data is None:
                return
            yield data

    threads = [
        threading.Thread(target=_keepalive_client, args=(port, take(), statuses))
        for _ in range(CONCURRENT_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


CHURN_MODES = {
    "sequential_keepalive": _churn_keepalive,
    "new_connection_each": _churn_new_connections,
    "concurrent_20": _churn_concurrent,
}


async def churn_once(w: Worker, run: Any, n: int) -> dict[str, Any]:
    """One churn run of ``n`` duration-0 reservations against ``w``."""
    requests = [_post_bytes(w.port, json.dumps(w.envelope(0)).encode()) for _ in range(n)]
    statuses: list[int] = []
    cpu0, own0, t0 = cpu_s(w.pid), time.process_time(), time.monotonic()
    with trio.fail_after(STEP_LIMIT_S * 10):
        await trio.to_thread.run_sync(run, w.port, requests, statuses)
    elapsed = time.monotonic() - t0
    if len(statuses) != n:
        raise RuntimeError(f"churn: {len(statuses)} answers for {n} requests")
    bad = [status for status in statuses if status != 200]
    if bad:
        w.errors.append(f"churn: {len(bad)} answers not 200: {sorted(set(bad))}")
    return {
        "per_s": n / elapsed,
        "cpu_s_per_1000": (cpu_s(w.pid) - cpu0) / n * 1000,
        "bench_cpu_s_per_1000": (time.process_time() - own0) / n * 1000,
    }


async def bench_churn(workers: dict[str, Worker], sizes: Sizes) -> dict[str, dict[str, Any]]:
    """Duration-0 reservations per second, and CPU per 1,000 in the worker and in this process.

    Both workers run at once (the idle one costs nothing) and their repetitions
    alternate, A B B A ..., so that a machine that gets slower or faster during the
    run (these are shared machines) weighs on both alike.

    The load comes from a minimal HTTP/1.1 client on blocking sockets in threads, with
    every envelope encoded before the clock starts, so that the worker rather than
    the client is what runs out of CPU (an httpx client saturated first: the bench
    process then measured itself). Its own CPU is recorded as ``bench_cpu_s_per_1000``
    (client and the engine that takes the reports, which share this process).
    """
    out: dict[str, dict[str, Any]] = {kind: {} for kind in workers}
    for name, run in CHURN_MODES.items():
        for kind in workers:
            out[kind][name] = {"per_s": [], "cpu_s_per_1000": [], "bench_cpu_s_per_1000": []}
        for rep in range(sizes.reps):
            order = list(workers) if rep % 2 == 0 else list(reversed(workers))
            for kind in order:
                one = await churn_once(workers[kind], run, sizes.churn)
                for key, value in one.items():
                    out[kind][name][key].append(value)
    return out


async def bench_memory(w: Worker, sizes: Sizes, http: httpx.AsyncClient) -> dict[str, float]:
    idle = rss_mb(w.pid)
    streams = [await hold(w, 600)]
    await trio.sleep(0.1)
    for _ in range(sizes.open - 1):
        streams.append(await hold(w, 600))
    await trio.sleep(sizes.settle_s)
    opened = rss_mb(w.pid)
    for s in streams:
        await s.aclose()
    await trio.sleep(sizes.settle_s)
    after = rss_mb(w.pid)
    await w.settle(http)
    return {
        "rss_idle_mb": idle,
        "rss_open_mb": opened,
        "rss_after_mb": after,
        "open": sizes.open,
        "kb_per_open": (opened - idle) * 1024 / sizes.open,
    }


async def bench_idle_cpu(w: Worker, sizes: Sizes) -> float:
    cpu0, t0 = cpu_s(w.pid), time.monotonic()
    await trio.sleep(sizes.idle_s)
    return (cpu_s(w.pid) - cpu0) / (time.monotonic() - t0) * 100


async def bench_worker(
    kind: str, engine: Engine, sdk: Path, logdir: Path, sizes: Sizes, first_container: int
) -> tuple[Worker, dict[str, Any]]:
    """Every measurement of one worker but churn; the worker is left running."""
    w = Worker(kind, engine, sdk, logdir)
    ready: list[float] = []
    try:
        for i in range(sizes.reps):
            if i:
                await w.stop()
            ready.append(await w.start(first_container + i))
        print(f"  {kind}: ready {statistics.median(ready):.2f} s", flush=True)
        async with httpx.AsyncClient(timeout=STEP_LIMIT_S) as http:
            await w.settle(http)
            busy_idle = await bench_busy_idle(w, sizes, http)
            print(f"  {kind}: busy/idle done", flush=True)
            release = await bench_release(w, sizes, http)
            print(f"  {kind}: release done", flush=True)
            memory = await bench_memory(w, sizes, http)
            print(f"  {kind}: memory done", flush=True)
            queue = await bench_queue_bound(w, sizes, http)
            print(f"  {kind}: queue bound: {queue['summary']}", flush=True)
            idle_cpu = await bench_idle_cpu(w, sizes)
            await w.settle(http)
    except BaseException:
        await w.stop()
        raise
    return w, {
        "ready_s": ready,
        **busy_idle,
        "release_s": release,
        "memory": memory,
        "queue_bound": queue,
        "idle_cpu_pct": idle_cpu,
        "errors": w.errors,
    }


def rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table: one row per measurement, a value per worker, ratio nullworker/official."""
    med = statistics.median

    def churn(mode: str, key: str) -> Any:
        return lambda r: med(r["churn"][mode][key])

    spec: list[tuple[str, str, Any]] = [
        ("ready (s)", "ready_s", lambda r: med(r["ready_s"])),
        ("release p50 (ms)", "release_p50_ms", lambda r: pct(r["release_s"], 0.5) * 1000),
        ("release p99 (ms)", "release_p99_ms", lambda r: pct(r["release_s"], 0.99) * 1000),
        ("busy seen by engine (ms)", "busy_report_ms", lambda r: med(r["busy_report_s"]) * 1000),
        ("idle seen by engine (ms)", "idle_report_ms", lambda r: med(r["idle_report_s"]) * 1000),
        ("queue bound: 2nd request", "queue_bound", lambda r: r["queue_bound"]["summary"]),
    ]
    for mode, label in (
        ("sequential_keepalive", "sequential keep-alive"),
        ("new_connection_each", "new connection each"),
        ("concurrent_20", "20 concurrent"),
    ):
        spec.append((f"churn {label} (/s)", f"churn_{mode}_per_s", churn(mode, "per_s")))
        spec.append(
            (f"CPU s / 1,000, {label}", f"cpu_{mode}_s_per_1000", churn(mode, "cpu_s_per_1000"))
        )
        spec.append(
            (
                f"bench process CPU s / 1,000, {label}",
                f"bench_cpu_{mode}_s_per_1000",
                churn(mode, "bench_cpu_s_per_1000"),
            )
        )
    spec += [
        ("RSS idle (MB)", "rss_idle_mb", lambda r: r["memory"]["rss_idle_mb"]),
        ("RSS with N open (MB)", "rss_open_mb", lambda r: r["memory"]["rss_open_mb"]),
        ("RSS after they close (MB)", "rss_after_mb", lambda r: r["memory"]["rss_after_mb"]),
        ("KB per open reservation", "kb_per_open", lambda r: r["memory"]["kb_per_open"]),
        ("idle CPU (% of a core)", "idle_cpu_pct", lambda r: r["idle_cpu_pct"]),
    ]
    out = []
    for label, key, get in spec:
        row: dict[str, Any] = {"row": key, "label": label}
        for kind in WORKERS:
            row[kind] = get(results[kind])
        ours, theirs = row["nullworker"], row["official"]
        numeric = isinstance(ours, float | int) and isinstance(theirs, float | int)
        row["ratio"] = ours / theirs if numeric and theirs else None
        out.append(row)
    return out


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown(table: list[dict[str, Any]], n_open: int) -> str:
    lines = ["| Measurement | nullworker | official SDK | ratio |", "|---|---|---|---|"]
    for row in table:
        label = row["label"].replace("N open", f"{n_open:,} open")
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else ""
        lines.append(f"| {label} | {fmt(row['nullworker'])} | {fmt(row['official'])} | {ratio} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    data = [[s * 1000 for s in results[k]["release_s"]] for k in WORKERS]
    left.boxplot(data, whis=(1, 99))
    left.set_xticks([1, 2], ["nullworker", "official SDK"])
    left.set_ylabel("ms")
    left.set_title("holder closed → queued reservation answered")
    modes = ["sequential_keepalive", "new_connection_each", "concurrent_20"]
    names = ["sequential\nkeep-alive", "new connection\neach", "20\nconcurrent"]
    width = 0.38
    for i, kind in enumerate(WORKERS):
        vals = [statistics.median(results[kind]["churn"][m]["per_s"]) for m in modes]
        xs = [j + (i - 0.5) * width for j in range(len(modes))]
        bars = right.bar(xs, vals, width, label="nullworker" if i == 0 else "official SDK")
        right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_xticks(range(len(modes)), names)
    right.set_ylabel("duration-0 reservations / s")
    right.set_title("churn (Vast mode, signatures checked)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "vastai": interop.SDK_VERSION}
    for name in ("nullworker", "trio", "hypercorn", "quart", "quart-trio", "httpx"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


async def measure(sizes: Sizes, sdk: Path) -> dict[str, dict[str, Any]]:
    engine = Engine(master_token=MASTER_TOKEN)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="nullworker-compare-") as tmp:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_engine, engine))
            running: dict[str, Worker] = {}
            try:
                for n, kind in enumerate(WORKERS):
                    print(f"measuring {kind} ...", flush=True)
                    running[kind], results[kind] = await bench_worker(
                        kind, engine, sdk, Path(tmp), sizes, 100 * (n + 1)
                    )
                print("churn, both workers in turn ...", flush=True)
                for kind, churn in (await bench_churn(running, sizes)).items():
                    results[kind]["churn"] = churn
            finally:
                for w in running.values():
                    await w.stop()
            nursery.cancel_scope.cancel()
    return results


def report(results: dict[str, dict[str, Any]], sizes: Sizes, out_dir: Path) -> Path:
    table = rows(results)
    now = dt.datetime.now(dt.UTC)
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "arch": platform.machine(),
            "kernel": platform.release(),
        },
        "versions": versions(),
        "sizes": sizes.__dict__,
        "rows": table,
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compare-{now.date().isoformat()}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(markdown(table, sizes.open))
    print()
    for kind in WORKERS:
        for err in results[kind]["errors"]:
            print(f"warning: {kind}: {err}")
    print(f"wrote {path}")
    png = out_dir / "compare.png"
    if plot(results, png):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="minimal sizes: proves it works")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--churn", type=int, default=None, help="reservations per churn run")
    parser.add_argument("--open", type=int, default=None, help="open reservations (memory)")
    parser.add_argument("--queue-window", type=float, default=None, help="seconds (default 60)")
    parser.add_argument("--idle-seconds", type=float, default=None, help="seconds (default 60)")
    args = parser.parse_args()
    sizes = (
        Sizes(
            reps=1,
            churn=10,
            open=10,
            release_samples=3,
            queue_window_s=0.5,
            idle_s=0.5,
            settle_s=0.3,
        )
        if args.tiny
        else Sizes()
    )
    for name, attr, low, high in (
        ("reps", "reps", 1, 50),
        ("churn", "churn", 1, 100_000),
        ("open", "open", 2, 5_000),
        ("queue_window", "queue_window_s", 0.1, 600),
        ("idle_seconds", "idle_s", 0.1, 3_600),
    ):
        value = getattr(args, name)
        if value is not None:
            if not low <= value <= high:
                parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
            setattr(sizes, attr, value)
    report(trio.run(measure, sizes, sdk_python()), sizes, args.out)


if __name__ == "__main__":
    main()
