"""The SDK's httpx transport: HTTP/2 header fields go out as raw HPACK literals.

Why
---
Every authenticated request carries ``Pqmsg-Signature``, 4,412 base64url
characters. hpack (pure Python, under ``h2`` and httpcore) Huffman-codes
every literal by default: 2.6 ms of client CPU for that one header, and
0.76 ms for the server to decode it, on every request. RFC 7541 5.2 leaves
the choice to the encoder, and base64url gains little from it (3,513 bytes
Huffman-coded against 4,412 raw), so the SDK sends raw literals: about
0.01 ms each way for about 900 bytes more on the wire per request.

How, and what it relies on
--------------------------
``h2.connection.H2Connection`` keeps its encoder in the public attribute
``encoder`` and calls ``encoder.encode(headers)`` (``huffman`` left at its
default, True) for every header block. :class:`RawLiteralEncoder` is an
``hpack.Encoder`` whose ``encode`` always passes ``huffman=False``; the SDK
puts one in each of *its own* ``H2Connection`` objects. Nothing is patched
process-wide: other httpx clients in the same process are untouched.

httpcore offers no hook for the ``H2Connection`` it makes, so reaching it
takes three steps through httpcore 1.0's internals, all confined to the
objects of one :class:`RawLiteralTransport`:

1. the transport's connection pool (``AsyncHTTPTransport._pool``, a plain
   ``httpcore.AsyncConnectionPool`` when no proxy is configured) becomes a
   :class:`_RawLiteralPool`, whose ``create_connection`` runs httpcore's and
   turns the ``httpcore.AsyncHTTPConnection`` it returns into a
   :class:`_RawLiteralConnection`. Both subclasses add behaviour, never
   state, so changing the class of an instance keeps every argument httpx
   and httpcore gave it;
2. ``AsyncHTTPConnection.handle_async_request`` creates the
   ``AsyncHTTP2Connection`` (which makes its ``H2Connection`` as
   ``_h2_state`` in ``__init__``) and stores it as ``self._connection``
   before the first request on it. :class:`_RawLiteralConnection` sees that
   assignment (``__setattr__``) and swaps the encoder while it is unused;
3. the swap copies the encoder's state, so it is exact even on an encoder
   that has been used.

Every new connection (after a GOAWAY, a dropped socket, keep-alive expiry)
goes through ``create_connection`` again, so it is covered too.

If these internals change
-------------------------
The SDK keeps working with hpack's default (Huffman) and logs a warning on
the ``pqmsg.client.transport`` logger, once per reason and process: when the
pool or the connection is not of the expected class (a proxy, a new
httpcore), when an ``AsyncHTTP2Connection`` has no ``H2Connection`` at
``_h2_state`` or its encoder is not an ``hpack.Encoder``, when
``hpack.Encoder.encode`` lost its ``huffman`` parameter, and, checked after
every HTTP/2 request, when the request went out without passing through a
:class:`RawLiteralEncoder` (httpcore stopped assigning ``_connection``, or
``h2`` stopped calling ``encoder.encode``). ``tests/client/test_raw_literals.py``
reads the header blocks off the wire, so CI fails loudly on any of these.

Out of scope: requests that httpx routes through a proxy (its own proxy
transports, e.g. from ``HTTPS_PROXY``) and an ``httpx.AsyncClient`` handed
to :class:`~pqmsg.client.Client` by the caller keep hpack's default.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any, Final

import h2.connection
import hpack
import httpcore
import httpx

__all__ = ["RawLiteralEncoder", "RawLiteralTransport", "raw_literal_encoder", "use_raw_literals"]

log = logging.getLogger(__name__)

_HPACK_HAS_HUFFMAN_FLAG: Final = "huffman" in inspect.signature(hpack.Encoder.encode).parameters

_warned: set[str] = set()


def _warn_once(reason: str, message: str, *args: object) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning(message + "; HTTP/2 header fields stay Huffman-coded (slower, still correct)", *args)


HeaderInput = (
    Iterable[hpack.HeaderTuple | tuple[bytes | str, bytes | str] | tuple[bytes | str, bytes | str, bool | None]]
    | dict[bytes | str, bytes | str]
)


class RawLiteralEncoder(hpack.Encoder):
    """An ``hpack.Encoder`` that never Huffman-codes a literal (RFC 7541 5.2 allows either).

    Indexing is unchanged: the header table is used exactly as by the base
    class. ``blocks`` counts the header blocks it encoded.
    """

    blocks: int = 0

    def encode(self, headers: HeaderInput, huffman: bool = True) -> bytes:
        self.blocks += 1
        return super().encode(headers, huffman=False)


def use_raw_literals(connection: h2.connection.H2Connection) -> bool:
    """Give ``connection`` a :class:`RawLiteralEncoder` with its encoder's state.

    Returns False, having logged a warning (once per reason), and leaves the
    connection as it is when that cannot be done safely.
    """
    encoder = connection.encoder
    if isinstance(encoder, RawLiteralEncoder):
        return True
    if not _HPACK_HAS_HUFFMAN_FLAG:
        _warn_once("hpack", "hpack.Encoder.encode (hpack %s) has no 'huffman' parameter", _version("hpack"))
        return False
    if type(encoder) is not hpack.Encoder:
        _warn_once("encoder", "H2Connection.encoder is a %s, not an hpack.Encoder", type(encoder).__qualname__)
        return False
    raw = RawLiteralEncoder.__new__(RawLiteralEncoder)
    raw.__dict__.update(vars(encoder))  # the header table and pending size changes, as they are
    connection.encoder = raw
    return True


def raw_literal_encoder(connection: object) -> RawLiteralEncoder | None:
    """The :class:`RawLiteralEncoder` of an httpcore HTTP/2 connection, None if it has none."""
    state = getattr(connection, "_h2_state", None)
    if isinstance(state, h2.connection.H2Connection) and isinstance(state.encoder, RawLiteralEncoder):
        return state.encoder
    return None


def _adopt(connection: httpcore.AsyncHTTP2Connection) -> None:
    state = getattr(connection, "_h2_state", None)
    if isinstance(state, h2.connection.H2Connection):
        use_raw_literals(state)
    else:
        _warn_once(
            "h2_state", "httpcore %s: AsyncHTTP2Connection._h2_state is %r, not an h2 H2Connection",
            _version("httpcore"), type(state).__qualname__,
        )


class _RawLiteralConnection(httpcore.AsyncHTTPConnection):
    """httpcore's connection; the HTTP/2 connection it creates gets a :class:`RawLiteralEncoder`.

    Instances are made by changing the class of an ``httpcore.AsyncHTTPConnection``
    (see :class:`_RawLiteralPool`): add no state here.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_connection" and isinstance(value, httpcore.AsyncHTTP2Connection):
            _adopt(value)
        super().__setattr__(name, value)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        response = await super().handle_async_request(request)
        if response.extensions.get("http_version") == b"HTTP/2":
            inner = getattr(self, "_connection", None)
            encoder = raw_literal_encoder(inner)
            if encoder is None:
                _warn_once(
                    "not_applied", "httpcore %s: an HTTP/2 connection (%s) was not given the raw-literal encoder",
                    _version("httpcore"), type(inner).__qualname__,
                )
            elif not encoder.blocks:
                _warn_once("not_called", "h2 %s sent a request without calling H2Connection.encoder.encode",
                           _version("h2"))
        return response


class _RawLiteralPool(httpcore.AsyncConnectionPool):
    """httpcore's pool, handing out :class:`_RawLiteralConnection` objects. Add no state here."""

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        connection = super().create_connection(origin)
        if type(connection) is httpcore.AsyncHTTPConnection:
            connection.__class__ = _RawLiteralConnection
        else:
            _warn_once("connection", "httpcore %s made a %s, not an AsyncHTTPConnection",
                       _version("httpcore"), type(connection).__qualname__)
        return connection


class RawLiteralTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` (same arguments) whose HTTP/2 connections send raw literals.

    HTTP/1.1 connections are unaffected (there is no HPACK). With a
    ``proxy`` the transport behaves exactly like its base class, with a
    warning.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        pool = getattr(self, "_pool", None)
        if type(pool) is httpcore.AsyncConnectionPool:
            pool.__class__ = _RawLiteralPool
        else:
            _warn_once("pool", "httpx %s: the transport's pool is a %s, not an httpcore AsyncConnectionPool",
                       httpx.__version__, type(pool).__qualname__)


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"
