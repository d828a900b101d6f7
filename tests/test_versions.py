"""The HTTP layer runs on the versions it was written for.

``nullworker/worker/http_server.py`` subclasses Hypercorn's per-connection server and its
HTTP/1.1 protocol and replaces private methods of both; ``nullworker/worker/app.py``
subclasses Quart-Trio's per-request handler and calls Quart's request factory;
the HTTP/1.1 protocol withdraws an upgrade proposal from h11's state machine. A new minor
release may rename or reorder any of these without notice, so ``pyproject.toml`` pins each
to a minor version, and this test fails at once, naming the package, when the installed
version is not the pinned one (the pins are read from ``pyproject.toml``, so the two
cannot drift apart).
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

#: What the HTTP layer relies on beyond the public API, and where.
RELIED_ON = {
    "hypercorn": "nullworker/worker/http_server.py (TCPServer, H11Protocol)",
    "quart-trio": "nullworker/worker/app.py (TrioASGIHTTPConnection)",
    "quart": "nullworker/worker/app.py (_create_request_from_scope)",
    "h11": "nullworker/worker/http_server.py (the upgrade proposal in h11's state)",
}


def _pins() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = (Requirement(line) for line in project["dependencies"])
    return {requirement.name.lower(): requirement for requirement in requirements}


@pytest.mark.parametrize("name", sorted(RELIED_ON))
def test_the_http_layer_runs_on_the_pinned_minor_version(name: str) -> None:
    pins = _pins()
    assert name in pins, f"pyproject.toml does not pin {name}, which {RELIED_ON[name]} relies on"
    specifier = pins[name].specifier
    (spec,) = specifier
    assert spec.operator == "==" and spec.version.endswith(".*"), (
        f"pyproject.toml should pin {name} to one minor version (==X.Y.*), not {specifier}"
    )
    installed = importlib.metadata.version(name)
    assert specifier.contains(installed, prereleases=True), (
        f"{name} {installed} is installed, but {RELIED_ON[name]} was written for "
        f"{name}{specifier} (pyproject.toml): read those overrides against {name} "
        f"{installed} before moving the pin"
    )
