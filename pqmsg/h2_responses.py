"""HTTP/2 response headers: raw HPACK literals, and the request id never indexed.

Every response carries a fresh ``X-Request-Id`` (24 hex characters). hpack,
pure Python, Huffman-codes every literal by default and adds each new
field to the connection's header table, where a request id is never used
again and only pushes out entries that are (``date``, ``content-type``).
Encoding a typical response's headers took 14.9 µs that way, against 7.6
µs with raw literals and the id sent never-indexed (RFC 7541 6.2.3): 44
bytes of header block instead of 25, on a connection that moves kilobytes
per request anyway (``Pqmsg-Signature`` alone is 4.4 KB).

:func:`apply` gives each of the server's HTTP/2 connections (Hypercorn's
``H2Protocol``) a :class:`ResponseEncoder`: raw literals, as the SDK's
requests use (RFC 7541 5.2 lets the encoder choose), and ``x-request-id``
never-indexed. Other fields are indexed as before. The marking is made
at the encoder because Hypercorn rebuilds the application's header pairs
as plain tuples before h2 sees them.

The bench's floor gets :func:`apply` too (``pqmsg.server.apply_hypercorn_fixes``):
its responses carry no per-request field, so it neither pays nor saves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import hpack
from hypercorn.protocol.h2 import H2Protocol

REQUEST_ID_NAME = b"x-request-id"
_original_init = H2Protocol.__init__


class ResponseEncoder(hpack.Encoder):
    """Raw literals, and the request id as a never-indexed field."""

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        marked = [
            hpack.NeverIndexedHeaderTuple(*field) if field[0] == REQUEST_ID_NAME else field for field in headers
        ]
        return super().encode(marked, huffman=False)


@functools.wraps(_original_init)
def _init(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    encoder = self.connection.encoder
    if type(encoder) is hpack.Encoder:  # else leave it: someone else's encoder
        replacement = ResponseEncoder.__new__(ResponseEncoder)
        replacement.__dict__.update(vars(encoder))  # its table and settings, as they are
        self.connection.encoder = replacement


def apply() -> None:
    """Raw-literal encoders for Hypercorn's HTTP/2 connections from now on (idempotent)."""
    H2Protocol.__init__ = _init  # type: ignore[method-assign]


def revert() -> None:
    """Hypercorn's own ``__init__`` back (for tests)."""
    H2Protocol.__init__ = _original_init  # type: ignore[method-assign]
