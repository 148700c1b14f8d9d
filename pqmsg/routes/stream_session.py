"""One accepted ``GET /v1/stream``: delivery, the unacked window, pings and idleness.

A message is sent once per stream. At most ``stream.max_unacked`` messages
(and about ``stream.max_unacked_bytes`` of ciphertext) are outstanding on a
stream, delivered but unacknowledged; then the stream waits for acks. This
window is the stream's send buffer bound: a client that keeps messages waiting
behind a full window for ``stream.ack_timeout_s`` is too slow and is
disconnected. Unacknowledged messages stay queued and come again on the next
stream or poll. The server pings every ``stream.ping_interval_s``; any client
frame counts as a sign of life.

The session decides how the stream closes (see
:mod:`pqmsg.routes.stream_frames`); sending the close is the handler's.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

import trio
from quart import websocket

from pqmsg.errors import StorageUnavailable
from pqmsg.nurseries.notify import DeviceClosed, Subscription
from pqmsg.protocol.auth import Principal
from pqmsg.routes.stream_frames import (
    CLOSE_FOR,
    IDLE_TIMEOUT,
    INTERNAL_ERROR,
    MAX_FRAME_CHARS,
    PING_FRAME,
    SLOW_CONSUMER,
    TOO_BIG,
    UNAVAILABLE,
    UNSUPPORTED,
    BadFrame,
    Close,
    acked_frame,
    bad_frame_close,
    message_frame,
    parse_frame,
)
from pqmsg.services import Services
from pqmsg.storage.base import QueuedMessage


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
            self._finish(bad_frame_close(exc))

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
            await self._send(message_frame(message))
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
            frame = parse_frame(data)
            if frame["type"] == "ack":
                await self._ack(frame["ids"])

    async def _ack(self, ids: list[str]) -> None:
        acked = await self._svc.storage.db.ack_messages(self._me.account, self._me.device, ids)
        self._svc.metrics.acked.inc(acked)
        await self._send(acked_frame(acked))
        self._wake.set()  # the window has room again
