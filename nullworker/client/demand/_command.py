"""Sources without a queue client: a shell command that prints a count, and an async callable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Awaitable, Callable

import trio

from ...errors import DemandError
from .._redact import redact
from ._base import DEFAULT_TIMEOUT_S, DemandSource, reason

#: Default bound on one run of a demand command (then it is killed).
COMMAND_TIMEOUT_S = 10.0
#: How much of a command's stdout is kept (a count is a few bytes; the rest is drained).
COMMAND_STDOUT_LIMIT = 4096
#: How much of the end of a command's stderr goes into an error message.
COMMAND_STDERR_TAIL = 500

# -- a command, a callable -------------------------------------------------------------


def _kill_group(process: trio.Process) -> None:
    # The command runs as the leader of its own process group, so this also reaches
    # the children a shell started (a pipeline, a subshell).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
    /dev/null) and parses its stdout, stripped, as one non-negative decimal integer::

        CommandDemand("redis-cli -h queue LLEN jobs")
        CommandDemand("aws sqs get-queue-attributes ... --query ... --output text")

    A non-zero exit, output that is not such an integer, or a run longer than
    ``timeout_s`` raises :class:`DemandError` (:class:`DemandTimeout` for the last)
    whose message ends with the tail of the command's stderr. On a timeout or a
    cancellation the command's whole process group is killed (SIGKILL): it runs in a
    new session so that the shell's children go too.

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
                self.cmd,
                shell=True,
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
                nursery.start_soon(_collect, process.stdout, stdout, COMMAND_STDOUT_LIMIT)
                nursery.start_soon(_collect_tail, process.stderr, stderr, COMMAND_STDERR_TAIL)
            returncode = await process.wait()
        except BaseException:
            # Cut off (timeout or cancellation): kill the group, stragglers included,
            # and reap the shell before the exception goes on.
            _kill_group(process)
            with trio.CancelScope(shield=True):
                await process.wait()
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
        text = bytes(stdout).decode("utf-8", "replace").strip()
        if not re.fullmatch(r"[0-9]+", text):
            shown = text if len(text) <= 80 else text[:79] + "…"
            said = f"printed {shown!r}" if text else "printed nothing"
            raise DemandError(
                f"{self.describe()}: {said}, not a non-negative integer ({_tail(stderr)})"
            )
        return int(text)


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
