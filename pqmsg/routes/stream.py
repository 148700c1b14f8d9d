"""WebSocket delivery: ``GET /v1/stream`` (PROTOCOL.md §5), over HTTP/1.1 and HTTP/2.

The upgrade (RFC 6455, or RFC 8441 extended CONNECT over HTTP/2) is signed
like any ``GET`` with an empty body (§3). A rejected upgrade is answered with
HTTP problem+json (401 with the auth ``reason``, 400, 503) and no WebSocket.
An accepted stream then, in this order: subscribes to its device's
wake-ups (so push skips the device and an older stream of the device on this
replica is replaced), sends the backlog oldest first, and sends each new
message as it is stored, here or on another replica (the notifier's bus
carries the wake-ups, as for long polls).

This module is the endpoint: the upgrade, its authentication and refusals,
and the closing handshake. The accepted stream is
:mod:`pqmsg.routes.stream_session` (delivery, the unacked window, pings and
the idle timeout); its frames and close codes are
:mod:`pqmsg.routes.stream_frames`.

Resources: WebSockets bypass the edge's in-flight limiter; open streams are
bounded by ``stream.max_streams`` (503 ``overloaded`` before the upgrade).
Hypercorn 0.18 does not push back on a peer that stopped reading: over
HTTP/1.1 it writes to the socket shielded (the send timeout can only notice
afterwards), and over HTTP/2 it buffers past a closed flow-control window.
The unacked window is therefore what bounds the bytes written to a stream and
not yet acknowledged; the ack and idle timeouts disconnect such a peer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, cast

import trio
from quart import Blueprint, Response, websocket

from pqmsg.errors import AuthError, BadRequest, ProblemError, Unavailable
from pqmsg.http.edge import REQUEST_ID_KEY
from pqmsg.http.inflight import RETRY_AFTER_OVERLOAD_S
from pqmsg.http.problems import PROBLEM_JSON, internal_error_body, problem_body
from pqmsg.nurseries.notify import Subscription
from pqmsg.protocol.auth import Principal
from pqmsg.routes.common import authenticate_scope, record_auth_reject
from pqmsg.routes.stream_frames import INTERNAL_ERROR, Close, close_reason
from pqmsg.routes.stream_session import StreamSession
from pqmsg.services import Services

log = logging.getLogger("pqmsg.stream")


class StreamNotifier(Protocol):
    """What streams need of the notifier (more than the long polls' protocol)."""

    def subscribe(
        self, account: str, device: int, *, stream: bool = False
    ) -> AbstractContextManager[Subscription]: ...


class StreamSlots:
    """Open streams on this server, against ``stream.max_streams``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    @contextmanager
    def take(self) -> Iterator[None]:
        if self.open >= self.limit:
            raise Unavailable(
                "too many open streams", retry_after_s=RETRY_AFTER_OVERLOAD_S, reason="overloaded"
            )
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


def blueprint(svc: Services) -> Blueprint:
    bp = Blueprint("stream", __name__)
    slots = StreamSlots(svc.settings.stream.max_streams)
    # The composition root's notifier is pqmsg.nurseries.notify.Notifier.
    notifier = cast(StreamNotifier, svc.notifier)

    @bp.websocket("/v1/stream")
    async def stream() -> Response | None:
        try:
            code, reason = await serve_stream(svc, slots, notifier)
        except ProblemError as exc:
            return rejection(exc)
        except Exception:  # only before the accept: run_session handles its own
            log.exception("stream upgrade of request %s failed", request_id())
            return internal_rejection()
        # The subscription is gone before the client learns of the close: from
        # now on its device gets push, and a reconnect replaces nothing.
        await close(svc, code, reason)
        return None

    return bp


async def serve_stream(svc: Services, slots: StreamSlots, notifier: StreamNotifier) -> Close:
    """Authenticate, subscribe, accept, and deliver until the stream is to close."""
    me = await authenticate_upgrade(svc)
    if websocket.args:
        raise BadRequest("/v1/stream takes no query parameters", reason="bad_query")
    with slots.take(), notifier.subscribe(me.account, me.device, stream=True) as sub:
        await check_still_open(svc, me, sub)
        await websocket.accept()
        return await run_session(StreamSession(svc, me, sub))


async def check_still_open(svc: Services, me: Principal, sub: Subscription) -> None:
    """Refuse the upgrade if the drain began, or the device went away, before we subscribed.

    Later revocations and the drain reach the subscription; these would not.
    """
    if sub.reason == "shutdown":
        raise Unavailable("the server is shutting down", retry_after_s=RETRY_AFTER_OVERLOAD_S)
    found = await svc.storage.db.get_device_auth(me.account, me.device)
    if found is None or found.revoked:
        if found is None:
            error = AuthError("no such account or device", reason="unknown_device")
        else:
            error = AuthError("this device was revoked", reason="revoked")
        await count_reject(svc, error, me.account)
        raise error


async def run_session(session: StreamSession) -> Close:
    """Run until something closes the stream; unexpected errors are 1011, logged."""
    result = INTERNAL_ERROR
    try:
        result = await session.run()
    except* Exception as group:
        log.error("stream of request %s failed", request_id(), exc_info=group)
    return result


async def close(svc: Services, code: int, reason: str) -> None:
    """Send the close frame, then wait (bounded) for the client's close in reply.

    The client's close ends the connection, which cancels this handler. We
    wait for it (RFC 6455 7.1.1) because Hypercorn 0.18 forgets an HTTP/2
    stream when its handler returns, and a DATA frame for a forgotten stream
    (such as that close, arriving late) raises KeyError in the connection
    (pgjones/hypercorn#329).
    """
    settings = svc.settings.stream
    with trio.move_on_after(settings.send_timeout_s):
        await websocket.close(code, close_reason(reason))
    with trio.move_on_after(settings.idle_timeout_s):
        await trio.sleep_forever()


def request_id() -> str:
    return str(websocket.scope.get(REQUEST_ID_KEY, "-"))


def rejection(error: ProblemError) -> Response:
    """The HTTP answer to an upgrade refused before the WebSocket was accepted."""
    rid = request_id()
    response = Response(problem_body(error, rid), status=error.status, content_type=PROBLEM_JSON)
    for name, value in error.headers().items():
        response.headers[name] = value
    # The edge adds X-Request-Id to accepts and HTTP responses, not to these.
    response.headers["X-Request-Id"] = rid
    return response


def internal_rejection() -> Response:
    rid = request_id()
    response = Response(internal_error_body(rid), status=500, content_type=PROBLEM_JSON)
    response.headers["X-Request-Id"] = rid
    return response


async def authenticate_upgrade(svc: Services) -> Principal:
    """§3 for the upgrade request: ``GET``, its raw path and query, an empty body."""
    scope = websocket.scope
    return await authenticate_scope(svc, scope, "GET", websocket.path, websocket.headers.items(), b"")


async def count_reject(svc: Services, exc: AuthError, account: str | None) -> None:
    """Count and audit a refused upgrade, as for any request (§3)."""
    await record_auth_reject(svc, exc, websocket.scope, account)
