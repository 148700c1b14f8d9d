"""Compact JWS signing (RFC 7515/7519) for the two provider credentials.

Only what the push senders need: RS256 (the FCM service-account assertion,
RFC 7523) and ES256 (the APNs provider token). A JWT is
``b64url(header) . b64url(claims) . b64url(signature)`` with unpadded
base64url and compact JSON. ES256 signatures are the raw 64-byte ``r || s``
of RFC 7518 section 3.4, not the DER that ``cryptography`` produces.

Signing is a millisecond or less and happens once per credential lifetime
(about an hour), so it runs inline rather than in a thread.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

P256_COORDINATE_BYTES: Final = 32


class UnsupportedKey(ValueError):
    """A signing key is not of the kind the algorithm needs."""


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWS wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _signing_input(header: Mapping[str, Any], claims: Mapping[str, Any]) -> bytes:
    def part(value: Mapping[str, Any]) -> str:
        return b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())

    return f"{part(header)}.{part(claims)}".encode("ascii")


def encode_rs256(
    claims: Mapping[str, Any], key: rsa.RSAPrivateKey, *, kid: str | None = None
) -> str:
    """A JWT signed RSASSA-PKCS1-v1_5 with SHA-256."""
    header = {"alg": "RS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = _signing_input(header, claims)
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def encode_es256(claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey, *, kid: str) -> str:
    """A JWT signed ECDSA P-256 with SHA-256 (raw ``r || s`` signature)."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise UnsupportedKey(f"ES256 needs a P-256 key, not {key.curve.name}")
    header = {"alg": "ES256", "kid": kid}
    signing_input = _signing_input(header, claims)
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(P256_COORDINATE_BYTES, "big") + s.to_bytes(P256_COORDINATE_BYTES, "big")
    return f"{signing_input.decode('ascii')}.{b64url(raw)}"
