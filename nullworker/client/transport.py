"""The client's connections: one httpx client per run, TCP keepalive, and whom TLS trusts.

Every reservation is one long-lived HTTP/1.1 connection to a worker, so the client
built here has no pool cap and turns on TCP keepalive (a worker that vanished without
FIN shows up as a lost connection in about a minute instead of hours).

Trust
-----
A worker started with ``USE_SSL=true`` (the default of ``start_server.sh`` on Vast)
serves a certificate signed by Vast's own root CA, which no public bundle holds. Like
the official ``vastai`` client, this module fetches that root from Vast the first time
a reservation goes to an ``https://`` worker (:data:`VAST_ROOT_CERT_URL`, over
verified HTTPS, at most :data:`VAST_ROOT_MAX_BYTES`), adds it to the public roots of
the shared TLS context, and clears ``VERIFY_X509_STRICT`` on that context: the root
gives a path length without the ``keyCertSign`` key usage, which OpenSSL's strict mode
(on by default from Python 3.13) rejects. The chain, signatures, validity dates and the
host name are still checked.

* ``SSL_CERT_FILE`` (else ``SSL_CERT_DIR``) replaces the public roots, as in httpx; Vast's
  root is added to that bundle's context the same way.
* ``NULLWORKER_VAST_ROOT_CERT_URL`` fetches the root from elsewhere (a mirror, a file
  server inside your network); set to an empty string, nothing is fetched, and only the
  bundle is trusted (put Vast's root in it yourself).
* A root that cannot be fetched is logged once, tried again at most once a minute, and
  the reservation fails with the reason (the worker's certificate is then not trusted).
* An ``http=`` client a caller passes brings its own TLS settings; nothing is added to it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import ssl

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = [
    "VAST_ROOT_CERT_ENV",
    "VAST_ROOT_CERT_URL",
    "VAST_ROOT_MAX_BYTES",
    "default_client",
    "ssl_context",
    "trust_vast_root",
    "vast_root_problem",
]

log = logging.getLogger("nullworker.client")

#: Where Vast publishes the root CA that signs workers' certificates (the official
#: client's ``SSL_CERT_URL``).
VAST_ROOT_CERT_URL = "https://console.vast.ai/static/jvastai_root.cer"
#: Overrides :data:`VAST_ROOT_CERT_URL`; an empty value turns the fetch off.
VAST_ROOT_CERT_ENV = "NULLWORKER_VAST_ROOT_CERT_URL"
#: A root certificate is about 2 KB; an answer larger than this is not one.
VAST_ROOT_MAX_BYTES = 64 * 1024
#: A failed fetch is tried again after this long, not on every reservation.
_ROOT_RETRY_S = 60.0
_ROOT_TIMEOUT = httpx.Timeout(10.0)

#: One ``/route/`` call (the default of the client built here).
_ROUTE_TIMEOUT = httpx.Timeout(10.0)
#: Client-side TCP keepalive on our own connections.
_KEEPIDLE_S = 30
_KEEPINTVL_S = 10
_KEEPCNT = 3


def default_client() -> httpx.AsyncClient:
    """The client :func:`~nullworker.client.reserve` uses when it is given none."""
    options: list[tuple[int, int, int]] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    # Linux names; other platforms keep the OS defaults.
    for name, value in (
        ("TCP_KEEPIDLE", _KEEPIDLE_S),
        ("TCP_KEEPINTVL", _KEEPINTVL_S),
        ("TCP_KEEPCNT", _KEEPCNT),
    ):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    # Every connection is one we mean to hold (one per reservation): no pool cap, or
    # the 101st concurrent hold would wait for a pool slot and time out.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=10)
    transport = httpx.AsyncHTTPTransport(
        socket_options=options, limits=limits, verify=ssl_context(*_ca_settings())
    )
    return httpx.AsyncClient(transport=transport, timeout=_ROUTE_TIMEOUT)


def _ca_settings() -> tuple[str | None, str | None]:
    return os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None


@functools.cache
def ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """One TLS context per CA setting, shared by every client this module makes.

    Loading the CA bundle costs about 25 ms and 0.8 MB per context; an autoscaler
    holding a thousand reservations, each with its own client, would pay that a
    thousand times. ``SSL_CERT_FILE`` (else ``SSL_CERT_DIR``) replaces the public roots,
    as in httpx, with ``VERIFY_X509_STRICT`` cleared (see the module docstring); without
    either, httpx's default (certifi). :func:`trust_vast_root` adds Vast's root to either.
    """
    if not (cert_file or cert_dir):
        return httpx.create_ssl_context(trust_env=False)
    if cert_file:
        context = ssl.create_default_context(cafile=cert_file)
    else:
        context = ssl.create_default_context(capath=cert_dir)
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


class _RootState:
    """What became of fetching Vast's root, process-wide."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        #: The contexts the root was added to (one per CA setting).
        self.trusted: list[ssl.SSLContext] = []
        self.problem: str | None = None
        self.retry_at = -math.inf


_root = _RootState()


def vast_root_problem() -> str | None:
    """Why Vast's root could not be fetched, if the last try failed (for error lines)."""
    return _root.problem


async def trust_vast_root() -> None:
    """Make the shared default TLS context trust Vast's root CA (see the module docstring).

    Does nothing when the fetch is turned off, once it succeeded for the context of the
    current CA setting, or within a minute of a failure. Never raises for a failed fetch:
    it is logged once, and the worker's certificate is then not trusted.
    """
    url = os.environ.get(VAST_ROOT_CERT_ENV, VAST_ROOT_CERT_URL).strip()
    context = ssl_context(*_ca_settings())
    if not url or any(done is context for done in _root.trusted):
        return
    async with _root.lock:
        if any(done is context for done in _root.trusted):
            return
        if trio.current_time() < _root.retry_at:
            return
        try:
            pem = await _fetch_root(url)
            context.load_verify_locations(cadata=pem)
        except (httpx.HTTPError, ValueError, ssl.SSLError) as exc:
            problem = f"Vast's root certificate could not be fetched from {url}: {exc}"
            if problem != _root.problem:
                log.warning("%s", problem)
            _root.problem = problem
            _root.retry_at = trio.current_time() + _ROOT_RETRY_S
            return
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        _root.trusted.append(context)
        _root.problem = None
        log.info("trusting Vast's root certificate from %s for https workers", url)


async def _fetch_root(url: str) -> str:
    """The PEM text at ``url``, checked to hold one CA certificate; bounded in size."""
    async with (
        httpx.AsyncClient(timeout=_ROOT_TIMEOUT, follow_redirects=False) as http,
        http.stream("GET", url) as response,
    ):
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > VAST_ROOT_MAX_BYTES:
                raise ValueError(f"the answer is over {VAST_ROOT_MAX_BYTES} bytes")
    try:
        cert = x509.load_pem_x509_certificate(bytes(data))
    except ValueError:
        try:
            cert = x509.load_der_x509_certificate(bytes(data))
        except ValueError:
            raise ValueError("the answer is not a PEM or DER certificate") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("the certificate there is not a CA certificate")
    return cert.public_bytes(Encoding.PEM).decode("ascii")
