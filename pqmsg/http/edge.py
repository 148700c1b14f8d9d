"""The ASGI edge in front of Quart: request ids, load shedding, metrics.

It runs before any routing or body parsing, so a shed request costs almost
nothing: the 503 is written at once. Route templates for the metrics come
from Quart's URL rule, which the app stores in the scope (``pqmsg.route``);
raw paths never become label values.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from pqmsg.errors import Unavailable
from pqmsg.http.inflight import RETRY_AFTER_OVERLOAD_S, InFlight
from pqmsg.http.problems import PROBLEM_JSON, problem_body
from pqmsg.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_KEY = "pqmsg.request_id"
ROUTE_KEY = "pqmsg.route"
UNMATCHED_ROUTE = "unmatched"
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{8,64}")

log = logging.getLogger("pqmsg.http")

# Generated request ids: 12 random bytes each, drawn from the OS in blocks.
_ID_BYTES = 12
_IDS_PER_BLOCK = 1024


class _RandomIds:
    """Random request ids, one ``os.urandom`` call per 1,024 of them."""

    def __init__(self) -> None:
        self._block = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._block):
            self._block = os.urandom(_ID_BYTES * _IDS_PER_BLOCK)
            self._at = 0
        at = self._at
        self._at = at + _ID_BYTES
        return self._block[at : at + _ID_BYTES].hex()

    def forget(self) -> None:
        """A forked child must not hand out the ids left in its parent's block."""
        self._block, self._at = b"", 0


_request_ids = _RandomIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_request_ids.forget)


def request_id_for(scope: Scope) -> str:
    """Echo the client's X-Request-Id when it is safe to, else make one.

    A made id is 24 hex digits of fresh randomness, as from
    ``secrets.token_hex(12)``, but the bytes are drawn from the OS a block at a
    time (one system call per 1,024 requests instead of one per request). They
    stay random rather than counted, so an id tells a client nothing about how
    many requests the server handled, or in what order.
    """
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and _SAFE_REQUEST_ID.fullmatch(value):
            return str(value.decode("ascii"))
    return _request_ids.next()


class Edge:
    """ASGI middleware wrapping the Quart app."""

    def __init__(self, app: ASGIApp, *, in_flight: InFlight, metrics: Metrics) -> None:
        self._app = app
        self._in_flight = in_flight
        self._metrics = metrics
        # Each (method, route, status)'s two series, looked up once: labels()
        # validates and locks on every call. Bounded, as methods are the
        # client's to choose; past the bound, labels() as before.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._app(scope, receive, send)
            return
        request_id = request_id_for(scope)
        scope[REQUEST_ID_KEY] = request_id
        send = _with_request_id(send, request_id)
        if scope["type"] == "websocket":
            await self._app(scope, receive, send)
            return
        await self._http(scope, receive, send, request_id)

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        borrower = object()
        scope["pqmsg.borrower"] = borrower
        method = scope["method"]
        if not self._in_flight.try_admit(borrower):
            await _shed(send, request_id)
            self._metrics.http_requests.labels(method, UNMATCHED_ROUTE, "503").inc()
            return
        status = 500
        started = trio.current_time()

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, observe)
        finally:
            self._in_flight.release(borrower)
            route = scope.get(ROUTE_KEY, UNMATCHED_ROUTE)
            series = self._series.get((method, route, status))
            if series is None:
                series = (
                    self._metrics.http_requests.labels(method, route, str(status)),
                    self._metrics.http_duration.labels(method, route),
                )
                if len(self._series) < MAX_CACHED_SERIES:
                    self._series[method, route, status] = series
            series[0].inc()
            series[1].observe(trio.current_time() - started)


#: The most (method, route, status) series the edge keeps looked up.
MAX_CACHED_SERIES = 1024


def _with_request_id(send: Send, request_id: str) -> Send:
    header = (b"x-request-id", request_id.encode("ascii"))

    async def wrapped(message: Message) -> None:
        if message["type"] in ("http.response.start", "websocket.accept"):
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
            headers.append(header)
            message["headers"] = headers
        await send(message)

    return wrapped


async def _shed(send: Send, request_id: str) -> None:
    error = Unavailable(
        "the server is at its in-flight request limit; retry shortly",
        retry_after_s=RETRY_AFTER_OVERLOAD_S,
        reason="overloaded",
    )
    body = problem_body(error, request_id)
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
