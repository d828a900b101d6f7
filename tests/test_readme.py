"""The examples of the README and of every docs/*.md page, run as written, so that they
cannot drift from the code.

* Every ```python block (of README.md and of each page, alike) runs as a program of its
  own (``python -u``, in a temporary directory, under a time bound) against a real local
  engine (:class:`nullworker.engine.Engine`, served here) with one real worker
  registered to it. The block sees the engine the way a user's program does, through
  ``VAST_ENGINE_URL`` and ``VAST_API_KEY``; the engine checks the key.
* A block that runs until stopped is interrupted (SIGINT, as Ctrl-C) once its output
  shows that it works. What shows it, and whether it must then end cleanly, is in
  :data:`PLANS`, keyed by a piece of the block's code; any other block must end by
  itself with status 0.
* A block that cannot run on its own (a fragment of a larger program) is preceded in its
  file by ``<!-- not-run: REASON -->``. Such markers are few (at most
  :data:`MAX_NOT_RUN_PER_FILE` in a file, :data:`MAX_NOT_RUN` in all), and each gives a
  reason.
* A ```bash block holds commands only: a line that looks like a command's output (JSON,
  an HTTP status line) belongs in a ```text block of its own, or pasting the block runs
  it as a command.
* The README's test command is the one ``.ci/run`` runs, character for character, and so is
  every copy of it in the pages; the configuration reference names every command-line flag
  and every ``NULLWORKER_*`` variable the code reads.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from nullworker.engine import Engine, serve_engine
from nullworker.worker.server import ServeInfo

from .conftest import StartWorker, envelope
from .helpers import Output

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
#: The files whose code blocks are run or checked: the README and every page of the site.
FILES = [README, *sorted((REPO / "docs").glob("*.md"))]
KEY = "readme-api-key"
#: Bound on one block's run, from start to exit.
RUN_TIMEOUT_S = 30.0
#: Bound on the exit after SIGINT.
EXIT_TIMEOUT_S = 10.0
#: At most this many blocks may be marked not-run in one file, and in all files together.
MAX_NOT_RUN_PER_FILE = 2
MAX_NOT_RUN = 4

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")


# -- the blocks of the README and the pages ----------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block: its file, language, code (unindented) and where it starts."""

    file: str  # relative to the repository: README.md, docs/scaling.md
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason of a <!-- not-run: ... --> right above it

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def file_blocks(text: str, file: str = "README.md") -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = len(opening["indent"])
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            body.append(lines[end][indent:] if lines[end][:indent].isspace() else lines[end])
            end += 1
        assert end < len(lines), f"{file}:{index + 1}: the code block is never closed"
        marker = _NOT_RUN.match(lines[index - 1]) if index else None
        blocks.append(
            Block(
                file=file,
                lang=opening["lang"],
                code="\n".join(body) + "\n",
                line=index + 1,
                not_run=marker["reason"].strip() if marker else None,
            )
        )
        index = end + 1
    return blocks


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


BLOCKS = [
    block
    for path in FILES
    for block in file_blocks(path.read_text(encoding="utf-8"), _relative(path))
]
README_BLOCKS = [b for b in BLOCKS if b.file == "README.md"]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
TO_RUN = [b for b in PYTHON if b.not_run is None]
SHELL = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell")]


def test_the_docs_have_python_examples_to_run() -> None:
    assert len(TO_RUN) >= 3


@pytest.mark.parametrize("path", FILES, ids=[_relative(p) for p in FILES])
def test_not_run_markers_are_few_each_with_a_reason(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    markers = [line for line in text.splitlines() if "not-run" in line]
    marked = [b for b in BLOCKS if b.file == _relative(path) and b.not_run is not None]
    # Every marker stands right above a Python block (a stray one would excuse nothing).
    assert len(markers) == len(marked), markers
    assert all(b.lang == "python" for b in marked), [b.id for b in marked]
    assert len(marked) <= MAX_NOT_RUN_PER_FILE, [b.id for b in marked]
    for block in marked:
        assert block.not_run is not None and len(block.not_run.split()) >= 4, (
            f"{block.id}: say why the block cannot run on its own"
        )


def test_not_run_markers_are_few_in_all() -> None:
    marked = [b.id for b in BLOCKS if b.not_run is not None]
    assert len(marked) <= MAX_NOT_RUN, marked


# -- running a block ----------------------------------------------------------------------


class Running(Output):
    """A block running as a child process; its output read as it comes."""

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of ``pattern`` in stdout, once it is there."""
        while True:
            found = re.search(pattern, self.out)
            if found is not None:
                return found
            if self.process.returncode is not None:
                await trio.sleep(0.1)  # the last output may still be in the pipe
                found = re.search(pattern, self.out)
                assert found is not None, (
                    f"exited with {self.process.returncode} before printing {pattern!r}\n"
                    f"stdout:\n{self.out}\nstderr:\n{self.err}"
                )
                return found
            with trio.move_on_after(0.5):
                await self.next_change()

    @property
    def output(self) -> str:
        return f"status {self.process.returncode}\nstdout:\n{self.out}\nstderr:\n{self.err}"


During = Callable[[Running, re.Match[str]], Awaitable[None]]


@dataclass(frozen=True)
class Plan:
    """How a block that does not end by itself shows that it works.

    ``shows`` is a pattern its stdout must match; ``during`` (optional) then exercises
    the running program; ``interrupt`` sends SIGINT after that; ``clean`` requires an
    exit with status 0 and no traceback (after the SIGINT too), and ``ends`` a pattern
    the whole stdout must match at its end.
    """

    shows: str
    interrupt: bool = False
    clean: bool = True
    during: During | None = None
    ends: str = ""


async def hold_until_shutdown(running: Running, shown: re.Match[str]) -> None:
    """Hold a reservation on the example's worker, then Ctrl-C it: the holder must be
    answered ``503 {"released": "shutdown"}``, not cut off."""
    url = shown["url"]
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as http:

        async def hold() -> None:
            payload = {"duration": 60}
            answers.append(await http.post(f"{url}/reserve", json=envelope(url, payload=payload)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            with trio.fail_after(5):
                while not (await http.get(f"{url}/health")).json().get("busy"):
                    await trio.sleep(0.05)
            running.process.send_signal(signal.SIGINT)
            with trio.fail_after(EXIT_TIMEOUT_S):
                while not answers:
                    await trio.sleep(0.05)
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["released"] == "shutdown"


#: The blocks that need more than "runs and exits 0", keyed by a piece of their code.
PLANS: dict[str, Plan] = {
    # Holds a reservation through the engine, does its "work" (2 s) and lets go.
    "nullworker.reserve(": Plan(shows=r"holding http://\S+\nreleased: client_released\n"),
    # autoscale() runs until Ctrl-C: it works once it holds a reservation, and the
    # SIGINT must end it cleanly, releasing everything.
    "nullworker.autoscale,": Plan(
        shows=r"reservation_started ",
        interrupt=True,
        ends=r"stopping: releasing every reservation\n(reservation_ended released: .*\n)+",
    ),
    # A worker served until Ctrl-C: it must answer its holder and end cleanly.
    "nullworker.serve,": Plan(
        shows=r"serving on (?P<url>http://\S+)\n",
        interrupt=True,
        during=hold_until_shutdown,
        ends=r"received SIGINT - stopping\nstopped\n",
    ),
}


def plan_for(block: Block) -> Plan:
    keys = [key for key in PLANS if key in block.code]
    assert len(keys) <= 1, f"{block.id}: more than one plan matches: {keys}"
    return PLANS[keys[0]] if keys else Plan(shows="")


def test_every_plan_names_a_block() -> None:
    for key in PLANS:
        assert any(key in b.code for b in TO_RUN), f"no block to run contains {key!r}"


@pytest.fixture
async def engine_with_worker(
    nursery: trio.Nursery, start_worker: StartWorker
) -> AsyncIterator[tuple[Engine, ServeInfo]]:
    """The local engine (it requires ``KEY``) and one idle worker registered to it."""
    engine = Engine(api_key=KEY)
    await nursery.start(partial(serve_engine, engine))
    assert engine.url is not None
    info = await start_worker(report_addrs=(engine.url,), container_id=1, unsecured=False)
    await engine.wait_for(lambda e: e.worker_state(1) == "idle", timeout=5)
    yield engine, info


@pytest.mark.parametrize("block", TO_RUN, ids=[b.id for b in TO_RUN])
async def test_python_block_runs(
    block: Block,
    engine_with_worker: tuple[Engine, ServeInfo],
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    engine, _ = engine_with_worker
    assert engine.url is not None
    plan = plan_for(block)
    script = tmp_path / f"{Path(block.file).stem}_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(
        os.environ,
        VAST_ENGINE_URL=engine.url,
        VAST_API_KEY=KEY,
        TMPDIR=str(tmp_path),  # the worker's per-port lock files
        PYTHONUNBUFFERED="1",
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-u", str(script)],
        cwd=str(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    running = Running(process)
    assert process.stdout is not None and process.stderr is not None
    nursery.start_soon(running.pump, process.stdout, "out")
    nursery.start_soon(running.pump, process.stderr, "err")
    try:
        with trio.fail_after(RUN_TIMEOUT_S):
            shown = await running.wait_for(plan.shows)
            if plan.during is not None:
                await plan.during(running, shown)
            elif plan.interrupt:
                process.send_signal(signal.SIGINT)
        with trio.fail_after(EXIT_TIMEOUT_S if plan.interrupt else RUN_TIMEOUT_S):
            await process.wait()
    except trio.TooSlowError:
        pytest.fail(f"{block.id} did not finish in time\n{running.output}")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await trio.sleep(0.1)  # the rest of the output
    if plan.clean:
        assert process.returncode == 0, f"{block.id}\n{running.output}"
        assert "Traceback" not in running.err, f"{block.id}\n{running.output}"
        assert re.search(f"{plan.ends}$", running.out), f"{block.id}\n{running.output}"
    else:
        # Ended by the SIGINT: Python's own KeyboardInterrupt, nothing else.
        ended = process.returncode in (0, -signal.SIGINT) or (
            process.returncode == 1 and "KeyboardInterrupt" in running.err
        )
        assert ended, f"{block.id}\n{running.output}"


async def test_the_reserve_example_reports_a_missing_api_key(tmp_path: Path) -> None:
    """Its ``except nullworker.ConfigError`` branch, as documented: nothing is sent."""
    (block,) = [b for b in TO_RUN if "nullworker.reserve(" in b.code]
    script = tmp_path / "reserve.py"
    script.write_text(block.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("VAST_API_KEY", "VAST_ENGINE_URL")}
    env["VAST_ENGINE_URL"] = "http://127.0.0.1:9"  # never asked
    with trio.fail_after(RUN_TIMEOUT_S):
        done = await trio.run_process(
            [sys.executable, str(script)],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr.decode() == (
        "cannot reserve: an API key is required: pass api_key or set VAST_API_KEY\n"
    )


# -- the quick start ------------------------------------------------------------------------


def quick_start() -> tuple[Block, Block, Block]:
    """The quick start's command that starts the worker, the one that holds it, and its output."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quick start\n")
    end = text.index("\n## ", start)
    first, last = text[:start].count("\n") + 1, text[:end].count("\n") + 1
    blocks = [b for b in README_BLOCKS if first < b.line < last]
    (start_block,) = [b for b in blocks if b.lang == "bash" and "start_server.sh" in b.code]
    (reserve,) = [b for b in blocks if b.lang == "bash" and "localhost:3000/reserve" in b.code]
    printed = next(b for b in blocks if b.lang == "text" and b.line > reserve.line)
    return start_block, reserve, printed


async def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    """``./start_server.sh`` from a checkout, then the ``curl`` line (on this test's port):
    the answer is the printed one, on a line of its own."""
    from .test_start_server import (
        processes_of,
        read_log,
        script_env,
        wait_until_gone,
        wait_until_serving,
    )

    start_block, reserve, printed = quick_start()
    env = script_env(tmp_path)
    port = env["WORKER_PORT"]
    script = await trio.lowlevel.open_process(
        ["bash", "-c", start_block.code],
        cwd=str(README.parent),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await wait_until_serving(port)
        with trio.fail_after(RUN_TIMEOUT_S):
            done = await trio.run_process(
                ["bash", "-c", reserve.code.replace("localhost:3000", f"localhost:{port}")],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        if script.returncode is None:
            os.killpg(script.pid, signal.SIGTERM)
            with trio.move_on_after(EXIT_TIMEOUT_S):
                await script.wait()
        for pid in processes_of(tmp_path):
            os.kill(pid, signal.SIGKILL)
        await script.wait()
    assert script.returncode == 0, read_log(tmp_path / "w.log")
    await wait_until_gone(tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert out.endswith("}\n") and out.count("\n") == 1, repr(out)
    answer, shown = json.loads(out), json.loads(printed.code)
    assert list(answer) == list(shown)
    assert answer["released"] == shown["released"] and answer["duration"] == shown["duration"]
    assert shown["duration"] <= answer["held"] < shown["duration"] + 5


# -- commands apart from their output -----------------------------------------------------

#: How a line of output starts (JSON, an HTTP status line); a command line does not.
_OUTPUT_STARTS = ("{", "}", "[{", "HTTP/")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>\w+)\1")


def output_lines(code: str) -> list[str]:
    """The lines of a shell block that look like a command's output.

    Lines inside a heredoc or inside a quoted string that spans lines (a JSON body
    given to ``curl -d '...'``) are the command's own and are not looked at.
    """
    found: list[str] = []
    heredoc: str | None = None
    quote: str | None = None
    for line in code.splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if quote is None and line.lstrip().startswith(_OUTPUT_STARTS):
            found.append(line)
        quote, comment_at = _scan_quotes(line, quote)
        if quote is None:
            start = _HEREDOC.search(line[:comment_at])
            if start is not None:
                heredoc = start["word"]
    return found


def _scan_quotes(line: str, quote: str | None) -> tuple[str | None, int]:
    """The quote still open at the end of ``line`` (given the one open at its start),
    and where a comment starts (``len(line)`` if none)."""
    index = 0
    while index < len(line):
        char = line[index]
        if quote == "'":
            if char == "'":
                quote = None
        elif char == "\\":
            index += 1  # an escaped character, in double quotes or none
        elif quote == '"':
            if char == '"':
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return None, index
        index += 1
    return quote, len(line)


@pytest.mark.parametrize(
    ("code", "found"),
    [
        ('curl -s localhost:18999/release\n{"released":true}\n', ['{"released":true}']),
        ("curl -si localhost:3000/health\nHTTP/1.1 200 OK\n", ["HTTP/1.1 200 OK"]),
        ('curl -d \'{"a": 1,\n  "b": 2}\n}\' localhost\n', []),
        ("cat > x.json <<'EOF'\n{\"a\": 1}\nEOF\necho done\n", []),
        ('echo "it\'s"   # a \'comment\n{"out": 1}\n', ['{"out": 1}']),
        ("[ -d x ] || mkdir x\n", []),
    ],
)
def test_output_lines(code: str, found: list[str]) -> None:
    assert output_lines(code) == found


@pytest.mark.parametrize("block", SHELL, ids=[b.id for b in SHELL])
def test_shell_block_holds_commands_only(block: Block) -> None:
    assert output_lines(block.code) == [], (
        f"{block.id}: output inside a command block; put it in a ```text block of its own"
    )


# -- the test command and the configuration reference -------------------------------------

CI = REPO / ".ci" / "run"
#: The line of .ci/run above the test command.
_CI_MARKER = "# The README's test command, verbatim"


def ci_test_command() -> str:
    lines = CI.read_text(encoding="utf-8").splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith(_CI_MARKER)]
    return lines[at + 1]


def test_ci_runs_the_readme_test_command() -> None:
    """``.ci/run`` runs the README's test command as written, and the pages that show the
    command show the same one."""
    command = ci_test_command()
    assert "pytest" in command and "pip install" in command, command
    assert [b.id for b in README_BLOCKS if b.code == command + "\n"], (
        f"README.md has no ```bash block holding exactly .ci/run's test command: {command}"
    )
    copies = [b for b in SHELL if "pytest -n" in b.code and "pip install -e" in b.code]
    for block in copies:
        if block.code.count("\n") == 1:  # the one-line form, as in the README
            assert block.code == command + "\n", f"{block.id} differs from .ci/run's"


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    from nullworker.cli import main

    try:
        status = main([command, "--help"])
    except SystemExit as exited:  # argparse's own exit, where main() does not catch it
        status = exited.code
    assert status in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "command", ["serve", "reserve", "autoscale", "hold", "wait-reserved", "engine", "dev"]
)
def test_the_configuration_reference_names_every_flag(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    (section,) = [
        part
        for part in re.split(r"^## ", reference, flags=re.M)
        if f"`nullworker {command}`" in part.splitlines()[0]
    ]
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", _help(command, capsys))) - {"--help"}
    missing = sorted(flag for flag in flags if f"`{flag}" not in section)
    assert not missing, f"docs/configuration.md lists no {missing} of nullworker {command}"


def test_the_configuration_reference_names_every_variable() -> None:
    """Every ``NULLWORKER_*`` name the code or ``start_server.sh`` spells out, and the
    Vast start-up environment, has its row."""
    import ast

    names: set[str] = set()
    for path in (REPO / "nullworker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"NULLWORKER_[A-Z0-9_]+", node.value):
                    names.add(node.value)
    script = (REPO / "start_server.sh").read_text(encoding="utf-8")
    names |= set(re.findall(r"\$\{?(NULLWORKER_[A-Z0-9_]+)", script))
    names |= {"WORKER_PORT", "REPORT_ADDR", "CONTAINER_ID", "PUBLIC_IPADDR", "MASTER_TOKEN"}
    names |= {"UNSECURED", "USE_SSL", "MAX_RESERVATION_SECONDS", "MAX_QUEUE_TIME"}
    names |= {"BACKEND_HEALTH_URL", "NULL_CONTROL_PORT", "VAST_API_KEY", "VAST_ENGINE_URL"}
    reference = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert len(names) > 30
    missing = sorted(name for name in names if f"`{name}" not in reference)
    assert not missing, f"docs/configuration.md has no row for {missing}"


# -- the README's links -------------------------------------------------------------------

_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and the site's toc both make it for our headings."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_links_to_pages_and_anchors_that_exist() -> None:
    """Relative links (``docs/scaling.md#sources``) work on GitHub and in a checkout."""
    text = README.read_text(encoding="utf-8")
    targets = [m["target"] for m in _LINK.finditer(text) if "://" not in m["target"]]
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        path, _, anchor = target.partition("#")
        page = REPO / path if path else README
        assert page.is_file(), f"README.md links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", page.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"README.md links to {target}"


def test_the_library_reference_covers_every_public_name() -> None:
    """Each name of ``nullworker.__all__`` has its entry (``::: module.Name``) on the
    Library API page, or is documented there with the module that defines it."""
    import nullworker
    import nullworker.errors

    page = (REPO / "docs" / "library.md").read_text(encoding="utf-8")
    entries = set(re.findall(r"^::: ([\w.]+)$", page, flags=re.M))
    documented = {entry.rsplit(".", 1)[-1] for entry in entries}
    if "nullworker.errors" in entries:
        documented |= set(nullworker.errors.__all__)
    missing = sorted(set(nullworker.__all__) - documented - {"__version__"})
    assert not missing, f"docs/library.md has no entry for {missing}"
