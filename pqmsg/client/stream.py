"""Message streams in the SDK: ``GET /v1/stream`` over a WebSocket.

::

    async with open_stream(bob) as stream:             # HTTP/1.1 upgrade
        async for message in stream:
            handle(message)
            await stream.ack([message.id])

    async with open_stream(bob, http2=True) as stream:  # RFC 8441 over HTTP/2
        message = await stream.receive()

Over HTTP/1.1 the stream is a ``trio-websocket`` connection
(:mod:`pqmsg.client.ws_h1`); over HTTP/2 it is an extended CONNECT (RFC 8441)
on its own connection (h2c with prior knowledge for ``http://``, ALPN ``h2``
for ``https://``), framed by ``wsproto`` (:mod:`pqmsg.client.ws_h2`). Either
way the upgrade is signed like a ``GET`` (§3).

The stream answers the server's pings itself. Messages come in the order the
server sent them; :meth:`MessageStream.ack` returns once the server confirms
the ack is durable. The messages not yet taken are buffered without bound:
the server's unacked window (``stream.max_unacked``) bounds them. When the
server closes the stream, :meth:`MessageStream.receive` raises
:class:`StreamClosed` with the code and reason (see
:mod:`pqmsg.routes.stream_frames`), iteration ends, and ``closed`` holds it. A
refused upgrade raises :class:`~pqmsg.client.session.ProblemResponse`.
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress

import trio

from pqmsg.client.session import Device, ReceivedMessage, sign_headers
from pqmsg.client.ws_h1 import open_h1_transport
from pqmsg.client.ws_h2 import open_h2_transport
from pqmsg.client.ws_transport import (
    ABNORMAL_CLOSURE,
    CLOSE_GRACE_S,
    STREAM_PATH,
    OpenTransport,
    StreamClosed,
    StreamUnsupported,
    Transport,
)

NORMAL_CLOSURE = 1000
PONG_FRAME = '{"type":"pong"}'


class MessageStream:
    """An open stream: messages in, acks out. Made by :func:`open_stream`."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._message_in, self._messages = trio.open_memory_channel[ReceivedMessage](math.inf)
        self._acked_in, self._acked = trio.open_memory_channel[int](math.inf)
        self._ack_lock = trio.Lock()
        self._done = trio.Event()
        self.closed: StreamClosed | None = None

    async def receive(self) -> ReceivedMessage:
        """The next message; StreamClosed once the stream closed and all were taken."""
        try:
            return await self._messages.receive()
        except trio.EndOfChannel:
            raise self._closed_error() from None

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> ReceivedMessage:
        try:
            return await self._messages.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def ack(self, ids: Sequence[str]) -> int:
        """Acknowledge messages (at most 500); returns how many the server removed."""
        async with self._ack_lock:
            await self._transport.send(json.dumps({"type": "ack", "ids": list(ids)}))
            try:
                return await self._acked.receive()
            except trio.EndOfChannel:
                raise self._closed_error() from None

    async def aclose(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Close the stream and wait (bounded) for the server's close frame."""
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            if not self._done.is_set():
                with suppress(StreamClosed):
                    await self._transport.close(code, reason)
                await self._done.wait()

    def _closed_error(self) -> StreamClosed:
        return self.closed or StreamClosed(ABNORMAL_CLOSURE, "the stream ended")

    async def _read(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                frame = json.loads(await self._transport.receive())
                kind = frame.get("type")
                if kind == "message":
                    self._message_in.send_nowait(ReceivedMessage.from_json(frame))
                elif kind == "acked":
                    self._acked_in.send_nowait(int(frame["acked"]))
                elif kind == "ping":
                    await self._transport.send(PONG_FRAME)
                # Frame types added by later servers are ignored.
        except StreamClosed as exc:
            self.closed = exc
        finally:
            self._message_in.close()
            self._acked_in.close()
            self._done.set()


@asynccontextmanager
async def open_stream(
    device: Device, *, http2: bool = False, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[MessageStream]:
    """Open the device's stream; closed (code 1000) when the block ends.

    ``ssl_context`` is for ``https://`` servers; over HTTP/2 it must offer the
    ``h2`` ALPN protocol (the default one does).
    """
    headers = sign_headers(
        "GET",
        STREAM_PATH,
        "",
        b"",
        account=device.account,
        device=device.device,
        device_key=device.device_key,
        now=device.client.clock(),
    )
    opener: OpenTransport = open_h2_transport if http2 else open_h1_transport
    async with opener(device.client.http.base_url, headers, ssl_context) as transport:
        async with trio.open_nursery() as nursery:
            stream = MessageStream(transport)
            await nursery.start(stream._read)
            try:
                yield stream
            finally:
                await stream.aclose()
                nursery.cancel_scope.cancel()


__all__ = [
    "MessageStream",
    "StreamClosed",
    "StreamUnsupported",
    "Transport",
    "open_stream",
]
