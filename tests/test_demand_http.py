"""``HttpJson`` against a small HTTP server of the test's own, ``PrometheusQuery`` against
Debian's real ``prometheus`` scraping a prometheus_client exporter (``tests/servers.py``).

The HTTP server is raw Trio sockets on 127.0.0.1 port 0: it answers each path as the
test set it (``routes``), records every request's head, and can hold a request
unanswered or stream a body without end, so that the bounds are real.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing
from prometheus_client import Gauge

from nullworker.client.demand import (
    DemandError,
    DemandSource,
    DemandTimeout,
    HttpJson,
    PrometheusQuery,
)

from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    PROMETHEUS_SCRAPE_S,
    PrometheusExporter,
    ServerProcess,
    prometheus_binary_fixture,
    prometheus_exporter_fixture,
    prometheus_server_fixture,
)

#: Bound on anything a test waits for.
WAIT_S = 30.0
#: A short read timeout for the hang tests.
SHORT_S = 0.5

HANG = "hang"
ENDLESS = "endless"


@dataclass
class JsonServer:
    port: int = 0
    routes: dict[str, tuple[int, bytes] | str] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve_json(self, path: str, document: object, status: int = 200) -> None:
        self.routes[path] = (status, json.dumps(document).encode())

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            self.heads.append(head)
            path = head.split(" ")[1].split("?")[0]
            route = self.routes.get(path, (404, b'{"error": "no such path"}'))
            if route == HANG:
                await trio.sleep_forever()
            if route == ENDLESS:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n["
                try:
                    await stream.send_all(head)
                    while True:
                        await stream.send_all(b"1," * 8192)
                except trio.BrokenResourceError:
                    return  # the client hung up, as it should

            assert isinstance(route, tuple)
            status, body = route
            await stream.send_all(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )


@pytest.fixture
async def json_server(nursery: trio.Nursery) -> JsonServer:
    server = JsonServer()
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    server.port = listeners[0].socket.getsockname()[1]
    return server


async def demand(source: DemandSource) -> int:
    with trio.fail_after(WAIT_S):
        return await source.read()


async def refused(source: DemandSource, words: str) -> str:
    with trio.fail_after(WAIT_S), pytest.raises(DemandError) as failed:
        await source.read()
    message = str(failed.value)
    assert words in message, message
    return message


# -- HTTP JSON -------------------------------------------------------------------------------

FLOWER = {
    "active_queues": [
        {"name": "celery", "messages": 3},
        {"name": "mail", "messages": 0},
        {"name": "dup", "messages": 1},
        {"name": "dup", "messages": 2},
    ]
}


async def test_http_json_reads_the_number_at_the_path(json_server: JsonServer) -> None:
    json_server.serve_json("/api/queues/length", FLOWER)
    json_server.serve_json("/plain", {"queue": {"depth": 7.0}, "list": [5, 6]})
    url = json_server.url("/api/queues/length")
    async with HttpJson(url, "active_queues.name=celery.messages") as source:
        assert await demand(source) == 3
        FLOWER["active_queues"][0]["messages"] = 4
        json_server.serve_json("/api/queues/length", FLOWER)
        assert await demand(source) == 4
    async with HttpJson(url, "active_queues.1.messages") as source:
        assert await demand(source) == 0
    async with HttpJson(json_server.url("/plain"), "queue.depth") as source:
        assert await demand(source) == 7  # 7.0: a whole number
    async with HttpJson(json_server.url("/plain"), "list.1") as source:
        assert await demand(source) == 6


@pytest.mark.parametrize(
    ("document", "path", "words"),
    [
        ({"n": None}, "n", "is null, not a number"),
        ({"n": "3"}, "n", 'is "3", not a number'),
        ({"n": True}, "n", "is true, not a number"),
        ({"n": -1}, "n", "a negative count"),
        ({"n": 2.5}, "n", "not a whole number"),
        ({"n": 1e400}, "n", "inf, not a count"),
        ({"m": 1}, "n", "has no key 'n'"),
        ({"n": [1]}, "n.3", "has 1 item(s), no [3]"),
        (FLOWER, "active_queues.name=dup.messages", "2 items of active_queues"),
        (FLOWER, "active_queues.name=none.messages", "0 items of active_queues"),
        (FLOWER, "active_queues.celery", "neither an index nor a key=value"),
        ({"n": 1}, "n.x", "is int, not an object or list"),
    ],
)
async def test_http_json_value_that_is_not_a_count_is_an_error_never_0(
    json_server: JsonServer, document: object, path: str, words: str
) -> None:
    json_server.serve_json("/doc", document)
    async with HttpJson(json_server.url("/doc"), path) as source:
        await refused(source, words)


async def test_http_json_nan_status_and_non_json_are_errors(json_server: JsonServer) -> None:
    json_server.routes["/nan"] = (200, b'{"n": NaN}')
    json_server.routes["/text"] = (200, b"<html>hello</html>")
    json_server.serve_json("/down", {"error": "maintenance"}, status=503)
    json_server.routes["/moved"] = (302, b"")
    async with HttpJson(json_server.url("/nan"), "n") as source:
        await refused(source, "is nan, not a count")
    async with HttpJson(json_server.url("/text"), "n") as source:
        await refused(source, "the answer is not JSON")
    async with HttpJson(json_server.url("/down"), "n") as source:
        await refused(source, 'answered 503: {"error": "maintenance"}')
    async with HttpJson(json_server.url("/moved"), "n") as source:
        await refused(source, "answered 302")  # redirects are not followed


async def test_http_json_bounds_the_body_and_the_time(json_server: JsonServer) -> None:
    json_server.routes["/endless"] = ENDLESS
    json_server.routes["/hang"] = HANG
    json_server.serve_json("/ok", {"n": 1})
    async with HttpJson(json_server.url("/endless"), "n", max_bytes=100_000) as source:
        await refused(source, "larger than 100000 bytes")
    source = HttpJson(json_server.url("/hang"), "n", timeout_s=SHORT_S)
    async with source:
        with trio.fail_after(WAIT_S), pytest.raises(DemandTimeout):
            await source.read()
        source.url = json_server.url("/ok")  # the same source reads again after a timeout
        assert await demand(source) == 1


async def test_http_credentials_go_in_the_header_only(json_server: JsonServer) -> None:
    json_server.serve_json("/doc", {"n": 2})
    json_server.serve_json("/denied", {"error": "bad token"}, status=401)
    async with HttpJson(json_server.url("/doc"), "n", bearer_token="t0ken-s3cret") as source:
        assert await demand(source) == 2
        assert "s3cret" not in source.describe() + repr(source)
    assert "Authorization: Bearer t0ken-s3cret" in json_server.heads[-1].replace(
        "authorization", "Authorization"
    )
    basic = HttpJson(json_server.url("/doc"), "n", basic_auth=("ops", "pa55word"))
    async with basic:
        assert await demand(basic) == 2
    expected = base64.b64encode(b"ops:pa55word").decode()
    assert f"Basic {expected}" in json_server.heads[-1]
    denied = HttpJson(json_server.url("/denied"), "n", bearer_token="t0ken-s3cret")
    async with denied:
        message = await refused(denied, "answered 401")
    assert "s3cret" not in message
    in_url = json_server.url("/denied").replace("http://", "http://ops:pa55word@")
    async with HttpJson(in_url, "n") as source:
        message = await refused(source, "answered 401")
        assert "pa55word" not in message and "pa55word" not in source.describe()


async def test_http_source_reconnects_after_the_server_goes_away(nursery: trio.Nursery) -> None:
    server = JsonServer()
    server.serve_json("/doc", {"n": 5})
    scope = trio.CancelScope()

    async def serve(port: int, *, task_status: trio.TaskStatus[int]) -> None:
        with scope:
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(server.handle, listeners)

    server.port = await nursery.start(serve, 0)
    async with HttpJson(server.url("/doc"), "n") as source:
        assert await demand(source) == 5
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        await refused(source, "ConnectError")
        scope = trio.CancelScope()
        await nursery.start(serve, server.port)
        assert await demand(source) == 5


def test_http_sources_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="expected http://host"):
        HttpJson("http:/h/x", "n")
    with pytest.raises(ValueError, match="scheme"):
        HttpJson("ftp://h/x", "n")
    with pytest.raises(ValueError, match="JSON path"):
        HttpJson("http://h/x", "a..b")
    with pytest.raises(ValueError, match="not both"):
        HttpJson("http://h/x", "n", bearer_token="t", basic_auth=("u", "p"))
    with pytest.raises(ValueError, match="must not have a query"):
        PrometheusQuery("http://h:9090/?x=1", "up")
    with pytest.raises(ValueError, match="needs a query"):
        PrometheusQuery("http://h:9090", "")


# -- Prometheus --------------------------------------------------------------------------------


async def until_scraped(source: PrometheusQuery, expected: int) -> None:
    """Read until Prometheus has scraped the exporter's current values."""
    with trio.fail_after(WAIT_S):
        while True:
            try:
                if await source.read() == expected:
                    return
            except DemandError:
                pass
            await trio.sleep(PROMETHEUS_SCRAPE_S / 2)


async def test_prometheus_query_is_one_value_or_an_error(
    prometheus_server: ServerProcess, prometheus_exporter: PrometheusExporter
) -> None:
    registry = prometheus_exporter.registry
    waiting = Gauge("jobs_waiting", "jobs in the queue", registry=registry)
    by_queue = Gauge("jobs_by_queue", "jobs per queue", ["queue"], registry=registry)
    waiting.set(3)
    by_queue.labels("a").set(1)
    by_queue.labels("b").set(2)
    url = prometheus_server.url

    async with PrometheusQuery(url, "jobs_waiting") as source:
        await until_scraped(source, 3)
        waiting.set(5)
        await until_scraped(source, 5)

    for query, expected in (
        ("sum(jobs_by_queue)", 3),
        ("scalar(sum(jobs_by_queue))", 3),  # a scalar result
        ('jobs_by_queue{queue="b"}', 2),
    ):
        async with PrometheusQuery(url, query) as source:
            assert await demand(source) == expected, query

    for query, words in (
        ("jobs_by_queue", "gave 2 series, not exactly one"),
        ('jobs_by_queue{queue="none"}', "gave no series"),
        ("no_such_metric", "gave no series"),
        ("sum(jobs_waiting) / 0", "is inf, not a count"),
        ("sum(jobs_waiting) - sum(jobs_waiting) / 0", "is -inf, not a count"),
        ("scalar(jobs_by_queue)", "is nan, not a count"),  # scalar() of 2 series is NaN
        ("-sum(jobs_waiting)", "is -5, a negative count"),
        ("sum(jobs_waiting) / 2", "not a whole number"),
        ("jobs_waiting[1m]", "gave a matrix"),
        ("sum(", "Prometheus answered 400: bad_data"),
    ):
        async with PrometheusQuery(url, query) as source:
            await refused(source, words)


async def test_prometheus_outage_is_an_error_and_the_source_recovers(
    prometheus_server: ServerProcess, prometheus_exporter: PrometheusExporter
) -> None:
    Gauge("jobs_waiting", "jobs", registry=prometheus_exporter.registry).set(2)
    async with PrometheusQuery(prometheus_server.url + "/", "jobs_waiting") as source:
        await until_scraped(source, 2)
        await prometheus_server.stop()
        await refused(source, "ConnectError")
        await prometheus_server.start()  # same data directory: the series is still there
        await until_scraped(source, 2)
