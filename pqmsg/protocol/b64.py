"""Unpadded base64url (RFC 4648 §5), strictly: the only binary encoding on the wire."""

from __future__ import annotations

import base64
import binascii

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_ALPHABET_ERROR = "must use the base64url alphabet (A-Z a-z 0-9 - _)"
# base64url to standard base64 for binascii's strict decoder, which then
# refuses every byte outside the alphabet; '+' and '/' are standard base64
# but not base64url, so they become '!', which it refuses as well.
_TO_STANDARD = bytes.maketrans(b"-_+/", b"+/!!")
# The 6-bit value of each base64url character (other bytes never reach it).
_SEXTET = bytes(_ALPHABET.find(bytes([byte])) & 0x3F for byte in range(256))
# Per ``len % 4``: the padding binascii wants, and the low bits of the last
# character that the canonical encoding leaves zero (a 2-character tail
# carries one byte, so 4 bits are spare; a 3-character tail two, so 2).
_PADDING = (b"", b"", b"==", b"=")
_SPARE_BITS = (0, 0, 0x0F, 0x03)


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
    if not text.isascii():
        raise Base64Error(_ALPHABET_ERROR)
    raw = text.encode("ascii")
    tail = len(raw) % 4
    if tail == 1:
        # The alphabet is checked before the length, as the decoder would.
        if raw.translate(None, _ALPHABET):
            raise Base64Error(_ALPHABET_ERROR)
        raise Base64Error("is not a valid base64url length")
    try:
        data = binascii.a2b_base64(raw.translate(_TO_STANDARD) + _PADDING[tail], strict_mode=True)
    except binascii.Error as exc:
        # Padding and length are right by now, so this is a byte outside the
        # alphabet (deleting every alphabet byte leaves something).
        if raw.translate(None, _ALPHABET):
            raise Base64Error(_ALPHABET_ERROR) from None
        raise Base64Error("is not valid base64url") from exc
    if tail and _SEXTET[raw[-1]] & _SPARE_BITS[tail]:
        # Non-canonical trailing bits: two encodings of one value are refused,
        # so signatures and ids have exactly one textual form.
        raise Base64Error("is not canonical base64url")
    if length is not None and len(data) != length:
        raise Base64Error(f"must decode to {length} bytes, got {len(data)}")
    return data
