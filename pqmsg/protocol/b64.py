"""Unpadded base64url (RFC 4648 §5), strictly: the only binary encoding on the wire."""

from __future__ import annotations

import base64
import binascii
import re

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


class Base64Error(ValueError):
    """Not unpadded base64url, or the wrong length."""


def b64encode(data: bytes) -> str:
    """Unpadded base64url text of ``data``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str, *, length: int | None = None, max_length: int | None = None) -> bytes:
    """Decode unpadded base64url; reject padding, other alphabets and bad lengths.

    ``length`` is the exact decoded size required, ``max_length`` an upper bound.
    """
    if not isinstance(text, str):
        raise Base64Error("must be a base64url string")
    if max_length is not None and len(text) > (max_length * 4 + 2) // 3:
        raise Base64Error(f"longer than {max_length} bytes")
    if "=" in text:
        raise Base64Error("must be unpadded base64url (no '=')")
    if not _ALPHABET.fullmatch(text):
        raise Base64Error("must use the base64url alphabet (A-Z a-z 0-9 - _)")
    if len(text) % 4 == 1:
        raise Base64Error("is not a valid base64url length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise Base64Error("is not valid base64url") from exc
    if b64encode(data) != text:
        # Non-canonical trailing bits: two encodings of one value are refused,
        # so signatures and ids have exactly one textual form.
        raise Base64Error("is not canonical base64url")
    if length is not None and len(data) != length:
        raise Base64Error(f"must decode to {length} bytes, got {len(data)}")
    return data
