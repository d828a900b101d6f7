"""Build the virtual environment with the official SDK (``vastai`` 1.9.1) that runs ``worker.py``.

    .venv/bin/python tests/sdk_worker/install.py     # prints the venv's Python

The interop tests (``tests/test_sdk_interop.py``, through their ``sdk_python`` fixture)
and ``bench/compare.py`` run ``tests/sdk_worker/worker.py`` with that Python. It is
built once per machine and Python version in pytest's cache directory,
``.pytest_cache/d/sdk-venv-vastai-1.9.1-py3XY`` (``pytest --cache-clear`` removes it).
Building is idempotent: with the marker ``installed.ok`` in place it does nothing, and
a lock file next to the venv keeps two processes (two test sessions, xdist workers, the
benchmark) from building it at once. A half-built venv has no marker and is rebuilt.

Run as a script, the exit status is 0 with the venv's Python printed when it is built.
When ``pip`` cannot download the SDK off CI (``CI`` unset; no network to PyPI?) it says
so on stderr and exits 0 without printing a path: the interop tests then try once more
and are skipped with that reason. Any other failure, and any failure in CI, exits 2.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

SDK_VERSION = "1.9.1"
WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"
ROOT = Path(__file__).resolve().parents[2]
#: The venv's directory name, under pytest's cache directory ``<cache>/d/``.
VENV_NAME = f"sdk-venv-vastai-{SDK_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
#: Where pytest's cache plugin puts it with the default ``cache_dir`` (``.pytest_cache``).
DEFAULT_VENV = ROOT / ".pytest_cache" / "d" / VENV_NAME
#: Bound on each step of building it (first run only; ~20 s on a warm index).
INSTALL_TIMEOUT_S = 600


class InstallError(Exception):
    """A step of building the venv failed; ``offline`` when it is the download (``pip``)."""

    def __init__(self, message: str, *, offline: bool) -> None:
        super().__init__(message)
        self.offline = offline


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_sdk(venv: Path = DEFAULT_VENV) -> Path:
    """The Python of ``venv``, built with ``vastai==1.9.1`` unless its marker says it is.

    Raises ``InstallError`` when a step of building it fails.
    """
    python = _venv_python(venv)
    marker = venv / "installed.ok"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and python.exists()):
            build(venv, python)
            marker.write_text(SDK_VERSION + "\n")
    return python


def build(venv: Path, python: Path) -> None:
    """(Re)build ``venv`` from scratch; raises ``InstallError`` naming the failed step."""
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        ("venv", [sys.executable, "-m", "venv", str(venv)]),
        (
            "pip",
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
                f"vastai=={SDK_VERSION}",
            ],
        ),
        ("import", [str(python), "-c", "import vastai.serverless.server.worker"]),
    ]
    for name, step in steps:
        try:
            done = subprocess.run(
                step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
            )
            failed = done.returncode != 0
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        except subprocess.TimeoutExpired:
            failed, tail = True, f"timed out after {INSTALL_TIMEOUT_S} s"
        if failed:
            raise InstallError(
                f"installing the official SDK vastai=={SDK_VERSION}: {name} step failed:\n{tail}",
                offline=name == "pip",
            )


def fail_or_skip(error: InstallError) -> NoReturn:
    """``error`` as pytest's outcome: a failed download off CI (``CI`` unset) skips (no
    network to PyPI?); anything else, and anything in CI (which reaches PyPI), fails."""
    import pytest

    if error.offline and not os.environ.get("CI"):
        pytest.skip(f"{error}\n(no network to PyPI?)")
    pytest.fail(str(error))


def _install_sdk(venv: Path, python: Path) -> None:
    """``build`` with pytest's outcomes (``fail_or_skip``), for ``bench/compare.py``."""
    try:
        build(venv, python)
    except InstallError as error:
        fail_or_skip(error)


def main() -> int:
    try:
        python = ensure_sdk()
    except InstallError as error:
        if error.offline and not os.environ.get("CI"):
            print(f"{error}\n(no network to PyPI?) the interop tests will skip.", file=sys.stderr)
            return 0
        print(error, file=sys.stderr)
        return 2
    print(python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
