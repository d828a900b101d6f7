"""``nullworker._groups.split_leaves``: nesting, ``Cancelled`` mixed in, order kept."""

from __future__ import annotations

import trio
import trio.testing

from nullworker._groups import split_leaves


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


async def test_a_real_nursery_group_with_cancelled_beside_an_error() -> None:
    async def fail_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            raise ValueError("boom") from None

    caught: BaseExceptionGroup[BaseException] | None = None
    with trio.CancelScope() as outer:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail_when_cancelled)
                await trio.testing.wait_all_tasks_blocked()
                outer.cancel()
                await trio.sleep_forever()
        except BaseExceptionGroup as group:  # looked at below; the scope is done anyway
            caught = group
    assert caught is not None
    errors, others = split_leaves(caught, ValueError)
    assert [str(e) for e in errors] == ["boom"]
    assert others and all(isinstance(e, trio.Cancelled) for e in others)
    assert split_leaves(caught, trio.Cancelled)[1] == errors
