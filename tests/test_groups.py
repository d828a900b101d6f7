"""``nullworker._groups``: ``split_leaves`` (nesting, ``Cancelled`` mixed in, order kept)
and ``only_leaf`` (the one error a group stands for, or the group whole)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing

from nullworker._groups import only_leaf, split_leaves


async def a_cancelled() -> trio.Cancelled:
    """A real ``trio.Cancelled``, as a cancelled scope delivers it."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")  # pragma: no cover


def test_a_lone_exception_is_its_own_leaf() -> None:
    exc = KeyError("k")
    assert split_leaves(exc, KeyError) == ([exc], [])
    assert split_leaves(exc, OSError) == ([], [exc])


async def test_nested_groups_are_opened_and_order_is_kept() -> None:
    a, b, c, d = OSError(1, "a"), ValueError("b"), OSError(2, "c"), KeyError("d")
    cancelled = await a_cancelled()
    group = BaseExceptionGroup(
        "outer", [a, BaseExceptionGroup("mid", [b, ExceptionGroup("inner", [c]), cancelled]), d]
    )
    matched, rest = split_leaves(group, OSError)
    assert matched == [a, c]  # the very objects, in the order the groups hold them
    assert rest == [b, cancelled, d]
    assert split_leaves(group, trio.Cancelled) == ([cancelled], [a, b, c, d])
    assert split_leaves(group, (OSError, KeyError)) == ([a, c, d], [b, cancelled])


async def test_only_cancelled_however_deep() -> None:
    one, two = await a_cancelled(), await a_cancelled()
    group = BaseExceptionGroup("", [one, BaseExceptionGroup("", [two])])
    cancelled, others = split_leaves(group, trio.Cancelled)
    assert cancelled == [one, two] and others == []


async def test_a_predicate_that_accepts_a_group_keeps_it_whole() -> None:
    cancelled = await a_cancelled()
    callers = ExceptionGroup("the caller's own", [ValueError("x"), KeyError("y")])
    group = BaseExceptionGroup("nursery", [cancelled, callers])
    others, rest = split_leaves(group, lambda exc: not isinstance(exc, trio.Cancelled))
    assert others == [callers]  # not opened: the caller's group comes out as raised
    assert rest == [cancelled]


def test_the_group_itself_is_never_a_leaf() -> None:
    inner = ValueError("v")
    group = ExceptionGroup("g", [inner])
    # A condition true for everything still gives the members, not the group.
    assert split_leaves(group, lambda exc: True) == ([inner], [])
    assert split_leaves(group, ExceptionGroup) == ([], [inner])


async def fail_when_cancelled() -> None:
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        raise ValueError("boom") from None


async def nested(task: Callable[[], Awaitable[None]]) -> None:
    """``task`` in a nursery of its own: one more level of groups."""
    async with trio.open_nursery() as inner:
        inner.start_soon(task)


async def group_of_cancelled_beside(task: Callable[[], Awaitable[None]]) -> BaseExceptionGroup:
    """What a nursery raises when its scope is cancelled while ``task`` runs in it."""
    caught: BaseExceptionGroup[BaseException] | None = None
    with trio.CancelScope() as outer:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(task)
                await trio.testing.wait_all_tasks_blocked()
                outer.cancel()
                await trio.sleep_forever()
        except BaseExceptionGroup as group:  # looked at below; the scope is done anyway
            caught = group
    assert caught is not None
    return caught


async def test_a_real_nursery_group_with_cancelled_beside_an_error() -> None:
    caught = await group_of_cancelled_beside(fail_when_cancelled)
    errors, others = split_leaves(caught, ValueError)
    assert [str(e) for e in errors] == ["boom"]
    assert others and all(isinstance(e, trio.Cancelled) for e in others)
    assert split_leaves(caught, trio.Cancelled)[1] == errors


async def test_only_leaf_unwraps_a_nested_group_of_one_real_error() -> None:
    error = OSError(98, "Address already in use")
    nested = BaseExceptionGroup("serve", [ExceptionGroup("run", [ExceptionGroup("_run", [error])])])
    assert only_leaf(nested) is error
    assert only_leaf(error) is error  # no group: the exception itself


async def test_only_leaf_keeps_a_group_with_cancelled_whole() -> None:
    error, cancelled = ValueError("boom"), await a_cancelled()
    beside = BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [cancelled, error])])
    # Two leaves: the group comes back as it is, the Cancelled still in it.
    assert only_leaf(beside) is beside
    two = ExceptionGroup("outer", [ExceptionGroup("inner", [error]), KeyError("k")])
    assert only_leaf(two) is two
    # A lone Cancelled, however deep, is the one exception the group stands for.
    alone = BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [cancelled])])
    assert only_leaf(alone) is cancelled


async def test_only_leaf_on_real_nested_nurseries() -> None:
    """One real error through two nurseries comes out alone; the same error raised while
    the outer scope is being cancelled comes out beside Cancelled, in its group."""

    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as outer:
            outer.start_soon(nested, fail)
    leaf = only_leaf(caught.value)
    assert isinstance(leaf, ValueError) and str(leaf) == "boom"

    group = await group_of_cancelled_beside(partial(nested, fail_when_cancelled))
    assert only_leaf(group) is group
    errors, cancelled = split_leaves(group, ValueError)
    assert [str(e) for e in errors] == ["boom"] and cancelled
    assert all(isinstance(e, trio.Cancelled) for e in cancelled)
