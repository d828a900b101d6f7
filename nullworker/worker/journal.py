"""The delivery journal: the ``request_idx`` values the engine may still think are here.

Why
---
The engine learns that a request reached this worker from a ``worker_status`` whose
``working_request_idxs`` lists it, and closes it only on a ``delete_requests`` entry.
Both live in the reporter's memory. A worker killed while it holds (SIGKILL, the OOM
killer) loses them, the process that replaces it knows nothing of that request, and
the engine never hears that it ended. The journal is what survives the process.

What is recorded
----------------
One text file next to the per-port lock (``nullworker-<port>.journal`` beside
``nullworker-<port>.lock`` in ``config.lock_dir``), one line per change:

* ``+<idx>``: written *before* the first ``worker_status`` that lists ``idx`` is sent
  (write-ahead). A process that dies right after that POST, or while it is in flight,
  leaves the line behind, whether the engine got the body or not.
* ``-<idx>``: written once the request's delete entry has been accepted by the engine
  (or dropped for good: refused on its own, or past the bound on undelivered entries).

On start, once the lock is taken (so no live process writes the file), every ``idx``
with a ``+`` and no later ``-`` was left by a process that died before the engine heard
how it ended. The reporter queues one delete entry for each, with ``status`` "Error"
(``success`` false: the request did not complete on this worker). They go after the
first delivered ``worker_status``, as any delete entry does, and are struck out of the
journal when accepted: exactly once, and a second restart sends nothing more. A
graceful stop whose final report could not reach the engine leaves its undelivered
entries behind the same way: they are sent on the next start, as ``Error`` (the
journal keeps indexes, not how each request ended).

Cost, and the window it leaves open
-----------------------------------
* Writes are batched per report round, not per reservation: a round appends the lines
  of everything it is about to report in one ``write`` (open, write, close: a few
  microseconds into the page cache), and rounds are paced (about one a second under
  churn with the defaults). The churn benchmark's ~800 reservations a second cost no
  syscall each; a reservation that is never listed in a report costs nothing at all.
* The price of batching: a reservation that starts and ends between two rounds is
  never written. If the process dies before its delete entry is delivered, the engine
  loses that entry -- but no ``worker_status`` of this worker ever listed it either,
  so the engine was never told that this worker had it, and has nothing here to close.
  A hold that *was* reported received was journaled before that report left, so a
  crash can never leave a reported request without a line.
* No ``fsync``. SIGKILL and the OOM killer end the process, not the kernel: what was
  written is in the page cache and reaches the file. Only a kernel crash or a power
  loss can lose the last lines, and that takes the instance (and this worker's slot
  in the engine's books) down with it. An ``fsync`` per round would block the Trio
  loop for a disk flush (milliseconds, tens of them on network disks) to guard against
  a case that does not need it.
* Compaction: once the file holds more than ``COMPACT_MIN_LINES`` lines and four times
  as many as there are open entries, it is rewritten with the open entries only (a
  temporary file, then ``os.replace``: a crash in between leaves the old file or the
  new one, both right).

Failures never stop the worker: a corrupt journal (a line that is not ``+N``/``-N``,
say the torn end of a write) is one warning and its readable lines are used; an
unreadable one is one warning and is replaced; a write that fails (disk full) is one
warning, and the journal is off for the rest of the process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

__all__ = ["COMPACT_MIN_LINES", "MAX_READ_BYTES", "Journal"]

log = logging.getLogger("nullworker.journal")

#: Below this many lines the file is never rewritten (about 10 bytes a line).
COMPACT_MIN_LINES = 10_000
#: The most of a journal read at start; a longer file is not one this worker wrote
#: (compaction keeps it far smaller), and only its start is used.
MAX_READ_BYTES = 4 * 1024 * 1024


class Journal:
    """The open ``request_idx`` values of one port's worker, kept in a file.

    Build it with :meth:`open`, which also returns what a previous process left.
    """

    def __init__(self, path: str, live: Iterable[int] = ()) -> None:
        self.path = path
        #: Entries written with ``+`` and not yet struck out (insertion order).
        self._live: dict[int, None] = dict.fromkeys(live)
        #: Lines in the file now (for compaction).
        self._lines = len(self._live)
        self._broken = False

    @classmethod
    def open(cls, path: str) -> tuple[Journal, list[int]]:
        """Read ``path`` and rewrite it with its open entries only.

        Returns the journal and the ``request_idx`` values a previous process left
        open (oldest first). Never raises for a missing, corrupt or unreadable file.
        """
        leftover = _read(path)
        journal = cls(path, leftover)
        journal._rewrite()
        return journal, leftover

    def __contains__(self, idx: int) -> bool:
        return idx in self._live

    def __len__(self) -> int:
        return len(self._live)

    def add(self, idxs: Iterable[int]) -> None:
        """Record that the engine is about to hear of ``idxs`` (the new ones only)."""
        new = list(dict.fromkeys(idx for idx in idxs if idx not in self._live))
        if not new:
            return
        self._live.update(dict.fromkeys(new))
        self._append("".join(f"+{idx}\n" for idx in new), len(new))

    def remove(self, idxs: Iterable[int]) -> None:
        """Strike out ``idxs`` (their end reached the engine, or never will)."""
        # A batch can carry one index twice (a client reusing its request_idx).
        gone = list(dict.fromkeys(idx for idx in idxs if idx in self._live))
        if not gone:
            return
        for idx in gone:
            del self._live[idx]
        self._append("".join(f"-{idx}\n" for idx in gone), len(gone))
        if self._lines > max(COMPACT_MIN_LINES, 4 * len(self._live)):
            self._rewrite()

    def _append(self, text: str, lines: int) -> None:
        if self._broken:
            return
        try:
            with open(self.path, "a", encoding="ascii") as handle:
                handle.write(text)
        except OSError as exc:
            self._fail(exc)
            return
        self._lines += lines

    def _rewrite(self) -> None:
        if self._broken:
            return
        text = "".join(f"+{idx}\n" for idx in self._live)
        temporary = f"{self.path}.tmp"
        try:
            with open(temporary, "w", encoding="ascii") as handle:
                handle.write(text)
            os.replace(temporary, self.path)
        except OSError as exc:
            self._fail(exc)
            return
        self._lines = len(self._live)

    def _fail(self, exc: OSError) -> None:
        self._broken = True
        log.warning(
            "cannot write the delivery journal %s (%s): a crash from now on can leave "
            "held requests unreported to the engine",
            self.path,
            exc.strerror or type(exc).__name__,
        )


def _read(path: str) -> list[int]:
    """The open entries of the journal at ``path``; one warning if it is damaged."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_READ_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning(
            "cannot read the delivery journal %s (%s); starting without it",
            path,
            exc.strerror or type(exc).__name__,
        )
        return []
    problems: list[str] = []
    if len(data) > MAX_READ_BYTES:
        data = data[:MAX_READ_BYTES]
        problems.append(f"only its first {MAX_READ_BYTES} bytes were read")
    live: dict[int, None] = {}
    bad = 0
    for line in data.split(b"\n"):
        if not line:
            continue
        sign, digits = line[:1], line[1:]
        if sign not in (b"+", b"-") or not digits.isdigit() or len(digits) > 20:
            bad += 1
            continue
        idx = int(digits)
        if sign == b"+":
            live[idx] = None
        else:
            live.pop(idx, None)
    if bad:
        problems.append(f"{bad} unreadable line(s) skipped")
    if problems:
        log.warning("the delivery journal %s is damaged: %s", path, "; ".join(problems))
    return list(live)
