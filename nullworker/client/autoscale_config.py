"""``nullworker autoscale --config FILE.toml``: several endpoints in one process.

The file names each endpoint in a table of its own, with its sources, its policy, its
API key *by reference* and an optional lease::

    [endpoints.emails]
    api_key_env = "VAST_API_KEY_EMAILS"   # the key's environment variable, never the key
    max = 8
    scale_down_delay = 60
    combine = "sum"                       # or "max": how the sources' counts add up

    [[endpoints.emails.sources]]
    kind = "redis-list"
    url = "redis://queue:6379/0"
    key = "emails"

    [[endpoints.emails.sources]]
    kind = "redis-list"
    url = "redis://queue:6379/0"
    key = "emails:retry"

    [endpoints.emails.lease]
    url = "redis://queue:6379/0"
    name = "autoscale:emails"

    [[endpoints.emails.schedule]]         # 3 warm workers on weekdays, office hours
    days = "mon-fri"
    hours = "08:00-18:00"
    min = 3
    tz = "Europe/Paris"                   # optional, UTC by default

Settings of an endpoint (defaults as the command line's): ``api_key_env`` (required),
``engine_url`` (``$VAST_ENGINE_URL``, else the public engine), ``min`` (0), ``max``
(10), ``jobs_per_worker`` (1), ``poll`` (1), ``scale_down_delay`` (30), ``duration``
(the worker's cap), ``demand_timeout`` (each source's own), ``combine`` (``sum``),
``sources`` (one or more), ``lease`` (``url``, ``name``, ``ttl``, ``renew``); the
policy rules of :mod:`.policy`: ``activation`` (0), ``scale_to_zero_delay`` (the
scale-down delay), ``max_new_per_minute`` (no limit), ``age_boost_after`` (off),
``age_boost`` (1), and ``schedule`` (``days``, ``hours``, ``min``, ``tz``).

Sources, by ``kind`` (the command line's option names; ``?`` marks optional fields):
``redis-list`` (url, key, processing?, configure_notifications?), ``redis-stream`` (url,
stream, group, configure_notifications?), ``nats-consumer`` (url, stream, consumer),
``redis-queue`` (framework, url, queue, prefix?), ``http-json`` (url, path),
``prometheus`` (url, query), ``sqs`` (queue_url, include_delayed?), ``rabbitmq`` (url,
queue, vhost?), ``postgres`` (dsn, query, age_query?, listen?), ``command`` (command). Any
text field ``F`` may be given as ``F_env``, the name of an environment variable holding it
(a URL with a password in it, say). The HTTP sources take their credentials as
``token_env``, or ``user_env`` and ``password_env``.

Validation
----------
The whole file is checked before anything starts, and every problem is reported, one
line each: ``FILE: endpoints.NAME.FIELD: reason`` (:class:`ConfigFileError`). Secrets
are never written in the file: ``api_key``, ``token`` and ``password`` are refused. No
line, plan or ``repr`` shows a secret: URLs go through :func:`redact`, and the API key
is shown as the name of its variable only. Building the plan does no I/O.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._lease import DEFAULT_RENEW_S, DEFAULT_TTL_S
from ._membership import members_key
from ._redis_lease import RedisLease
from .demand import (
    COMBINE,
    COMMAND_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    CombinedDemand,
    CommandDemand,
    DemandSource,
    HttpJson,
    NatsConsumer,
    PrometheusQuery,
    RedisList,
    RedisQueue,
    RedisStream,
    redact,
)
from .extras import AUTOSCALE_EXTRA_MODULES, missing_extra_message
from .policy import ScheduleWindow, parse_days, parse_hours, parse_zone
from .reservation import DEFAULT_ENGINE_URL

__all__ = [
    "SOURCE_FIELDS",
    "ConfigFileError",
    "EndpointOptions",
    "LeaseOptions",
    "lease_from_flags",
    "load_config",
    "new_source",
    "plan_lines",
]

#: Each source kind's fields: (required, optional). The HTTP kinds also take the
#: credentials' variables (:data:`_HTTP_AUTH_FIELDS`).
SOURCE_FIELDS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "redis-list": (("url", "key"), ("processing", "configure_notifications")),
    "redis-stream": (("url", "stream", "group"), ("configure_notifications",)),
    "nats-consumer": (("url", "stream", "consumer"), ()),
    "redis-queue": (("framework", "url", "queue"), ("prefix",)),
    "http-json": (("url", "path"), ()),
    "prometheus": (("url", "query"), ()),
    "sqs": (("queue_url",), ("include_delayed",)),
    "rabbitmq": (("url", "queue"), ("vhost",)),
    "postgres": (("dsn", "query"), ("age_query", "listen")),
    "command": (("command",), ()),
}
_HTTP_KINDS = ("http-json", "prometheus")
#: The source fields that are true or false; the others are text.
_BOOL_FIELDS = ("include_delayed", "configure_notifications")
_HTTP_AUTH_FIELDS = ("token_env", "user_env", "password_env")
#: Settings that would put a secret in the file, and what to write instead.
_SECRETS = {
    "api_key": "api_key_env",
    "token": "token_env",
    "password": "password_env",
}
_POLICY = (
    "min",
    "max",
    "jobs_per_worker",
    "poll",
    "scale_down_delay",
    "duration",
    "activation",
    "scale_to_zero_delay",
    "max_new_per_minute",
    "age_boost_after",
    "age_boost",
)
_ENDPOINT_FIELDS = (
    "api_key_env",
    "engine_url",
    *_POLICY,
    "demand_timeout",
    "combine",
    "sources",
    "lease",
    "schedule",
)
_LEASE_FIELDS = ("url", "name", "ttl", "renew")
_SCHEDULE_FIELDS = ("days", "hours", "min", "tz")


@dataclass(frozen=True)
class LeaseOptions:
    """A Redis lease: only its holder holds the endpoint's reservations."""

    url: str
    key: str
    ttl_s: float
    renew_s: float


@dataclass(frozen=True)
class EndpointOptions:
    """One endpoint to autoscale: from the command line's flags, or a config file's table.

    ``api_key`` is never shown (``repr=False``); ``api_key_from`` says where it came
    from, for the plan (``$VAST_API_KEY_EMAILS``, ``--api-key``).
    """

    endpoint: str
    source: DemandSource
    min_workers: int
    max_workers: int
    jobs_per_worker: int
    poll_s: float
    scale_down_delay_s: float
    duration_s: float | None
    api_key: str = field(repr=False)
    engine_url: str
    lease: LeaseOptions | None = None
    api_key_from: str = "$VAST_API_KEY"
    activation: int = 0
    scale_to_zero_delay_s: float | None = None
    max_new_per_minute: int | None = None
    schedule: tuple[ScheduleWindow, ...] = ()
    age_boost_after_s: float | None = None
    age_boost: int = 1

    def policy_lines(self) -> list[str]:
        """The policy rules that differ from their defaults, for the plan and logs."""
        rules: list[str] = []
        if self.activation:
            rules.append(f"activation {self.activation}")
        if self.scale_to_zero_delay_s is not None:
            rules.append(f"scale-to-zero delay {self.scale_to_zero_delay_s:g} s")
        if self.max_new_per_minute is not None:
            rules.append(f"at most {self.max_new_per_minute} new per minute")
        if self.age_boost_after_s is not None:
            rules.append(
                f"+{self.age_boost} while the oldest job waits over {self.age_boost_after_s:g} s"
            )
        lines = [f"rules: {', '.join(rules)}"] if rules else []
        lines.extend(f"schedule: {window.describe()}" for window in self.schedule)
        return lines


class ConfigFileError(ConfigError):
    """The config file is unusable; ``lines`` holds one ``FILE: WHERE: reason`` per problem."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = tuple(lines)


def new_source(
    kind: str,
    fields: Mapping[str, Any],
    *,
    timeout_s: float | None,
    http_auth: Mapping[str, Any] | None = None,
) -> DemandSource:
    """The source of ``kind`` with its ``fields`` (checked, no I/O).

    ``timeout_s`` ``None`` gives each source its own default. The sources whose client
    comes with the ``autoscale`` extra (SQS, PostgreSQL) are imported here, so that a
    missing client is reported only to those who use it.

    Raises:
      ValueError: a bad URL, name or value (the message is password-free).
      ModuleNotFoundError: the source's client is not installed.
    """
    timeout = timeout_s or DEFAULT_TIMEOUT_S
    f = fields
    configure = bool(f.get("configure_notifications", False))
    if kind == "redis-list":
        return RedisList(
            f["url"],
            f["key"],
            f.get("processing"),
            timeout_s=timeout,
            configure_notifications=configure,
        )
    if kind == "redis-stream":
        return RedisStream(
            f["url"],
            f["stream"],
            f["group"],
            timeout_s=timeout,
            configure_notifications=configure,
        )
    if kind == "nats-consumer":
        return NatsConsumer(f["url"], f["stream"], f["consumer"], timeout_s=timeout)
    if kind == "redis-queue":
        return RedisQueue(
            f["url"], f["framework"], f["queue"], prefix=f.get("prefix"), timeout_s=timeout
        )
    if kind == "http-json":
        return HttpJson(f["url"], f["path"], timeout_s=timeout, **(http_auth or {}))
    if kind == "prometheus":
        return PrometheusQuery(f["url"], f["query"], timeout_s=timeout, **(http_auth or {}))
    if kind == "sqs":
        from .demand import SqsQueue

        delayed = bool(f.get("include_delayed", False))
        return SqsQueue(f["queue_url"], include_delayed=delayed, timeout_s=timeout)
    if kind == "rabbitmq":
        from .demand import RabbitMQQueue

        vhost = f.get("vhost")
        return RabbitMQQueue(
            f["url"], f["queue"], vhost="/" if vhost is None else vhost, timeout_s=timeout
        )
    if kind == "postgres":
        from .demand import PostgresQuery

        return PostgresQuery(
            f["dsn"],
            f["query"],
            age_query=f.get("age_query"),
            timeout_s=timeout,
            listen=f.get("listen"),
        )
    if kind == "command":
        return CommandDemand(f["command"], timeout_s=timeout_s or COMMAND_TIMEOUT_S)
    raise ValueError(f"unknown source kind {kind!r}")


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> list[EndpointOptions]:
    """The endpoints of the config file at ``path``, every setting checked (no I/O).

    Args:
      path: the TOML file.
      environ: where ``*_env`` settings are looked up (default ``os.environ``).

    Raises:
      ConfigFileError: every problem found, one line each.
    """
    name = os.fspath(path)
    try:
        with Path(name).open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigFileError([f"{name}: cannot read it: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError([f"{name}: not valid TOML: {exc}"]) from None
    checker = _Checker(name, os.environ if environ is None else environ)
    endpoints = checker.document(document)
    if checker.problems:
        raise ConfigFileError(checker.problems)
    return endpoints


def lease_from_flags(
    lease: Sequence[str] | None, *, ttl: float | None, renew: float | None
) -> LeaseOptions | None:
    """The command line's ``--lease URL KEY``, ``--lease-ttl`` and ``--lease-renew``.

    Raises:
      ValueError: one line naming the flag (no password in it).
    """
    if lease is None:
        for flag, value in (("--lease-ttl", ttl), ("--lease-renew", renew)):
            if value is not None:
                raise ValueError(f"{flag} goes with --lease")
        return None
    url, key = lease
    ttl = DEFAULT_TTL_S if ttl is None else ttl
    renew = DEFAULT_RENEW_S if renew is None else renew
    if not (math.isfinite(renew) and renew > 0):
        raise ValueError(f"--lease-renew must be a finite number of seconds > 0, got {renew}")
    if not (math.isfinite(ttl) and ttl > 2 * renew):
        raise ValueError(
            f"--lease-ttl must be more than twice --lease-renew ({2 * renew:g} s), got {ttl}"
        )
    try:
        RedisLease(url, key, ttl_s=ttl, renew_s=renew)  # checks the URL and the key; no I/O
    except ValueError as exc:
        raise ValueError(f"--lease: {exc}") from None
    return LeaseOptions(url=url, key=key, ttl_s=ttl, renew_s=renew)


def plan_lines(endpoints: Sequence[EndpointOptions]) -> list[str]:
    """What ``--check`` prints: one block per endpoint, no secret in it."""
    lines: list[str] = []
    for o in endpoints:
        duration = "the worker's cap" if o.duration_s is None else f"{o.duration_s:g} s"
        source = o.source
        parts = source.sources if isinstance(source, CombinedDemand) else (source,)
        how = f" ({source.how})" if isinstance(source, CombinedDemand) else ""
        lines.append(f"endpoint {o.endpoint!r}")
        lines.append(f"  sources{how}:")
        lines.extend(
            f"    {redact(part.describe())}, timeout {part.timeout_s:g} s" for part in parts
        )
        lines.append(
            f"  policy: min {o.min_workers}, max {o.max_workers}, "
            f"{o.jobs_per_worker} job(s) per worker"
        )
        lines.append(
            f"  timing: poll {o.poll_s:g} s, scale-down delay {o.scale_down_delay_s:g} s, "
            f"each hold {duration}"
        )
        lines.extend(f"  {line}" for line in o.policy_lines())
        lines.append(f"  engine {redact(o.engine_url)}, API key from {o.api_key_from}")
        if o.lease is None:
            lines.append("  lease: none")
        else:
            lines.append(
                f"  lease: {o.lease.key!r} at {redact(o.lease.url)}, ttl {o.lease.ttl_s:g} s, "
                f"renewed every {o.lease.renew_s:g} s"
            )
    # The leased endpoints on one Redis server are shared out among the processes
    # running this file (nullworker.client.sharing).
    by_url: dict[str, list[LeaseOptions]] = {}
    for o in endpoints:
        if o.lease is not None:
            by_url.setdefault(o.lease.url, []).append(o.lease)
    for url, leases in by_url.items():
        if len(leases) > 1:
            lines.append(
                f"sharing: {len(leases)} leased endpoints at {redact(url)}, shared out among "
                f"the processes running this file (members "
                f"{members_key(lease.key for lease in leases)!r})"
            )
    return lines


# -- implementation ----------------------------------------------------------------------


class _Checker:
    """Walks the document, collecting every problem instead of stopping at the first."""

    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.problems: list[str] = []

    def problem(self, where: str, reason: str) -> None:
        self.problems.append(f"{self.file}: {where}: {reason}")

    def unknown(self, where: str, table: Mapping[str, Any], known: Sequence[str]) -> None:
        for key in table:
            if key in known:
                continue
            if key in _SECRETS:
                self.problem(
                    f"{where}.{key}",
                    f"an inline secret is refused; set {_SECRETS[key]} to the name of an "
                    "environment variable holding it",
                )
                continue
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.problem(f"{where}.{key}", f"unknown setting{hint}")

    def document(self, document: Mapping[str, Any]) -> list[EndpointOptions]:
        for key in document:
            if key != "endpoints":
                self.problem(key, "unknown setting; the file holds [endpoints.NAME] tables")
        tables = document.get("endpoints")
        if not isinstance(tables, dict) or not tables:
            self.problem("endpoints", "no endpoint: add an [endpoints.NAME] table")
            return []
        endpoints: list[EndpointOptions] = []
        leases: dict[tuple[str, str], str] = {}
        for name, table in tables.items():
            where = f"endpoints.{name}"
            if not isinstance(table, dict):
                self.problem(where, "must be a table ([endpoints.NAME])")
                continue
            options = self.endpoint(name, where, table)
            if options is None:
                continue
            if options.lease is not None:
                lease_id = (options.lease.url, options.lease.key)
                if lease_id in leases:
                    self.problem(
                        f"{where}.lease.name", f"the same lease as endpoints.{leases[lease_id]}"
                    )
                leases.setdefault(lease_id, name)
            endpoints.append(options)
        return endpoints

    def endpoint(self, name: str, where: str, t: Mapping[str, Any]) -> EndpointOptions | None:
        before = len(self.problems)
        self.unknown(where, t, _ENDPOINT_FIELDS)
        if not name.strip():
            self.problem(where, "the endpoint name must not be empty")
        api_key_from, api_key = self.api_key(where, t)
        engine_url = self.engine_url(where, t)
        low = self.integer(where, t, "min", 0, 0)
        high = self.integer(where, t, "max", 10, 1)
        jobs = self.integer(where, t, "jobs_per_worker", 1, 1)
        if low is not None and high is not None and low > high:
            self.problem(f"{where}.min", f"must not be greater than max ({high}), got {low}")
        poll = self.seconds(where, t, "poll", 1.0)
        delay = self.seconds(where, t, "scale_down_delay", 30.0, zero=True)
        duration = self.seconds(where, t, "duration", None)
        timeout = self.seconds(where, t, "demand_timeout", None)
        source = self.sources(where, t, timeout)
        lease = self.lease(where, t.get("lease"))
        activation = self.integer(where, t, "activation", 0, 0)
        to_zero = self.seconds(where, t, "scale_to_zero_delay", None, zero=True)
        rate = self.integer(where, t, "max_new_per_minute", None, 1)
        boost_after = self.seconds(where, t, "age_boost_after", None, zero=True)
        boost = self.integer(where, t, "age_boost", 1, 1)
        if "age_boost" in t and "age_boost_after" not in t:
            self.problem(f"{where}.age_boost", "goes with age_boost_after")
        schedule = self.schedule(where, t.get("schedule"), high)
        if len(self.problems) > before:
            return None
        assert low is not None and high is not None and jobs is not None
        assert poll is not None and delay is not None and source is not None
        assert api_key is not None and engine_url is not None
        return EndpointOptions(
            endpoint=name,
            source=source,
            min_workers=low,
            max_workers=high,
            jobs_per_worker=jobs,
            poll_s=poll,
            scale_down_delay_s=delay,
            duration_s=duration,
            api_key=api_key,
            engine_url=engine_url,
            lease=lease,
            api_key_from=api_key_from,
            activation=activation or 0,
            scale_to_zero_delay_s=to_zero,
            max_new_per_minute=rate,
            schedule=schedule,
            age_boost_after_s=boost_after,
            age_boost=boost or 1,
        )

    # -- settings --------------------------------------------------------------------

    def api_key(self, where: str, t: Mapping[str, Any]) -> tuple[str, str | None]:
        variable = t.get("api_key_env")
        if variable is None:
            if "api_key" not in t:  # an inline key is reported as such already
                self.problem(
                    f"{where}.api_key_env",
                    "required: the name of the environment variable holding the API key",
                )
            return "", None
        value = self.variable(f"{where}.api_key_env", variable)
        return f"${variable}", value

    def variable(self, where: str, variable: object) -> str | None:
        """The value of the environment variable named at ``where``."""
        if not isinstance(variable, str) or not variable.strip():
            self.problem(where, f"must name an environment variable, got {variable!r}")
            return None
        value = self.environ.get(variable)
        if not value:
            self.problem(where, f"${variable} is not set")
            return None
        return value

    def engine_url(self, where: str, t: Mapping[str, Any]) -> str | None:
        url = t.get("engine_url")
        if url is None:
            return self.environ.get("VAST_ENGINE_URL") or DEFAULT_ENGINE_URL
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            shown = redact(url) if isinstance(url, str) else url
            self.problem(f"{where}.engine_url", f"must be an http(s) URL, got {shown!r}")
            return None
        return url

    def integer(
        self, where: str, t: Mapping[str, Any], key: str, default: int | None, least: int
    ) -> int | None:
        value = t.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            self.problem(f"{where}.{key}", f"must be an integer >= {least}, got {value!r}")
            return None
        return value

    def seconds(
        self,
        where: str,
        t: Mapping[str, Any],
        key: str,
        default: float | None,
        *,
        zero: bool = False,
    ) -> float | None:
        value = t.get(key, default)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not zero)
        ):
            bound = ">= 0" if zero else "> 0"
            self.problem(
                f"{where}.{key}", f"must be a finite number of seconds {bound}, got {value!r}"
            )
            return None
        return float(value)

    def sources(
        self, where: str, t: Mapping[str, Any], timeout_s: float | None
    ) -> DemandSource | None:
        how = t.get("combine", "sum")
        if how not in COMBINE:
            self.problem(f"{where}.combine", f"must be 'sum' or 'max', got {how!r}")
        tables = t.get("sources")
        if not isinstance(tables, list) or not tables:
            self.problem(
                f"{where}.sources", "at least one source is required ([[endpoints.NAME.sources]])"
            )
            return None
        built: list[DemandSource] = []
        for index, table in enumerate(tables):
            here = f"{where}.sources[{index}]"
            if not isinstance(table, dict):
                self.problem(here, "must be a table with a kind")
                continue
            source = self.source(here, table, timeout_s)
            if source is not None:
                built.append(source)
        if len(built) != len(tables) or how not in COMBINE:
            return None
        if len(built) == 1:
            return built[0]
        return CombinedDemand(built, how=how)

    def source(
        self, here: str, table: Mapping[str, Any], timeout_s: float | None
    ) -> DemandSource | None:
        kind = table.get("kind")
        if not isinstance(kind, str) or kind not in SOURCE_FIELDS:
            kinds = ", ".join(SOURCE_FIELDS)
            self.problem(f"{here}.kind", f"must be one of {kinds}; got {kind!r}")
            return None
        required, optional = SOURCE_FIELDS[kind]
        auth_fields = _HTTP_AUTH_FIELDS if kind in _HTTP_KINDS else ()
        known = ("kind", *required, *optional, *auth_fields)
        known_env = tuple(f"{name}_env" for name in (*required, *optional))
        before = len(self.problems)
        self.unknown(here, table, (*known, *known_env))
        fields: dict[str, Any] = {}
        for name in (*required, *optional):
            value = self.source_field(here, table, name, required=name in required)
            if value is not None:
                fields[name] = value
        auth = self.http_auth(here, table) if auth_fields else {}
        if len(self.problems) > before:
            return None
        try:
            return new_source(kind, fields, timeout_s=timeout_s, http_auth=auth)
        except ValueError as exc:  # the message is password-free
            # Name the field whose value the message quotes, when one does.
            text = str(exc)
            quoted = [
                k for k, v in fields.items() if isinstance(v, str) and repr(redact(v)) in text
            ]
            self.problem(f"{here}.{quoted[0]}" if quoted else here, text)
        except ModuleNotFoundError as exc:
            if exc.name not in AUTOSCALE_EXTRA_MODULES:
                raise
            self.problem(f"{here}.kind", missing_extra_message(exc.name))
        return None

    def source_field(
        self, here: str, table: Mapping[str, Any], name: str, *, required: bool
    ) -> object:
        expected: type = bool if name in _BOOL_FIELDS else str
        if name in table and f"{name}_env" in table:
            self.problem(f"{here}.{name}", f"set {name} or {name}_env, not both")
            return None
        if f"{name}_env" in table:
            return self.variable(f"{here}.{name}_env", table[f"{name}_env"])
        value = table.get(name)
        if value is None:
            if required:
                self.problem(f"{here}.{name}", "required")
            return None
        if not isinstance(value, expected):
            self.problem(f"{here}.{name}", f"must be a {expected.__name__}, got {value!r}")
            return None
        return value

    def http_auth(self, here: str, table: Mapping[str, Any]) -> dict[str, Any]:
        values = {
            name: self.variable(f"{here}.{name}", table[name])
            for name in _HTTP_AUTH_FIELDS
            if name in table
        }
        if "token_env" in values and ("user_env" in values or "password_env" in values):
            self.problem(f"{here}.token_env", "set token_env or user_env, not both")
        elif "password_env" in values and "user_env" not in values:
            self.problem(f"{here}.password_env", "goes with user_env")
        token, user = values.get("token_env"), values.get("user_env")
        if token is not None:
            return {"bearer_token": token}
        if user is not None:
            return {"basic_auth": (user, values.get("password_env") or "")}
        return {}

    def schedule(
        self, where: str, tables: object, max_workers: int | None
    ) -> tuple[ScheduleWindow, ...]:
        if tables is None:
            return ()
        if not isinstance(tables, list):
            self.problem(
                f"{where}.schedule", "must be an array of tables ([[endpoints.NAME.schedule]])"
            )
            return ()
        windows: list[ScheduleWindow] = []
        for index, table in enumerate(tables):
            here = f"{where}.schedule[{index}]"
            if not isinstance(table, dict):
                self.problem(here, "must be a table with days, hours and min")
                continue
            self.unknown(here, table, _SCHEDULE_FIELDS)
            window = self.window(here, table, max_workers)
            if window is not None:
                windows.append(window)
        return tuple(windows)

    def window(
        self, here: str, table: Mapping[str, Any], max_workers: int | None
    ) -> ScheduleWindow | None:
        before = len(self.problems)
        parsed: dict[str, Any] = {}
        for key, parse in (("days", parse_days), ("hours", parse_hours), ("tz", parse_zone)):
            value = table.get(key, "UTC" if key == "tz" else None)
            if value is None:
                self.problem(f"{here}.{key}", "required")
            elif not isinstance(value, str):
                self.problem(f"{here}.{key}", f"must be a string, got {value!r}")
            else:
                try:
                    parsed[key] = parse(value)
                except ValueError as exc:
                    self.problem(f"{here}.{key}", str(exc))
        if "min" not in table:
            self.problem(f"{here}.min", "required")
        minimum = self.integer(here, table, "min", 0, 0)
        if minimum is not None and max_workers is not None and minimum > max_workers:
            self.problem(
                f"{here}.min", f"must not be greater than max ({max_workers}), got {minimum}"
            )
        if len(self.problems) > before or minimum is None:
            return None
        start, end = parsed["hours"]
        return ScheduleWindow(
            days=parsed["days"], start_min=start, end_min=end, min_workers=minimum, tz=parsed["tz"]
        )

    def lease(self, where: str, table: object) -> LeaseOptions | None:
        if table is None:
            return None
        here = f"{where}.lease"
        if not isinstance(table, dict):
            self.problem(here, "must be a table with url and name")
            return None
        before = len(self.problems)
        self.unknown(here, table, (*_LEASE_FIELDS, "url_env"))
        url = self.source_field(here, table, "url", required=True)
        key = self.source_field(here, table, "name", required=True)
        ttl = self.seconds(here, table, "ttl", DEFAULT_TTL_S)
        renew = self.seconds(here, table, "renew", DEFAULT_RENEW_S)
        if ttl is not None and renew is not None and ttl <= 2 * renew:
            self.problem(
                f"{here}.ttl", f"must be more than twice renew ({2 * renew:g} s), got {ttl:g}"
            )
        if len(self.problems) > before:
            return None
        assert isinstance(url, str) and isinstance(key, str)
        assert ttl is not None and renew is not None
        try:
            RedisLease(url, key, ttl_s=ttl, renew_s=renew)  # checks the URL and key; no I/O
        except ValueError as exc:  # the message is password-free
            self.problem(here, str(exc))
            return None
        return LeaseOptions(url=url, key=key, ttl_s=ttl, renew_s=renew)
