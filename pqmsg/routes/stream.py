"""WebSocket delivery: ``GET /v1/stream`` (PROTOCOL.md §5), over HTTP/1.1 and HTTP/2.

The upgrade (RFC 6455, or RFC 8441 extended CONNECT over HTTP/2) is signed
like any ``GET`` with an empty body (§3). A rejected upgrade is answered with
HTTP problem+json (401 with the auth ``reason``, 400, 503) and no WebSocket.
An accepted stream then, in this order: subscribes to its device's
wake-ups (so push skips the device and an older stream of the device on this
replica is replaced), sends the backlog oldest first, and sends each new
message as it is stored, here or on another replica (the notifier's bus
carries the wake-ups, as for long polls).

Frames are JSON text frames::

    server -> client                       client -> server
    {"type": "message", <GET /v1/messages fields>}
                                           {"type": "ack", "ids": [...]}  (<= 500)
    {"type": "acked", "acked": n}          (one per ack frame, in order, once durable)
    {"type": "ping"}                       {"type": "pong"}

A message is sent once per stream. At most ``stream.max_unacked`` messages
(and about ``stream.max_unacked_bytes`` of ciphertext) are outstanding on a
stream, delivered but unacknowledged; then the stream waits for acks. This
window is the stream's send buffer bound: a client that keeps messages waiting
behind a full window for ``stream.ack_timeout_s`` is too slow and is
disconnected. Unacknowledged messages stay queued and come again on the next
stream or poll. The server pings every ``stream.ping_interval_s``; any client
frame counts as a sign of life.

Close codes (the close reason is the token, sometimes with a detail)::

    1001 going_away      the server is draining (SIGTERM); reconnect
    1003 unsupported     a binary frame
    1008 bad_frame       a text frame that is none of the client frames above
    1009 too_big         a frame longer than MAX_FRAME_CHARS
    1011 internal_error  an unexpected server error (details only in the log)
    1013 unavailable     storage is unavailable; reconnect later
    4001 revoked         the device was revoked or its account deleted
    4002 replaced        a newer stream of the same device opened on this replica
    4003 slow_consumer   messages waited behind a full window for stream.ack_timeout_s,
                         or a frame could not be written within stream.send_timeout_s
    4004 idle_timeout    nothing from the client for stream.idle_timeout_s

Resources: WebSockets bypass the edge's in-flight limiter; open streams are
bounded by ``stream.max_streams`` (503 ``overloaded`` before the upgrade).
Hypercorn 0.18 does not push back on a peer that stopped reading: over
HTTP/1.1 it writes to the socket shielded (the send timeout can only notice
afterwards), and over HTTP/2 it buffers past a closed flow-control window.
The unacked window is therefore what bounds the bytes written to a stream and
not yet acknowledged; the ack and idle timeouts disconnect such a peer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, cast

import trio
from quart import Blueprint, Response, websocket

from pqmsg.audit.events import AUTH_REJECTED, AUTH_REPLAY
from pqmsg.errors import AuthError, BadRequest, ProblemError, StorageUnavailable, Unavailable
from pqmsg.http.edge import REQUEST_ID_KEY
from pqmsg.http.inflight import RETRY_AFTER_OVERLOAD_S
from pqmsg.http.problems import PROBLEM_JSON, internal_error_body, problem_body
from pqmsg.nurseries.notify import CloseReason, DeviceClosed, Subscription
from pqmsg.protocol.auth import Authenticator, Principal, parse_auth
from pqmsg.protocol.validate import UUID_RE
from pqmsg.routes.messages import MAX_ACK, message_json
from pqmsg.services import Services
from pqmsg.storage.base import QueuedMessage

log = logging.getLogger("pqmsg.stream")

Close = tuple[int, str]
GOING_AWAY: Close = (1001, "going_away")
UNSUPPORTED: Close = (1003, "unsupported: binary frames are not part of the protocol")
TOO_BIG: Close = (1009, "too_big")
INTERNAL_ERROR: Close = (1011, "internal_error")
UNAVAILABLE: Close = (1013, "unavailable")
REVOKED: Close = (4001, "revoked")
REPLACED: Close = (4002, "replaced")
SLOW_CONSUMER: Close = (4003, "slow_consumer")
IDLE_TIMEOUT: Close = (4004, "idle_timeout")
BAD_FRAME_CODE = 1008
CLOSE_FOR: dict[CloseReason, Close] = {
    "revoked": REVOKED,
    "replaced": REPLACED,
    "shutdown": GOING_AWAY,
}
# An ack of 500 UUIDs is about 20,000 characters.
MAX_FRAME_CHARS = 64 * 1024
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455 5.5: control frame payload 125, minus the code
PING_FRAME = '{"type":"ping"}'


class StreamNotifier(Protocol):
    """What streams need of the notifier (more than the long polls' protocol)."""

    def subscribe(
        self, account: str, device: int, *, stream: bool = False
    ) -> AbstractContextManager[Subscription]: ...


class BadFrame(Exception):
    """A client frame that breaks the protocol; the stream closes with 1008."""


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
        await websocket.close(code, _truncate(reason))
    with trio.move_on_after(settings.idle_timeout_s):
        await trio.sleep_forever()


def _truncate(reason: str) -> str:
    data = reason.encode()[:MAX_CLOSE_REASON_BYTES]
    return data.decode("utf-8", errors="ignore")


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
    """§3 for the upgrade request: ``GET``, its raw path and query, an empty body.

    The same checks as :func:`pqmsg.routes.common.authenticate`, counted by
    reason and audited the same way.
    """
    scope = websocket.scope
    try:
        path = (scope.get("raw_path") or websocket.path.encode()).decode("ascii")
        query = scope.get("query_string", b"").decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request target must be ASCII", reason="bad_path") from None
    headers = {name.lower(): value for name, value in websocket.headers.items()}
    authenticator = Authenticator(
        lookup_device=svc.storage.db.get_device_auth,
        record_nonce=svc.replay.record,
        clock=svc.clock,
        skew_window_s=svc.settings.auth.skew_window_s,
    )
    try:
        principal = await authenticator.authenticate(parse_auth("GET", path, query, headers, b""))
    except AuthError as exc:
        account = headers.get("pqmsg-account") if exc.reason != "malformed" else None
        await count_reject(svc, exc, account)
        raise
    now = svc.clock()
    last = principal.last_seen_at
    if last is None or now - last >= svc.settings.auth.last_seen_resolution_s:
        await svc.storage.db.touch_device(principal.account, principal.device, now=now)
    return principal


async def count_reject(svc: Services, exc: AuthError, account: str | None) -> None:
    """Count and audit a refused upgrade, as for any request (§3)."""
    svc.metrics.auth_rejects.labels(exc.reason).inc()
    client = websocket.scope.get("client")
    await svc.audit.record(
        AUTH_REPLAY if exc.reason == "replay" else AUTH_REJECTED,
        outcome="rejected",
        request_id=request_id(),
        account=account,
        ip=str(client[0]) if client else "unknown",
        detail={"reason": exc.reason},
    )


class StreamSession:
    """One accepted stream: four tasks, and the first close decision wins.

    ``deliver`` fetches and sends, ``receive`` applies client frames,
    ``keepalive`` pings and enforces the idle timeout, ``watch`` turns
    notifier wake-ups into deliveries and revocation, replacement or the
    drain into a close. Frames are written one at a time under a lock.
    """

    def __init__(self, svc: Services, me: Principal, sub: Subscription) -> None:
        self._svc = svc
        self._settings = svc.settings.stream
        self._me = me
        self._sub = sub
        self._sent: set[str] = set()  # delivered on this stream, maybe acked since
        self._wake = trio.Event()
        self._send_lock = trio.Lock()
        self._last_heard = trio.current_time()
        self._close: Close | None = None
        self._scope = trio.CancelScope()

    async def run(self) -> Close:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, self._deliver)
                nursery.start_soon(self._guard, self._receive)
                nursery.start_soon(self._guard, self._keepalive)
                nursery.start_soon(self._guard, self._watch)
        return self._close or INTERNAL_ERROR

    def _finish(self, close: Close) -> None:
        if self._close is None:
            self._close = close
        self._scope.cancel()

    async def _guard(self, loop: Callable[[], Awaitable[None]]) -> None:
        try:
            await loop()
        except StorageUnavailable:
            self._finish(UNAVAILABLE)
        except BadFrame as exc:
            self._finish((BAD_FRAME_CODE, f"bad_frame: {exc}"))

    async def _send(self, text: str) -> None:
        with trio.move_on_after(self._settings.send_timeout_s) as deadline:
            async with self._send_lock:
                await websocket.send(text)
        if deadline.cancelled_caught:
            self._finish(SLOW_CONSUMER)
            await trio.lowlevel.checkpoint()  # raises Cancelled: the session is over

    # -- server to client --------------------------------------------------------

    async def _deliver(self) -> None:
        """Send, then wait for a wake-up; close when held back by the window too long."""
        held_since = math.inf  # since when the full window holds messages back
        while True:
            # Re-arm before fetching: a message stored from now on wakes us again.
            self._wake = trio.Event()
            sent, held = await self._send_new()
            if not held:
                held_since = math.inf
            elif sent or held_since == math.inf:
                held_since = trio.current_time()
            with trio.move_on_at(held_since + self._settings.ack_timeout_s):
                await self._wake.wait()
                continue
            self._finish(SLOW_CONSUMER)
            return

    async def _send_new(self) -> tuple[int, bool]:
        """Send what is queued and not yet sent here, within the unacked window.

        Returns how many were sent, and whether the window holds others back.
        """
        window = self._settings.max_unacked
        batch, more = await self._svc.storage.db.fetch_messages(
            self._me.account, self._me.device, limit=window
        )
        self._forget_acked(batch, more)
        outstanding = [m for m in batch if m.id in self._sent]
        count, size, sent = len(outstanding), sum(len(m.ciphertext) for m in outstanding), 0
        for message in batch:
            if message.id in self._sent:
                continue
            length = len(message.ciphertext)
            if count >= window or (count and size + length > self._settings.max_unacked_bytes):
                return sent, True
            await self._send(json.dumps({"type": "message", **message_json(message)}))
            self._sent.add(message.id)
            self._svc.metrics.delivered.inc()
            count, size, sent = count + 1, size + length, sent + 1
        return sent, more

    def _forget_acked(self, batch: Sequence[QueuedMessage], more: bool) -> None:
        """Drop ids no longer queued; only safe to know when the batch is the whole queue.

        Ids are not dropped when acked, as a fetch that raced the ack may still
        hold them (they would be sent twice). Past twice the window the set is
        trimmed anyway, so acks sent by HTTP cannot grow it without bound.
        """
        if not more or len(self._sent) > 2 * self._settings.max_unacked:
            self._sent &= {m.id for m in batch}

    async def _keepalive(self) -> None:
        interval, idle = self._settings.ping_interval_s, self._settings.idle_timeout_s
        next_ping = trio.current_time() + interval
        while True:
            await trio.sleep_until(min(next_ping, self._last_heard + idle))
            now = trio.current_time()
            if now >= self._last_heard + idle:
                self._finish(IDLE_TIMEOUT)
                return
            if now >= next_ping:
                await self._send(PING_FRAME)
                next_ping = now + interval

    async def _watch(self) -> None:
        try:
            while True:
                await self._sub.wait()
                self._wake.set()
        except DeviceClosed as exc:
            self._finish(CLOSE_FOR[exc.reason])

    # -- client to server --------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            data = await websocket.receive()
            self._last_heard = trio.current_time()
            if isinstance(data, bytes):
                self._finish(UNSUPPORTED)
                return
            if len(data) > MAX_FRAME_CHARS:
                self._finish(TOO_BIG)
                return
            frame = _parse_frame(data)
            if frame["type"] == "ack":
                await self._ack(frame["ids"])

    async def _ack(self, ids: list[str]) -> None:
        acked = await self._svc.storage.db.ack_messages(self._me.account, self._me.device, ids)
        self._svc.metrics.acked.inc(acked)
        await self._send(json.dumps({"type": "acked", "acked": acked}))
        self._wake.set()  # the window has room again


def _parse_frame(data: str) -> dict[str, Any]:
    try:
        frame = json.loads(data)
    except ValueError:
        raise BadFrame("not JSON") from None
    if not isinstance(frame, dict):
        raise BadFrame("a frame must be a JSON object")
    kind = frame.get("type")
    if kind == "pong" and frame.keys() == {"type"}:
        return frame
    if kind != "ack":
        raise BadFrame(f"unknown frame type {str(kind)[:32]!r}")
    if frame.keys() != {"type", "ids"}:
        raise BadFrame("an ack frame has exactly the fields 'type' and 'ids'")
    ids = frame["ids"]
    if not isinstance(ids, list) or len(ids) > MAX_ACK or not all(map(_is_uuid, ids)):
        raise BadFrame(f"'ids' must be a list of at most {MAX_ACK} message ids")
    return frame


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and UUID_RE.fullmatch(value) is not None
