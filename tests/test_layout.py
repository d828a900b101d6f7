"""The package's import contract: the roles import one way, and no module imports itself back.

Every module under ``nullworker/`` is read with ``ast``, and every import statement in it
counts: at the top, inside functions (the lazy imports) and under ``if TYPE_CHECKING:``.

* ``nullworker.errors``, ``nullworker.logs`` (log output) and the shared helpers
  (``nullworker._support``, ``nullworker._groups``) import nothing of nullworker;
  ``nullworker.vast`` (the wire format) only itself, the errors and the helpers.
* Each role imports only itself, ``nullworker.vast``, ``nullworker.errors``,
  ``nullworker.logs`` and the shared helpers: the worker (``nullworker.worker``), the client
  (``nullworker.client``) and the local engine (``nullworker.engine``) never import each
  other, nor the top-level modules that tie them together (``nullworker``,
  ``nullworker.cli``, ``nullworker.app``). One exception: the engine may use the worker's
  public names, ``from nullworker.worker import ...``, never a module inside it. Today it
  uses none: ``nullworker dev`` starts workers as ``python -m nullworker serve``
  processes.
* No import cycle between modules, top-level ones included.
* No module imports another module's private name (``from .x import _name``): what two
  modules share gets a public name, in the module it belongs to or in the shared
  helpers, so a rename of a private name never breaks another module.
* The queue clients of the ``autoscale`` extra (redis, nats-py, trio-asyncio) are imported
  only by the modules that need them (:data:`EXTRA_USERS`), so ``pip install nullworker``
  gives a worker without them and the autoscaler's core runs without them too.

An import of ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages ``a`` and
``a.b`` whose ``__init__`` Python runs first: otherwise every package that re-exports
its own modules would be a cycle with them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nullworker

PACKAGE = "nullworker"
ROOT = Path(nullworker.__file__).parent

#: What each part of the package may import from nullworker: module-name prefixes
#: (``P`` allows ``P`` and ``P.*``) and exact names (the package only, not its modules).
#: Helpers every part may use; they import nothing of nullworker themselves.
SHARED = ("nullworker._support", "nullworker._groups")
RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "nullworker.errors": ((), ()),
    "nullworker.logs": ((), ()),
    "nullworker._support": ((), ()),
    "nullworker._groups": ((), ()),
    "nullworker.vast": (("nullworker.vast", "nullworker.errors", *SHARED), ()),
    "nullworker.worker": (
        ("nullworker.worker", "nullworker.vast", "nullworker.errors", "nullworker.logs", *SHARED),
        (),
    ),
    "nullworker.client": (
        ("nullworker.client", "nullworker.vast", "nullworker.errors", "nullworker.logs", *SHARED),
        (),
    ),
    "nullworker.engine": (
        ("nullworker.engine", "nullworker.vast", "nullworker.errors", "nullworker.logs", *SHARED),
        ("nullworker.worker",),
    ),
}


#: Third-party top-level modules that come with the ``autoscale`` extra, and the only
#: modules that may import them.
EXTRA_MODULES = ("redis", "nats", "trio_asyncio", "boto3", "botocore", "asyncpg")
EXTRA_USERS = (
    "nullworker.client.demand._redis",
    "nullworker.client.demand._redis_queues",
    "nullworker.client.demand._nats",
    "nullworker.client.demand._sqs",
    "nullworker.client.demand._postgres",
    "nullworker.client._redis_lease",
    "nullworker.client._redis_client",
    "nullworker.client._aio",
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: Path  # its file, as nullworker/...
    line: int
    target: str  # the nullworker module (or package) it imports

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(root: Path, known: dict[str, Path], package: str = PACKAGE) -> Iterator[Import]:
    """Every import of a module of the package, by every module of it."""
    for module, path in known.items():
        shown = Path(package) / path.relative_to(root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(shown))
        # The package a relative import starts from: a package's own name for its
        # __init__, else the enclosing package.
        home = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):  # every statement, however deeply nested
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = home.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join([*base_parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                for alias in node.names:
                    # ``from pkg import mod`` imports the module pkg.mod when there is one.
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else base)
            for target in targets:
                if target == package or target.startswith(package + "."):
                    yield Import(module, shown, node.lineno, target)


def part_of(module: str) -> str | None:
    """The part of the package a module belongs to (a key of :data:`RULES`), if any."""
    for part in RULES:
        if module == part or module.startswith(part + "."):
            return part
    return None


def violations(found: list[Import]) -> list[str]:
    """One message per import that crosses the roles the wrong way."""
    problems: list[str] = []
    for imp in sorted(found, key=lambda imp: (str(imp.path), imp.line)):
        part = part_of(imp.module)
        if part is None:
            continue
        prefixes, exact = RULES[part]
        if imp.target in exact or any(
            imp.target == p or imp.target.startswith(p + ".") for p in prefixes
        ):
            continue
        allowed = [*prefixes, *(f"{name} (the package's public names only)" for name in exact)]
        problems.append(
            f"{imp.where()}: {imp.module} imports {imp.target}; {part} may import only "
            f"{', '.join(allowed) if allowed else 'nothing of nullworker'}"
        )
    return problems


def cycles(found: list[Import], known: dict[str, Path]) -> list[str]:
    """One message per group of modules that import each other (Tarjan's SCC)."""
    graph: dict[str, set[str]] = {name: set() for name in known}
    for imp in found:
        if imp.target in known and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    messages: list[str] = []
    for group in groups:
        edges = sorted(
            f"  {imp.where()}: {imp.module} imports {imp.target}"
            for imp in found
            if imp.module in group and imp.target in group and imp.target != imp.module
        )
        messages.append(f"import cycle between {', '.join(group)}:\n" + "\n".join(edges))
    return messages


def _check(root: Path) -> tuple[list[str], list[str]]:
    known = modules(root)
    found = list(imports(root, known))
    return violations(found), cycles(found, known)


def private_imports(root: Path, package: str = PACKAGE) -> list[str]:
    """One message per ``from <module> import _name`` of a private name of another module.

    A private *module* may be imported (``from ._core import Accounting``: the package
    keeps it to itself); a private *name* may not. Dunder names (``__version__``) are
    not private.
    """
    known = modules(root, package)
    problems: list[str] = []
    for module, path in known.items():
        shown = Path(package) / path.relative_to(root)
        home = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base_parts = home.split(".")[: len(home.split(".")) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if not (base == package or base.startswith(package + ".")):
                continue
            for alias in node.names:
                name = alias.name
                private = name.startswith("_") and not name.startswith("__")
                if private and f"{base}.{name}" not in known:  # a name, not a module
                    problems.append(f"{shown}:{node.lineno}: {module} imports {base}.{name}")
    return sorted(problems)


def test_no_module_imports_a_private_name_of_another() -> None:
    problems = private_imports(ROOT)
    assert not problems, (
        "private names imported across modules (give them a public name):\n" + "\n".join(problems)
    )


def test_the_private_name_check_names_a_bad_import(tmp_path: Path) -> None:
    files = {
        "__init__.py": "from ._version import __version__\n",
        "_version.py": "__version__ = '1'\n",
        "worker/__init__.py": "",
        # A private module is fine, and so is a public name from it.
        "worker/_core.py": "from . import _helpers\nfrom ._helpers import shared\n",
        "worker/_helpers.py": "shared = 1\n_hidden = 2\n",
        "worker/app.py": "def f():\n    from ._helpers import shared, _hidden\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert private_imports(tmp_path) == [
        "nullworker/worker/app.py:2: nullworker.worker.app imports "
        "nullworker.worker._helpers._hidden"
    ]


def test_each_role_imports_only_what_it_may() -> None:
    problems, _ = _check(ROOT)
    assert not problems, "imports across the roles the wrong way:\n" + "\n".join(problems)


def test_no_import_cycle() -> None:
    _, found = _check(ROOT)
    assert not found, "\n".join(found)


def extra_imports(root: Path) -> list[str]:
    """One message per import of an ``autoscale``-extra module outside :data:`EXTRA_USERS`."""
    problems: list[str] = []
    for module, path in modules(root).items():
        if module in EXTRA_USERS:
            continue
        shown = Path(PACKAGE) / path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in EXTRA_MODULES:
                    problems.append(f"{shown}:{node.lineno}: {module} imports {name}")
    return sorted(problems)


def test_only_the_queue_clients_import_the_autoscale_extra() -> None:
    problems = extra_imports(ROOT)
    assert not problems, (
        "modules outside "
        + ", ".join(EXTRA_USERS)
        + " import the autoscale extra:\n"
        + "\n".join(problems)
    )


def test_the_extra_check_names_a_bad_import(tmp_path: Path) -> None:
    (tmp_path / "worker").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "worker" / "__init__.py").write_text("")
    (tmp_path / "worker" / "app.py").write_text("def f():\n    from redis.asyncio import Redis\n")
    assert extra_imports(tmp_path) == [
        "nullworker/worker/app.py:2: nullworker.worker.app imports redis.asyncio"
    ]


def test_every_sub_package_has_a_rule() -> None:
    """A new sub-package must say what it may import (add it to RULES)."""
    packages = {
        name for name, path in modules(ROOT).items() if path.name == "__init__.py" and "." in name
    }
    missing = sorted(name for name in packages if part_of(name) is None)
    assert not missing, f"no import rule in tests/test_layout.py for {', '.join(missing)}"


def test_the_checks_name_a_bad_import_and_a_cycle(tmp_path: Path) -> None:
    """The checks themselves, on a small package that breaks each rule once."""
    files = {
        "__init__.py": "",
        "errors.py": "",
        "vast/__init__.py": "",
        # A lazy import, inside a function: still an import.
        "vast/envelope.py": "def f():\n    from ..worker import runtime\n",
        "worker/__init__.py": "",
        "worker/runtime.py": "from .app import serve\n",
        # Under TYPE_CHECKING: still an edge of the cycle.
        "worker/app.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .runtime import Worker\n"
        ),
        "client/__init__.py": "from nullworker.worker.runtime import Worker\n",
        "engine/__init__.py": "from ..worker import serve\nfrom .. import __version__\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    problems, found = _check(tmp_path)
    shared = "nullworker._support, nullworker._groups"
    assert sorted(problems) == [
        "nullworker/client/__init__.py:1: nullworker.client imports nullworker.worker.runtime; "
        "nullworker.client may import only nullworker.client, nullworker.vast, nullworker.errors, "
        f"nullworker.logs, {shared}",
        # ``from ..worker import serve`` is allowed (the package's public names), but
        # ``from .. import __version__`` imports the top-level package.
        "nullworker/engine/__init__.py:2: nullworker.engine imports nullworker; "
        "nullworker.engine may import only nullworker.engine, nullworker.vast, "
        f"nullworker.errors, nullworker.logs, {shared}, "
        "nullworker.worker (the package's public names only)",
        "nullworker/vast/envelope.py:2: nullworker.vast.envelope imports "
        "nullworker.worker.runtime; nullworker.vast may import only nullworker.vast, "
        f"nullworker.errors, {shared}",
    ]
    assert found == [
        "import cycle between nullworker.worker.app, nullworker.worker.runtime:\n"
        "  nullworker/worker/app.py:3: nullworker.worker.app imports nullworker.worker.runtime\n"
        "  nullworker/worker/runtime.py:1: nullworker.worker.runtime imports "
        "nullworker.worker.app"
    ]
