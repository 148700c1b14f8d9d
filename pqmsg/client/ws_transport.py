"""The interface between :mod:`pqmsg.client.stream` and its WebSocket transports.

A transport carries the text frames of ``GET /v1/stream``; an opener makes
one, with the upgrade signed by ``headers``, and closes it on exit. The two
openers are :func:`pqmsg.client.ws_h1.open_h1_transport` (RFC 6455 over
HTTP/1.1) and :func:`pqmsg.client.ws_h2.open_h2_transport` (RFC 8441 over
HTTP/2). Both raise :class:`StreamClosed` from a closed stream,
:class:`StreamUnsupported` when the server cannot carry the transport, and
:class:`~pqmsg.client.session.ProblemResponse` for a refused upgrade.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import httpx

STREAM_PATH = "/v1/stream"
CLOSE_GRACE_S = 5.0
ABNORMAL_CLOSURE = 1006


class StreamClosed(Exception):
    """The stream is closed; ``code`` and ``reason`` are the server's (1006: lost)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"stream closed with {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class StreamUnsupported(Exception):
    """The server does not offer WebSockets over HTTP/2 (no RFC 8441 setting, no h2)."""


class Transport(Protocol):
    """A WebSocket carrying text frames; both transports implement it."""

    async def send(self, text: str) -> None:
        """Send one text frame; StreamClosed once closed."""

    async def receive(self) -> str:
        """The next text frame; StreamClosed when the stream closed."""

    async def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (idempotent)."""


OpenTransport = Callable[
    [httpx.URL, Mapping[str, str], ssl.SSLContext | None],
    AbstractAsyncContextManager[Transport],
]
