"""The Amazon SQS source: a queue's visible and in-flight messages."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions
import trio

from ...errors import DemandError, DemandNotFound
from .._redact import reason, redact
from ._base import DEFAULT_TIMEOUT_S, DemandSource

#: The attributes summed: waiting, and received but not yet deleted (in flight).
SQS_ATTRIBUTES = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
#: Added with ``include_delayed``: messages sent with a delay that has not run out.
SQS_DELAYED_ATTRIBUTE = "ApproximateNumberOfMessagesDelayed"
#: Attempts botocore makes for one read (the first and one retry).
SQS_MAX_ATTEMPTS = 2

# sqs.<region>.amazonaws.com[.cn], sqs-fips.<region>…, and the legacy <region>.queue.amazonaws.com.
_REGION_IN_HOST = re.compile(
    r"^(?:sqs(?:-fips)?\.(?P<a>[a-z0-9-]+)|(?P<b>[a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?$"
)
_COUNT_RE = re.compile(r"[0-9]+")
_XML_CODE = re.compile(r"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_NOT_FOUND_CODES = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
)
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "AccessDenied",
        "AccessDeniedException",
        "AuthFailure",
    }
)


def region_from_queue_url(url: str) -> str | None:
    """The AWS region in an SQS queue URL's host (``sqs.eu-west-1.amazonaws.com``), if any."""
    match = _REGION_IN_HOST.match((urlsplit(url).hostname or "").lower())
    if match is None:
        return None
    return match["a"] or match["b"]


class SqsQueue(DemandSource):
    """Messages of an Amazon SQS queue that are waiting or being worked on.

    Demand is ``ApproximateNumberOfMessages`` (visible, waiting) plus
    ``ApproximateNumberOfMessagesNotVisible`` (received by a consumer and not yet
    deleted: in flight), and ``ApproximateNumberOfMessagesDelayed`` too with
    ``include_delayed``, from one ``GetQueueAttributes`` call. SQS documents these as
    approximate (eventually consistent, about a minute behind at worst); a FIFO queue
    answers the same way.

    boto3 is a blocking library: each read runs in a worker thread
    (``trio.to_thread.run_sync``) behind a :class:`trio.CapacityLimiter` of one, so a
    source never has more than one thread, even when a read that timed out left its
    thread finishing its last attempt. The client is created once, by the constructor
    (which is when botocore looks for credentials; those of a role renew themselves),
    with connect and read timeouts of a quarter of ``timeout_s`` and at most
    :data:`SQS_MAX_ATTEMPTS` attempts, so a thread ends soon after its read's timeout.
    botocore's connection pool reconnects by itself.

    Credentials, region and endpoint come from boto3's standard chain: the
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE`` environment, the
    shared config and credentials files, an instance or task role; the endpoint from
    ``AWS_ENDPOINT_URL_SQS`` or ``AWS_ENDPOINT_URL`` (a local SQS: ElasticMQ, moto). With
    no region configured, the region in the queue URL's host is used.

    Args:
      queue_url: ``https://sqs.<region>.amazonaws.com/<account>/<name>``.
      include_delayed: also count delayed messages.
      timeout_s: bound on one read.

    A missing queue raises :class:`DemandNotFound`; refused or missing credentials a
    :class:`DemandError` saying so.
    """

    _wrapped_errors = (botocore.exceptions.BotoCoreError, OSError)
    _timeout_errors = (
        TimeoutError,
        botocore.exceptions.ConnectTimeoutError,
        botocore.exceptions.ReadTimeoutError,
    )

    def __init__(
        self,
        queue_url: str,
        *,
        include_delayed: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(timeout_s=timeout_s)
        parts = urlsplit(queue_url)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.username:
            raise ValueError(
                f"{redact(queue_url)!r}: an SQS queue URL is https://sqs.<region>.amazonaws.com/"
                "<account>/<name>, without credentials"
            )
        path = [part for part in parts.path.split("/") if part]
        if len(path) != 2:
            raise ValueError(f"{redact(queue_url)!r}: an SQS queue URL's path is /<account>/<name>")
        self.queue_url = queue_url
        self.queue_name = path[1]
        self.include_delayed = include_delayed
        self._attributes = (
            (*SQS_ATTRIBUTES, SQS_DELAYED_ATTRIBUTE) if include_delayed else SQS_ATTRIBUTES
        )
        # Reads the environment and the config files, no network: a missing region is
        # a misconfiguration, refused here rather than at every read.
        try:
            self._session = boto3.session.Session()
        except botocore.exceptions.BotoCoreError as exc:  # an AWS_PROFILE that is not there
            raise ValueError(f"{redact(queue_url)!r}: {reason(exc)}") from exc
        region = self._session.region_name or region_from_queue_url(queue_url)
        if region is None:
            raise ValueError(
                f"{redact(queue_url)!r}: no AWS region: set AWS_DEFAULT_REGION (or a "
                "profile's region), or use a queue URL with the region in its host"
            )
        self.region = region
        self._limiter = trio.CapacityLimiter(1)
        # Created once, here: botocore reads its endpoint (AWS_ENDPOINT_URL_SQS, …) now,
        # so a malformed one is refused at start. No network until the first read.
        try:
            self._client: Any = self._new_client()
        except (ValueError, botocore.exceptions.BotoCoreError) as exc:
            raise ValueError(f"{redact(queue_url)!r}: no SQS client: {reason(exc)}") from exc

    def describe(self) -> str:
        delayed = " (+ delayed)" if self.include_delayed else ""
        return f"sqs queue {redact(self.queue_url)}{delayed}"

    def _new_client(self) -> Any:
        per_call = max(self.timeout_s / 4, 0.1)
        config = botocore.config.Config(
            region_name=self.region,
            connect_timeout=per_call,
            read_timeout=per_call,
            retries={"total_max_attempts": SQS_MAX_ATTEMPTS, "mode": "standard"},
        )
        return self._session.client("sqs", config=config)

    def _get_attributes(self) -> dict[str, str]:
        """One ``GetQueueAttributes`` (in the worker thread)."""
        answer = self._client.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=list(self._attributes)
        )
        attributes: dict[str, str] = answer.get("Attributes") or {}
        return attributes

    async def _read(self) -> int:
        try:
            attributes = await trio.to_thread.run_sync(
                self._get_attributes, limiter=self._limiter, abandon_on_cancel=True
            )
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(exc) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise DemandError(
                f"{self.describe()}: no AWS credentials found (environment, profile, instance role)"
            ) from exc
        total = 0
        for name in self._attributes:
            value = attributes.get(name)
            if not isinstance(value, str) or not _COUNT_RE.fullmatch(value):
                raise DemandError(
                    f"{self.describe()}: {name} is {value!r}, not a count"
                    if value is not None
                    else f"{self.describe()}: the answer has no {name}"
                )
            total += int(value)
        return total

    def _client_error(self, exc: botocore.exceptions.ClientError) -> DemandError:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")).strip()
        # Some SQS-compatible servers answer an auth failure with an XML body that
        # botocore leaves whole in the message: take its code and message out.
        if message.startswith("<"):
            inner_code, inner_message = _XML_CODE.search(message), _XML_MESSAGE.search(message)
            code = inner_code[1] if inner_code else code
            message = inner_message[1] if inner_message else ""
        message = redact(message[:300])
        said = f"{code}: {message}" if message else code or reason(exc)
        if code in _NOT_FOUND_CODES or error.get("QueryErrorCode") in _NOT_FOUND_CODES:
            return DemandNotFound(f"{self.describe()}: the queue does not exist ({said})")
        if code in _CREDENTIAL_CODES or status in (401, 403):
            return DemandError(f"{self.describe()}: the credentials were refused ({said})")
        return DemandError(f"{self.describe()}: SQS answered {said}")
