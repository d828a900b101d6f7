"""The options of ``nullworker dev``, checked once where they are made.

One frozen :class:`DevOptions` is shared by its command line (:mod:`.dev`), its scaling
policy (:mod:`.dev_scaling`) and its processes (:mod:`.dev_processes`). A bad value is
a ``ValueError`` naming the command-line option, which ``nullworker dev`` prints as its
one line before exiting 2.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from .core import DEFAULT_ENGINE_PORT

__all__ = ["DevOptions"]


@dataclass(frozen=True, kw_only=True)
class DevOptions:
    """What ``nullworker dev`` runs with; ``ValueError`` naming the option if out of range."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_ENGINE_PORT
    min_workers: int = 0
    max_workers: int = 3
    idle_timeout_s: float = 60.0
    #: Per-worker log files go here; ``None`` prefixes worker output with ``[worker N]``.
    log_dir: str | None = None
    #: Require this key on ``/route/`` (``None``: any key is accepted).
    api_key: str | None = None
    stop_timeout_s: float = 5.0
    worker_command: tuple[str, ...] = (sys.executable, "-m", "nullworker", "serve")
    #: Extra environment for the workers (e.g. ``MAX_RESERVATION_SECONDS``).
    worker_env: Mapping[str, str] = field(default_factory=dict)
    #: A shell command run beside each worker once it is ready, with the worker's
    #: control listener in ``NULLWORKER_CONTROL_URL`` (``None``: no consumer).
    consumer: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError("--max-workers must be at least 1")
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError("--min-workers must be between 0 and --max-workers")
        if not math.isfinite(self.idle_timeout_s) or self.idle_timeout_s < 0:
            raise ValueError("--idle-timeout must be a finite number of seconds >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be between 0 and 65535")
        if self.consumer is not None and not self.consumer.strip():
            raise ValueError("--consumer must be a command, not empty")
