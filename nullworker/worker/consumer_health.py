"""Consumer health: the worker is ready only while the consumer beside it answers.

On a Vast instance the worker runs beside the user's consumer, the process that takes
jobs from the queue and keeps the worker busy with local holds. If the consumer dies or
hangs, the worker alone would stay ready and idle: the autoscaler keeps reserving it and
a GPU is billed for a machine that will never take a job. The official null worker
points its health check at the consumer (``BACKEND_HEALTH_URL``) for that reason; so do
we, with one of two probes:

* :func:`http_probe` -- ``GET`` a URL (``BACKEND_HEALTH_URL``); any 2xx is healthy, the
  body is read up to :data:`MAX_BODY_BYTES` and dropped, redirects are not followed.
* :func:`command_probe` -- run a shell command
  (``NULLWORKER_BACKEND_HEALTH_COMMAND``); exit 0 is healthy. The command gets its own
  process group, and the whole group is killed if the probe outlives its bound.

Theory of operation
-------------------
:func:`watch` is pure Trio: it is given the probe (an async function returning ``None``
for healthy or a short reason) and says each change of state through ``on_change``,
exactly once per change:

* ``on_change(None)`` -- the first healthy answer (the worker may become ready), and
  every recovery after an unhealthy spell (the error is cleared: a consumer that
  restarts is taken back, the instance need not be replaced).
* ``on_change(message)`` -- no healthy answer for ``timeout_s`` since the last one, or
  none in the ``startup_s`` after start. The message names the target, the last reason
  and the bound, e.g. ``consumer unhealthy: GET http://127.0.0.1:9000/health: connection
  refused for 30 s``.

Probes start ``interval_s`` apart (a slow probe does not push the next one later than
its own end), each bounded by ``probe_timeout_s``; so an unhealthy consumer is said to
be so at most one interval plus one probe bound after ``timeout_s``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable

import httpx
import trio

from .._groups import split_leaves

__all__ = ["MAX_BODY_BYTES", "Probe", "command_probe", "http_probe", "watch"]

log = logging.getLogger("nullworker")

#: How much of a health answer's body is read (and dropped) before the probe is done.
MAX_BODY_BYTES = 4096
#: The shell that runs the health command.
SHELL = "/bin/sh"
#: Bound on reaping a health command after its group was killed.
_REAP_S = 2.0

#: One probe: ``None`` when healthy, else a short reason ("connection refused", "HTTP 500").
Probe = Callable[[], Awaitable[str | None]]


async def watch(
    probe: Probe,
    *,
    target: str,
    interval_s: float,
    probe_timeout_s: float,
    timeout_s: float,
    startup_s: float,
    on_change: Callable[[str | None], None],
) -> None:
    """Probe until cancelled; call ``on_change`` at each change of health (see the module).

    ``target`` names what is probed in the messages (``GET http://...``, ``command ...``).
    A probe that raises is a bug and propagates; a probe that outlives ``probe_timeout_s``
    is cancelled and counts as unhealthy.
    """
    started = trio.current_time()
    last_ok: float | None = None
    healthy: bool | None = None  # None: no answer yet
    while True:
        began = trio.current_time()
        with trio.move_on_after(probe_timeout_s) as bound:
            why = await probe()
        if bound.cancelled_caught:
            why = f"no answer in {probe_timeout_s:g} s"
        now = trio.current_time()
        if why is None:
            last_ok = now
            if healthy is not True:
                if healthy is False:
                    log.warning("consumer healthy again (%s): accepting reservations", target)
                else:
                    log.info("consumer healthy (%s)", target)
                healthy = True
                on_change(None)
        elif healthy is not False:
            if last_ok is None and now - started >= startup_s:
                message = (
                    f"consumer unhealthy: {target}: {why}; not healthy within "
                    f"{startup_s:g} s of start"
                )
            elif last_ok is not None and now - last_ok >= timeout_s:
                message = f"consumer unhealthy: {target}: {why} for {timeout_s:g} s"
            else:
                message = ""
            if message:
                log.error("%s; refusing reservations until it answers", message)
                healthy = False
                on_change(message)
        await trio.sleep_until(max(began + interval_s, now))


def http_probe(url: str, *, client: httpx.AsyncClient) -> Probe:
    """``GET url``: healthy on any 2xx. ``client`` sets the timeouts (no redirects)."""

    async def probe() -> str | None:
        try:
            async with client.stream("GET", url) as response:
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_BODY_BYTES:
                        break
                status = response.status_code
        except httpx.TimeoutException:
            return "timed out"
        except httpx.HTTPError as exc:
            return _describe_http_error(exc)
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    return probe


def _describe_http_error(exc: httpx.HTTPError) -> str:
    """The failure in a few words: the innermost OS error's text when there is one
    ("connection refused"), else the exception's own (bounded)."""
    reason = _os_reason(exc, depth=0)
    return reason if reason is not None else (str(exc) or type(exc).__name__)[:200]


def _os_reason(exc: BaseException | None, *, depth: int) -> str | None:
    """The first OS error in ``exc``'s causes (groups included), by its errno."""
    if exc is None or depth > 8:  # the chains are short; bounded all the same
        return None
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, BaseExceptionGroup):
        # Its members, in order (each one's own causes and groups are the recursion's).
        for inner in split_leaves(exc, BaseException)[0]:
            if (reason := _os_reason(inner, depth=depth + 1)) is not None:
                return reason
    return _os_reason(exc.__cause__ or exc.__context__, depth=depth + 1)


def command_probe(command: str, *, env: dict[str, str] | None = None) -> Probe:
    """Run ``command`` with ``/bin/sh -c``: healthy on exit 0.

    The command runs in its own process group with no input and its output dropped; when
    the probe is cancelled (its bound, or the worker stopping) the whole group is killed
    and the shell reaped, so a hung check leaves nothing behind.
    """

    async def probe() -> str | None:
        try:
            process = await trio.lowlevel.open_process(
                [SHELL, "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            return f"cannot run it: {exc.strerror or exc}"
        try:
            code = await process.wait()
        finally:
            if process.returncode is None:
                _kill_group(process.pid)
                with trio.move_on_after(_REAP_S, shield=True):
                    await process.wait()
        if code == 0:
            return None
        if code < 0:
            return f"killed by signal {-code}"
        return f"exit code {code}"

    return probe


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
