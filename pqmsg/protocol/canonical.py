"""The canonical string a device signs for every authenticated request (§3)."""

from __future__ import annotations

import hashlib

import attrs

CANONICAL_VERSION = "PQMSG-V1"


@attrs.frozen
class SignedRequest:
    """The parts of a request that its signature covers."""

    method: str
    path: str  # exactly as sent, percent-encoding untouched
    query: str  # raw query string, "" if none
    account: str
    device: int
    timestamp: int
    nonce: str
    body: bytes


def canonical_string(req: SignedRequest) -> bytes:
    """The UTF-8 bytes that the device key signs: nine lines, no trailing newline."""
    lines = (
        CANONICAL_VERSION,
        req.method.upper(),
        req.path,
        req.query,
        req.account,
        str(req.device),
        str(req.timestamp),
        req.nonce,
        hashlib.sha256(req.body).hexdigest(),
    )
    return "\n".join(lines).encode("utf-8")
