"""Several endpoints, several processes: each endpoint led by one, the endpoints spread.

:func:`autoscale_endpoints` is what ``nullworker autoscale --config`` runs, as a library
function. For each endpoint (an :class:`EndpointRun`):

* without a lease, ``autoscale()`` runs for as long as the call does;
* with a lease (:class:`~.lease.Lease`), a loop: wait for the lease (standby) ->
  ``autoscale()`` while leading -> stand by again when the lease is lost. On the way
  out (cancellation, SIGTERM) the endpoint's reservations are closed first, then its
  key is deleted, so that a standby elsewhere takes over at its next attempt.

When two leased endpoints or more are on one Redis server, the processes running them
share them out, through a :class:`~.lease.Membership` beside the leases (a Redis sorted
set where each process counts itself)::

    runs = [EndpointRun(name, partial(autoscale, name, ...), lease=RedisLease(...)), ...]
    async with AsyncExitStack() as stack:
        for run in runs:
            await stack.enter_async_context(run.lease)
        await autoscale_endpoints(runs)

Theory of operation
-------------------
With ``k`` live members and ``n`` leased endpoints in the call, this process's
*share* is ``ceil(n / k)``; it counts what it *claims*: the endpoints it leads, and
one whose acquisition just succeeded (:attr:`~.lease.Lease.claimed`).

* **Taking.** A standby endpoint tries its lease (every ``renew_s``, as any lease)
  while the process claims fewer than its share. At or above its share, it tries only
  once every ``patience_s`` (default ``2 * ttl_s``): an endpoint nobody else took in
  that long is taken anyway, so a wrong count never leaves one unled.
* **Shedding.** Every ``renew_s`` the process refreshes its membership and reads ``k``.
  When it has led more than its share for ``settle_s`` (default ``2 * renew_s``, so
  that a process starting or stopping does not move anything at once), it sheds the
  excess, the most recently acquired first: that term's ``autoscale()`` is cancelled
  (every reservation closed), then its key deleted (compare-and-delete). A process under
  its share takes it at its next attempt, within ``renew_s``.
* **Spread.** Once things settle, every endpoint is led by exactly one process (the
  lease) and none leads more than ``ceil(n / k)``. Processes started one after the other
  end up with ``ceil(n / k)`` for the first ones and less (down to none) for the last:
  the bound is what is kept, not an even split.

Windows
-------
* **Hand-off by shedding**: the endpoint holds nothing from the moment the old leader
  closed its reservations until the new one's are held: one standby attempt (at most
  ``renew_s``) plus the time to reserve. Never two leaders at once: the key is deleted
  only after the reservations are closed. **By SIGTERM**: the same, but a process at
  its share takes more only once it counts one process less: within ``2 * renew_s``.
* **A process killed (SIGKILL)**: the kernel closes its connections, so its workers see
  the reservations end at once; its keys expire at most ``ttl_s`` after its last
  renewal, and its membership entry before that (``ttl_s - renew_s``), so the others,
  counting one less, take its endpoints at their next attempt: within ``ttl_s +
  renew_s`` (plus the time to reserve).
* **Over ``max``**: only the lease's own window (:mod:`.lease`): a key that disappears
  early (a Redis restart without persistence, a failover) or a frozen leader.

Concurrency invariants
----------------------
* One nursery: the membership task (refresh, count, shed), then one task per endpoint.
  Each term runs its own ``autoscale()``; the counters of the terms that ended are kept
  in :attr:`EndpointRun.totals`, so :meth:`EndpointRun.statistics` never goes back.
* The attempts of one call's endpoints go one at a time, through a lock in their
  lease's ``gate``: the taking rule is decided under the lock, and an attempt that
  succeeded is claimed (:attr:`~.lease.Lease.claimed`) before the lock is released, so
  two endpoints freed at once never take the process past its share, and an attempt
  on an endpoint that another process holds never counts against the share.
* Shedding cancels the term's own nursery, not the lease's: the lease's term ends
  normally and the key is deleted by the endpoint's task, after the reservations.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import trio

if TYPE_CHECKING:
    from ._lease import Lease
    from ._membership import Membership
    from .autoscaler import Autoscaler, AutoscalerStatistics

__all__ = [
    "EndpointRun",
    "ShareEvent",
    "ShareEventKind",
    "autoscale_endpoints",
]

log = logging.getLogger(__name__)

ShareEventKind = Literal["members", "shed"]


@dataclass
class _Totals:
    """The counters of the autoscalers of terms that ended."""

    ended_by_outcome: Counter[str] = field(default_factory=Counter)
    reservations_failed: int = 0
    source_errors: int = 0

    def add(self, stats: AutoscalerStatistics) -> None:
        self.ended_by_outcome.update(stats.ended_by_outcome)
        self.reservations_failed += stats.reservations_failed
        self.source_errors += stats.source_errors

    def on_top_of(self, stats: AutoscalerStatistics) -> AutoscalerStatistics:
        return replace(
            stats,
            ended_by_outcome=dict(self.ended_by_outcome + Counter(stats.ended_by_outcome)),
            reservations_failed=self.reservations_failed + stats.reservations_failed,
            source_errors=self.source_errors + stats.source_errors,
        )


@dataclass(eq=False)
class EndpointRun:
    """One endpoint for :func:`autoscale_endpoints`, and its state while it runs.

    Args:
      name: the endpoint's name (for events).
      autoscale: starts its autoscaler: ``await nursery.start(autoscale)`` must answer the
        :class:`~.autoscaler.Autoscaler` (a ``functools.partial`` of
        :func:`~.autoscaler.autoscale`); called once per term with a lease.
      lease: the endpoint's lease, entered (``async with``) by the caller; ``None`` to
        autoscale without one.

    Attributes:
      scaler: the running autoscaler (``None`` while standing by).
      totals: the counters of the terms that ended.
    """

    name: str
    autoscale: Callable[..., Awaitable[Any]]
    lease: Lease | None = None
    scaler: Autoscaler | None = field(default=None, init=False)
    totals: _Totals = field(default_factory=_Totals, init=False)
    _scope: trio.CancelScope | None = field(default=None, init=False, repr=False)
    _shedding: bool = field(default=False, init=False, repr=False)
    _tried_at: float = field(default=-math.inf, init=False, repr=False)

    @property
    def leading(self) -> bool:
        """Its autoscaler may hold reservations: no lease, or the lease is held."""
        return self.lease is None or self.lease.leader

    def statistics(self) -> AutoscalerStatistics | None:
        """Its autoscaler's snapshot with the ended terms' counters added; ``None`` while
        standing by."""
        scaler = self.scaler
        return None if scaler is None else self.totals.on_top_of(scaler.statistics())


@dataclass(frozen=True)
class ShareEvent:
    """A change in how this process shares the endpoints.

    ``kind`` is ``members`` (the count of live processes or the share changed: sent at
    the start and at each change) or ``shed`` (``endpoint``'s term is ended to hand it
    to a process under its share). ``leading`` names the endpoints led at the time.
    """

    kind: ShareEventKind
    at: float
    message: str
    members: int
    share: int
    endpoints: int
    leading: tuple[str, ...]
    endpoint: str | None = None


async def autoscale_endpoints(
    endpoints: Sequence[EndpointRun],
    *,
    share: bool = True,
    patience_s: float | None = None,
    settle_s: float | None = None,
    on_event: Callable[[ShareEvent], None] | None = None,
    membership: Callable[[Sequence[Lease]], Membership | None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Autoscale every endpoint, each under its lease if it has one, until cancelled.

    Args:
      endpoints: the endpoints; their leases (if any) already entered.
      share: the leased endpoints on one Redis server (two or more) are shared out among
        the processes running them, through a :class:`~.lease.Membership` beside the
        leases (:meth:`~.lease.Membership.beside`): none leads more than ``ceil(n / k)``
        once things settle. ``False``: every process tries every lease.
      patience_s: how long an endpoint waits between attempts while this process
        claims its share (default ``2 * ttl_s``).
      settle_s: how long this process must lead more than its share before it sheds
        (default ``2 * renew_s``).
      on_event: called synchronously with each :class:`ShareEvent`; must not block.
      membership: makes the membership of a group of leases (on one store), or answers
        ``None`` for no sharing; default :meth:`~.lease.Membership.beside` (a Redis
        store). The result is entered (``async with``) here.

    ``task_status.started()`` is called once the endpoints without a lease run their
    autoscalers and each membership was counted once.

    Resource handling:
      On cancellation each autoscaler closes its reservations; then each lease's key is
      deleted (shielded, bounded) and the membership entries removed.
    """
    leased: dict[str, list[EndpointRun]] = {}
    for ep in endpoints:
        if ep.lease is not None:
            # Grouped by server: a membership lives beside its leases.
            leased.setdefault(ep.lease.store.describe(), []).append(ep)
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        for ep in endpoints:
            if ep.lease is None:
                ep.scaler = await nursery.start(ep.autoscale)
        for group in leased.values():
            sharing = None
            if share and len(group) > 1:
                sharing = await _Sharing.open(
                    stack,
                    group,
                    membership=membership,
                    patience_s=patience_s,
                    settle_s=settle_s,
                    on_event=on_event,
                )
            if sharing is not None:
                await nursery.start(sharing.run)
            for ep in group:
                assert ep.lease is not None
                nursery.start_soon(_lead, ep, ep.lease, sharing, name=f"lead {ep.name}")
        task_status.started()


async def _lead(ep: EndpointRun, lease: Lease, sharing: _Sharing | None) -> None:
    """Each term: wait for the lease, then autoscale until the term is lost or shed."""
    gate = None if sharing is None else partial(sharing.gate, ep)
    try:
        while True:
            try:
                async with (
                    lease.leadership(gate=gate),
                    trio.open_nursery() as nursery,
                ):
                    ep._scope = nursery.cancel_scope
                    ep.scaler = await nursery.start(ep.autoscale)
            finally:
                ep._scope = None
                scaler, ep.scaler = ep.scaler, None
                if scaler is not None:
                    ep.totals.add(scaler.statistics())
            if ep._shedding:
                # Every reservation of the term is closed: hand the endpoint over.
                ep._shedding = False
                await lease.release()
    finally:
        # Cancelled (SIGTERM): the reservations are closed by now; hand over at once.
        await lease.release()


class _Sharing:
    """The membership task and the taking rule of one :func:`autoscale_endpoints` call."""

    def __init__(
        self,
        endpoints: list[EndpointRun],
        membership: Membership,
        *,
        patience_s: float,
        settle_s: float,
        on_event: Callable[[ShareEvent], None] | None,
    ) -> None:
        self.endpoints = endpoints
        self.membership = membership
        self.patience_s = patience_s
        self.settle_s = settle_s
        self._on_event = on_event
        self._seen: tuple[int, int] | None = None
        self._lock = trio.Lock()

    @classmethod
    async def open(
        cls,
        stack: AsyncExitStack,
        endpoints: list[EndpointRun],
        *,
        membership: Callable[[Sequence[Lease]], Membership | None] | None,
        patience_s: float | None,
        settle_s: float | None,
        on_event: Callable[[ShareEvent], None] | None,
    ) -> _Sharing | None:
        """The sharing of these endpoints, its membership entered on ``stack``; ``None``
        when there is no membership for them (not all on one Redis server)."""
        if membership is None:
            from ._membership import Membership

            membership = Membership.beside
        members = membership([ep.lease for ep in endpoints if ep.lease is not None])
        if members is None:
            return None
        await stack.enter_async_context(members)
        return cls(
            endpoints,
            members,
            patience_s=2 * members.ttl_s if patience_s is None else patience_s,
            settle_s=2 * members.renew_s if settle_s is None else settle_s,
            on_event=on_event,
        )

    def share(self) -> int:
        return math.ceil(len(self.endpoints) / max(1, self.membership.members))

    def leading(self) -> list[EndpointRun]:
        return [ep for ep in self.endpoints if ep.lease is not None and ep.lease.leader]

    @asynccontextmanager
    async def gate(self, ep: EndpointRun) -> AsyncIterator[bool]:
        """Around each attempt of ``ep``'s lease: one attempt at a time, and whether to
        make it (:meth:`may_acquire`)."""
        async with self._lock:
            yield self.may_acquire(ep)

    def may_acquire(self, ep: EndpointRun) -> bool:
        """Try now: under the share, or once per ``patience_s`` at or above it."""
        now = trio.current_time()
        claimed = sum(1 for e in self.endpoints if e.lease is not None and e.lease.claimed)
        if claimed < self.share() or now - ep._tried_at >= self.patience_s:
            ep._tried_at = now
            return True
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        renew_s = self.membership.renew_s
        try:
            await self.membership.refresh()
            now = trio.current_time()
            # Standing back from the start counts as a try: patience runs from here.
            for ep in self.endpoints:
                ep._tried_at = now
            self._report()
            task_status.started()
            over_since: float | None = None
            next_at = now + renew_s
            while True:
                await trio.sleep_until(next_at)
                next_at = trio.current_time() + renew_s
                await self.membership.refresh()
                self._report()
                leading, share = self.leading(), self.share()
                now = trio.current_time()
                if len(leading) <= share:
                    over_since = None
                    continue
                if over_since is None:
                    over_since = now
                if now - over_since < self.settle_s:
                    continue
                over_since = None
                # Keep the oldest terms; shed the newest.
                leading.sort(key=lambda ep: _acquired_at(ep))
                for ep in leading[share:]:
                    self._shed(ep, share)
        finally:
            await self.membership.leave()

    def _shed(self, ep: EndpointRun, share: int) -> None:
        scope = ep._scope
        if scope is None:
            return
        ep._shedding = True
        ep._tried_at = trio.current_time()
        leading = len(self.leading())
        self._emit(
            "shed",
            f"handing endpoint {ep.name!r} over: this process leads {leading} of "
            f"{len(self.endpoints)} endpoints, more than its share of {share} with "
            f"{self.membership.members} processes",
            endpoint=ep.name,
        )
        scope.cancel()

    def _report(self) -> None:
        seen = (self.membership.members, self.share())
        if seen == self._seen:
            return
        self._seen = seen
        members, share = seen
        self._emit(
            "members",
            f"{members} process(es) share {len(self.endpoints)} endpoints "
            f"({self.membership.describe()}): this one leads at most {share}",
        )

    def _emit(self, kind: ShareEventKind, message: str, *, endpoint: str | None = None) -> None:
        log.debug("%s: %s", kind, message)
        if self._on_event is None:
            return
        event = ShareEvent(
            kind=kind,
            at=trio.current_time(),
            message=message,
            members=self.membership.members,
            share=self.share(),
            endpoints=len(self.endpoints),
            leading=tuple(ep.name for ep in self.leading()),
            endpoint=endpoint,
        )
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback failed on a %s event", kind)


def _acquired_at(ep: EndpointRun) -> float:
    term = None if ep.lease is None else ep.lease.term
    return math.inf if term is None else term.acquired_at
