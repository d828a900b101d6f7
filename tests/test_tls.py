"""USE_SSL: the main port serves TLS with the instance certificate; bad files fail at start."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from nullworker.errors import ConfigError
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
    """The README's recipe for a Vast-signed worker certificate: SSL_CERT_FILE."""
    from nullworker.client import hold

    cert, key = make_cert(tmp_path)
    await start_worker(
        use_ssl=True, ssl_certfile=str(cert), ssl_keyfile=str(key), **vast_settings(vast_engine)
    )
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    assert vast_engine.workers[7].url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert vast_engine.url is not None
    reservation = await hold("ep", duration=0.1, api_key="k", engine_url=vast_engine.url)
    assert reservation.outcome == "duration_elapsed"
