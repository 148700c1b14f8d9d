"""What the identity and device keys sign (PROTOCOL.md §2 and §5).

``||`` in the protocol is byte concatenation; strings are UTF-8.
"""

from __future__ import annotations

from typing import Literal

PrekeySignatureKind = Literal["spk", "pqspk"]

DEVICE_CERT_CONTEXT = b"pqmsg-device-v1"
PREKEY_CONTEXT = b"pqmsg-prekey-v1"
REGISTER_CONTEXT = b"pqmsg-register-v1"


def device_certificate_message(device_key: bytes) -> bytes:
    """Signed by the identity key: it vouches for ``device_key``."""
    return DEVICE_CERT_CONTEXT + device_key


def prekey_message(kind: PrekeySignatureKind, key_id: int, public_key: bytes) -> bytes:
    """Signed by the identity key for every signed prekey."""
    return PREKEY_CONTEXT + kind.encode("ascii") + key_id.to_bytes(8, "big") + public_key


def registration_proof_message(identity_key: bytes, device_key: bytes) -> bytes:
    """Signed by the device key: proves possession of it."""
    return REGISTER_CONTEXT + identity_key + device_key
