"""Exception groups, taken apart in one place.

Trio nurseries raise :class:`BaseExceptionGroup` (strict groups: even a lone exception
comes wrapped, and groups nest when nurseries do). Code that must decide what a group
stands for -- "only Cancelled", "a start-up OSError", "the one error worth re-raising"
-- asks :func:`split_leaves` (or :func:`only_leaf`, built on it) instead of walking
``.exceptions`` by hand, so that nesting, order and ``Cancelled`` are treated the same
way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Condition", "only_leaf", "split_leaves"]

#: What :func:`split_leaves` sorts by: an exception type, a tuple of them, or a predicate.
Condition = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


def split_leaves(
    exc: BaseException, condition: Condition
) -> tuple[list[BaseException], list[BaseException]]:
    """The exceptions ``exc`` stands for, sorted into those that meet ``condition`` and
    the others, each list in the order the groups hold them (depth first).

    Built on :meth:`BaseExceptionGroup.split`, with its rules: a type (or tuple of
    types) matches by ``isinstance``, a predicate is called with each exception; inside
    ``exc``, a nested group is offered to ``condition`` first and, if it meets it, is
    kept whole as one leaf, else it is opened. ``exc`` itself is never a leaf when it
    is a group (its members are what it stands for); when it is not a group, it is the
    only leaf. So:

    * ``split_leaves(group, trio.Cancelled)`` -> ``([cancelled...], [the rest...])``,
      however deep the nurseries nested them;
    * ``not split_leaves(exc, OSError)[1]`` -- nothing but OS errors in there;
    * a predicate that accepts any group keeps the group's direct members as they are
      (``lambda e: not isinstance(e, trio.Cancelled)`` sorts the direct members, and
      leaves a nested group the caller raised unopened).
    """
    matches: Callable[[BaseException], bool]
    if isinstance(condition, type | tuple):
        kinds = condition

        def matches(candidate: BaseException) -> bool:
            return isinstance(candidate, kinds)

    else:
        matches = condition
    if not isinstance(exc, BaseExceptionGroup):
        return ([exc], []) if matches(exc) else ([], [exc])
    matched, rest = exc.split(lambda candidate: candidate is not exc and matches(candidate))
    return _leaves(matched, matches, whole=True), _leaves(rest, matches, whole=False)


def only_leaf(exc: BaseException) -> BaseException:
    """The one exception ``exc`` stands for, when it stands for exactly one; else ``exc``.

    A nursery wraps its child's error in a group, and nested nurseries wrap it once per
    level; a caller that reports one known error in one line wants the error itself.
    A group that holds several exceptions -- two errors, or an error beside a
    ``trio.Cancelled`` -- comes back whole, so that nothing in it is dropped (a
    ``Cancelled`` must reach the scope that cancelled). A group holding a lone
    ``Cancelled``, however deep, gives that ``Cancelled``.
    """
    leaves, _ = split_leaves(exc, _not_a_group)
    return leaves[0] if len(leaves) == 1 else exc


def _not_a_group(exc: BaseException) -> bool:
    return not isinstance(exc, BaseExceptionGroup)


def _leaves(
    group: BaseExceptionGroup[BaseException] | None,
    matches: Callable[[BaseException], bool],
    *,
    whole: bool,
) -> list[BaseException]:
    """The leaves of one side of a split: the exceptions that are no group, and, on the
    matching side (``whole``), the nested groups that met the condition themselves."""
    if group is None:
        return []
    found: list[BaseException] = []
    for member in group.exceptions:
        if isinstance(member, BaseExceptionGroup) and not (whole and matches(member)):
            found.extend(_leaves(member, matches, whole=whole))
        else:
            found.append(member)
    return found
