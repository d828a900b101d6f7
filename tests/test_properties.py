"""Property tests of the envelope and payload: sans-IO, then a real worker over HTTP.

The worker tests send hundreds of requests, each parsed and answered by the real app
and HTTP server; they run over in-memory streams (``start_memory_worker``), since what
they test is the answer to the bytes, not the socket.

Whatever a client sends to ``POST /reserve`` (any JSON, odd unicode, non-finite and huge
numbers, deep nesting, truncated bodies, wrong types in every field, random bytes), the
worker must answer a 4xx or a 200 with a JSON body, never a 5xx, never log a traceback,
and it must hold a normal reservation right after.

How hypothesis drives these tests
---------------------------------
The sans-IO tests (:func:`parse_envelope`, :func:`parse_duration`, :func:`signature_ok`)
are plain ``@given`` tests.

``@given`` cannot drive a pytest-trio async test that uses trio fixtures (the worker
runs in the test's nursery). The server tests therefore *collect* examples first:
:func:`draw_examples` runs a synchronous ``@given`` function once, with
``derandomize=True`` (the same examples on every run, so CI is reproducible),
``database=None`` and only the ``generate`` phase (it never fails, so nothing is shrunk
or replayed), and that function only records each drawn example (repeats dropped). The
async test then starts a real worker and sends it the fixed :data:`EDGE_BODIES` (the
named hard cases, in every field) followed by the collected examples, one at a time,
checking each response and holding a normal reservation after each one. A failure
message names the example's index and its exact body; the same run of
:func:`draw_examples` draws it again.

Every 4xx body must be a JSON object with an ``"error"`` key, except the ``422`` for a
malformed envelope, which names each bad field instead (``{"auth_data": {...}}``), as
the HTTP API of docs/instance.md documents.

Bodies are drawn as :class:`Body` values whose JSON text carries placeholders for the
signed ``url`` and ``signature``; they are rendered to bytes (placeholders replaced,
then encoded, cut short or corrupted) only once the worker's URL is known. Generation
does not depend on the port, and it happens before the worker starts, so the worker's
Trio loop is never blocked by it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nullworker.errors import EnvelopeError
from nullworker.vast.envelope import (
    AUTH_KEYS,
    MAX_ENGINE_ID,
    Envelope,
    parse_duration,
    parse_envelope,
    signature_ok,
)
from nullworker.vast.signing import sign_url
from nullworker.worker.server import ServeInfo

from .conftest import StartMemoryWorker, StartWorker, envelope, runtime, vast_settings

#: Placeholders for the values only known once a worker runs (see :meth:`Body.render`).
URL_TOKEN = "@@url@@"
SIGNATURE_TOKEN = "@@signature@@"

#: Holds are capped here, so a valid body holds the worker for at most this long.
MAX_HOLD_S = 0.05

#: Examples sent to each real worker (each also costs one normal reservation).
STANDALONE_EXAMPLES = 150
VAST_EXAMPLES = 100

#: Number literals as JSON text, written out (``json.dumps`` cannot produce all of them).
RAW_NUMBERS = [
    "0",
    "-0",
    "-0.0",
    "0.0",
    "1e309",
    "-1e309",
    "1E-400",
    "5e-324",
    "NaN",
    "Infinity",
    "-Infinity",
    "1.5",
    "-1",
    "0.05",
    "1e2",
    str(MAX_ENGINE_ID),
    str(MAX_ENGINE_ID + 1),
    str(10**100),
    "1" + "0" * 400,
    "1" + "0" * 5000,  # past Python's int-from-text digit limit
    "-" + "9" * 30,
]

#: Strings that have tripped parsers elsewhere.
ODD_TEXT = [
    "",
    " ",
    "\x00",
    "\x7f",
    "\ud800",
    "\udfff",
    "\ud83d",
    "\U0001f4a9",
    "\u202e",
    "\ufeff",
    "\u2028\u2029",
    "e\u0301",
    "\uffff",
    "\u00b2",
    "\u0663",
    "\U0001d7d9",
    "\\",
    '"',
    "null",
    "NaN",
    " 8 ",
    "-5",
    "1e3",
    "0x10",
    "1_000",
    URL_TOKEN,
]

ENCODINGS = ["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32-le"]
CONTENT_TYPES = [
    "application/json",
    "application/json",
    None,
    "text/plain; charset=latin-1",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
]

OK_OR_4XX = "a 200 or a 4xx"


# -- strategies ----------------------------------------------------------------------

texts = st.one_of(
    st.text(
        st.one_of(st.characters(), st.characters(categories=["Cs"])),  # lone surrogates too
        max_size=16,
    ),
    st.sampled_from(ODD_TEXT),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**120), max_value=10**120),
    st.floats(),  # NaN, infinities, -0.0 and subnormals included
    texts,
)

#: Object keys: mostly the envelope's own names, so fuzzed objects collide with them.
keys = st.one_of(
    st.sampled_from(
        [*AUTH_KEYS, "auth_data", "payload", "session_id", "duration", "__proto__", ""]
    ),
    texts,
)


def _dumps(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    """A JSON object from (key, value text) pairs; a repeated key is kept (the last wins)."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


def _deep(depth: int, opener: str, closed: bool) -> str:
    if opener == "[":
        return "[" * depth + ("]" * depth if closed else "")
    return '{"a":' * depth + "0" + ("}" * depth if closed else "")


deep_nesting = st.builds(_deep, st.integers(1, 12_000), st.sampled_from(["[", "{"]), st.booleans())

#: Any JSON value as text, with non-finite and huge number literals and odd strings.
json_text: st.SearchStrategy[str] = st.recursive(
    st.one_of(
        st.builds(_dumps, scalars, st.booleans()),
        st.sampled_from(RAW_NUMBERS),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(_array),
        st.lists(st.tuples(keys, children), max_size=4).map(_object),
    ),
    max_leaves=10,
)

#: Any JSON value as text (deep nesting is drawn on its own: it would drown the rest).
any_json = json_text

#: Engine ids the worker accepts: an int, or digit text (with blanks) in 0..2**63-1.
engine_ids = st.one_of(
    st.integers(0, MAX_ENGINE_ID).map(str),
    st.integers(0, MAX_ENGINE_ID).map(lambda n: json.dumps(f" {n} ")),
    st.sampled_from(["0", str(MAX_ENGINE_ID)]),
)

#: Durations the worker accepts (everything is capped at ``MAX_HOLD_S``).
valid_durations = st.one_of(
    st.floats(0, MAX_HOLD_S).map(repr),
    st.integers(0, 10**200).map(str),
    st.sampled_from(["0", "-0.0", "0.0", "5e-324", "1e100", "null", str(MAX_ENGINE_ID)]),
)
fuzzed_durations = st.one_of(st.sampled_from(RAW_NUMBERS), any_json)

OMIT = None  # a field value meaning "leave the key out"


def _field(valid: st.SearchStrategy[str], fuzz: bool) -> st.SearchStrategy[str | None]:
    if not fuzz:
        return valid
    return st.one_of(valid, valid, any_json, st.just(OMIT))


@st.composite
def envelope_texts(draw: st.DrawFn, *, fuzz_signed: bool) -> str:
    """An envelope as JSON text: every field valid, fuzzed or left out.

    ``fuzz_signed=False`` keeps ``signature`` and ``url`` valid (the placeholders), so
    in Vast mode the signature check passes and the other fields are what is tested.
    """
    mode = draw(st.sampled_from(["valid", "valid", "one", "one", "each"]))
    valid: dict[str, st.SearchStrategy[str]] = {
        "signature": st.just(json.dumps(SIGNATURE_TOKEN)),
        "url": st.just(json.dumps(URL_TOKEN)),
        "cost": st.sampled_from(["100", "0", '"100"']),
        "endpoint": st.sampled_from(['"test"', '"\\u00e9\\ud83d\\udca9"']),
        "reqnum": engine_ids,
        "request_idx": engine_ids,
    }
    fuzzable = [k for k in AUTH_KEYS if fuzz_signed or k not in ("signature", "url")]
    chosen = draw(st.sampled_from(fuzzable))
    pairs: list[tuple[str, str]] = []
    for key in AUTH_KEYS:
        fuzz = key in fuzzable and (mode == "each" or (mode == "one" and key == chosen))
        value = draw(_field(valid[key], fuzz))
        if value is not OMIT:
            pairs.append((key, value))
    pairs += draw(st.lists(st.tuples(texts, any_json), max_size=2))  # unknown keys
    auth = draw(
        st.one_of(st.just(_object(pairs)), any_json) if mode == "each" else st.just(_object(pairs))
    )

    duration = draw(st.one_of(valid_durations, valid_durations, fuzzed_durations, st.just(OMIT)))
    payload_pairs = [] if duration is OMIT else [("duration", duration)]
    payload_pairs += draw(st.lists(st.tuples(keys, any_json), max_size=2))
    payload = draw(
        st.one_of(
            st.just(_object(payload_pairs)),
            st.just(_object(payload_pairs)),
            st.just("null"),
            st.just(OMIT),
            any_json,
        )
    )
    session_id = draw(
        st.one_of(
            st.just(OMIT),
            st.just(OMIT),
            st.just("null"),
            st.builds(_dumps, texts, st.booleans()),
            any_json,
        )
    )

    top = [("auth_data", auth)]
    if payload is not OMIT:
        top.append(("payload", payload))
    if session_id is not OMIT:
        top.append(("session_id", session_id))
    top += draw(st.lists(st.tuples(keys, any_json), max_size=1))
    return _object(draw(st.permutations(top)))


@dataclass(frozen=True)
class Body:
    """One request body to send: JSON-ish text (with placeholders) or raw bytes."""

    text: str | None
    raw: bytes = b""
    encoding: str = "utf-8"
    #: Keep only the first ``cut / 10_000`` of the encoded bytes (a truncated body).
    cut: int | None = None
    #: Overwrite the byte at ``pos / 10_000`` of the length with ``value``.
    flip: tuple[int, int] | None = None
    content_type: str | None = "application/json"

    def render(self, url: str, signature: str) -> bytes:
        if self.text is None:
            data = self.raw
        else:
            text = self.text.replace(URL_TOKEN, url).replace(SIGNATURE_TOKEN, signature)
            data = text.encode(self.encoding, "surrogatepass")
        if self.cut is not None:
            data = data[: len(data) * self.cut // 10_000]
        if self.flip is not None and data:
            pos = min(len(data) * self.flip[0] // 10_000, len(data) - 1)
            data = data[:pos] + bytes([self.flip[1]]) + data[pos + 1 :]
        return data


#: The kinds of body :func:`bodies` draws, repeated to weight them.
BODY_KINDS = [
    *["envelope"] * 6,
    "truncated envelope",
    "corrupted envelope",
    "deep envelope",
    "any JSON",
    "deep nesting",
    "random bytes",
    "padded envelope",
]


@st.composite
def bodies(draw: st.DrawFn, *, fuzz_signed: bool) -> Body:
    """Envelopes (whole, cut short, with a corrupted byte or nested deep), any JSON, bytes."""
    kind = draw(st.sampled_from(BODY_KINDS))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if kind == "random bytes":
        return Body(None, raw=draw(st.binary(max_size=300)), content_type=content_type)
    if kind == "any JSON":
        return Body(draw(any_json), encoding=draw(st.sampled_from(ENCODINGS)))
    if kind == "deep nesting":
        return Body(draw(deep_nesting), content_type=content_type)
    text = draw(envelope_texts(fuzz_signed=fuzz_signed))
    fraction = st.integers(0, 9_999)
    if kind == "truncated envelope":
        return Body(text, cut=draw(fraction))
    if kind == "corrupted envelope":
        return Body(text, flip=(draw(fraction), draw(st.integers(0, 255))))
    if kind == "padded envelope":
        # Around the 64 KiB limit: some are taken, the others get 413.
        char = draw(st.sampled_from(["x", "\u00e9", "\U0001f4a9"]))
        size = draw(st.integers(64 * 1024 - 1_000, 64 * 1024 + 3_000))  # bytes, in UTF-8
        pad = char * (size // len(char.encode()))
        text = text.replace("{", f'{{"pad":{json.dumps(pad, ensure_ascii=False)},', 1)
        return Body(text, content_type=content_type)
    if kind == "deep envelope":
        # Nesting inside an otherwise valid envelope: below and past the parser's limit.
        nested = _deep(draw(st.integers(1, 3_000)), draw(st.sampled_from(["[", "{"])), True)
        where = draw(st.sampled_from(['"payload":{', '"auth_data":{', '"payload":{"duration":']))
        if where.endswith(":"):  # the duration itself, the drawn one moved to "x"
            text = text.replace(where, f'{where}{nested},"x":', 1)
        elif where + "}" in text:  # an empty object
            text = text.replace(where + "}", f'{where}"deep":{nested}}}', 1)
        else:
            text = text.replace(where, f'{where}"deep":{nested},', 1)
    return Body(text, encoding=draw(st.sampled_from(ENCODINGS)), content_type=content_type)


def _edge(auth: dict[str, str] | None = None, payload: str = "{}", session: str = "null") -> str:
    """A valid envelope's text with some fields replaced by the given JSON text."""
    fields = {
        "signature": json.dumps(SIGNATURE_TOKEN),
        "url": json.dumps(URL_TOKEN),
        "cost": "100",
        "endpoint": '"test"',
        "reqnum": "1",
        "request_idx": "1",
        **(auth or {}),
    }
    pairs = [("auth_data", _object(list(fields.items()))), ("payload", payload)]
    return _object([*pairs, ("session_id", session)])


#: The literals that most often break a JSON service, in every numeric field.
EDGE_NUMBERS = ["1e309", "-1e309", "NaN", "Infinity", "-Infinity", "-0.0", str(10**100)]
EDGE_NUMBERS += ["1" + "0" * 5000, "1E-400"]
#: Wrong types for every field.
EDGE_VALUES = ["null", "true", "[]", '{"a":1}', '"\\ud800"', '"\u00b2"', "1.5"]

#: Sent to each worker before hypothesis's examples: the brief's named cases, always.
EDGE_BODIES: list[Body] = [
    *(Body(_edge(payload=f'{{"duration":{n}}}')) for n in EDGE_NUMBERS),
    *(Body(_edge({k: n})) for k in ("cost", "reqnum", "request_idx") for n in EDGE_NUMBERS),
    *(Body(_edge({k: v})) for k in AUTH_KEYS for v in EDGE_VALUES),
    *(Body(_edge(payload=v)) for v in EDGE_VALUES),
    *(Body(_edge(session=v)) for v in ['"abc"', "1e309", *EDGE_VALUES]),
    Body(_edge(payload='{"pad":"' + "x" * 70_000 + '"}')),
    Body(_edge(payload='{"duration":' + _deep(900, "[", True) + "}")),
    Body(_deep(60_000, "[", False)),
    Body(_edge(payload='{"duration":0}'), cut=9_000),
    Body(_edge(payload='{"duration":0}'), encoding="utf-16"),
    Body(None, raw=b"\xff\xfe\x00"),
    Body(None, raw=b""),
    # Bare payloads: a standalone worker holds or names the duration; Vast mode, 422.
    *(Body(f'{{"duration":{n}}}') for n in EDGE_NUMBERS),
    *(Body(f'{{"duration":{v},"payload ":{v}}}') for v in EDGE_VALUES),
    Body("{}"),
    Body(None, raw=b" \r\n\t"),
]


def draw_examples(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` examples of ``strategy``, the same ones on every run (see the docstring)."""
    found: dict[Any, None] = {}  # ordered, without the repeats hypothesis may draw

    @settings(
        max_examples=count * 5 // 4,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        found[example] = None

    collect()
    assert len(found) >= count // 2, f"hypothesis drew only {len(found)} distinct examples"
    return list(found)[:count]


# -- sans-IO -------------------------------------------------------------------------


def _check_parse(
    data: bytes, key: rsa.RSAPublicKey | None = None, *, bare_payload: bool = False
) -> None:
    """``parse_envelope`` and ``parse_duration`` return or raise ``EnvelopeError``, only."""
    try:
        env = parse_envelope(data, bare_payload=bare_payload)
    except EnvelopeError as exc:
        _check_detail(exc.detail)
        return
    assert isinstance(env, Envelope)
    if env.bare:
        assert bare_payload
        assert env.auth_data == {} and env.session_id is None
        assert env.request_idx is None and env.reqnum is None
        assert isinstance(env.payload, dict)
        assert not any(k in env.payload for k in ("auth_data", "payload", "session_id"))
        try:
            seconds = parse_duration(env.payload, bare=True)
        except EnvelopeError as exc:
            _check_detail(exc.detail)
            assert set(exc.detail) == {"duration"}
        else:
            assert seconds is None or (type(seconds) is float and math.isfinite(seconds))
        return
    assert all(k in env.auth_data for k in AUTH_KEYS)
    assert isinstance(env.auth_data["signature"], str)
    assert isinstance(env.auth_data["url"], str)
    for ident in (env.request_idx, env.reqnum):
        assert type(ident) is int and 0 <= ident <= MAX_ENGINE_ID
    assert isinstance(env.payload, dict)
    assert env.session_id is None or isinstance(env.session_id, str)
    try:
        seconds = parse_duration(env.payload)
    except EnvelopeError as exc:
        _check_detail(exc.detail)
    else:
        assert seconds is None or (type(seconds) is float and math.isfinite(seconds))
        assert seconds is None or seconds >= 0
    if key is not None:
        assert signature_ok(env, key) in (True, False)


def _check_detail(detail: object) -> None:
    """An error detail the app can send as it is: a non-empty, strict-JSON object."""
    assert isinstance(detail, dict) and detail
    json.dumps(detail, allow_nan=False)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(bodies(fuzz_signed=True))
def test_parse_envelope_returns_or_raises_envelope_error(body: Body) -> None:
    _check_parse(body.render("http://127.0.0.1:1", ""))


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(st.binary(max_size=2000) | any_json.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_parse_envelope_on_any_bytes(data: bytes) -> None:
    _check_parse(data)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    bodies(fuzz_signed=True).map(lambda b: b.render("http://127.0.0.1:1", ""))
    | st.binary(max_size=200)
    | any_json.map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_a_standalone_parse_takes_bare_payloads_and_reads_envelopes_the_same(
    data: bytes,
) -> None:
    _check_parse(data, bare_payload=True)
    try:
        standalone: Envelope | dict[str, Any] = parse_envelope(data, bare_payload=True)
    except EnvelopeError as exc:
        standalone = exc.detail
    if isinstance(standalone, Envelope) and standalone.bare:
        return
    # Anything but a bare payload is read exactly as a Vast-mode worker reads it.
    try:
        vast: Envelope | dict[str, Any] = parse_envelope(data)
    except EnvelopeError as exc:
        vast = exc.detail
    if isinstance(vast, dict) and vast.get("error", "").startswith("the body must be"):
        assert isinstance(standalone, dict) and set(standalone) == {"error"}
        return
    assert repr(standalone) == repr(vast)


@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(bodies(fuzz_signed=False))
def test_signature_check_never_raises(rsa_key: rsa.RSAPrivateKey, body: Body) -> None:
    url = "http://127.0.0.1:1"
    _check_parse(body.render(url, sign_url(rsa_key, url)), rsa_key.public_key())


json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=3)
)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=3), st.one_of(json_values, st.just(OMIT)))
def test_parse_duration_returns_a_finite_float_or_raises(
    payload: dict[str, Any], duration: Any
) -> None:
    if duration is not OMIT:
        payload["duration"] = duration
    try:
        seconds = parse_duration(payload)
    except EnvelopeError as exc:
        _check_detail(exc.detail)
        assert set(exc.detail) == {"payload"}
    else:
        assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


# -- against a real worker -----------------------------------------------------------


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _check_response(response: httpx.Response, what: str) -> None:
    status = response.status_code
    assert status == 200 or 400 <= status < 500, f"{OK_OR_4XX}, got {status}: {what}"
    mime = response.headers.get("content-type", "").split(";")[0].strip()
    assert mime == "application/json", f"content-type {mime!r}: {what}"
    try:
        data = json.loads(response.content)
    except ValueError:
        pytest.fail(f"not a JSON body: {response.content[:200]!r}: {what}")
    assert isinstance(data, dict) and data, f"{data!r}: {what}"
    if status == 200:
        assert data["released"] == "duration_elapsed", f"{data!r}: {what}"
        assert 0 <= data["duration"] <= MAX_HOLD_S, f"{data!r}: {what}"
    elif "error" not in data:
        # A malformed envelope's 422 names each bad field instead (docs/instance.md, HTTP API).
        assert status == 422, f"{status} {data!r}: {what}"
        # Standalone, a bare payload's bad duration is named where it was written.
        fields = {"auth_data", "payload", "session_id"}
        assert set(data) <= fields or set(data) == {"duration"}, f"{data!r}: {what}"


async def _send_all(
    http: httpx.AsyncClient,
    info: ServeInfo,
    examples: list[Body],
    *,
    url: str,
    signature: str,
    normal: dict[str, Any],
) -> Counter[int]:
    """Send every example, then a normal reservation; return the examples' statuses."""
    statuses: Counter[int] = Counter()
    slot = runtime(info).slot
    for index, example in enumerate(examples):
        data = example.render(url, signature)
        what = f"example {index}: {example!r} rendered as {data[:300]!r}"
        headers = {} if example.content_type is None else {"content-type": example.content_type}
        response = await http.post(f"{info.url}/reserve", content=data, headers=headers)
        _check_response(response, what)
        statuses[response.status_code] += 1
        assert slot.statistics().busy is False, what
        normal["auth_data"]["request_idx"] = 1_000_000 + index
        after = await http.post(f"{info.url}/reserve", json=normal)
        assert after.status_code == 200, f"{after.status_code} {after.text} after {what}"
        assert after.json()["released"] == "duration_elapsed", what
        assert slot.statistics().busy is False, what
    return statuses


async def _check_worker_after(
    http: httpx.AsyncClient,
    info: ServeInfo,
    statuses: Counter[int],
    examples: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = await http.get(f"{info.url}/health")
    assert health.status_code == 200, health.text
    assert health.json() == {"ready": True, "busy": False}
    stats = runtime(info).slot.statistics()
    assert stats.busy is False
    assert stats.waiting == 0
    # Every 200 (an example's and each normal reservation's) was one hold that elapsed.
    assert stats.counts["duration_elapsed"] == statuses[200] + examples
    assert _tracebacks(caplog) == []
    print(f"statuses over {examples} examples: {dict(sorted(statuses.items()))}")


async def test_standalone_worker_answers_any_body_with_200_or_4xx(
    start_memory_worker: StartMemoryWorker,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No socket and no engine: nothing but Trio tasks, so the holds pass in virtual time.
    examples = EDGE_BODIES + draw_examples(bodies(fuzz_signed=True), STANDALONE_EXAMPLES)
    caplog.set_level(logging.INFO)
    served = await start_memory_worker(max_reservation_s=MAX_HOLD_S, max_queue_time_s=0)
    info, http = served.info, served.http
    url = "http://127.0.0.1:1"  # unsecured: neither url nor signature is checked
    normal = envelope(url, payload={"duration": 0})
    with trio.fail_after(60):
        statuses = await _send_all(http, info, examples, url=url, signature="", normal=normal)
    await _check_worker_after(http, info, statuses, len(examples), caplog)
    # The strategies reach every layer: holds, field errors, sessions, oversized bodies.
    assert statuses[200] >= 10 and statuses[422] >= 10, statuses
    assert statuses[410] >= 1 and statuses[413] >= 1, statuses


async def test_vast_worker_answers_signed_fuzzed_envelopes_with_200_or_4xx(
    start_worker: StartWorker,
    vast_engine: Any,
    rsa_key: rsa.RSAPrivateKey,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Over a real socket, as the one fuzzed case that is: the worker reports to a real
    # engine anyway, so virtual time is not an option here.
    examples = EDGE_BODIES + draw_examples(bodies(fuzz_signed=False), VAST_EXAMPLES)
    caplog.set_level(logging.INFO)
    info = await start_worker(
        **vast_settings(vast_engine, max_reservation_s=MAX_HOLD_S, max_queue_time_s=0)
    )
    await vast_engine.wait_for(lambda e: any(w.ready for w in e.workers.values()))
    assert info.public_url is not None
    url = info.public_url
    signature = sign_url(rsa_key, url)
    normal = envelope(url, key=rsa_key, payload={"duration": 0})
    with trio.fail_after(60):
        statuses = await _send_all(
            http, info, examples, url=url, signature=signature, normal=normal
        )
    await _check_worker_after(http, info, statuses, len(examples), caplog)
    assert statuses[200] >= 10 and statuses[422] >= 10, statuses
    assert statuses[401] >= 1 and statuses[410] >= 1 and statuses[413] >= 1, statuses


# -- request framing against a real worker ---------------------------------------------

#: ``Content-Length`` values, well-formed and not.
LENGTHS = ["0", "3", "03", " 3", "3, 3", "3, 4", "+3", "-3", "0x3", "3.0", "", "three"]
#: ``Transfer-Encoding`` values, well-formed and not.
CODINGS = ["chunked", "CHUNKED", "gzip", "gzip, chunked", "chunked, gzip", "identity", ""]

FRAMING_EXAMPLES = 120


@st.composite
def framings(draw: st.DrawFn) -> tuple[str, tuple[tuple[str, str], ...]]:
    """An HTTP version and up to three framing header lines, in any order."""
    version = draw(st.sampled_from(["1.1", "1.0"]))
    line = st.tuples(st.just("Content-Length"), st.sampled_from(LENGTHS)) | st.tuples(
        st.just("Transfer-Encoding"), st.sampled_from(CODINGS)
    )
    return version, tuple(draw(st.lists(line, max_size=3)))


def _strict_length(version: str, lines: tuple[tuple[str, str], ...]) -> int | str | None:
    """RFC 9112's framing, strictly: the body's length, ``"chunked"``, or None (ambiguous)."""
    lengths = [
        v.strip() for name, value in lines if name == "Content-Length" for v in value.split(",")
    ]
    codings = [value for name, value in lines if name == "Transfer-Encoding"]
    if codings:
        if lengths or version == "1.0" or len(codings) > 1:
            return None
        return "chunked" if codings[0].lower() == "chunked" else None
    if not lengths:
        return 0
    if len(set(lengths)) != 1 or not lengths[0].isdigit():
        return None
    return int(lengths[0])


async def test_the_worker_frames_a_request_body_as_rfc_9112_does_or_refuses_it(
    start_memory_worker: StartMemoryWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever ``Content-Length`` and ``Transfer-Encoding`` lines a request carries, the
    worker either reads its body as a strict reading of RFC 9112 does, or answers a JSON
    ``400`` and closes, so the request sent behind it is never served: a proxy in front
    that framed the body differently cannot smuggle a request through."""
    examples = draw_examples(framings(), FRAMING_EXAMPLES)
    caplog.set_level(logging.INFO)
    served = await start_memory_worker()
    info = served.info
    smuggled = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    seen: Counter[str] = Counter()
    for index, (version, lines) in enumerate(examples):
        length = _strict_length(version, lines)
        body = (
            b"0\r\n\r\n"
            if length == "chunked"
            else b"x" * (length if isinstance(length, int) else 3)
        )
        head = f"POST /health HTTP/{version}\r\nHost: x\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in lines
        )
        what = f"example {index}: {head!r}"
        stream = await served.connect()
        data = b""
        with trio.fail_after(10):
            # HTTP/1.0 without keep-alive ends with its answer: more bytes are an error
            behind = smuggled if version == "1.1" else b""
            await stream.send_all(head.encode() + b"\r\n" + body + behind)
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if length is not None and data.count(b"HTTP/1.1 ") == 2:
                        break  # a keep-alive connection: both answered
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
        assert data.startswith(b"HTTP/1.1 "), what
        status = int(data.split(b" ", 2)[1])
        if length is None:
            assert status == 400, f"{data[:300]!r}: {what}"
            assert data.count(b"HTTP/1.1 ") == 1, f"the request behind was served: {what}"
            assert json.loads(data.partition(b"\r\n\r\n")[2])["error"], what
            seen["refused"] += 1
        else:
            assert status == 405, f"{data[:300]!r}: {what}"  # POST /health, read as framed
            seen["framed"] += 1
    assert seen["refused"] >= 10 and seen["framed"] >= 10, seen
    assert not runtime(info).slot.statistics().busy
    assert _tracebacks(caplog) == []
