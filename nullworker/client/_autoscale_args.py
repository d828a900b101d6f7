"""The command line of ``nullworker autoscale``: its flags, and their checks into options.

:func:`build_parser` declares every flag; :func:`parse_options` turns a command line
into :class:`Options` (one :class:`~.autoscale_config.EndpointOptions` per endpoint: the
flags' one, or a ``--config`` file's), or ends with argparse's usage error (exit status
2) naming the flag. Nothing here connects anywhere: a source is built, not opened. The
run and its output are :mod:`.autoscale_cli`'s.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any

from .. import logs
from ._lease import DEFAULT_RENEW_S, DEFAULT_TTL_S
from .autoscale_config import (
    ConfigFileError,
    EndpointOptions,
    LeaseOptions,
    lease_from_flags,
    load_config,
    new_source,
)
from .cli import EXIT_USAGE
from .demand import DemandSource, redact
from .extras import AUTOSCALE_EXTRA_MODULES, missing_extra_message
from .policy import ScheduleWindow, parse_schedule
from .reservation import DEFAULT_ENGINE_URL

__all__ = ["Options", "build_parser", "parse_options"]

#: The environment variables the HTTP sources (--http-json, --prometheus) take their
#: credentials from: a bearer token, or a user and password for basic authentication.
_HTTP_TOKEN_ENV = "NULLWORKER_HTTP_TOKEN"
_HTTP_USER_ENV = "NULLWORKER_HTTP_USER"
_HTTP_PASSWORD_ENV = "NULLWORKER_HTTP_PASSWORD"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Hold as many reservations of a Vast serverless endpoint as your job queue "
            "needs: ceil(demand / jobs-per-worker), between --min and --max; more at once, "
            "fewer after --scale-down-delay. Runs until SIGINT/SIGTERM, which release "
            "every reservation."
        ),
        epilog=(
            "exit status: 2 usage; 1 the metrics port cannot be bound; 130/143 interrupted "
            "by SIGINT/SIGTERM (every reservation released at once). A source or engine "
            "fault is printed and retried, never an exit."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="several endpoints from a TOML file (instead of --endpoint and the options of "
        "one endpoint); see 'One autoscaler for all your endpoints' in docs/scaling.md",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --config: check the file, print the plan and exit, connecting nowhere",
    )
    parser.add_argument("--endpoint", metavar="NAME", help="endpoint name")
    sources = parser.add_argument_group("demand source: exactly one of the source options")
    source = sources.add_mutually_exclusive_group()
    source.add_argument(
        "--redis-list",
        nargs=2,
        metavar=("URL", "KEY"),
        help="LLEN KEY (+ LLEN of --processing): a Redis list queue of your own",
    )
    source.add_argument(
        "--redis-stream",
        nargs=3,
        metavar=("URL", "STREAM", "GROUP"),
        help="a Redis stream consumer group's lag + pending entries (XINFO GROUPS)",
    )
    source.add_argument(
        "--nats-consumer",
        nargs=3,
        metavar=("URL", "STREAM", "CONSUMER"),
        help="a NATS JetStream durable consumer's num_pending + num_ack_pending",
    )
    # -- SQS, RabbitMQ, PostgreSQL ----------------------------------------------------------
    source.add_argument(
        "--sqs",
        metavar="QUEUE_URL",
        help="an SQS queue's visible + in-flight messages (+ delayed with "
        "--sqs-include-delayed); AWS credentials, region and endpoint as boto3 finds them",
    )
    source.add_argument(
        "--rabbitmq",
        nargs=2,
        metavar=("MANAGEMENT_URL", "QUEUE"),
        help="a RabbitMQ queue's ready + unacknowledged messages, from the management API "
        "(http://user:password@host:15672)",
    )
    source.add_argument(
        "--postgres",
        nargs=2,
        metavar=("DSN", "QUERY"),
        help="the number a PostgreSQL query returns (one row, one column, a whole number >= 0)",
    )
    # -- job frameworks on Redis, HTTP JSON, Prometheus ------------------------------------
    source.add_argument(
        "--redis-queue",
        nargs=3,
        metavar=("FRAMEWORK", "URL", "QUEUE"),
        help="a job framework's waiting + running + due jobs, from its own Redis keys: "
        "FRAMEWORK is celery, rq, dramatiq, arq, bullmq or sidekiq",
    )
    source.add_argument(
        "--http-json",
        nargs=2,
        metavar=("URL", "PATH"),
        help="the number at PATH (keys, indexes, key=value selectors, dot-separated) in "
        f"the JSON that GET URL answers; auth from ${_HTTP_TOKEN_ENV} (bearer) or "
        f"${_HTTP_USER_ENV} + ${_HTTP_PASSWORD_ENV} (basic)",
    )
    source.add_argument(
        "--prometheus",
        nargs=2,
        metavar=("URL", "QUERY"),
        help="the one value of a Prometheus instant query (no series, several, NaN: an "
        "error); auth as for --http-json",
    )
    source.add_argument(
        "--demand-command",
        metavar="CMD",
        help="a shell command that prints one integer (SQS, RabbitMQ, a database, ...)",
    )
    sources.add_argument(
        "--processing",
        metavar="KEY",
        help="with --redis-list: the list of jobs being worked on, counted too",
    )
    # -- SQS, RabbitMQ, PostgreSQL ----------------------------------------------------------
    sources.add_argument(
        "--sqs-include-delayed",
        action="store_true",
        help="with --sqs: count delayed messages (ApproximateNumberOfMessagesDelayed) too",
    )
    sources.add_argument(
        "--postgres-age-query",
        metavar="QUERY",
        help="with --postgres: a query returning the oldest waiting job's age in seconds "
        "(NULL: none or unknown), for --age-boost-after",
    )
    sources.add_argument(
        "--vhost",
        default=None,
        metavar="VHOST",
        help="with --rabbitmq: the queue's virtual host (default /)",
    )
    sources.add_argument(
        "--postgres-listen",
        default=None,
        metavar="CHANNEL",
        help="with --postgres: LISTEN on CHANNEL, and read at once on every NOTIFY to it "
        "(polling goes on as the fallback)",
    )
    sources.add_argument(
        "--redis-configure-notifications",
        action="store_true",
        help="with --redis-list or --redis-stream: if the server's keyspace notifications "
        "are off, turn them on (CONFIG SET notify-keyspace-events) so that new jobs wake "
        "the autoscaler; without it, they are only checked and a warning says how",
    )
    sources.add_argument(
        "--redis-queue-prefix",
        metavar="PREFIX",
        help="with --redis-queue: the framework's key prefix if not its default (celery's "
        "global_keyprefix, rq, dramatiq's namespace, BullMQ's prefix, a Sidekiq namespace)",
    )
    sources.add_argument(
        "--demand-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="bound on one read of the source (default 10 for a command, 5 for the others)",
    )
    parser.add_argument(
        "--min", type=int, default=0, metavar="N", help="reservations held even with no jobs (0)"
    )
    parser.add_argument(
        "--max",
        type=int,
        default=10,
        metavar="N",
        help="most reservations at once, counting those waiting for a worker (10)",
    )
    parser.add_argument(
        "--jobs-per-worker", type=int, default=1, metavar="N", help="jobs one worker takes (1)"
    )
    parser.add_argument(
        "--poll", type=float, default=1.0, metavar="SECONDS", help="seconds between reads (1)"
    )
    parser.add_argument(
        "--scale-down-delay",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long the demand must stay lower before reservations are released (30)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="each reservation's duration, renewed while wanted (default: the worker's cap)",
    )
    rules = parser.add_argument_group("policy rules (see docs/scaling-policy.md)")
    rules.add_argument(
        "--activation",
        type=int,
        default=0,
        metavar="N",
        help="from no reservation, start only when more than N jobs wait (KEDA's "
        "activationQueueLength) (0)",
    )
    rules.add_argument(
        "--scale-to-zero-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="release the last reservation only after no jobs for this long (default: "
        "--scale-down-delay)",
    )
    rules.add_argument(
        "--max-new-per-minute",
        type=int,
        default=None,
        metavar="N",
        help="start at most N reservations within any 60 s (default: no limit)",
    )
    rules.add_argument(
        "--min-schedule",
        action="append",
        default=None,
        metavar="'DAYS HH:MM-HH:MM [TZ]=N'",
        help="a minimum for a weekly window, e.g. 'mon-fri 08:00-18:00 UTC=3' (the zone "
        "defaults to UTC; a window may cross midnight); repeatable, the largest applies",
    )
    rules.add_argument(
        "--age-boost-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="while the oldest waiting job is older than this, hold --age-boost more "
        "(sources that can tell: --redis-stream, --rabbitmq, --postgres-age-query)",
    )
    rules.add_argument(
        "--age-boost",
        type=int,
        default=None,
        metavar="N",
        help="workers added by --age-boost-after (1)",
    )
    parser.add_argument(
        "--api-key", default=None, metavar="KEY", help="endpoint API key (default $VAST_API_KEY)"
    )
    parser.add_argument(
        "--engine-url",
        default=None,
        metavar="URL",
        help=f"engine base URL (default $VAST_ENGINE_URL, else {DEFAULT_ENGINE_URL})",
    )
    lease = parser.add_argument_group(
        "standby autoscalers: only the holder of a Redis lease holds reservations"
    )
    lease.add_argument(
        "--lease",
        nargs=2,
        metavar=("URL", "KEY"),
        help="hold reservations only while holding the lease KEY on this Redis server",
    )
    lease.add_argument(
        "--lease-ttl",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long the lease lives after each renewal ({DEFAULT_TTL_S:g})",
    )
    lease.add_argument(
        "--lease-renew",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"seconds between renewals, and between a standby's attempts ({DEFAULT_RENEW_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="log lines (warnings, errors) as text, or json: one object per line "
        "(default $NULLWORKER_LOG_FORMAT or text)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port)",
    )
    parser.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="the metrics server's address (default 127.0.0.1)",
    )
    return parser


@dataclass(frozen=True)
class Options:
    endpoints: tuple[EndpointOptions, ...]
    json: bool
    metrics_host: str
    metrics_port: int | None
    log_format: str | None = None
    check: bool = False


#: The options of one endpoint on the command line, which --config replaces.
_ENDPOINT_DESTS = (
    "endpoint",
    *("processing", "sqs_include_delayed", "vhost", "redis_queue_prefix", "demand_timeout"),
    *("postgres_listen", "redis_configure_notifications"),
    *("min", "max", "jobs_per_worker", "poll", "scale_down_delay", "duration"),
    *("activation", "scale_to_zero_delay", "max_new_per_minute", "min_schedule"),
    *("age_boost_after", "age_boost", "postgres_age_query"),
    *("api_key", "engine_url", "lease", "lease_ttl", "lease_renew"),
)


def parse_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> Options:
    """The options, or ``parser.error`` (SystemExit 2) with a one-line reason."""
    args = parser.parse_args(argv)
    if args.metrics_host is not None and args.metrics_port is None:
        parser.error("--metrics-host goes with --metrics-port")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    if args.config is not None:
        endpoints = _parse_config(parser, args)
    else:
        if args.check:
            parser.error("--check goes with --config")
        endpoints = (_parse_endpoint(parser, args),)
    return Options(
        endpoints=endpoints,
        json=args.json,
        log_format=args.log_format,
        metrics_host=args.metrics_host or "127.0.0.1",
        metrics_port=args.metrics_port,
        check=args.check,
    )


def _parse_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[EndpointOptions, ...]:
    given = [
        f"--{dest.replace('_', '-')}"
        for dest in (*_ENDPOINT_DESTS, *_SOURCE_DESTS)
        if getattr(args, dest) != parser.get_default(dest)
    ]
    if given:
        parser.error(f"--config excludes {', '.join(given)}: set them in the file")
    try:
        return tuple(load_config(args.config))
    except ConfigFileError as exc:
        parser.exit(EXIT_USAGE, "".join(f"{line}\n" for line in exc.lines))


def _parse_lease(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LeaseOptions | None:
    try:
        return lease_from_flags(args.lease, ttl=args.lease_ttl, renew=args.lease_renew)
    except ValueError as exc:  # naming the flag; the message is password-free
        parser.error(str(exc))


def _parse_endpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EndpointOptions:
    """The one endpoint of the command line's options."""
    if args.endpoint is None:
        parser.error("the following arguments are required: --endpoint")
    if all(getattr(args, dest) is None for dest in _SOURCE_DESTS):
        flags = " ".join(f"--{dest.replace('_', '-')}" for dest in _SOURCE_DESTS)
        parser.error(f"one of the arguments {flags} is required (or --config FILE)")
    if args.processing is not None and args.redis_list is None:
        parser.error("--processing goes with --redis-list")
    if args.sqs_include_delayed and args.sqs is None:
        parser.error("--sqs-include-delayed goes with --sqs")
    if args.vhost is not None and args.rabbitmq is None:
        parser.error("--vhost goes with --rabbitmq")
    if args.redis_queue_prefix is not None and args.redis_queue is None:
        parser.error("--redis-queue-prefix goes with --redis-queue")
    if args.postgres_listen is not None and args.postgres is None:
        parser.error("--postgres-listen goes with --postgres")
    if args.redis_configure_notifications and args.redis_list is None and args.redis_stream is None:
        parser.error("--redis-configure-notifications goes with --redis-list or --redis-stream")
    if args.postgres_age_query is not None and args.postgres is None:
        parser.error("--postgres-age-query goes with --postgres")
    for flag, value, least in (
        ("--min", args.min, 0),
        ("--max", args.max, 1),
        ("--jobs-per-worker", args.jobs_per_worker, 1),
    ):
        if value < least:
            parser.error(f"{flag} must be an integer >= {least}, got {value}")
    if args.min > args.max:
        parser.error(f"--min ({args.min}) must not be greater than --max ({args.max})")
    if not (math.isfinite(args.poll) and args.poll > 0):
        parser.error(f"--poll must be a finite number of seconds > 0, got {args.poll}")
    if not (math.isfinite(args.scale_down_delay) and args.scale_down_delay >= 0):
        parser.error(
            "--scale-down-delay must be a finite number of seconds >= 0, "
            f"got {args.scale_down_delay}"
        )
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        parser.error(f"--duration must be a finite number of seconds > 0, got {args.duration}")
    if args.demand_timeout is not None and not (
        math.isfinite(args.demand_timeout) and args.demand_timeout > 0
    ):
        parser.error(
            f"--demand-timeout must be a finite number of seconds > 0, got {args.demand_timeout}"
        )
    api_key = args.api_key or os.environ.get("VAST_API_KEY")
    if not api_key:
        parser.error("an API key is required: pass --api-key or set VAST_API_KEY")
    engine_url = args.engine_url or os.environ.get("VAST_ENGINE_URL") or DEFAULT_ENGINE_URL
    if not engine_url.startswith(("http://", "https://")):
        parser.error(f"--engine-url must be an http(s) URL, got {redact(engine_url)!r}")
    try:
        source = _build_source(args)
    except ValueError as exc:  # a bad URL or name; the message is password-free
        parser.error(str(exc))
    except ModuleNotFoundError as exc:  # a source whose client is not installed
        if exc.name not in AUTOSCALE_EXTRA_MODULES:
            raise
        parser.exit(EXIT_USAGE, f"{parser.prog}: {missing_extra_message(exc.name)}\n")
    return EndpointOptions(
        endpoint=args.endpoint,
        source=source,
        min_workers=args.min,
        max_workers=args.max,
        jobs_per_worker=args.jobs_per_worker,
        poll_s=args.poll,
        scale_down_delay_s=args.scale_down_delay,
        duration_s=args.duration,
        api_key=api_key,
        engine_url=engine_url,
        lease=_parse_lease(parser, args),
        api_key_from="--api-key" if args.api_key else "$VAST_API_KEY",
        **_parse_rules(parser, args),
    )


def _parse_rules(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The policy rules' options, as :class:`EndpointOptions` fields."""
    if args.activation < 0:
        parser.error(f"--activation must be an integer >= 0, got {args.activation}")
    for flag, count in (
        ("--max-new-per-minute", args.max_new_per_minute),
        ("--age-boost", args.age_boost),
    ):
        if count is not None and count < 1:
            parser.error(f"{flag} must be an integer >= 1, got {count}")
    for flag, seconds in (
        ("--scale-to-zero-delay", args.scale_to_zero_delay),
        ("--age-boost-after", args.age_boost_after),
    ):
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            parser.error(f"{flag} must be a finite number of seconds >= 0, got {seconds}")
    if args.age_boost is not None and args.age_boost_after is None:
        parser.error("--age-boost goes with --age-boost-after")
    windows: list[ScheduleWindow] = []
    for text in args.min_schedule or ():
        try:
            window = parse_schedule(text)
        except ValueError as exc:
            parser.error(f"--min-schedule: {exc}")
        if window.min_workers > args.max:
            parser.error(
                f"--min-schedule {text!r}: the minimum must not be greater than --max ({args.max})"
            )
        windows.append(window)
    return {
        "activation": args.activation,
        "scale_to_zero_delay_s": args.scale_to_zero_delay,
        "max_new_per_minute": args.max_new_per_minute,
        "schedule": tuple(windows),
        "age_boost_after_s": args.age_boost_after,
        "age_boost": 1 if args.age_boost is None else args.age_boost,
    }


#: The argparse destinations of the source options, in --help's order.
_SOURCE_DESTS = (
    "redis_list",
    "redis_stream",
    "nats_consumer",
    "redis_queue",
    "http_json",
    "prometheus",
    "sqs",
    "rabbitmq",
    "postgres",
    "demand_command",
)


def _build_source(args: argparse.Namespace) -> DemandSource:
    """The source the options name; ``ValueError`` starting with the option's name."""
    # The source options are mutually exclusive (argparse): the one given is its dest.
    flag = next(
        (
            f"--{dest.replace('_', '-')}"
            for dest in _SOURCE_DESTS
            if getattr(args, dest, None) is not None
        ),
        "demand source",
    )
    try:
        return _new_source(args)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


#: Each source option's kind (autoscale_config) and the names of its values.
_SOURCE_ARGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "redis_list": ("redis-list", ("url", "key")),
    "redis_stream": ("redis-stream", ("url", "stream", "group")),
    "nats_consumer": ("nats-consumer", ("url", "stream", "consumer")),
    "redis_queue": ("redis-queue", ("framework", "url", "queue")),
    "http_json": ("http-json", ("url", "path")),
    "prometheus": ("prometheus", ("url", "query")),
    "sqs": ("sqs", ("queue_url",)),
    "rabbitmq": ("rabbitmq", ("url", "queue")),
    "postgres": ("postgres", ("dsn", "query")),
    "demand_command": ("command", ("command",)),
}


def _new_source(args: argparse.Namespace) -> DemandSource:
    dest = next(dest for dest in _SOURCE_DESTS if getattr(args, dest) is not None)
    kind, names = _SOURCE_ARGS[dest]
    value = getattr(args, dest)
    fields: dict[str, Any] = dict(
        zip(names, [value] if isinstance(value, str) else value, strict=True)
    )
    fields.update(
        processing=args.processing,
        prefix=args.redis_queue_prefix,
        include_delayed=args.sqs_include_delayed,
        vhost=args.vhost,
        listen=args.postgres_listen,
        configure_notifications=args.redis_configure_notifications,
        age_query=args.postgres_age_query,
    )
    auth = _http_auth() if kind in ("http-json", "prometheus") else None
    # Each source's own default timeout unless --demand-timeout says otherwise.
    return new_source(kind, fields, timeout_s=args.demand_timeout, http_auth=auth)


def _http_auth() -> dict[str, Any]:
    """The HTTP sources' credentials, from the environment (never the command line)."""
    token = os.environ.get(_HTTP_TOKEN_ENV) or None
    user = os.environ.get(_HTTP_USER_ENV) or None
    password = os.environ.get(_HTTP_PASSWORD_ENV)
    if token is not None and (user is not None or password):
        raise ValueError(f"set ${_HTTP_TOKEN_ENV} or ${_HTTP_USER_ENV}, not both")
    if user is None and password:
        raise ValueError(f"${_HTTP_PASSWORD_ENV} goes with ${_HTTP_USER_ENV}")
    if token is not None:
        return {"bearer_token": token}
    if user is not None:
        return {"basic_auth": (user, password or "")}
    return {}
