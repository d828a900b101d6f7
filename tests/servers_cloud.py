"""A local SQS, a RabbitMQ node and a PostgreSQL server for the tests, on free loopback ports.

These servers are slow to start (a RabbitMQ node takes seconds), so each fixture is
session-scoped: one server per test process, shared by the tests that use it, which
keep apart by naming their own queues and tables. The fixtures are synchronous (a
pytest-trio test runs its own Trio run, which a session fixture cannot share):

* ``moto_sqs`` -> :class:`MotoServer`: ``moto_server`` (from ``moto[server]``) on
  ``127.0.0.1:P`` with IAM authentication enforced (``INITIAL_NO_AUTH_ACTION_COUNT``:
  the fixture's first three calls create a user, its access key and an ``sqs:*``
  policy; every later call needs that key). ``.client()`` is a boto3 SQS client with it;
  ``.env()`` the environment variables that point boto3's default chain at it.
* ``rabbitmq_node`` -> :class:`RabbitNode`: Debian's ``rabbitmq-server`` with the
  management plugin, under a unique ``RABBITMQ_NODENAME``, its AMQP, distribution and
  management listeners and its own ``epmd`` on free loopback ports, everything (Mnesia,
  logs, config, Erlang cookie) in a temporary directory. Statistics are emitted every
  :data:`RABBIT_STATS_INTERVAL_MS` and sampled every second (the defaults, 5 s each,
  would make every count a test waits for take seconds). User ``guest`` may log in
  from loopback. A node takes several seconds to start, and two or so to stop.
* ``postgres_server`` -> :class:`PostgresServer`: ``initdb`` + ``postgres`` from
  ``/usr/lib/postgresql/<version>/bin``, run as the ``postgres`` user when the tests run
  as root (``initdb`` refuses root), on ``127.0.0.1:P`` with its socket in the data
  directory's parent; password (SCRAM) authentication over TCP. ``.psql(sql)`` runs SQL
  with ``psql`` (no code under test); ``.stop()``/``.start()`` restart it on the same
  port.

As in :mod:`tests.servers`, a missing server binary skips the test off CI and fails it
in CI. Teardown stops each server (SIGTERM, then SIGKILL after a bound) and removes its
directory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .helpers import PortTaken, free_port, port_in_use, start_on_free_port_sync
from .servers import find_binary, in_ci

__all__ = [
    "MotoServer",
    "PostgresServer",
    "RabbitNode",
    "moto_sqs_fixture",
    "postgres_server_fixture",
    "rabbitmq_node_fixture",
]

#: Bound on a server's start (a RabbitMQ node takes several seconds on a busy machine).
START_TIMEOUT_S = 60.0
#: Bound on a graceful stop before SIGKILL.
STOP_TIMEOUT_S = 15.0
#: How often a starting server is probed.
PROBE_INTERVAL_S = 0.05
#: How often the RabbitMQ node's queues emit the statistics the management API reports.
RABBIT_STATS_INTERVAL_MS = 500
#: The PostgreSQL superuser's password (TCP logins need it).
PG_PASSWORD = "pg-test-secret"


def _missing(what: str, package: str) -> None:
    if in_ci():
        pytest.fail(
            f"{what} is not installed, and CI must run the tests that need it: "
            f"install the Debian package {package} (.ci/run does)",
            pytrace=False,
        )
    pytest.skip(f"{what} is not installed (apt-get install {package})")


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path) -> None:
    """Return once ``ready()``; raise :class:`PortTaken` if the server exited saying its
    port is in use (the caller tries a fresh port), RuntimeError on any other failure."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            message = f"{process.args!r} exited with status {process.returncode}:\n{_tail(log)}"
            if port_in_use(_tail(log)):
                raise PortTaken(message)
            raise RuntimeError(message)
        if time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"no answer within {START_TIMEOUT_S:g} s:\n{_tail(log)}")
        time.sleep(PROBE_INTERVAL_S)


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _http_ok(url: str, **kwargs: Any) -> bool:
    try:
        return httpx.get(url, timeout=1.0, **kwargs).status_code == 200
    except httpx.HTTPError:
        return False


# -- SQS: moto_server --------------------------------------------------------------------

#: The calls moto lets through unauthenticated: the fixture's create_user,
#: create_access_key and put_user_policy.
_MOTO_FREE_ACTIONS = 3


class MotoServer:
    """A running ``moto_server`` and the IAM access key that it accepts."""

    region = "us-east-1"

    def __init__(self, url: str, access_key: str, secret_key: str) -> None:
        self.url = url
        self.access_key = access_key
        self.secret_key = secret_key

    def env(self) -> dict[str, str]:
        """Environment for boto3's default chain: this server, this key, no files."""
        return {
            "AWS_ENDPOINT_URL_SQS": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 SQS client of its own (not the code under test's)."""
        import boto3

        return boto3.client(
            "sqs",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


@pytest.fixture(name="moto_sqs", scope="session")
def moto_sqs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A ``moto_server`` on a free loopback port, enforcing IAM credentials."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not os.access(binary, os.X_OK):
        _missing("moto_server", "moto[server] (pip; the dev extra has it)")
    import boto3

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_MOTO_FREE_ACTIONS)}

    def start(port: int) -> tuple[subprocess.Popen[bytes], str]:
        url = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [binary, "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            _wait_until(lambda: _http_ok(f"{url}/moto-api/"), process, log)
        except BaseException:
            _stop(process)
            raise
        return process, url

    process, url = start_on_free_port_sync(start)
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name=MotoServer.region,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="nullworker-test")
        key = iam.create_access_key(UserName="nullworker-test")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="nullworker-test", PolicyName="sqs", PolicyDocument=json.dumps(policy)
        )
        yield MotoServer(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        _stop(process)


# -- RabbitMQ ------------------------------------------------------------------------------

_RABBIT_BIN = "/usr/lib/rabbitmq/bin"


class RabbitNode:
    """A running RabbitMQ node: its management API and its AMQP port."""

    user = "guest"
    password = "guest"

    def __init__(self, management_port: int, amqp_port: int) -> None:
        self.management_port = management_port
        self.amqp_port = amqp_port
        self.base_url = f"http://127.0.0.1:{management_port}"
        self._http = httpx.Client(
            base_url=self.base_url, auth=(self.user, self.password), timeout=10.0
        )

    @property
    def url(self) -> str:
        """The management URL with the credentials in it."""
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.management_port}"

    def api(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self._http.request(method, f"/api{path}", json=body)

    def declare(self, queue: str, vhost: str = "%2F") -> None:
        answer = self.api("PUT", f"/queues/{vhost}/{queue}", {"durable": False})
        assert answer.status_code in (201, 204), answer.text

    def publish(self, queue: str, count: int, vhost: str = "%2F") -> None:
        for i in range(count):
            body = {
                "properties": {},
                "routing_key": queue,
                "payload": f"job {i}",
                "payload_encoding": "string",
            }
            answer = self.api("POST", f"/exchanges/{vhost}/amq.default/publish", body)
            assert answer.status_code == 200 and answer.json()["routed"], answer.text

    def messages(self, queue: str, vhost: str = "%2F") -> Any:
        """The queue's ``messages`` as the management API shows it (None: no stats yet)."""
        return self.api("GET", f"/queues/{vhost}/{queue}").json().get("messages")

    def wait_for_messages(self, queue: str, expected: int, vhost: str = "%2F") -> None:
        """Until the management API's statistics show ``expected`` messages."""
        deadline = time.monotonic() + 30.0
        while (seen := self.messages(queue, vhost)) != expected:
            assert time.monotonic() < deadline, f"{queue}: messages stayed {seen!r}"
            time.sleep(0.05)

    def close(self) -> None:
        self._http.close()


def _rabbit_config(base: Path, amqp: int, management: int) -> dict[str, str]:
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
        f"management.tcp.port = {management}\n"
        "management.tcp.ip = 127.0.0.1\n"
        f"collect_statistics_interval = {RABBIT_STATS_INTERVAL_MS}\n"
        "loopback_users = none\n"
    )
    # The management API's samples are kept at a 5 s granularity by default, which is
    # how stale its counts would be: 1 s here, so that a test waits a second, not five.
    (base / "advanced.config").write_text(
        "[{rabbitmq_management_agent, [{sample_retention_policies, [{global, [{605, 1}]}, "
        "{basic, [{605, 1}]}, {detailed, [{10, 1}]}]}]}].\n"
    )
    (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
    return {
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
    }


@pytest.fixture(name="rabbitmq_node", scope="session")
def rabbitmq_node_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node with the management plugin, on free loopback ports."""
    server = Path(_RABBIT_BIN) / "rabbitmq-server"
    if not os.access(server, os.X_OK):
        _missing("rabbitmq-server", "rabbitmq-server")
    epmd = find_binary("epmd", "erlang-base")
    base = tmp_path_factory.mktemp("rabbitmq")
    log = base / "node.log"

    def start(
        epmd_port: int,
    ) -> tuple[RabbitNode, subprocess.Popen[bytes], subprocess.Popen[bytes]]:
        amqp, dist, management = (free_port() for _ in range(3))
        epmd_process, process = _start_rabbit(
            server, epmd, base, log, epmd_port, amqp, dist, management
        )
        node = RabbitNode(management, amqp)
        try:
            _wait_until(
                lambda: _http_ok(f"{node.base_url}/api/overview", auth=("guest", "guest")),
                process,
                log,
            )
        except BaseException:
            node.close()
            _stop(process)
            _stop(epmd_process)
            raise
        return node, process, epmd_process

    node, process, epmd_process = start_on_free_port_sync(start)
    try:
        yield node
    finally:
        node.close()
        # The script forwards SIGTERM to the node (`rabbitmqctl stop`'s clean shutdown).
        _stop(process)
        _stop(epmd_process)


def _start_rabbit(
    server: Path,
    epmd: str,
    base: Path,
    log: Path,
    epmd_port: int,
    amqp: int,
    dist: int,
    management: int,
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Start the node's own epmd, then the node; both processes."""
    env = {
        **os.environ,
        **_rabbit_config(base, amqp, management),
        # The node's own epmd (started below, stopped at teardown) and Erlang cookie.
        "ERL_EPMD_PORT": str(epmd_port),
        "HOME": str(base),
        "RABBITMQ_NODENAME": f"nullworker-test-{os.getpid()}-{amqp}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp),
        "RABBITMQ_DIST_PORT": str(dist),
        # The broker's own stop (listeners, vhosts, message stores) takes milliseconds,
        # then the VM waits about 5 s for a process that never ends by itself; bound
        # that wait (init's -shutdown_time) so that a test session does not.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-shutdown_time 1000",
    }
    with log.open("ab") as out:
        epmd_process = subprocess.Popen(
            [epmd, "-port", str(epmd_port), "-address", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        process = subprocess.Popen(
            [str(server)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=base,
        )
    return epmd_process, process


# -- PostgreSQL ----------------------------------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        _missing("PostgreSQL (/usr/lib/postgresql/*/bin/initdb)", "postgresql")
    return Path(found[-1]).parent


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory, which can be stopped and restarted."""

    user = "postgres"

    def __init__(self, bindir: Path, base: Path, run_as: str | None) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.port = 0
        self._run_as = run_as
        self._process: subprocess.Popen[bytes] | None = None
        self.log = base / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{PG_PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self._run_as,
                cwd=self.base,
                **kwargs,
            )

    def init(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        self._chown(pwfile)
        initdb = self._popen(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
            ]
        )
        if initdb.wait(START_TIMEOUT_S) != 0:
            raise RuntimeError(f"initdb failed:\n{_tail(self.log)}")

    def start(self) -> None:
        """Start the server: on a free port the first time, on the same port after."""
        if self.port == 0:

            def start_on(port: int) -> None:
                self.port = port
                self._start()

            start_on_free_port_sync(start_on)
            return
        self._start()

    def _start(self) -> None:
        self._process = self._popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.base),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ]
        )
        _wait_until(self._ready, self._process, self.log)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): sessions are ended, the server exits."""
        process, self._process = self._process, None
        if process is not None:
            _stop(process, signal.SIGINT)

    def _ready(self) -> bool:
        probe = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        return probe.returncode == 0

    def psql(self, sql: str) -> str:
        """Run ``sql`` with psql over the socket; its unaligned output, stripped."""
        answer = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.base),
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
                "-c",
                sql,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            user=self._run_as,
            timeout=30,
        )
        assert answer.returncode == 0, answer.stderr
        return answer.stdout.strip()

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)


@pytest.fixture(name="postgres_server", scope="session")
def postgres_server_fixture() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster on a free loopback port (superuser ``postgres``)."""
    bindir = _postgres_bin()
    run_as = None
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root.
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _missing("the 'postgres' user", "postgresql")
        run_as = "postgres"
    # Not under pytest's root-only temporary directory: the postgres user must reach it.
    base = Path(tempfile.mkdtemp(prefix="nullworker-pg-"))
    server = PostgresServer(bindir, base, run_as)
    try:
        server._chown(base)
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(base)
