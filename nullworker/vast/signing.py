"""The Vast route signature: what the engine signs and what a worker checks.

The engine signs only the worker URL it routed the client to. The message is the
text of ``{"url": url}`` exactly as Python's ``json.dumps(..., indent=4,
sort_keys=True)`` prints it, hashed with SHA-256 and signed with RSASSA-PKCS1-v1_5.
The signature travels as standard base64 in ``auth_data["signature"]``.

Both halves live here so that the local engine emulator and the worker can never
disagree about the bytes: a test that signs with one and verifies with the other
checks the real scheme, not two copies of it.
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "generate_private_key",
    "load_public_key",
    "public_key_pem",
    "sign_url",
    "signed_message",
    "verify_url",
]


def signed_message(url: str) -> bytes:
    """The exact bytes the engine signs for ``url``."""
    return json.dumps({"url": url}, indent=4, sort_keys=True).encode("utf-8")


def generate_private_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_key_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def load_public_key(pem: str | bytes) -> rsa.RSAPublicKey:
    """Parse the PEM text served by ``/pubkey/``; raise ``ValueError`` if it is not RSA."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data.strip())
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the engine's public key is not an RSA key")
    return key


def sign_url(key: rsa.RSAPrivateKey, url: str) -> str:
    """Sign ``url`` as the engine does and return the base64 signature."""
    raw = key.sign(signed_message(url), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(raw).decode("ascii")


#: Bound on remembered good signatures (the engine signs one URL per worker and key).
_VERIFIED_MAX = 64
#: (id(key), url, signature) -> key, for triples that verified: the same signature of
#: the same URL under the same key verifies again, so a repeat is answered from here.
#: Only successes enter, so no input can fill it with garbage; the key is kept as the
#: value and compared by identity, so a reused ``id`` cannot match another key.
_verified: dict[tuple[int, str, str], rsa.RSAPublicKey] = {}


def verify_url(key: rsa.RSAPublicKey, url: str, signature: str) -> bool:
    """True if ``signature`` is the engine's signature of ``url``.

    Decoding is lenient the way the official worker's is (characters outside the
    base64 alphabet are dropped), but bad padding or a wrong signature is a plain
    ``False``, never an exception.

    RSA verification is deterministic, so a triple (key, url, signature) that verified
    once is remembered (a bounded table of successes) and a repeat costs a dict lookup
    instead of an RSA operation: every request is still checked against the key, and
    anything not seen verifying before is verified in full.
    """
    memo = (id(key), url, signature)
    if _verified.get(memo) is key:
        return True
    try:
        raw = base64.b64decode(signature, validate=False)
    except (binascii.Error, ValueError):
        return False
    try:
        key.verify(raw, signed_message(url), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    if len(_verified) >= _VERIFIED_MAX:
        _verified.clear()
    _verified[memo] = key
    return True
