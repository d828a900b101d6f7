"""Deploying on Vast, as docs/deploying.md says: the on-start script and the Python 3.11+ check.

The on-start script is taken from docs/deploying.md (the fenced block after its marker comment) and
run as written, with two substitutions: a local bare repository for the GitHub URL and a
temporary directory for /workspace. It runs once per simulated container start.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .helpers import wait_for_log
from .test_start_server import _cmdline, processes_of, wait_until_gone, wait_until_serving
from .test_startup import REPO, worker_env

pytestmark = [
    pytest.mark.skipif(shutil.which("flock") is None, reason="start_server.sh needs flock(1)"),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc"),
]

DEPLOYING = REPO / "docs" / "deploying.md"
MARKER = "<!-- on-start script:"
REPO_URL = "https://github.com/<you>/nullworker"
WORKSPACE = "/workspace/"


def deploying() -> str:
    return DEPLOYING.read_text()


def onstart_block() -> str:
    """The page's on-start script: the ```bash block right after the marker line."""
    text = deploying()
    assert text.count(MARKER) == 1, "docs/deploying.md marks exactly one on-start script"
    after = text[text.index(MARKER) :]
    match = re.match(r"<!--[^\n]*-->\n```bash\n(.*?)\n```\n", after, re.S)
    assert match, "the marker line is followed directly by a ```bash block"
    return match.group(1) + "\n"


def localize(block: str, origin: Path, workspace: Path) -> str:
    """The block with the repository URL and /workspace replaced by local paths."""
    assert REPO_URL in block and WORKSPACE in block
    return block.replace(REPO_URL, str(origin)).replace(WORKSPACE, f"{workspace}/")


def git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(home),  # no user or global configuration
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }


def git(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(["git", *args], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def git_bytes(env: dict[str, str], *args: str) -> bytes:
    return subprocess.run(["git", *args], env=env, capture_output=True, check=True).stdout


def on_a_branch(env: dict[str, str], checkout: Path) -> bool:
    symbolic_ref = ["git", "-C", str(checkout), "symbolic-ref", "-q", "HEAD"]
    return subprocess.run(symbolic_ref, env=env, capture_output=True).returncode == 0


def append(path: Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


def fake_venv(venv: Path, checkout: Path, pyproject: bytes) -> None:
    """A virtual environment for start_server.sh that runs the checkout's own code.

    Its `nullworker` is this test's interpreter with the checkout first on sys.path, and its
    install stamp matches the checkout's pyproject.toml, so nothing is installed; its
    `python` refuses to run, so a mismatch fails the start instead of installing anywhere.
    """
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(
        '#!/bin/sh\necho "test venv: nothing is installed here" >&2\nexit 1\n'
    )
    (bin_dir / "nullworker").write_text(
        f'#!/bin/sh\nPYTHONPATH="{checkout}" exec "{sys.executable}" -m nullworker "$@"\n'
    )
    for name in ("python", "nullworker"):
        (bin_dir / name).chmod(0o755)
    (venv / ".nullworker-installed").write_text(hashlib.sha256(pyproject).hexdigest() + "\n")


async def container_start(block: str, env: dict[str, str], cwd: Path) -> str:
    """Run the on-start script as Vast would on a container start; its stderr."""
    with trio.fail_after(60):
        result = await trio.run_process(
            ["sh", "-c", block],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert result.stdout == b""
    return stderr


async def stop_the_script(tmp_path: Path, script: Path) -> None:
    """SIGTERM to the backgrounded start_server.sh; wait until all it started is gone."""
    with trio.fail_after(30):
        while True:
            found = [
                pid
                for pid in processes_of(tmp_path)
                if any(arg == str(script) for arg in _cmdline(pid))
            ]
            if len(found) == 1:  # (not a subshell of it in the middle of a fork)
                break
            await trio.sleep(0.05)
    os.kill(found[0], signal.SIGTERM)
    await wait_until_gone(tmp_path)


@pytest.mark.skipif(shutil.which("git") is None, reason="the on-start script uses git")
@pytest.mark.skipif(not (REPO / ".git").exists(), reason="clones this repository")
async def test_the_readme_onstart_script_survives_restarts_and_follows_its_tag(
    tmp_path: Path,
) -> None:
    genv = git_env(tmp_path)
    origin = tmp_path / "origin.git"
    # (safe.directory: this repository may belong to another user than the test's git home)
    git(genv, "-c", "safe.directory=*", "clone", "--quiet", "--bare", str(REPO), str(origin))
    block = onstart_block()
    ref_match = re.search(r"NULLWORKER_REF=(\S+)", block)
    assert ref_match
    ref = ref_match.group(1)
    git(genv, "--git-dir", str(origin), "tag", "--force", "-a", ref, "-m", "release", "HEAD")
    tagged = git(genv, "--git-dir", str(origin), "rev-parse", f"{ref}^{{commit}}")

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    checkout = workspace / "nullworker"
    script = checkout / "start_server.sh"
    pyproject = git_bytes(genv, "--git-dir", str(origin), "show", "HEAD:pyproject.toml")
    fake_venv(tmp_path / "venv", checkout, pyproject)
    consumer = workspace / "my-consumer"
    consumer.write_text('#!/bin/sh\necho "consumer started in $PWD"\n')
    consumer.chmod(0o755)
    assert f"{WORKSPACE}my-consumer" in block

    env = worker_env(tmp_path, NULLWORKER_VENV=str(tmp_path / "venv")) | {
        k: v for k, v in genv.items() if k.startswith("GIT_") or k == "HOME"
    }
    port = env["WORKER_PORT"]
    local = localize(block, origin, workspace)
    start_log = workspace / "nullworker-start.log"

    def head() -> str:
        return git(genv, "-C", str(checkout), "rev-parse", "HEAD")

    try:
        # First start: the tag is cloned, the worker serves, the consumer runs.
        assert await container_start(local, env, workspace) == ""
        await wait_until_serving(port)
        assert head() == tagged
        assert not on_a_branch(genv, checkout)  # detached at the tag
        await wait_for_log(workspace / "consumer.log", "consumer started")
        await stop_the_script(tmp_path, script)
        assert "received SIGTERM" in start_log.read_text()

        # Second start, with a local edit to a tracked file and an untracked file:
        # the checkout exists, so it is updated (the edit is discarded) and started.
        append(checkout / "README.md", "\nlocal edit\n")
        (checkout / "local-note.txt").write_text("kept\n")
        assert await container_start(local, env, workspace) == ""
        await wait_until_serving(port)
        assert head() == tagged
        assert git(genv, "-C", str(checkout), "status", "--porcelain", "--untracked-files=no") == ""
        assert (checkout / "local-note.txt").read_text() == "kept\n"
        assert (checkout / "nullworker.log").read_text().count("ready after") == 2
        await stop_the_script(tmp_path, script)

        # The tag moves to a new commit: the next start checks that commit out.
        work = tmp_path / "work"
        git(genv, "clone", "--quiet", str(origin), str(work))
        (work / "DEPLOY_MARKER").write_text("new release\n")
        git(genv, "-C", str(work), "add", "DEPLOY_MARKER")
        git(genv, "-C", str(work), "commit", "--quiet", "-m", "a new release")
        git(genv, "-C", str(work), "tag", "--force", "-a", ref, "-m", "moved")
        git(genv, "-C", str(work), "push", "--quiet", "--force", "origin", f"refs/tags/{ref}")
        moved = git(genv, "-C", str(work), "rev-parse", "HEAD")
        assert moved != tagged
        assert await container_start(local, env, workspace) == ""
        await wait_until_serving(port)
        assert head() == moved
        assert (checkout / "DEPLOY_MARKER").exists()
        await stop_the_script(tmp_path, script)

        # The repository cannot be reached: it says so and starts what it has.
        origin.rename(tmp_path / "origin-gone.git")
        stderr = await container_start(local, env, workspace)
        assert f"nullworker: could not update to {ref}; starting the checkout as it is" in stderr
        await wait_until_serving(port)
        assert head() == moved
        await stop_the_script(tmp_path, script)
        assert start_log.read_text().count("not restarting") == 4
    finally:
        for pid in processes_of(tmp_path):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["python3 on PATH", "PYTHON"])
async def test_a_python_older_than_3_11_stops_the_start_and_says_what_to_do(
    tmp_path: Path, how: str
) -> None:
    """An image whose Python is 3.10 (Ubuntu 22.04): exit 1, naming PYTHON and the fixes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "python3.11", "python3.12", "python3.13"):
        fake = bin_dir / name
        fake.write_text(
            '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "Python 3.10.12"; exit 0; fi\nexit 1\n'
        )
        fake.chmod(0o755)
    env = worker_env(
        tmp_path,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        NULLWORKER_VENV=str(tmp_path / "venv"),
        NULLWORKER_LOG=str(tmp_path / "w.log"),
    )
    env.pop("PYTHON", None)
    if how == "PYTHON":
        env["PYTHON"] = str(bin_dir / "python3.12")
    with trio.fail_after(60):
        result = await trio.run_process(
            [str(REPO / "start_server.sh")], env=env, capture_stderr=True, check=False
        )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1, err  # one line, as the engine gets it in error_msg
    if how == "PYTHON":
        assert f"PYTHON={bin_dir / 'python3.12'} is not 3.11+: point it at one that is" in err
    else:
        assert "none of python3, python3.13, python3.12, python3.11 on PATH is 3.11+" in err
        assert "set PYTHON to one that is" in err
    for fix in (
        "PYTHON=/venv/main/bin/python",  # vastai/base-image -py311/-py312
        "deadsnakes PPA, then PYTHON=python3.12",
        "uv python install 3.12, then PYTHON=$(uv python find 3.12)",
        "vastai/base-image:cuda-12.8.1-cudnn-devel-ubuntu24.04",
        "python:3.12",
        "docs/deploying.md",
    ):
        assert fix in err, fix
    # docs/deploying.md quotes the message as the script prints it.
    quoted = re.search(r"`(Python 3\.11 or newer is required \(found: [^`]*\))`", deploying())
    assert quoted and quoted.group(1) in err
    assert not (tmp_path / "venv").exists()
