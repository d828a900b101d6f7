"""USE_SSL: the main port serves TLS with the instance certificate; bad files fail at start.

The client side: certificates shaped like the ones Vast issues (a root with a path length
but no key usage extension) pass the client's verification on any Python, while OpenSSL's
strict mode, on by default from Python 3.13, refuses them.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from nullworker.client import transport
from nullworker.client.transport import default_client
from nullworker.errors import ConfigError, ReservationRejected
from nullworker.vast.signing import generate_private_key
from nullworker.worker.config import WorkerConfig
from nullworker.worker.server import serve

from .conftest import StartWorker, envelope, vast_settings


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / "instance.crt"
    key_path = tmp_path / "instance.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def vast_shaped_root(
    name: str = "Vast-shaped test root",
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A CA shaped like Vast's ``jvastai_root.cer``: a critical basicConstraints with a
    path length, a subject key identifier, and no key usage extension (vastai's client
    notes the path length without keyCertSign; OpenSSL's strict mode rejects both)."""
    key = generate_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def vast_shaped_leaf(
    root: x509.Certificate,
    root_key: rsa.RSAPrivateKey,
    public_key: rsa.RSAPublicKey,
    *,
    ip: str = "127.0.0.1",
) -> x509.Certificate:
    """An instance certificate as the root signs it: for the instance's IP address."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyworker.vast.ai")]))
        .issuer_name(root.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )


def write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def instance_files(
    directory: Path, root: x509.Certificate, root_key: rsa.RSAPrivateKey, *, ip: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """``instance.crt`` and ``instance.key`` in ``directory``, signed by ``root``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    key_path = directory / "instance.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    leaf = vast_shaped_leaf(root, root_key, key.public_key(), ip=ip)
    return write_pem(directory / "instance.crt", leaf), key_path


def verify_error(exc: BaseException) -> str:
    """The certificate verification error behind an httpx error (httpcore chains it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message)
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"not a certificate verification error: {exc!r}")


@pytest.fixture
def strict_x509_by_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``ssl.create_default_context`` as on Python 3.13+, which sets VERIFY_X509_STRICT (and
    VERIFY_X509_PARTIAL_CHAIN): the tests below then mean the same on 3.11 and 3.12."""
    original = ssl.create_default_context

    def as_on_python_3_13(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        context = original(*args, **kwargs)
        context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
        return context

    monkeypatch.setattr(ssl, "create_default_context", as_on_python_3_13)
    yield


async def test_use_ssl_serves_https(start_worker: StartWorker, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    info = await start_worker(use_ssl=True, ssl_certfile=str(cert), ssl_keyfile=str(key))
    assert info.url.startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(verify=context) as http:
        response = await http.post(
            f"{info.url}/reserve", json=envelope("https://x", payload={"duration": 0})
        )
    assert response.status_code == 200
    assert response.json()["released"] == "duration_elapsed"


async def test_unusable_tls_files_fail_before_listening(tmp_path: Path) -> None:
    config = WorkerConfig(
        port=0,
        control_port=None,
        use_ssl=True,
        ssl_certfile=str(tmp_path / "missing.crt"),
        ssl_keyfile=str(tmp_path / "missing.key"),
    )
    with pytest.raises(ConfigError, match=r"missing\.crt"):
        await serve(config)


async def test_client_trusts_a_worker_certificate_named_by_ssl_cert_file(
    start_worker: StartWorker,
    vast_engine: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The recipe of docs/deploying.md for a Vast-signed worker certificate: SSL_CERT_FILE."""
    from nullworker.client import hold

    cert, key = make_cert(tmp_path)
    await start_worker(
        use_ssl=True, ssl_certfile=str(cert), ssl_keyfile=str(key), **vast_settings(vast_engine)
    )
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    assert vast_engine.workers[7].url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert vast_engine.url is not None
    reservation = await hold("ep", duration_s=0.1, api_key="k", engine_url=vast_engine.url)
    assert reservation.outcome == "duration_elapsed"


async def test_the_client_accepts_a_vast_shaped_chain_that_strict_x509_refuses(
    start_worker: StartWorker,
    vast_engine: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    strict_x509_by_default: None,
) -> None:
    """Vast's root under the client's bundle: accepted on any Python, hostname still checked."""
    from nullworker.client import hold

    root, root_key = vast_shaped_root()
    bundle = write_pem(tmp_path / "vast-bundle.pem", root)
    cert, key = instance_files(tmp_path / "vast", root, root_key)
    info = await start_worker(
        use_ssl=True, ssl_certfile=str(cert), ssl_keyfile=str(key), **vast_settings(vast_engine)
    )
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    assert vast_engine.workers[7].url == info.url and info.url.startswith("https://127.0.0.1:")

    # Plain ssl with strict X.509 checks refuses the chain (the default from Python 3.13).
    strict = ssl.create_default_context(cafile=str(bundle))
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    async with httpx.AsyncClient(verify=strict) as http:
        with pytest.raises(httpx.ConnectError) as refused:
            await http.get(f"{info.url}/health")
    assert "keyCertSign" in verify_error(refused.value)

    # Without that root the client does not trust the worker, and says why.
    assert vast_engine.url is not None
    with pytest.raises(ReservationRejected) as rejected:
        await hold("ep", duration_s=0.1, api_key="k", engine_url=vast_engine.url, max_rejections=0)
    assert (
        "TLS certificate not trusted: unable to get local issuer certificate "
        "(SSL_CERT_FILE names the CA bundle)" in str(rejected.value)
    )

    # The client, pointed at a bundle with that root, holds the worker.
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    reservation = await hold("ep", duration_s=0.1, api_key="k", engine_url=vast_engine.url)
    assert reservation.outcome == "duration_elapsed"

    # Everything else stays strict: a certificate for another host, or from another CA.
    other_root, other_key = vast_shaped_root("another root")
    wrong_host = instance_files(tmp_path / "wrong-host", root, root_key, ip="127.0.0.2")
    other_ca = instance_files(tmp_path / "other-ca", other_root, other_key)
    for (cert_path, key_path), refusal in (
        (wrong_host, "IP address mismatch"),
        (other_ca, "unable to get local issuer certificate"),
    ):
        other = await start_worker(
            use_ssl=True, ssl_certfile=str(cert_path), ssl_keyfile=str(key_path)
        )
        async with default_client() as http:
            with pytest.raises(httpx.ConnectError) as refused:
                await http.get(f"{other.url}/health")
        assert refusal in verify_error(refused.value)


@pytest.fixture
def fresh_trust(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The client's process-wide TLS state as in a new process, and again after the test."""
    monkeypatch.setattr(transport, "_root", transport._RootState())
    transport.ssl_context.cache_clear()
    yield
    transport.ssl_context.cache_clear()


async def serve_bytes(nursery: trio.Nursery, body: bytes) -> tuple[str, list[bytes]]:
    """A loopback HTTP server answering every GET with ``body``; the request heads it saw."""
    heads: list[bytes] = []

    async def answer(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        heads.append(head)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/jvastai_root.cer", heads


async def test_the_client_fetches_vast_root_once_and_holds_an_https_worker(
    start_worker: StartWorker,
    vast_engine: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    strict_x509_by_default: None,
    fresh_trust: None,
) -> None:
    """As vastai's client does: no bundle named, so Vast's root is fetched, added to the
    public roots and strict mode cleared; once per process, however many reservations."""
    from nullworker.client import hold

    root, root_key = vast_shaped_root()
    cert, key = instance_files(tmp_path / "vast", root, root_key)
    url, heads = await serve_bytes(nursery, root.public_bytes(serialization.Encoding.PEM))
    monkeypatch.setenv("NULLWORKER_VAST_ROOT_CERT_URL", url)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the public roots: httpx's certifi
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    await start_worker(
        use_ssl=True, ssl_certfile=str(cert), ssl_keyfile=str(key), **vast_settings(vast_engine)
    )
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    assert vast_engine.url is not None
    for _ in range(2):
        reservation = await hold("ep", duration_s=0.1, api_key="k", engine_url=vast_engine.url)
        assert reservation.outcome == "duration_elapsed"
    assert len(heads) == 1 and heads[0].startswith(b"GET /jvastai_root.cer HTTP/1.1")
    # Public roots are still there beside it.
    assert len(transport.ssl_context(None, None).get_ca_certs()) > 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>not a certificate</html>", "not a PEM or DER certificate"),
        (b"x" * (transport.VAST_ROOT_MAX_BYTES + 1), "over 65536 bytes"),
    ],
)
async def test_a_root_that_cannot_be_fetched_is_named_in_the_refusal(
    body: bytes,
    reason: str,
    start_worker: StartWorker,
    vast_engine: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    fresh_trust: None,
) -> None:
    from nullworker.client import hold

    root, root_key = vast_shaped_root()
    cert, key = instance_files(tmp_path / "vast", root, root_key)
    url, heads = await serve_bytes(nursery, body)
    monkeypatch.setenv("NULLWORKER_VAST_ROOT_CERT_URL", url)
    await start_worker(
        use_ssl=True, ssl_certfile=str(cert), ssl_keyfile=str(key), **vast_settings(vast_engine)
    )
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    assert vast_engine.url is not None
    with pytest.raises(ReservationRejected) as rejected:
        await hold("ep", duration_s=0.1, api_key="k", engine_url=vast_engine.url, max_rejections=1)
    message = str(rejected.value)
    assert f"Vast's root certificate could not be fetched from {url}" in message
    assert reason in message and "TLS certificate not trusted" in message
    assert len(heads) == 1  # the retry waits a minute, not one fetch per attempt
