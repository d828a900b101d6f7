"""The public API's spelling: one name for durations (``duration_s``) across ``reserve``,
``hold``, ``local_hold`` and ``autoscale``, the old ``duration`` kept for one release
with a ``DeprecationWarning``, ``autoscale(reserve=...)`` taking a reserve factory, and
the demand sources, the lease and the local hold exported from ``nullworker.client``.

All against the real parts: the local engine, real workers, real HTTP."""

from __future__ import annotations

import importlib
import inspect
import pickle
import warnings
from functools import partial

import pytest
import trio

import nullworker
import nullworker.client
from nullworker.client.autoscaler import Autoscaler
from nullworker.engine import Engine, serve_engine

from .conftest import StartWorker
from .test_client import start_vast_worker

KEY = "secret-key-123"


@pytest.fixture
async def engine(nursery: trio.Nursery) -> Engine:
    e = Engine()
    await nursery.start(partial(serve_engine, e))
    return e


def test_the_client_exports_what_users_import() -> None:
    names = set(nullworker.client.__all__)
    for source in ("RedisList", "RedisStream", "RedisQueue", "NatsConsumer", "SqsQueue"):
        assert source in names
    for source in ("RabbitMQQueue", "PostgresQuery", "HttpJson", "PrometheusQuery"):
        assert source in names
    for name in ("CommandDemand", "CallableDemand", "CombinedDemand", "DemandSource"):
        assert name in names
    for name in ("Lease", "RedisLease", "LeaseError", "local_hold", "LocalHold"):
        assert name in names
    for name in nullworker.client.__all__:
        getattr(nullworker.client, name)
    assert nullworker.client.local_hold is nullworker.local_hold


@pytest.mark.parametrize(
    "module",
    [
        "nullworker",
        "nullworker.client",
        "nullworker.client.autoscaler",
        "nullworker.client.lease",
        "nullworker.client.demand",
        "nullworker.worker",
        "nullworker.engine",
        "nullworker.errors",
    ],
)
def test_public_names_say_the_module_users_import_them_from(module: str) -> None:
    """A class or function exported by a public module names a public module as its
    home (reprs, tracebacks, pickles), never the private file it is defined in."""
    imported = importlib.import_module(module)
    private = {
        f"{name}: {obj.__module__}"
        for name in imported.__all__
        if inspect.isclass(obj := getattr(imported, name)) or inspect.isfunction(obj)
        if any(part.startswith("_") for part in obj.__module__.split("."))
    }
    assert not private
    event = nullworker.client.AutoscaleEvent("demand", 1.0, "demand 1", 1, 1, 0, 0)
    assert pickle.loads(pickle.dumps(event)) == event


async def test_reserve_and_hold_take_duration_s(engine: Engine, start_worker: StartWorker) -> None:
    await start_vast_worker(start_worker, engine, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        r = await nullworker.hold("ep", duration_s=0.3, api_key=KEY, engine_url=engine.url)
        assert r.outcome == "duration_elapsed" and r.body["duration"] == 0.3
        async with nullworker.reserve(
            "ep", duration_s=0.3, api_key=KEY, engine_url=engine.url
        ) as reservation:
            with trio.fail_after(5):
                await reservation.ended.wait()
        assert reservation.outcome == "duration_elapsed"


async def test_the_old_duration_still_works_with_a_deprecation_warning(
    engine: Engine, start_worker: StartWorker
) -> None:
    await start_vast_worker(start_worker, engine, 1)
    with pytest.warns(DeprecationWarning, match=r"duration= is deprecated, use duration_s=") as w:
        r = await nullworker.hold("ep", duration=0.3, api_key=KEY, engine_url=engine.url)
    assert r.outcome == "duration_elapsed" and r.body["duration"] == 0.3
    assert w[0].filename == __file__  # it points at the caller's line
    with pytest.warns(DeprecationWarning) as w:
        cm = nullworker.reserve("ep", duration=0.3, api_key=KEY, engine_url=engine.url)
    assert w[0].filename == __file__
    async with cm as reservation:
        with trio.fail_after(5):
            await reservation.ended.wait()
    assert reservation.outcome == "duration_elapsed"


def test_both_spellings_at_once_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"pass duration_s= only"):
        nullworker.reserve("ep", duration=1, duration_s=1, api_key=KEY)
    with pytest.raises(TypeError, match=r"pass duration_s= only"):
        nullworker.local_hold(duration=1, duration_s=1)


async def test_local_hold_takes_duration_s(start_worker: StartWorker) -> None:
    info = await start_worker()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with nullworker.local_hold(duration_s=0.2, control_url=info.control_url) as hold:
            assert hold.duration_s == 0.2 and hold.held_for_s == 0.2
            with trio.fail_after(5):
                await hold.ended.wait()
    assert hold.outcome == "duration_elapsed"


async def test_local_hold_old_duration_warns_and_works(start_worker: StartWorker) -> None:
    info = await start_worker()
    with pytest.warns(DeprecationWarning, match=r"duration= is deprecated") as w:
        cm = nullworker.local_hold(duration=0.2, control_url=info.control_url)
    assert w[0].filename == __file__
    async with cm as hold:
        with trio.fail_after(5):
            await hold.ended.wait()
        with pytest.warns(DeprecationWarning, match=r"LocalHold.duration is deprecated"):
            assert hold.duration == 0.2
    assert hold.outcome == "duration_elapsed"


async def test_autoscale_takes_a_reserve_factory(
    engine: Engine, start_worker: StartWorker, nursery: trio.Nursery
) -> None:
    await start_vast_worker(start_worker, engine, 1)

    async def one_job() -> int:
        return 1

    factory = partial(nullworker.reserve, "ep", duration_s=60, api_key=KEY, engine_url=engine.url)
    with trio.CancelScope() as scope:
        scaler: Autoscaler = await nursery.start(
            partial(nullworker.autoscale, "ep", demand=one_job, poll_s=0.05, reserve=factory)
        )
        with trio.fail_after(10):
            while scaler.statistics().held != 1:
                await trio.sleep(0.05)
        assert engine.worker_state(1) != "idle"
        scope.cancel()


async def test_autoscale_refuses_engine_settings_beside_a_factory() -> None:
    async def no_jobs() -> int:
        return 0

    factory = partial(nullworker.reserve, "ep", api_key=KEY)
    # Refused before anything starts (it would otherwise run until cancelled).
    with (
        trio.fail_after(5),
        pytest.raises(nullworker.ConfigError, match=r"engine_url and api_key are for the default"),
    ):
        await nullworker.autoscale("ep", demand=no_jobs, reserve=factory, api_key=KEY)
