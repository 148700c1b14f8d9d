"""Send HTTP/2 header values as raw literals instead of Huffman-coded ones.

The ``Pqmsg-Signature`` header is 4,412 base64url characters. hpack 4.2
(pure Python, under h2 and httpcore) spends about 2.6 ms Huffman-coding it
on the client and the server about 0.75 ms decoding it: more than the
server's signature check. Huffman coding is optional in HPACK (RFC 7541
5.2), so the harness turns it off in its own process to stay out of the
way; ``--huffman`` keeps hpack's default (what stock HTTP/2 clients send).
"""

from __future__ import annotations

import functools
from typing import Any

import hpack


def disable_huffman() -> None:
    """Make every ``hpack.Encoder`` in this process emit raw literals (idempotent)."""
    encode = hpack.Encoder.encode
    if getattr(encode, "_bench_raw", False):
        return

    @functools.wraps(encode)
    def raw(self: hpack.Encoder, headers: Any, huffman: bool = True) -> bytes:
        return encode(self, headers, huffman=False)

    raw._bench_raw = True  # type: ignore[attr-defined]
    hpack.Encoder.encode = raw  # type: ignore[method-assign]
