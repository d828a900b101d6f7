"""The wire's words (:mod:`nullworker.vast.vocabulary`): their spellings, and their use.

The values are the wire format (answers, log fields, metrics labels, the engine's
statuses), so they are written out here once more: a change to one fails here first.
The worker and the client name the members instead of repeating the strings; a scan of
their source keeps it so.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from nullworker.vast.vocabulary import ClientOutcome, HoldOutcome, Outcome, RequestStatus

PACKAGE = Path(__file__).resolve().parent.parent / "nullworker"

SPELLINGS = {
    Outcome: {
        "ELAPSED": "duration_elapsed",
        "RELEASED": "explicit",
        "CANCELLED": "cancelled",
        "SHUTDOWN": "shutdown",
        "REJECTED": "rejected",
        "ERROR": "error",
    },
    HoldOutcome: {
        "ELAPSED": "duration_elapsed",
        "SHUTDOWN": "shutdown",
        "DISCONNECTED": "disconnected",
        "RELEASED": "released",
        "ERROR": "error",
    },
    ClientOutcome: {
        "ELAPSED": "duration_elapsed",
        "EXPLICIT": "explicit",
        "SHUTDOWN": "shutdown",
        "CONNECTION_LOST": "connection_lost",
        "REJECTED": "rejected",
        "COMPLETED": "completed",
        "CLIENT_RELEASED": "client_released",
        "REFUSED": "refused",
        "ERROR": "error",
    },
    RequestStatus: {
        "CREATED": "Created",
        "STARTED": "Started",
        "SUCCESS": "Success",
        "ERROR": "Error",
        "CANCELLED": "Cancelled",
        "REJECTED": "Rejected",
        "SESSION_ACTIVE": "SessionActive",
    },
}


@pytest.mark.parametrize("kind", list(SPELLINGS), ids=lambda k: k.__name__)
def test_each_member_is_its_wire_string(kind: type) -> None:
    members = {m.name: m for m in kind}  # type: ignore[attr-defined]
    assert {name: m.value for name, m in members.items()} == SPELLINGS[kind]
    for member in members.values():
        assert member == member.value and isinstance(member, str)
        assert f"{member}" == member.value and str(member) == member.value
        assert json.dumps({"released": member}) == json.dumps({"released": member.value})
        assert member in {member.value} and {member: 1}.get(member.value) == 1


def test_the_worker_modules_re_export_the_same_enums() -> None:
    from nullworker.worker import local_holds, reservations

    assert reservations.Outcome is Outcome
    assert local_holds.HoldOutcome is HoldOutcome


def test_a_client_reads_a_workers_released_values_as_its_own() -> None:
    for worker_side in (Outcome.ELAPSED, Outcome.RELEASED, Outcome.SHUTDOWN):
        assert ClientOutcome(worker_side.value) == worker_side


#: The outcome words: a bare string with one of these values, compared with or passed
#: on, should be a member. ("error" and "released" are JSON keys as well, and the
#: engine's statuses are compared in the engine and the reporter.)
OUTCOME_WORDS = {m.value for m in (*Outcome, *HoldOutcome, *ClientOutcome)} - {"error", "released"}


def _bare_words(path: Path) -> list[str]:
    """``file:line: 'word'`` for each outcome word compared, passed or returned as a literal."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        candidates: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                candidates.append(side)
                if isinstance(side, ast.Tuple | ast.Set | ast.List):
                    candidates.extend(side.elts)
        elif isinstance(node, ast.Call):
            candidates.extend(node.args)
        elif isinstance(node, ast.Return) and node.value is not None:
            candidates.append(node.value)
            if isinstance(node.value, ast.IfExp):
                candidates.extend((node.value.body, node.value.orelse))
        for candidate in candidates:
            if isinstance(candidate, ast.Constant) and candidate.value in OUTCOME_WORDS:
                where = path.relative_to(PACKAGE.parent)
                found.append(f"{where}:{candidate.lineno}: {candidate.value!r}")
    return found


def test_the_worker_and_the_client_name_outcomes_by_their_members() -> None:
    files = sorted((PACKAGE / "worker").rglob("*.py")) + sorted((PACKAGE / "client").rglob("*.py"))
    assert len(files) > 10
    found = [line for path in files for line in _bare_words(path)]
    assert found == [], "use nullworker.vast.vocabulary's members:\n" + "\n".join(found)
