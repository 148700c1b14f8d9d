"""Client-side key material: the identity key, device keys and prekeys.

The server only ever sees public keys and signatures; everything secret here
stays on the device. X25519 keys come from ``cryptography``; ML-DSA-65 and
ML-KEM-768 from :mod:`pqmsg.protocol.crypto`.
"""

from __future__ import annotations

import itertools

import attrs
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pqmsg.protocol import crypto
from pqmsg.protocol.b64 import b64encode
from pqmsg.protocol.signing import (
    PrekeySignatureKind,
    device_certificate_message,
    prekey_message,
    registration_proof_message,
)


@attrs.frozen
class PrekeyPair:
    key_id: int
    public_key: bytes
    secret_key: bytes = attrs.field(repr=False)


def x25519_keypair(key_id: int) -> PrekeyPair:
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    secret = private.private_bytes_raw()
    return PrekeyPair(key_id, public, secret)


def ml_kem_keypair(key_id: int) -> PrekeyPair:
    public, secret = crypto.generate_kem_public_key()
    return PrekeyPair(key_id, public, secret)


@attrs.define
class Identity:
    """An account's identity key: it certifies devices and signs prekeys."""

    keys: crypto.SigningKeyPair = attrs.field(factory=crypto.generate_signing_key)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), repr=False)

    @property
    def public_key(self) -> bytes:
        return self.keys.public_key

    def certify(self, device_key: bytes) -> bytes:
        return crypto.sign(self.keys.secret_key, device_certificate_message(device_key))

    def sign_prekey(self, kind: PrekeySignatureKind, key_id: int, public_key: bytes) -> bytes:
        return crypto.sign(self.keys.secret_key, prekey_message(kind, key_id, public_key))

    def next_key_id(self) -> int:
        return next(self._ids)

    def signed_entry(self, kind: PrekeySignatureKind, pair: PrekeyPair) -> dict[str, object]:
        """A ``{"id", "public_key", "signature"}`` body entry."""
        return {
            "id": pair.key_id,
            "public_key": b64encode(pair.public_key),
            "signature": b64encode(self.sign_prekey(kind, pair.key_id, pair.public_key)),
        }


def registration_body(identity: Identity, device_key: crypto.SigningKeyPair, name: str | None) -> dict[str, object]:
    """What ``POST /v1/accounts`` and ``POST /v1/devices`` take (less the token)."""
    proof = crypto.sign(device_key.secret_key, registration_proof_message(identity.public_key, device_key.public_key))
    body: dict[str, object] = {
        "identity_key": b64encode(identity.public_key),
        "device_key": b64encode(device_key.public_key),
        "device_certificate": b64encode(identity.certify(device_key.public_key)),
        "proof": b64encode(proof),
    }
    if name is not None:
        body["name"] = name
    return body
