"""Worker settings: one frozen object, read from the environment once, at start.

Every module receives the ``WorkerConfig`` explicitly; nothing reads ``os.environ``
after start-up. Units are in the field names (``_s`` for seconds).

Two modes:

* **Vast mode** -- ``REPORT_ADDR`` and ``CONTAINER_ID`` are set (the instance's start
  script exports them). The worker binds all interfaces, checks signatures unless
  ``UNSECURED=true`` and reports to the engine. It needs the address the engine
  routes clients to: ``PUBLIC_IPADDR`` and ``VAST_TCP_PORT_<port>`` (always set on a
  Vast instance), or ``NULLWORKER_PUBLIC_URL`` / ``NULLWORKER_PUBLIC_HOST`` for a
  local engine. Without one it refuses to start: a guessed loopback URL would look
  ready and idle to the engine while no client could ever reach it.
* **Standalone** -- neither is set. The worker binds ``127.0.0.1``, checks no
  signatures and reports to nobody: the embedded default for trying it out.
  Setting only one of the two is a configuration error, not a silent fallback.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

from ..errors import ConfigError

__all__ = ["DEFAULT_CONTROL_PORT", "DEFAULT_PORT", "WorkerConfig"]

DEFAULT_PORT = 3000
#: The official null worker's control port (``NULL_CONTROL_PORT``), kept for familiarity.
DEFAULT_CONTROL_PORT = 18999
DEFAULT_MAX_RESERVATION_S = 3600.0
DEFAULT_MAX_QUEUE_TIME_S = 30.0
DEFAULT_CERT_FILE = "/etc/instance.crt"
DEFAULT_KEY_FILE = "/etc/instance.key"
#: The workload of one reservation and the throughput the worker reports. The
#: official null worker pins both to 100 (``.has_benchmark`` holds "100"), so one
#: busy worker shows ``cur_load == max_perf`` and endpoint maths stays
#: ``min_load = 100 * N`` for N workers.
RESERVATION_WORKLOAD = 100.0
MAX_PERF = 100.0

DeleteRequestsFormat = Literal["1.9.1", "legacy"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be between 0 and 65535, got {value}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a finite number >= {minimum:g}, got {raw!r}")
    return value


def _count(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _url_host(host: str) -> str:
    """``host`` as it goes into a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _public_url(env: Mapping[str, str], *, port: int, use_ssl: bool) -> str | None:
    """The advertised URL from the environment, or None when it names none.

    ``NULLWORKER_PUBLIC_URL`` wins outright; then Vast's ``PUBLIC_IPADDR`` with
    ``VAST_TCP_PORT_<port>``; then ``NULLWORKER_PUBLIC_HOST`` with the worker's port.
    """
    scheme = "https" if use_ssl else "http"
    explicit = env.get("NULLWORKER_PUBLIC_URL", "").strip()
    if explicit:
        if not _is_http_url(explicit):
            raise ConfigError(f"NULLWORKER_PUBLIC_URL must be an http(s) URL, got {explicit!r}")
        return explicit.rstrip("/")
    public_ip = env.get("PUBLIC_IPADDR", "").strip()
    public_port = env.get(f"VAST_TCP_PORT_{port}", "").strip()
    if public_ip and public_port:
        return f"{scheme}://{_url_host(public_ip)}:{public_port}"
    host = env.get("NULLWORKER_PUBLIC_HOST", "").strip()
    if host:
        return f"{scheme}://{_url_host(host)}:{port}"
    return None


#: The consumer health check's timings: field, variable, default.
_HEALTH_SECONDS = (
    ("backend_health_interval_s", "NULLWORKER_BACKEND_HEALTH_INTERVAL_SECONDS", 5.0),
    ("backend_health_probe_timeout_s", "NULLWORKER_BACKEND_HEALTH_PROBE_TIMEOUT_SECONDS", 5.0),
    ("backend_health_timeout_s", "NULLWORKER_BACKEND_HEALTH_TIMEOUT_SECONDS", 30.0),
    ("backend_health_startup_s", "NULLWORKER_BACKEND_HEALTH_STARTUP_SECONDS", 300.0),
)


def _check_engine_url(addr: str) -> None:
    if not _is_http_url(addr):
        raise ConfigError(f"REPORT_ADDR entries must be http(s) URLs, got {addr!r}")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything the worker needs to know, validated.

    Build it with :meth:`from_env` (what ``nullworker serve`` does) or directly with
    keyword arguments (what tests and embedding programs do); the defaults are the
    standalone mode.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    control_host: str = "127.0.0.1"
    #: ``None`` turns the control listener off.
    control_port: int | None = DEFAULT_CONTROL_PORT
    max_reservation_s: float = DEFAULT_MAX_RESERVATION_S
    max_queue_time_s: float = DEFAULT_MAX_QUEUE_TIME_S
    #: Engine base URLs, tried in order (fallback, not fan-out). Empty: no reporting.
    report_addrs: tuple[str, ...] = ()
    container_id: int | None = None
    #: A secret: kept out of ``repr()`` (and so out of every log line that shows the config).
    master_token: str = dataclasses.field(default="", repr=False)
    #: The URL the engine routes clients to (``auth_data.url``); None when standalone.
    public_url: str | None = None
    unsecured: bool = True
    use_ssl: bool = False
    ssl_certfile: str = DEFAULT_CERT_FILE
    ssl_keyfile: str = DEFAULT_KEY_FILE
    max_body_bytes: int = 64 * 1024
    #: A report goes out at least this often even when nothing changes.
    heartbeat_s: float = 10.0
    #: Bursts of state changes within this window are sent as one report.
    report_coalesce_s: float = 0.02
    #: Rounds are paced by a token bucket: up to ``report_burst`` rounds back to back,
    #: then one per ``report_interval_s`` while the state keeps changing (what changes in
    #: between goes out in the next round). A change after a quiet spell goes at once.
    #: The defaults stay close to the official worker's cadence (about one report a
    #: second): whether the engine throttles a faster worker is unknown. Two tokens let
    #: a short reservation's busy and idle both go at once after a quiet spell; a
    #: larger burst or a shorter interval makes reports under churn fresher, at the cost
    #: of more requests to the engine (NULLWORKER_REPORT_BURST,
    #: NULLWORKER_REPORT_INTERVAL_SECONDS).
    report_burst: int = 2
    report_interval_s: float = 1.0
    #: Per-try timeout of every call to the engine.
    engine_timeout_s: float = 5.0
    #: Tries per engine address before falling back to the next one.
    engine_tries: int = 3
    #: Sleep after a failed try; doubles per try, so addresses get their own deadline.
    engine_retry_s: float = 0.5
    #: Shape of ``/delete_requests/``: the 1.9.1 single POST, or the older pair of POSTs.
    delete_requests_format: DeleteRequestsFormat = "1.9.1"
    #: Kernel keepalive on accepted sockets, so a client that vanished without FIN
    #: (power loss, NAT drop) frees the slot in ~idle + interval * count seconds.
    tcp_keepidle_s: int = 15
    tcp_keepintvl_s: int = 5
    tcp_keepcnt: int = 3
    #: The marker ``POST /pyworker/update`` creates for the instance's start script.
    force_update_path: str = "/.force_update"
    #: Where the per-port single-process locks live (default: the temp dir).
    lock_dir: str = dataclasses.field(default_factory=tempfile.gettempdir)
    #: A failed signature check refetches the engine's key (the engine may have rotated
    #: it; the official worker never refetches), at most once per this many seconds.
    key_refresh_min_s: float = 3.0
    #: How long held reservations get on shutdown before the server is cancelled.
    graceful_timeout_s: float = 5.0
    #: A request's body must be complete this long after its headers, or the
    #: connection is closed (a stalled body would otherwise hold a socket for good).
    body_timeout_s: float = 10.0
    #: A send of response bytes that the client does not read is abandoned after this.
    send_timeout_s: float = 10.0
    #: Idle keep-alive connections, and headers from connection start, are cut after this.
    keep_alive_timeout_s: float = 5.0
    #: A keep-alive connection is closed after this many requests (Hypercorn's default).
    keep_alive_max_requests: int = 1000
    #: The consumer's health check (:mod:`~nullworker.worker.consumer_health`): a URL
    #: (``BACKEND_HEALTH_URL``, any 2xx is healthy) or a shell command
    #: (``NULLWORKER_BACKEND_HEALTH_COMMAND``, exit 0 is healthy), at most one. With one,
    #: the worker is ready only once it answers healthy, and refuses reservations (503,
    #: ``error_msg`` to the engine) while it has not answered for ``backend_health_timeout_s``.
    backend_health_url: str | None = None
    backend_health_command: str | None = None
    #: Probes start this often; each is bounded by ``backend_health_probe_timeout_s``.
    backend_health_interval_s: float = 5.0
    backend_health_probe_timeout_s: float = 5.0
    #: No healthy answer for this long after the last one: the worker is errored.
    backend_health_timeout_s: float = 30.0
    #: No healthy answer at all this long after start: the worker is errored (still not
    #: ready; it becomes ready if the consumer answers later). The official worker's 300 s.
    backend_health_startup_s: float = 300.0
    log_level: str = "INFO"
    #: ``text`` (the default) or ``json``: one JSON object per line (:mod:`nullworker.logs`).
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_reservation_s) or self.max_reservation_s <= 0:
            raise ConfigError(
                f"MAX_RESERVATION_SECONDS must be a finite number > 0, got {self.max_reservation_s}"
            )
        if not math.isfinite(self.max_queue_time_s) or self.max_queue_time_s < 0:
            raise ConfigError(
                f"MAX_QUEUE_TIME must be a finite number >= 0, got {self.max_queue_time_s}"
            )
        for name, port in (("WORKER_PORT", self.port), ("the control port", self.control_port)):
            if port is not None and not (isinstance(port, int) and 0 <= port <= 65535):
                raise ConfigError(f"{name} must be a port between 0 and 65535, got {port!r}")
        for addr in self.report_addrs:
            _check_engine_url(addr)
        if self.report_addrs and self.container_id is None:
            raise ConfigError("CONTAINER_ID is required when REPORT_ADDR is set")
        if self.container_id is not None and not self.report_addrs:
            raise ConfigError("REPORT_ADDR is required when CONTAINER_ID is set")
        if not self.unsecured and not self.report_addrs:
            raise ConfigError(
                "signature checks need the engine's key: set REPORT_ADDR or UNSECURED=true"
            )
        if self.control_port is not None and self.control_port == self.port != 0:
            raise ConfigError("the control port must differ from WORKER_PORT")
        if self.delete_requests_format not in ("1.9.1", "legacy"):
            raise ConfigError(
                "NULLWORKER_DELETE_REQUESTS_FORMAT must be 1.9.1 or legacy, "
                f"got {self.delete_requests_format!r}"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(
                f"NULLWORKER_LOG_FORMAT must be text or json, got {self.log_format!r}"
            )
        if self.engine_tries < 1:
            raise ConfigError("engine_tries must be at least 1")
        if self.report_burst < 1:
            raise ConfigError("report_burst must be at least 1")
        if not math.isfinite(self.report_interval_s) or self.report_interval_s < 0:
            raise ConfigError(
                f"report_interval_s must be a finite number >= 0, got {self.report_interval_s!r}"
            )
        if self.backend_health_url is not None and self.backend_health_command is not None:
            raise ConfigError(
                "BACKEND_HEALTH_URL and NULLWORKER_BACKEND_HEALTH_COMMAND are both set: "
                "use one of them"
            )
        if self.backend_health_url is not None and not _is_http_url(self.backend_health_url):
            raise ConfigError(
                f"BACKEND_HEALTH_URL must be an http(s) URL, got {self.backend_health_url!r}"
            )
        if self.backend_health_command is not None and not self.backend_health_command.strip():
            raise ConfigError("NULLWORKER_BACKEND_HEALTH_COMMAND must be a command, not empty")
        for name in (
            "body_timeout_s",
            "send_timeout_s",
            "keep_alive_timeout_s",
            "backend_health_interval_s",
            "backend_health_probe_timeout_s",
            "backend_health_timeout_s",
            "backend_health_startup_s",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")

    @property
    def reporting(self) -> bool:
        """True when there is an engine to report to (Vast mode)."""
        return bool(self.report_addrs)

    @property
    def backend_health_target(self) -> str | None:
        """What the consumer health check probes, as logs and ``error_msg`` name it (None:
        no check). Only what cannot hold a secret: the URL without its user info and
        query, the command's program name only."""
        if self.backend_health_url is not None:
            parts = urlsplit(self.backend_health_url)
            netloc = parts.netloc.rpartition("@")[2]
            return f"GET {parts.scheme}://{netloc}{parts.path}"
        if self.backend_health_command is not None:
            program = self.backend_health_command.split()[0].rpartition("/")[2]
            return f"health command {program}"
        return None

    @property
    def standalone(self) -> bool:
        return not self.report_addrs

    def replace(self, **changes: object) -> WorkerConfig:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> WorkerConfig:
        """Read the Vast environment contract (and nullworker's own variables).

        ``overrides`` (from command-line flags) win over the environment.
        Raises :class:`ConfigError` naming the offending variable.
        """
        report_raw = env.get("REPORT_ADDR", "").strip()
        report_addrs = tuple(a.strip().rstrip("/") for a in report_raw.split(",") if a.strip())
        container_raw = env.get("CONTAINER_ID", "").strip()
        container_id: int | None = None
        if container_raw:
            try:
                container_id = int(container_raw)
            except ValueError:
                raise ConfigError(
                    f"CONTAINER_ID must be an integer, got {container_raw!r}"
                ) from None
        vast = bool(report_addrs) or container_id is not None

        port = _port(env, "WORKER_PORT", DEFAULT_PORT)
        if isinstance(overrides.get("port"), int):  # --port decides the advertised URL too
            port = cast(int, overrides["port"])
        # Exactly "true", as the official worker reads it.
        use_ssl = env.get("USE_SSL", "false") == "true"
        public_url = _public_url(env, port=port, use_ssl=use_ssl) if vast else None
        if vast and public_url is None:
            missing = [
                name
                for name in ("PUBLIC_IPADDR", f"VAST_TCP_PORT_{port}")
                if not env.get(name, "").strip()
            ]
            raise ConfigError(
                f"{' and '.join(missing)} not set: Vast mode (REPORT_ADDR/CONTAINER_ID) needs "
                "the address the engine routes clients to (for a local engine set "
                "NULLWORKER_PUBLIC_URL)"
            )

        control_raw = env.get("NULLWORKER_CONTROL_PORT", env.get("NULL_CONTROL_PORT"))
        control_port: int | None
        if control_raw is not None and control_raw.strip().lower() in ("off", "none", "-"):
            control_port = None
        else:
            control_port = _port(
                {"NULLWORKER_CONTROL_PORT": control_raw} if control_raw is not None else {},
                "NULLWORKER_CONTROL_PORT",
                DEFAULT_CONTROL_PORT,
            )

        values: dict[str, object] = {
            "host": env.get("NULLWORKER_HOST", "0.0.0.0" if vast else "127.0.0.1").strip(),
            "port": port,
            "control_port": control_port,
            "max_reservation_s": _seconds(
                env, "MAX_RESERVATION_SECONDS", DEFAULT_MAX_RESERVATION_S, minimum=0.001
            ),
            "max_queue_time_s": _seconds(
                env, "MAX_QUEUE_TIME", DEFAULT_MAX_QUEUE_TIME_S, minimum=0.0
            ),
            "report_addrs": report_addrs,
            "container_id": container_id,
            "master_token": env.get("MASTER_TOKEN", ""),
            "public_url": public_url,
            "unsecured": _flag(env, "UNSECURED", default=not vast),
            "use_ssl": use_ssl,
            "ssl_certfile": env.get("NULLWORKER_SSL_CERTFILE", DEFAULT_CERT_FILE),
            "ssl_keyfile": env.get("NULLWORKER_SSL_KEYFILE", DEFAULT_KEY_FILE),
            "delete_requests_format": env.get("NULLWORKER_DELETE_REQUESTS_FORMAT", "1.9.1"),
            "log_level": env.get("NULLWORKER_LOG_LEVEL", "INFO").upper(),
            "log_format": env.get("NULLWORKER_LOG_FORMAT", "text").strip().lower() or "text",
            "force_update_path": env.get("NULLWORKER_FORCE_UPDATE_PATH", "/.force_update"),
            "lock_dir": env.get("NULLWORKER_LOCK_DIR") or tempfile.gettempdir(),
            "report_burst": _count(env, "NULLWORKER_REPORT_BURST", 2, minimum=1),
            "report_interval_s": _seconds(
                env, "NULLWORKER_REPORT_INTERVAL_SECONDS", 1.0, minimum=0.0
            ),
            "backend_health_url": env.get("BACKEND_HEALTH_URL", "").strip() or None,
            "backend_health_command": env.get("NULLWORKER_BACKEND_HEALTH_COMMAND", "").strip()
            or None,
            **{
                field: _seconds(env, name, default, minimum=0.001)
                for field, name, default in _HEALTH_SECONDS
            },
        }
        values.update(overrides)
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as exc:  # an unknown override name
            raise ConfigError(str(exc)) from None
