"""The HTTP/1.1 stream transport: an RFC 6455 upgrade, framed by ``trio-websocket``."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import httpx
import trio

from pqmsg.client.ws_transport import (
    ABNORMAL_CLOSURE,
    CLOSE_GRACE_S,
    STREAM_PATH,
    StreamClosed,
    Transport,
)
from pqmsg.client.ws_upgrade import Socket, authority, connect, header_list, problem

if TYPE_CHECKING:
    # Imported where used, so the rest of the SDK works without trio-websocket.
    import trio_websocket

MAX_FRAME_BYTES = 4 * 1024 * 1024  # a 256 KiB ciphertext is ~350 KB as a frame


class TrioWebsocketTransport:
    """A :class:`~pqmsg.client.ws_transport.Transport` over a ``trio_websocket`` connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def send(self, text: str) -> None:
        from trio_websocket import ConnectionClosed

        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
            raise _closed(exc.reason) from None

    async def receive(self) -> str:
        from trio_websocket import ConnectionClosed

        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc.reason) from None
        return message if isinstance(message, str) else message.decode("utf-8")

    async def close(self, code: int, reason: str) -> None:
        await self._ws.aclose(code, reason or None)


def _closed(reason: trio_websocket.CloseReason | None) -> StreamClosed:
    if reason is None:
        return StreamClosed(ABNORMAL_CLOSURE)
    return StreamClosed(reason.code, reason.reason or "")


@asynccontextmanager
async def open_h1_transport(
    url: httpx.URL, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None
) -> AsyncIterator[Transport]:
    """An RFC 6455 upgrade to ``/v1/stream``."""
    async with open_websocket(url, headers, ssl_context) as ws:
        yield TrioWebsocketTransport(ws)


@asynccontextmanager
async def open_websocket(
    url: httpx.URL,
    headers: Mapping[str, str],
    ssl_context: ssl.SSLContext | None,
    *,
    target: str = STREAM_PATH,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A ``trio_websocket`` connection; ProblemResponse if the upgrade is refused.

    Not ``trio_websocket.open_websocket``: that one leaves the socket of a
    refused upgrade open. The caller's cancel scopes bound the connect.
    """
    from trio_websocket import ConnectionRejected

    stream = await connect(url, ssl_context, alpn="http/1.1")
    try:
        async with _upgrade(stream, url, headers, target) as ws:
            yield ws
    except* ConnectionRejected as group:
        exc = group.exceptions[0]
        assert isinstance(exc, ConnectionRejected)
        raise problem(exc.status_code, exc.headers, exc.body or b"") from None
    finally:
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            await stream.aclose()


@asynccontextmanager
async def _upgrade(
    stream: Socket, url: httpx.URL, headers: Mapping[str, str], target: str
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """The RFC 6455 handshake on ``stream``; the WebSocket is closed (bounded) on exit."""
    from trio_websocket import wrap_client_stream

    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            authority(url),
            target,
            extra_headers=header_list(headers),
            max_message_size=MAX_FRAME_BYTES,
        )
        try:
            yield ws
        finally:
            with trio.move_on_after(CLOSE_GRACE_S, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()
