"""The error tree: one module draws it, every class is where the drawing says, and each
error the tree names is raised for its real cause by the real parts (the local engine,
a worker, a closed port, a listener that never answers)."""

from __future__ import annotations

import re
from functools import partial

import httpx
import pytest
import trio

import nullworker
import nullworker.client
from nullworker import errors
from nullworker.client import reservation as reservation_module
from nullworker.engine import Engine, serve_engine
from nullworker.worker.reporter import EngineReporter

from .conftest import StartWorker, runtime, vast_settings
from .helpers import closed_port, closed_url
from .servers import silent_server_fixture  # noqa: F401  (fixture, used by name)

KEY = "secret-key-123"


def drawn_tree() -> dict[str, str]:
    """Each class of the drawing in ``errors``' docstring, with the class drawn above it."""
    doc = errors.__doc__ or ""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.split("The tree::", 1)[1].splitlines():
        found = re.match(r"^(\s*[│ ]*(?:[├└]── )?)([A-Z]\w+)", line)
        if not found:
            continue
        depth, name = len(found.group(1)), found.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def test_the_drawing_is_the_tree() -> None:
    parents = drawn_tree()
    assert set(parents) | {"NullworkerError"} == set(errors.__all__)
    # The errors that used to live beside the code raising them are in the one tree.
    moved = {"PubkeyUnavailable", "EngineRefused", "RouteTimeout", "LeaseError"}
    assert moved | {"LocalHoldFailed", "ReleaseFailed"} <= set(parents)
    for name, parent in parents.items():
        cls = getattr(errors, name)
        assert issubclass(cls, getattr(errors, parent)), f"{name} is not a {parent}"
        # The class itself lives in nullworker.errors, not in the module that raises it.
        assert cls.__module__ == "nullworker.errors", name


def test_every_error_is_exported_where_users_import_it() -> None:
    for name in errors.__all__:
        assert getattr(nullworker, name) is getattr(errors, name)
        assert name in nullworker.__all__
    for name in ("ClientError", "EngineRefused", "RouteTimeout", "LocalHoldFailed"):
        assert getattr(nullworker.client, name) is getattr(errors, name)
    for name in ("LeaseError", "DemandError", "DemandTimeout", "DemandNotFound"):
        assert getattr(nullworker.client, name) is getattr(errors, name)


def test_the_old_import_paths_still_work() -> None:
    from nullworker.client.lease import LeaseError
    from nullworker.client.local_hold import LocalHoldFailed, ReleaseFailed
    from nullworker.client.reservation import EngineRefused, RouteTimeout
    from nullworker.worker.reporter import PubkeyUnavailable

    assert LeaseError is nullworker.LeaseError
    assert LocalHoldFailed is nullworker.LocalHoldFailed
    assert ReleaseFailed is nullworker.ReleaseFailed
    assert EngineRefused is nullworker.EngineRefused
    assert RouteTimeout is nullworker.RouteTimeout
    assert PubkeyUnavailable is nullworker.PubkeyUnavailable


@pytest.fixture
async def engine(nursery: trio.Nursery) -> Engine:
    e = Engine(api_key=KEY)
    await nursery.start(partial(serve_engine, e))
    return e


async def test_pubkey_unavailable_when_the_engine_has_no_key_at_that_address(
    engine: Engine,
) -> None:
    assert engine.url is not None
    # REPORT_ADDR with a path the engine does not serve: its /pubkey/ is a 404.
    config = nullworker.WorkerConfig(**vast_settings(engine, report_addrs=(engine.url + "/x",)))
    with pytest.raises(nullworker.PubkeyUnavailable) as caught:
        await EngineReporter(config).fetch_pubkey(backoff_s=(0.01,))
    assert isinstance(caught.value, nullworker.NullworkerError)
    assert "HTTP 404" in str(caught.value) and "/x/pubkey/" in str(caught.value)
    assert engine.counters["pubkey"] == 0


async def test_engine_refused_names_the_key_without_showing_it(engine: Engine) -> None:
    with pytest.raises(nullworker.EngineRefused) as caught:
        await nullworker.hold("ep", api_key="wrong-key-456", engine_url=engine.url)
    assert isinstance(caught.value, nullworker.EngineUnavailable)
    assert isinstance(caught.value, nullworker.ClientError)
    assert caught.value.status == 401 and caught.value.api_key_refused
    assert "wrong-key-456" not in str(caught.value) and KEY not in str(caught.value)


async def test_route_timeout_when_no_worker_becomes_free(engine: Engine) -> None:
    with pytest.raises(nullworker.RouteTimeout) as caught:
        await nullworker.hold("ep", api_key=KEY, engine_url=engine.url, route_timeout_s=0.5)
    assert isinstance(caught.value, nullworker.EngineUnavailable)
    assert caught.value.timeout_s == 0.5
    assert engine.counters["route_waiting"] >= 1


async def test_route_timeout_when_the_engine_never_answers_the_route_call(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call's own bound (10 s, three tries) made short, so the test takes a second.
    monkeypatch.setattr(reservation_module, "_ROUTE_TIMEOUT", httpx.Timeout(0.3))
    monkeypatch.setattr(reservation_module, "_ENGINE_RETRY_S", (0.01, 0.01))
    url = f"http://127.0.0.1:{silent_server}"
    with pytest.raises(nullworker.RouteTimeout) as caught:
        await nullworker.hold("ep", api_key=KEY, engine_url=url)
    assert isinstance(caught.value, nullworker.EngineUnavailable)
    assert caught.value.timeout_s == 0.3 and caught.value.reason is None
    assert "did not answer /route/ within 0.3 s" in str(caught.value)
    assert KEY not in str(caught.value)


async def test_an_engine_that_is_not_there_is_engine_unavailable_not_a_timeout() -> None:
    with pytest.raises(nullworker.EngineUnavailable) as caught:
        await nullworker.hold("ep", api_key=KEY, engine_url=closed_url())
    assert not isinstance(caught.value, nullworker.RouteTimeout)


async def test_local_hold_failed_when_the_worker_refuses(start_worker: StartWorker) -> None:
    worker = await start_worker()
    runtime(worker).begin_shutdown()
    with pytest.raises(errors.LocalHoldFailed) as caught:
        async with nullworker.local_hold(control_url=worker.control_url):
            pass  # pragma: no cover
    assert isinstance(caught.value, nullworker.ClientError)
    assert caught.value.status == 503


async def test_lease_error_when_the_redis_server_is_not_there() -> None:
    from nullworker.client.lease import RedisLeaseStore

    store = RedisLeaseStore(f"redis://:hunter2@127.0.0.1:{closed_port()}/0", timeout_s=2.0)
    async with store:
        with pytest.raises(nullworker.LeaseError) as caught:
            await store.acquire("nullworker:lease:ep", "token", 1000)
    assert isinstance(caught.value, nullworker.NullworkerError)
    assert "hunter2" not in str(caught.value)
