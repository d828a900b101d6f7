"""The scaling policy of ``nullworker dev``: when a worker is started, and when one is stopped.

The scaling model (small and honest):

* ``--min-workers`` workers start at once and are kept alive (restarted with a
  backoff if they exit on their own).
* Each WAITING answer fires the engine's ``on_demand`` hook. A worker is started
  when fewer workers are starting than requests are waiting and fewer than
  ``--max-workers`` exist (starting ones count, so a burst of polls does not start
  a crowd).
* A worker that stayed idle (ready, not busy, not leased) for ``--idle-timeout``
  seconds is stopped while more than ``--min-workers`` exist.
* After a worker crashes, no new one starts for 2, 4, 8, 16, then 30 s (the engine's
  :class:`~.records.Scaling` says so on the page); a worker that became ready ends the
  streak.

Starting and stopping the processes is :mod:`.dev_processes`'s; this module only decides.

Concurrency invariant: the engine's hook and the scaling tick are synchronous, so "is
this worker idle?" and "retire it from the engine" happen in one step: no client can be
routed to a worker between the check and its retirement.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from .core import Engine
from .dev_options import DevOptions
from .dev_processes import Child, Processes

__all__ = ["Scaler"]

#: How often the policy checks idle workers and the minimum count.
TICK_S = 0.25
#: Backoff after a worker exits on its own: 2, 4, 8, 16, 30, 30, ... seconds.
MAX_RESPAWN_BACKOFF_S = 30.0


class Scaler:
    """Starts and stops :class:`~.dev_processes.Processes`' workers by the policy above.

    Its :meth:`on_demand` is the engine's hook; :meth:`run` ticks the rest.
    """

    def __init__(
        self,
        engine: Engine,
        options: DevOptions,
        processes: Processes,
        *,
        say: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.options = options
        self.processes = processes
        self.say = say
        processes.on_crash = self._crashed
        self._crashes = 0
        self._spawn_not_before = -math.inf
        #: Set by :meth:`run`: demand before it starts no worker.
        self._running = False

    # -- scaling decisions (synchronous: atomic with respect to the engine) ------------

    def live(self) -> list[Child]:
        return self.processes.live()

    def starting(self) -> int:
        return sum(
            1
            for c in self.live()
            if self.engine.worker_state(c.id) in (None, "starting", "loading")
        )

    def on_demand(self, waiting: int) -> None:
        """The engine's hook: called on every WAITING answer."""
        if not self._running or not self.processes.running:
            return
        if self.starting() >= waiting or len(self.live()) >= self.options.max_workers:
            return
        if trio.current_time() < self._spawn_not_before:
            return
        self.processes.spawn(f"{waiting} request(s) waiting")

    def _tick(self) -> None:
        now = trio.current_time()
        for child in self.live():
            record = self.engine.workers.get(child.id)
            if record is not None and record.ready and not child.was_ready:
                child.was_ready = True
                self._crashes = 0
                self.say(f"[dev] worker {child.id} ready after {now - child.started_at:.1f} s")
        self._scale_down(now)
        missing = self.options.min_workers - len(self.live())
        if missing > 0 and now >= self._spawn_not_before:
            for _ in range(missing):
                self.processes.spawn("--min-workers")

    def _scale_down(self, now: float) -> None:
        excess = len(self.live()) - self.options.min_workers
        if excess <= 0:
            return
        idle: list[tuple[float, Child]] = []
        for child in self.live():
            record = self.engine.workers.get(child.id)
            if record is None or record.idle_since is None:
                continue
            if self.engine.worker_state(child.id) != "idle":
                continue
            if now - record.idle_since >= self.options.idle_timeout_s:
                idle.append((record.idle_since, child))
        idle.sort(key=lambda pair: pair[0])
        for _, child in idle[:excess]:
            self.processes.stop(child, f"idle for {self.options.idle_timeout_s:g} s")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start ``--min-workers`` workers, then tick until cancelled (start
        :meth:`Processes.run` first)."""
        assert self.processes.running
        self._running = True
        for _ in range(self.options.min_workers):
            self.processes.spawn("--min-workers")
        task_status.started()
        while True:
            await trio.sleep(TICK_S)
            self._tick()

    def _crashed(self, child: Child, what: str) -> None:
        self._crashes += 1
        backoff = min(2.0**self._crashes, MAX_RESPAWN_BACKOFF_S)
        self._spawn_not_before = trio.current_time() + backoff
        child.stop_reason = what
        if self.engine.scaling is not None:
            self.engine.scaling.paused_until = self._spawn_not_before
        self.say(f"[dev] worker {child.id} {what}; no new worker for {backoff:g} s")
