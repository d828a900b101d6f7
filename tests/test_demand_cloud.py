"""The SQS, RabbitMQ and PostgreSQL demand sources against real servers.

The servers (``tests/servers_cloud.py``) are a ``moto_server`` enforcing IAM credentials,
a RabbitMQ node with its management plugin and a PostgreSQL cluster, each on free
loopback ports, one per test session; each test names its own queues and tables. Test
data goes in with clients that are not the code under test: boto3 with its own client,
the management API over plain httpx and an AMQP consumer (pika) for RabbitMQ, ``psql``
for PostgreSQL. Hangs are a loopback listener that never answers (``silent_server``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pika
import pytest
import trio

from nullworker.client.autoscale_cli import main
from nullworker.client.demand import (
    DemandError,
    DemandNotFound,
    DemandSource,
    DemandTimeout,
    PostgresQuery,
    RabbitMQQueue,
    SqsQueue,
)
from nullworker.client.demand._postgres import APPLICATION_NAME
from nullworker.client.demand._sqs import region_from_queue_url

from .helpers import closed_port, closed_url
from .servers import silent_server_fixture  # noqa: F401  (a fixture, used by name)
from .servers_cloud import (  # noqa: F401  (pytest fixtures, used by name)
    PG_PASSWORD,
    MotoServer,
    PostgresServer,
    RabbitNode,
    moto_sqs_fixture,
    postgres_server_fixture,
    rabbitmq_node_fixture,
)

#: Bound on anything a test waits for.
WAIT_S = 15.0
#: A short read timeout for the hang tests.
SHORT_S = 0.5

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}_{time.monotonic_ns() % 10**9}"


@pytest.fixture(autouse=True)
def _aws_stays_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS file of this machine, and no instance-metadata lookup (not loopback)."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)


async def read_within(source: DemandSource, bound_s: float = WAIT_S) -> int:
    with trio.fail_after(bound_s):
        return await source.read()


async def read_error(source: DemandSource, bound_s: float = WAIT_S) -> DemandError:
    """The DemandError a read raises (any other exception fails the test)."""
    with trio.fail_after(bound_s):
        try:
            value = await source.read()
        except DemandError as exc:
            return exc
    pytest.fail(f"read() returned {value} instead of raising DemandError")


class Answering:
    """A loopback HTTP server that answers every request with ``status`` and ``body``.

    For answers a real server does not give (a count that is not a number): the
    client under test still speaks real HTTP over a real socket.
    """

    def __init__(self) -> None:
        self.port = 0
        self.status = 200
        self.body: object = {}
        self.content_type = "application/json"

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            body = json.dumps(self.body).encode()
            await stream.send_all(
                f"HTTP/1.1 {self.status} X\r\ncontent-type: {self.content_type}\r\n"
                f"x-amzn-requestid: 1\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode()
                + body
            )


@pytest.fixture
async def answering(nursery: trio.Nursery) -> Answering:
    server = Answering()
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    server.port = listeners[0].socket.getsockname()[1]
    return server


# -- SQS -----------------------------------------------------------------------------------


@pytest.fixture
def sqs_env(moto_sqs: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """boto3's default chain pointed at the moto server, with its valid key."""
    for name, value in moto_sqs.env().items():
        monkeypatch.setenv(name, value)
    yield moto_sqs


async def test_sqs_counts_waiting_and_in_flight_messages(sqs_env: MotoServer) -> None:
    sqs = sqs_env.client()
    url = sqs.create_queue(QueueName=unique("jobs"))["QueueUrl"]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"job {i}")
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=600)
    async with (
        SqsQueue(url, timeout_s=5) as source,
        SqsQueue(url, include_delayed=True, timeout_s=5) as with_delayed,
    ):
        assert await read_within(source) == 3
        assert await read_within(with_delayed) == 4
        # Two received and not deleted: in flight, still demand.
        received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=600)[
            "Messages"
        ]
        assert len(received) == 2
        assert await read_within(source) == 3
        sqs.delete_message(QueueUrl=url, ReceiptHandle=received[0]["ReceiptHandle"])
        assert await read_within(source) == 2
        assert await read_within(with_delayed) == 3
    assert "(+ delayed)" in with_delayed.describe()


async def test_sqs_fifo_queue(sqs_env: MotoServer) -> None:
    sqs = sqs_env.client()
    url = sqs.create_queue(
        QueueName=unique("jobs") + ".fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"},
    )["QueueUrl"]
    for i in range(2):
        sqs.send_message(QueueUrl=url, MessageBody=f"job {i}", MessageGroupId="g")
    async with SqsQueue(url) as source:
        assert await read_within(source) == 2
        # A FIFO group is locked while its head is in flight; both still count.
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=600)
        assert await read_within(source) == 2


async def test_sqs_missing_queue_is_not_found(sqs_env: MotoServer) -> None:
    url = f"{sqs_env.url}/123456789012/{unique('missing')}"
    async with SqsQueue(url) as source:
        error = await read_error(source)
    assert isinstance(error, DemandNotFound)
    assert "the queue does not exist" in str(error) and url in str(error)


async def test_sqs_refused_credentials_are_an_error_without_the_secret(
    sqs_env: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqs_env.client().create_queue(QueueName=unique("jobs"))["QueueUrl"]
    wrong_secret = "wrong-secret-5f2a9c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    async with SqsQueue(url) as source:
        error = await read_error(source)
    assert type(error) is DemandError
    assert "the credentials were refused (SignatureDoesNotMatch" in str(error)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    async with SqsQueue(url) as source:
        error = await read_error(source)
    assert "the credentials were refused (InvalidClientTokenId" in str(error)
    assert wrong_secret not in str(error) + repr(source)
    # The right key again: the same source reads.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", sqs_env.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sqs_env.secret_key)
    async with SqsQueue(url) as source:
        assert await read_within(source) == 0


async def test_sqs_no_credentials_says_so(
    sqs_env: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with SqsQueue(f"{sqs_env.url}/123456789012/jobs") as source:
        error = await read_error(source)
    assert "no AWS credentials found" in str(error)


async def test_sqs_hung_and_refused_endpoints_fail_within_the_timeout(
    sqs_env: MotoServer, silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{silent_server}")
    async with SqsQueue(f"http://127.0.0.1:{silent_server}/1/jobs", timeout_s=SHORT_S) as source:
        first = await read_error(source)
        # The abandoned thread may still be finishing: the next read waits for it (one
        # thread per source) and is bounded all the same.
        second = await read_error(source)
    assert isinstance(first, DemandTimeout) and isinstance(second, DemandTimeout)
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{port}")
    async with SqsQueue(f"http://127.0.0.1:{port}/1/jobs", timeout_s=2) as source:
        error = await read_error(source)
    assert type(error) is DemandError and "Could not connect" in str(error)


async def test_sqs_answer_that_is_not_a_count_is_an_error(
    sqs_env: MotoServer, answering: Answering, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{answering.port}")
    answering.content_type = "application/x-amz-json-1.0"
    url = f"http://127.0.0.1:{answering.port}/1/jobs"
    async with SqsQueue(url) as source:
        for attributes, message in [
            ({"ApproximateNumberOfMessages": "3"}, "the answer has no ApproximateNumberOfMes"),
            (
                {"ApproximateNumberOfMessages": "-1", "ApproximateNumberOfMessagesNotVisible": "0"},
                "ApproximateNumberOfMessages is '-1', not a count",
            ),
            (
                {"ApproximateNumberOfMessages": "1", "ApproximateNumberOfMessagesNotVisible": "x"},
                "ApproximateNumberOfMessagesNotVisible is 'x', not a count",
            ),
        ]:
            answering.body = {"Attributes": attributes}
            error = await read_error(source)
            assert type(error) is DemandError and message in str(error), error
        answering.body = {
            "Attributes": {
                "ApproximateNumberOfMessages": "4",
                "ApproximateNumberOfMessagesNotVisible": "5",
            }
        }
        assert await read_within(source) == 9


def test_sqs_region_comes_from_the_queue_url_when_not_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert region_from_queue_url("https://sqs.eu-west-3.amazonaws.com/1/q") == "eu-west-3"
    assert region_from_queue_url("https://sqs-fips.us-gov-west-1.amazonaws.com/1/q") == (
        "us-gov-west-1"
    )
    assert region_from_queue_url("https://ap-south-1.queue.amazonaws.com/1/q") == "ap-south-1"
    assert region_from_queue_url("http://127.0.0.1:9324/1/q") is None
    assert SqsQueue("https://sqs.eu-west-3.amazonaws.com/1/q").region == "eu-west-3"
    with pytest.raises(ValueError, match="no AWS region: set AWS_DEFAULT_REGION"):
        SqsQueue("http://127.0.0.1:9324/1/q")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert SqsQueue("https://sqs.eu-west-3.amazonaws.com/1/q").region == "us-west-2"
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "not a url")
    with pytest.raises(ValueError, match="no SQS client: ValueError: Invalid endpoint"):
        SqsQueue("https://sqs.eu-west-3.amazonaws.com/1/q")


@pytest.mark.parametrize(
    "url",
    [
        "jobs",
        "ftp://sqs.us-east-1.amazonaws.com/1/q",
        "https://sqs.us-east-1.amazonaws.com/q",
        "https://user:hunter2@sqs.us-east-1.amazonaws.com/1/q",
    ],
)
def test_sqs_url_that_does_not_parse_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="SQS queue URL") as info:
        SqsQueue(url)
    assert "hunter2" not in str(info.value)


# -- RabbitMQ ------------------------------------------------------------------------------


async def test_rabbitmq_counts_ready_and_unacknowledged(rabbitmq_node: RabbitNode) -> None:
    queue = unique("jobs")
    rabbitmq_node.declare(queue)
    rabbitmq_node.publish(queue, 3)
    await trio.to_thread.run_sync(rabbitmq_node.wait_for_messages, queue, 3)
    async with RabbitMQQueue(rabbitmq_node.url, queue) as source:
        assert await read_within(source) == 3
        # A consumer takes two and holds them unacknowledged: still demand.
        params = pika.ConnectionParameters("127.0.0.1", rabbitmq_node.amqp_port)
        connection = await trio.to_thread.run_sync(pika.BlockingConnection, params)
        try:
            channel = connection.channel()
            tags = []
            for _ in range(2):
                method, _, _ = channel.basic_get(queue, auto_ack=False)
                assert method is not None
                tags.append(method.delivery_tag)

            def unacked() -> int:
                info = rabbitmq_node.api("GET", f"/queues/%2F/{queue}").json()
                return int(info.get("messages_unacknowledged", 0))

            while await trio.to_thread.run_sync(unacked) != 2:
                await trio.sleep(0.05)
            assert await read_within(source) == 3
            channel.basic_ack(tags[0])
            await trio.to_thread.run_sync(rabbitmq_node.wait_for_messages, queue, 2)
            assert await read_within(source) == 2
        finally:
            connection.close()


async def test_rabbitmq_queue_without_statistics_is_unknown_not_zero(
    rabbitmq_node: RabbitNode,
) -> None:
    # A queue has no counts until it first emits statistics; a read right after its
    # creation falls in that window unless the machine stalls for a whole interval,
    # so a few fresh queues are tried.
    for _ in range(5):
        queue = unique("fresh")
        async with RabbitMQQueue(rabbitmq_node.url, queue) as source:
            rabbitmq_node.declare(queue)
            try:
                value = await read_within(source)
            except DemandError as exc:
                assert "no message count yet" in str(exc) and "unknown, not 0" in str(exc)
                break
            assert value == 0
    else:
        pytest.fail("every fresh queue had statistics at once")
    await trio.to_thread.run_sync(rabbitmq_node.wait_for_messages, queue, 0)
    async with RabbitMQQueue(rabbitmq_node.url, queue) as source:
        assert await read_within(source) == 0


async def test_rabbitmq_missing_queue_and_vhost_are_not_found(rabbitmq_node: RabbitNode) -> None:
    async with RabbitMQQueue(rabbitmq_node.url, unique("missing")) as source:
        error = await read_error(source)
    assert isinstance(error, DemandNotFound) and "HTTP 404" in str(error)
    async with RabbitMQQueue(rabbitmq_node.url, "jobs", vhost="no-such-vhost") as source:
        assert isinstance(await read_error(source), DemandNotFound)


async def test_rabbitmq_vhost_is_url_encoded_and_env_credentials(
    rabbitmq_node: RabbitNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    vhost = unique("team/a")
    encoded = vhost.replace("/", "%2F")
    assert rabbitmq_node.api("PUT", f"/vhosts/{encoded}").status_code in (201, 204)
    permissions = {"configure": ".*", "write": ".*", "read": ".*"}
    answer = rabbitmq_node.api("PUT", f"/permissions/{encoded}/guest", permissions)
    assert answer.status_code in (201, 204)
    rabbitmq_node.declare("jobs", vhost=encoded)
    rabbitmq_node.publish("jobs", 2, vhost=encoded)
    await trio.to_thread.run_sync(rabbitmq_node.wait_for_messages, "jobs", 2, encoded)
    monkeypatch.setenv("NULLWORKER_RABBITMQ_USER", "guest")
    monkeypatch.setenv("NULLWORKER_RABBITMQ_PASSWORD", "guest")
    async with RabbitMQQueue(rabbitmq_node.base_url, "jobs", vhost=vhost) as source:
        assert await read_within(source) == 2
    assert f"vhost {vhost!r}" in source.describe()


async def test_rabbitmq_refused_credentials_are_clear_and_hidden(
    rabbitmq_node: RabbitNode,
) -> None:
    queue = unique("jobs")
    rabbitmq_node.declare(queue)
    url = f"http://guest:hunter2@127.0.0.1:{rabbitmq_node.management_port}"
    async with RabbitMQQueue(url, queue) as source:
        error = await read_error(source)
    assert type(error) is DemandError
    assert "refused the credentials (HTTP 401)" in str(error)
    assert "hunter2" not in str(error) + repr(source)


async def test_rabbitmq_hung_and_refused_servers(silent_server: int) -> None:
    async with RabbitMQQueue(f"http://127.0.0.1:{silent_server}", "q", timeout_s=SHORT_S) as src:
        assert isinstance(await read_error(src), DemandTimeout)
    async with RabbitMQQueue(closed_url(), "q") as source:
        error = await read_error(source)
    assert type(error) is DemandError and "ConnectError" in str(error)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (200, {"messages": -1}, "'messages' is -1, not a count"),
        (200, {"messages": "3"}, "'messages' is '3', not a count"),
        (200, {"messages": 2.5}, "'messages' is 2.5, not a count"),
        (200, {"messages": True}, "'messages' is True, not a count"),
        (200, [1], "the answer is not a queue object"),
        (403, {}, "HTTP 403"),
        (500, {"error": "boom"}, "HTTP 500"),
    ],
)
async def test_rabbitmq_answer_that_is_not_a_count_is_an_error(
    answering: Answering, status: int, body: object, message: str
) -> None:
    answering.status, answering.body = status, body
    async with RabbitMQQueue(f"http://127.0.0.1:{answering.port}", "q") as source:
        error = await read_error(source)
    assert type(error) is DemandError and message in str(error), error


@pytest.mark.parametrize(
    "url", ["amqp://guest:hunter2@h:5672", "http://", "http://guest:hunter2@h:port", "h:15672"]
)
def test_rabbitmq_url_that_does_not_parse_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="management URL") as info:
        RabbitMQQueue(url, "q")
    assert "hunter2" not in str(info.value)


# -- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def jobs_table(postgres_server: PostgresServer) -> str:
    table = unique("jobs")
    postgres_server.psql(
        f"CREATE TABLE {table} (id serial PRIMARY KEY, status text NOT NULL, n numeric)"
    )
    return table


async def test_postgres_counts(postgres_server: PostgresServer, jobs_table: str) -> None:
    postgres_server.psql(
        f"INSERT INTO {jobs_table} (status, n) VALUES ('todo', 1), ('todo', 2), ('doing', 3),"
        " ('done', 4)"
    )
    query = f"SELECT count(*) FROM {jobs_table} WHERE status IN ('todo', 'doing')"
    async with PostgresQuery(postgres_server.dsn, query) as source:
        assert await read_within(source) == 3
        postgres_server.psql(f"UPDATE {jobs_table} SET status = 'done' WHERE n = 1")
        assert await read_within(source) == 2
    # A numeric with no fraction is a count (sum() of integers is numeric).
    async with PostgresQuery(postgres_server.dsn, f"SELECT sum(n) FROM {jobs_table}") as source:
        assert await read_within(source) == 10


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT NULL::bigint", "returned NULL, not a count"),
        ("SELECT 2.5", "returned Decimal('2.5')"),
        ("SELECT -1", "returned -1 (int), not a whole number >= 0"),
        ("SELECT 'NaN'::float8", "not a whole number"),
        ("SELECT '3'", "returned '3' (str)"),
        ("SELECT true", "returned True (bool)"),
        ("SELECT 1 WHERE false", "returned 0 rows, not one"),
        ("SELECT * FROM generate_series(1, 2)", "returned 2 rows, not one"),
        ("SELECT 1, 2", "returned 2 columns, not one"),
        ("SELEC 1", "the server answered PostgresSyntaxError"),
        ("SELECT count(*) FROM no_such_table", "UndefinedTableError"),
        ("SELECT 1; SELECT 2", "the server answered"),
    ],
)
async def test_postgres_value_that_is_not_a_count_is_an_error(
    postgres_server: PostgresServer, query: str, message: str
) -> None:
    async with PostgresQuery(postgres_server.dsn, query) as source:
        error = await read_error(source)
        assert type(error) is DemandError and message in str(error), str(error)
        # The connection stays usable for the next read.
        assert PG_PASSWORD not in str(error)


async def test_postgres_query_is_read_only(
    postgres_server: PostgresServer, jobs_table: str
) -> None:
    postgres_server.psql(f"INSERT INTO {jobs_table} (status) VALUES ('todo')")
    query = f"WITH gone AS (DELETE FROM {jobs_table} RETURNING 1) SELECT count(*) FROM gone"
    async with PostgresQuery(postgres_server.dsn, query) as source:
        error = await read_error(source)
    assert "ReadOnlySQLTransactionError" in str(error)
    assert postgres_server.psql(f"SELECT count(*) FROM {jobs_table}") == "1"


async def test_postgres_slow_query_times_out_and_is_not_left_running(
    postgres_server: PostgresServer,
) -> None:
    marker = unique("slow")
    query = f"SELECT 1 FROM pg_sleep(30) WHERE '{marker}' <> ''"
    async with PostgresQuery(postgres_server.dsn, query, timeout_s=1.0) as source:
        error = await read_error(source)
        assert isinstance(error, DemandTimeout), error

        def running() -> str:
            return postgres_server.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                f"AND application_name = '{APPLICATION_NAME}' AND query LIKE '%{marker}%'"
            )

        with trio.fail_after(WAIT_S):
            while await trio.to_thread.run_sync(running) != "0":
                await trio.sleep(0.05)
        # The source reads again afterwards.
        source.query = "SELECT 7"
        assert await read_within(source) == 7


async def test_postgres_bad_password_and_dsn_are_refused_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    dsn = postgres_server.dsn.replace(PG_PASSWORD, "hunter2")
    async with PostgresQuery(dsn, "SELECT 1") as source:
        error = await read_error(source)
    assert "InvalidPasswordError" in str(error)
    assert "hunter2" not in str(error) + repr(source)
    assert "postgresql://postgres:***@127.0.0.1:" in str(error)
    for bad in ("mysql://u:hunter2@h/db", "postgresql://u:hunter2@h:port/db", "h:5432"):
        with pytest.raises(ValueError) as info:
            PostgresQuery(bad, "SELECT 1")
        assert "hunter2" not in str(info.value)


async def test_postgres_recovers_from_a_restart(postgres_server: PostgresServer) -> None:
    async with PostgresQuery(postgres_server.dsn, "SELECT 5") as source:
        assert await read_within(source) == 5
        # Restarted between two reads: the kept connection is dead, the read reconnects.
        await trio.to_thread.run_sync(postgres_server.stop)
        await trio.to_thread.run_sync(postgres_server.start)
        assert await read_within(source) == 5
        # Down during a read: an error; up again: the next read connects anew.
        await trio.to_thread.run_sync(postgres_server.stop)
        try:
            error = await read_error(source)
            assert type(error) is DemandError
        finally:
            await trio.to_thread.run_sync(postgres_server.start)
        assert await read_within(source) == 5


def test_postgres_recipes_in_the_docs_count_waiting_and_running_jobs(
    postgres_server: PostgresServer,
) -> None:
    """The queries of docs/scaling.md, on the columns each project's schema defines."""
    schema = unique("recipes")
    postgres_server.psql(
        f"""
        CREATE SCHEMA {schema}; SET search_path = {schema};
        CREATE TYPE procrastinate_job_status AS ENUM
            ('todo', 'doing', 'succeeded', 'failed', 'cancelled', 'aborting', 'aborted');
        CREATE TABLE procrastinate_jobs (id bigserial, queue_name text NOT NULL,
            status procrastinate_job_status NOT NULL DEFAULT 'todo', scheduled_at timestamptz);
        INSERT INTO procrastinate_jobs (queue_name, status, scheduled_at) VALUES
            ('default', 'todo', NULL), ('default', 'doing', NULL),
            ('default', 'todo', now() + interval '1 hour'), ('default', 'succeeded', NULL);
        CREATE TYPE pgqueuer_status AS ENUM
            ('queued', 'picked', 'successful', 'exception', 'canceled', 'deleted', 'failed');
        CREATE TABLE pgqueuer (id bigserial, entrypoint text NOT NULL,
            execute_after timestamptz NOT NULL DEFAULT now(), status pgqueuer_status NOT NULL);
        INSERT INTO pgqueuer (entrypoint, status, execute_after) VALUES
            ('fetch', 'queued', now()), ('fetch', 'picked', now()),
            ('fetch', 'queued', now() + interval '1 hour');
        CREATE TYPE river_job_state AS ENUM ('available', 'cancelled', 'completed',
            'discarded', 'pending', 'retryable', 'running', 'scheduled');
        CREATE TABLE river_job (id bigserial, state river_job_state NOT NULL,
            queue text NOT NULL DEFAULT 'default', scheduled_at timestamptz NOT NULL);
        INSERT INTO river_job (state, scheduled_at) VALUES
            ('available', now()), ('running', now()), ('retryable', now() - interval '1 s'),
            ('retryable', now() + interval '1 hour'), ('scheduled', now() - interval '1 s'),
            ('completed', now());
        CREATE TABLE jobs (id bigserial, status text NOT NULL);
        INSERT INTO jobs (status) VALUES ('queued'), ('running'), ('done');
        """
    )
    recipes = {
        "procrastinate": (
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing' OR "
            "(status = 'todo' AND (scheduled_at IS NULL OR scheduled_at <= now()))"
        ),
        "pgqueuer": (
            "SELECT count(*) FROM pgqueuer WHERE status = 'picked' OR "
            "(status = 'queued' AND execute_after <= now())"
        ),
        "river": (
            "SELECT count(*) FROM river_job WHERE state IN ('available', 'running') OR "
            "(state IN ('retryable', 'scheduled') AND scheduled_at <= now())"
        ),
        "plain": "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')",
    }
    # docs/scaling.md must show these very queries.
    page = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    for name, query in recipes.items():
        assert query in " ".join(page.split()), name
    counts = {
        name: postgres_server.psql(f"SET search_path = {schema}; {query}")
        for name, query in recipes.items()
    }
    assert counts == {"procrastinate": "2", "pgqueuer": "2", "river": "4", "plain": "2"}


# -- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sqs", "jobs"], "--sqs: 'jobs': an SQS queue URL is"),
        (["--rabbitmq", "amqp://guest:hunter2@h", "q"], "--rabbitmq: 'amqp://guest:***@h'"),
        (["--postgres", "mysql://u:hunter2@h/db", "SELECT 1"], "--postgres: 'mysql://u:***@h/db'"),
        (["--postgres", "postgresql://h/db", " "], "--postgres: PostgresQuery needs a query"),
        (["--demand-command", "echo 1", "--vhost", "v"], "--vhost goes with --rabbitmq"),
        (["--demand-command", "echo 1", "--sqs-include-delayed"], "goes with --sqs"),
    ],
)
def test_cli_refuses_a_bad_source_in_one_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAST_API_KEY", "key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert main(["--endpoint", "ep", *argv]) == 2
    captured = capsys.readouterr()
    error_lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, captured.err
    assert message in error_lines[0], error_lines[0]
    assert "hunter2" not in captured.err


def test_cli_builds_each_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from nullworker.client import _autoscale_args

    monkeypatch.setenv("VAST_API_KEY", "key")
    parser = _autoscale_args.build_parser("nullworker autoscale")
    base = ["--endpoint", "ep"]
    sqs = (
        _autoscale_args.parse_options(
            parser,
            [*base, "--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q", "--sqs-include-delayed"],
        )
        .endpoints[0]
        .source
    )
    assert isinstance(sqs, SqsQueue) and sqs.include_delayed and sqs.timeout_s == 5.0
    rabbit = (
        _autoscale_args.parse_options(
            parser,
            [*base, "--rabbitmq", "http://h:15672", "q", "--vhost", "v", "--demand-timeout", "2"],
        )
        .endpoints[0]
        .source
    )
    assert isinstance(rabbit, RabbitMQQueue) and rabbit.vhost == "v" and rabbit.timeout_s == 2.0
    pg = (
        _autoscale_args.parse_options(
            parser, [*base, "--postgres", "postgresql://h/db", "SELECT 1"]
        )
        .endpoints[0]
        .source
    )
    assert isinstance(pg, PostgresQuery) and pg.query == "SELECT 1"
