"""The public surface: every exported name resolves, and the core imports without the web stack."""

from __future__ import annotations

import subprocess
import sys

import nullworker


def test_every_exported_name_resolves() -> None:
    for name in nullworker.__all__:
        assert getattr(nullworker, name) is not None, name


def test_the_core_does_not_import_the_web_stack() -> None:
    code = (
        "import sys, nullworker\n"
        "slot = nullworker.ReservationSlot(max_reservation_s=1, max_queue_time_s=0)\n"
        "print(sorted(m for m in ('quart', 'hypercorn', 'httpx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
