"""The public surface: every exported name resolves, the core imports without the web stack,
and the worker runs without the queue clients of the ``autoscale`` extra."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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


#: Run first in a child Python: every import of a module of the ``autoscale`` extra fails,
#: as in an environment where only ``pip install nullworker`` ran.
_WITHOUT_EXTRA = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("redis", "nats", "trio_asyncio", "boto3", "botocore", "asyncpg"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Missing())
"""


def _run_without_extra(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRA + code], capture_output=True, text=True, timeout=60
    )


def test_the_worker_serves_without_the_autoscale_extra() -> None:
    code = (
        "import httpx, trio, nullworker\n"
        "AUTH = dict(signature='', url='', cost=100, endpoint='e', reqnum=1, request_idx=1)\n"
        "ENVELOPE = {'auth_data': AUTH, 'payload': {'duration': 0.01}}\n"
        "async def main():\n"
        "    async with trio.open_nursery() as nursery:\n"
        "        config = nullworker.WorkerConfig(port=0, control_port=0)\n"
        "        info = await nursery.start(nullworker.serve, config)\n"
        "        async with httpx.AsyncClient() as client:\n"
        "            answer = await client.post(info.url + '/reserve', json=ENVELOPE)\n"
        "        print(answer.status_code, answer.json()['released'])\n"
        "        nursery.cancel_scope.cancel()\n"
        "trio.run(main)\n"
        "import nullworker.client.autoscaler, nullworker.engine.dev, nullworker.client.hold_cli\n"
        "from nullworker.client.demand import CommandDemand, CallableDemand\n"
        "print(sorted(m for m in ('redis', 'nats', 'trio_asyncio', 'boto3', 'asyncpg') "
        "if m in sys.modules))\n"
    )
    out = _run_without_extra(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["200 duration_elapsed", "[]"]


def test_autoscale_without_the_extra_names_it() -> None:
    code = (
        "from nullworker.cli import main\n"
        "sys.exit(main(['autoscale', '--endpoint', 'e', '--redis-list', "
        "'redis://127.0.0.1:1/0', 'jobs']))\n"
    )
    out = _run_without_extra(code)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(
        "nullworker autoscale: the demand sources and leases need the 'autoscale' extra "
        "(no module named "
    )
    assert line.endswith("): pip install 'nullworker[autoscale]'")
    library = _run_without_extra(
        "import nullworker.client\n"
        "try:\n"
        "    nullworker.client.RedisList\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name, '|', exc)\n"
    )
    name, _, message = library.stdout.strip().partition(" | ")
    assert name in ("redis", "nats", "trio_asyncio"), library.stderr
    assert message.endswith("pip install 'nullworker[autoscale]'")


@pytest.mark.parametrize(
    ("blocked", "argv"),
    [
        ("boto3", "'--sqs', 'https://sqs.eu-west-1.amazonaws.com/1/jobs'"),
        ("asyncpg", "'--postgres', 'postgresql://h/db', 'SELECT 1'"),
    ],
)
def test_a_source_whose_client_is_missing_names_the_extra(blocked: str, argv: str) -> None:
    # Only this one client is missing: the Redis and NATS clients are there.
    code = (
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {blocked!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Missing())\n"
        "from nullworker.cli import main\n"
        f"sys.exit(main(['autoscale', '--endpoint', 'e', '--api-key', 'k', {argv}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        "nullworker autoscale: the demand sources and leases need the 'autoscale' extra "
        f"(no module named {blocked!r}): pip install 'nullworker[autoscale]'"
    )


def test_the_install_leaves_the_queue_clients_to_the_extra() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]
    }
    queue_clients = {"redis", "nats-py", "trio-asyncio", "boto3", "asyncpg"}
    assert not names & queue_clients, names
    extra = {dep.split(">")[0].strip() for dep in project["optional-dependencies"]["autoscale"]}
    assert extra == queue_clients
    assert "nullworker[autoscale]" in project["optional-dependencies"]["dev"]


def test_the_term_logic_and_the_metrics_import_without_the_autoscale_extra() -> None:
    """Only the lease's Redis store needs redis and trio-asyncio: the term logic, the
    sharing and the metrics import without them; the public module, which gathers the
    store's names too, still needs them."""
    out = _run_without_extra(
        "from nullworker.client._lease import Lease, LeaseStatistics\n"
        "import nullworker.client.metrics, nullworker.client.sharing\n"
        "print(sorted(m for m in ('redis', 'trio_asyncio') if m in sys.modules))\n"
        "try:\n"
        "    import nullworker.client.lease\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name)\n"
    )
    assert out.returncode == 0, out.stderr
    missing, named = out.stdout.split()
    assert missing == "[]" and named in ("redis", "trio_asyncio")
