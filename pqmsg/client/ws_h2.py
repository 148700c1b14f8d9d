"""The HTTP/2 stream transport: RFC 8441 extended CONNECT, framed by ``h2`` and ``wsproto``.

The WebSocket runs on one stream of an HTTP/2 connection of its own (h2c with
prior knowledge for ``http://``, ALPN ``h2`` for ``https://``).
"""

from __future__ import annotations

import collections
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress

import h2.config
import h2.connection
import h2.events
import httpx
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from pqmsg.client.transport import use_raw_literals
from pqmsg.client.ws_transport import (
    ABNORMAL_CLOSURE,
    CLOSE_GRACE_S,
    STREAM_PATH,
    StreamClosed,
    StreamUnsupported,
    Transport,
)
from pqmsg.client.ws_upgrade import authority, connect, header_list, problem

RECEIVE_BYTES = 65_536


class H2WebSocket:
    """A :class:`~pqmsg.client.ws_transport.Transport`: a WebSocket on one HTTP/2 stream.

    One task receives (it also answers pings and opens flow-control windows);
    others may send. Writes to the socket go through one lock, and the DATA
    of one WebSocket frame is never interleaved with another's.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config)
        use_raw_literals(self._h2)  # the upgrade is signed: no Huffman coding of its 4.4 KB header
        self._ws = Connection(ConnectionType.CLIENT)
        self._id = 0
        self._write_lock = trio.Lock()
        self._frame_lock = trio.Lock()
        self._window_grew = trio.Event()
        self._settings_seen = False
        self._status: int | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._ended = False
        self._parts: list[str] = []
        self._texts: collections.deque[str] = collections.deque()
        self._replies: list[bytes] = []
        self._closed: StreamClosed | None = None

    async def handshake(self, authority: str, scheme: str, headers: Mapping[str, str]) -> None:
        """Send the extended CONNECT; ProblemResponse unless the server answers 200."""
        await self._start_connection()
        self._id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(self._id, _connect_request(authority, scheme) + header_list(headers))
        await self._flush()
        while self._status is None and not self._ended:
            await self._pump()
        if self._status != 200:
            while not self._ended:
                await self._pump()
            raise problem(self._status or 502, self._headers, bytes(self._body))

    async def send(self, text: str) -> None:
        try:
            data = self._ws.send(TextMessage(data=text))
        except LocalProtocolError:
            raise self._closed or StreamClosed(ABNORMAL_CLOSURE) from None
        await self._send_data(data)

    async def receive(self) -> str:
        while not self._texts:
            if self._closed is not None:
                raise self._closed
            await self._pump()
        return self._texts.popleft()

    async def close(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            await self._send_data(self._ws.send(CloseConnection(code=code, reason=reason)))

    async def aclose(self) -> None:
        """Say GOAWAY and close the socket."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._h2.close_connection()
            await self._flush()
        await self._stream.aclose()

    async def _start_connection(self) -> None:
        """Send the preface; StreamUnsupported unless the server's settings allow RFC 8441."""
        self._h2.initiate_connection()
        await self._flush()
        while not self._settings_seen:
            await self._pump()
        if not self._h2.remote_settings.enable_connect_protocol:
            raise StreamUnsupported("the server does not offer RFC 8441 (extended CONNECT)")

    async def _send_data(self, data: bytes) -> None:
        async with self._frame_lock:
            while data:
                window = min(
                    self._h2.local_flow_control_window(self._id), self._h2.max_outbound_frame_size
                )
                if window <= 0:
                    self._window_grew = trio.Event()
                    await self._window_grew.wait()
                    continue
                self._h2.send_data(self._id, data[:window])
                data = data[window:]
                await self._flush()

    async def _flush(self) -> None:
        async with self._write_lock:
            data = self._h2.data_to_send()
            if data:
                await self._stream.send_all(data)

    async def _pump(self) -> None:
        """Read once from the socket and handle what it brought."""
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except trio.BrokenResourceError:
            data = b""
        events = self._h2.receive_data(data) if data else [h2.events.ConnectionTerminated()]
        for event in events:
            self._on_h2_event(event)
        replies, self._replies = self._replies, []
        for reply in replies:
            await self._send_data(reply)
        await self._flush()

    def _on_h2_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_seen = True
            self._window_grew.set()
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_grew.set()
        elif isinstance(event, h2.events.ResponseReceived) and event.stream_id == self._id:
            self._headers = list(event.headers or [])
            self._status = int(dict(self._headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived) and event.stream_id == self._id:
            self._h2.acknowledge_received_data(event.flow_controlled_length or 0, self._id)
            if self._status != 200:
                self._body += event.data or b""
            elif self._ws.state is not ConnectionState.CLOSED:  # after the close: ignored
                self._ws.receive_data(event.data)
                self._on_ws_events()  # now: a close frame here comes before the stream's end
        elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
            if event.stream_id == self._id:
                self._end()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._settings_seen = True
            self._end()

    def _end(self) -> None:
        if not self._ended and self._status == 200 and self._ws.state is not ConnectionState.CLOSED:
            self._ws.receive_data(None)  # a stream lost without a close frame is a 1006 close
            self._on_ws_events()
        self._ended = True

    def _on_ws_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    self._texts.append("".join(self._parts))
                    self._parts.clear()
            elif isinstance(event, Ping):
                self._replies.append(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._replies.append(self._ws.send(event.response()))
                self._closed = self._closed or StreamClosed(event.code, event.reason or "")


def _connect_request(authority: str, scheme: str) -> list[tuple[bytes, bytes]]:
    """The pseudo-headers of an RFC 8441 CONNECT to ``/v1/stream``."""
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", scheme.encode("ascii")),
        (b":path", STREAM_PATH.encode("ascii")),
        (b":authority", authority.encode("ascii")),
        (b"sec-websocket-version", b"13"),
    ]


@asynccontextmanager
async def open_h2_transport(
    url: httpx.URL, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None
) -> AsyncIterator[Transport]:
    """An RFC 8441 WebSocket to ``/v1/stream`` on a new HTTP/2 connection of its own."""
    ws = H2WebSocket(await connect(url, ssl_context, alpn="h2"))
    try:
        await ws.handshake(authority(url), url.scheme, headers)
        yield ws
    finally:
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            await ws.aclose()
