"""Sources without a queue client: a shell command that prints a count, and an async callable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable

import trio

from ...errors import DemandError
from .._redact import reason, redact
from ._base import DEFAULT_TIMEOUT_S, DemandSource

#: Default bound on one run of a demand command (then it is killed).
COMMAND_TIMEOUT_S = 10.0
#: The most a command may print on stdout (a count is a few bytes): more is an error,
#: and the rest is drained unread.
COMMAND_STDOUT_LIMIT = 4096
#: Bound on the reaper's own cleanup after a timeout or a cancellation (then SIGKILL).
COMMAND_REAP_TIMEOUT_S = 1.0
#: The one line a command prints: a count of at most 18 digits (below 2**63).
_COUNT_LINE = re.compile(r"[ \t]*([0-9]{1,18})[ \t]*\r?\n?")
#: How much of the end of a command's stderr goes into an error message.
COMMAND_STDERR_TAIL = 500

# -- a command, a callable -------------------------------------------------------------

# The reaper: a small Python process between us and the shell. It makes itself a child
# subreaper (prctl PR_SET_CHILD_SUBREAPER, Linux 3.4+), so that every process the
# command leaves behind (a `cmd &`, and a `setsid cmd &` too, which leaves the command's
# process group and session) is re-parented to it, not to init. When the shell exits,
# or on SIGTERM (our timeout or cancellation), it kills every process still below it
# and reaps them, then exits with the shell's status. It also asks for SIGTERM when we
# die (PR_SET_PDEATHSIG), so an autoscaler that is killed leaves no command behind.
# Without it, each poll of `setsid sleep 777 & echo 1` leaves one orphan.
_REAPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[2]):
    sys.exit(143)  # our parent is already gone
me = os.getpid()

def kill_all():
    while True:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return

def on_term(signum, frame):
    kill_all()
    os._exit(128 + signum)

signal.signal(signal.SIGTERM, on_term)
shell = os.fork()
if shell == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execv("/bin/sh", ["sh", "-c", sys.argv[1]])
status = os.waitpid(shell, 0)[1]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
kill_all()
code = os.waitstatus_to_exitcode(status)
if code < 0:  # die of the same signal, so the status says which
    try:
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL, SIGSTOP: no handler to reset
    os.kill(me, -code)
sys.exit(code)
"""


def _kill_group(process: trio.Process) -> None:
    # The reaper runs as the leader of its own process group, so this also reaches the
    # shell and the children it started in that group (a pipeline, a subshell).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _stop(process: trio.Process) -> None:
    """Stop a command cut off by a timeout or a cancellation, and everything it started.

    SIGTERM asks the reaper to kill and reap every process below it; if it has not
    exited within :data:`COMMAND_REAP_TIMEOUT_S`, SIGKILL goes to its process group.
    Either way the reaper is reaped before this returns. Shielded: the caller is being
    cancelled.
    """
    with trio.CancelScope(shield=True):
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        with trio.move_on_after(COMMAND_REAP_TIMEOUT_S):
            await process.wait()
        _kill_group(process)
        await process.wait()


async def _collect(stream: trio.abc.ReceiveStream, into: bytearray, limit: int) -> None:
    """Read ``stream`` to its end, keeping its first ``limit`` bytes in ``into``."""
    while chunk := await stream.receive_some(65536):
        if len(into) < limit:
            into += chunk[: limit - len(into)]


async def _collect_tail(stream: trio.abc.ReceiveStream, into: bytearray, limit: int) -> None:
    """Read ``stream`` to its end, keeping its last ``limit`` bytes in ``into``."""
    while chunk := await stream.receive_some(65536):
        into += chunk
        del into[:-limit]


def _tail(data: bytes | bytearray) -> str:
    text = bytes(data).decode("utf-8", "replace").strip()
    if not text:
        return "nothing on stderr"
    if len(data) >= COMMAND_STDERR_TAIL:
        text = "…" + text
    return f"stderr: {redact(text)!r}"


class CommandDemand(DemandSource):
    """The integer a shell command prints.

    Each read runs ``cmd`` with ``/bin/sh -c`` (inheriting the environment, stdin from
    /dev/null) and parses its stdout as one line holding one non-negative decimal
    integer (spaces around it and a final newline allowed, at most 18 digits)::

        CommandDemand("redis-cli -h queue LLEN jobs")
        CommandDemand("aws sqs get-queue-attributes ... --query ... --output text")

    A non-zero exit, output that is not such a line (another line, more than
    :data:`COMMAND_STDOUT_LIMIT` bytes), or a run longer than ``timeout_s`` raises
    :class:`DemandError` (:class:`DemandTimeout` for the last) whose message ends with
    the tail of the command's stderr.

    No process of the command outlives its read. The shell runs under a small reaper
    process (Python, a child subreaper, see ``_REAPER``): when the shell exits, every
    process it left behind is killed, even one that left the process group and session
    (``setsid daemon &``); on a timeout or a cancellation the reaper kills them all
    (SIGTERM to it, then SIGKILL to its process group after
    :data:`COMMAND_REAP_TIMEOUT_S`). A command that starts a daemon on purpose sees it
    killed: a demand command should only print a count. Linux only.

    Args:
      cmd: the shell command line.
      timeout_s: bound on one run.
    """

    def __init__(self, cmd: str, *, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        if not cmd.strip():
            raise ValueError("CommandDemand needs a command")
        super().__init__(timeout_s=timeout_s)
        self.cmd = cmd
        self._stderr = bytearray()

    def describe(self) -> str:
        shown = self.cmd if len(self.cmd) <= 200 else self.cmd[:199] + "…"
        return f"command {redact(shown)!r}"

    def _timeout_message(self) -> str:
        return (
            f"{self.describe()}: did not finish within {self.timeout_s:g} s and was killed "
            f"({_tail(self._stderr)})"
        )

    async def _read(self) -> int:
        stdout = bytearray()
        stderr = self._stderr = bytearray()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-S", "-c", _REAPER, self.cmd, str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise DemandError(f"{self.describe()}: could not start: {reason(exc)}") from exc
        assert process.stdout is not None and process.stderr is not None
        try:
            async with process.stdout, process.stderr, trio.open_nursery() as nursery:
                # One byte over the limit is kept, to tell "too much" from "exactly".
                nursery.start_soon(_collect, process.stdout, stdout, COMMAND_STDOUT_LIMIT + 1)
                nursery.start_soon(_collect_tail, process.stderr, stderr, COMMAND_STDERR_TAIL)
            returncode = await process.wait()
        except BaseException:
            # Cut off (timeout or cancellation): kill the command and everything it
            # started, and reap the reaper, before the exception goes on.
            await _stop(process)
            raise
        if returncode != 0:
            if returncode < 0:
                try:
                    how = f"was killed by {signal.Signals(-returncode).name}"
                except ValueError:
                    how = f"was killed by signal {-returncode}"
            else:
                how = f"exited with status {returncode}"
            raise DemandError(f"{self.describe()}: {how} ({_tail(stderr)})")
        if len(stdout) > COMMAND_STDOUT_LIMIT:
            raise DemandError(
                f"{self.describe()}: printed more than {COMMAND_STDOUT_LIMIT} bytes, not one "
                f"count ({_tail(stderr)})"
            )
        raw = bytes(stdout).decode("utf-8", "replace")
        line = _COUNT_LINE.fullmatch(raw)
        if line is None:
            text = raw.strip()
            shown = text if len(text) <= 80 else text[:79] + "…"
            said = f"printed {shown!r}" if text else "printed nothing"
            raise DemandError(
                f"{self.describe()}: {said}, not a non-negative integer on one line "
                f"({_tail(stderr)})"
            )
        return int(line[1])


class CallableDemand(DemandSource):
    """Demand from an async function: ``await fn()`` must return an int >= 0.

    For queues with no built-in source::

        async def sqs_depth() -> int: ...
        source = CallableDemand(sqs_depth)

    A result that is not an int (``True`` and ``3.0`` are refused) or is negative, and
    any ``Exception`` the function raises, become :class:`DemandError` (the function's
    exception as ``__cause__``); ``trio.Cancelled`` and other ``BaseException`` pass
    through. ``fn`` runs in Trio: to call an asyncio library, go through
    ``nullworker.client._aio``.

    Args:
      fn: a Trio-flavoured async function of no arguments.
      timeout_s: bound on one call.
      name: what :meth:`describe` calls it (default: the function's qualified name).
    """

    _wrapped_errors = (Exception,)

    def __init__(
        self,
        fn: Callable[[], Awaitable[int]],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise ValueError(f"CallableDemand needs an async function, not {fn!r}")
        super().__init__(timeout_s=timeout_s)
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__qualname__", repr(fn))

    def describe(self) -> str:
        return f"callable {redact(self.name)}"

    async def _read(self) -> int:
        return await self.fn()
