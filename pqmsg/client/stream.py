"""Message streams in the SDK: ``GET /v1/stream`` over a WebSocket.

::

    async with open_stream(bob) as stream:             # HTTP/1.1 upgrade
        async for message in stream:
            handle(message)
            await stream.ack([message.id])

    async with open_stream(bob, http2=True) as stream:  # RFC 8441 over HTTP/2
        message = await stream.receive()

Over HTTP/1.1 the stream is a ``trio-websocket`` connection; over HTTP/2 it is
an extended CONNECT (RFC 8441) on its own connection (h2c with prior
knowledge for ``http://``, ALPN ``h2`` for ``https://``), framed by
``wsproto``. Either way the upgrade is signed like a ``GET`` (§3).

The stream answers the server's pings itself. Messages come in the order the
server sent them; :meth:`MessageStream.ack` returns once the server confirms
the ack is durable. The messages not yet taken are buffered without bound:
the server's unacked window (``stream.max_unacked``) bounds them. When the
server closes the stream, :meth:`MessageStream.receive` raises
:class:`StreamClosed` with the code and reason (see
:mod:`pqmsg.routes.stream`), iteration ends, and ``closed`` holds it. A
refused upgrade raises :class:`~pqmsg.client.session.ProblemResponse`.
"""

from __future__ import annotations

import collections
import json
import math
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Protocol

import h2.config
import h2.connection
import h2.events
import httpx
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from pqmsg.client.session import Device, ProblemResponse, ReceivedMessage, sign_headers

if TYPE_CHECKING:
    # Imported where used, so the rest of the SDK works without trio-websocket.
    import trio_websocket

STREAM_PATH = "/v1/stream"
CLOSE_GRACE_S = 5.0
MAX_FRAME_BYTES = 4 * 1024 * 1024  # a 256 KiB ciphertext is ~350 KB as a frame
RECEIVE_BYTES = 65_536
ABNORMAL_CLOSURE = 1006
NORMAL_CLOSURE = 1000
PONG_FRAME = '{"type":"pong"}'


class StreamClosed(Exception):
    """The stream is closed; ``code`` and ``reason`` are the server's (1006: lost)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"stream closed with {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class StreamUnsupported(Exception):
    """The server does not offer WebSockets over HTTP/2 (no RFC 8441 setting, no h2)."""


class Transport(Protocol):
    """A WebSocket carrying text frames; both transports below implement it."""

    async def send(self, text: str) -> None:
        """Send one text frame; StreamClosed once closed."""

    async def receive(self) -> str:
        """The next text frame; StreamClosed when the stream closed."""

    async def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (idempotent)."""


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
    opener = open_h2_transport if http2 else open_h1_transport
    async with opener(device.client.http.base_url, headers, ssl_context) as transport:
        async with trio.open_nursery() as nursery:
            stream = MessageStream(transport)
            await nursery.start(stream._read)
            try:
                yield stream
            finally:
                await stream.aclose()
                nursery.cancel_scope.cancel()


def _problem(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> ProblemResponse:
    """A refused upgrade as the SDK reports any error response."""
    try:
        problem = json.loads(body)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"detail": body.decode("utf-8", errors="replace")}
    names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
    return ProblemResponse(status, problem, names)


def _header_list(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        (name.lower().encode("ascii"), value.encode("ascii")) for name, value in headers.items()
    ]


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


# -- HTTP/1.1: trio-websocket ------------------------------------------------------


class TrioWebsocketTransport:
    """A :class:`Transport` over a ``trio_websocket`` connection."""

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
    from trio_websocket import ConnectionRejected, wrap_client_stream

    stream = await _connect(url, ssl_context, alpn="http/1.1")
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                f"{url.host}:{_port(url)}",
                target,
                extra_headers=_header_list(headers),
                max_message_size=MAX_FRAME_BYTES,
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(CLOSE_GRACE_S, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except* ConnectionRejected as group:
        exc = group.exceptions[0]
        assert isinstance(exc, ConnectionRejected)
        raise _problem(exc.status_code, exc.headers, exc.body or b"") from None
    finally:
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            await stream.aclose()


async def _connect(
    url: httpx.URL, ssl_context: ssl.SSLContext | None, *, alpn: str
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """TCP, and TLS for ``https://``, where ALPN must select ``alpn``.

    A caller's context must offer ``alpn``; mind that ``httpx`` sets its own
    ALPN list on a context it is handed.
    """
    tcp = await trio.open_tcp_stream(url.host, _port(url))
    if url.scheme != "https":
        return tcp
    if ssl_context is None:
        ssl_context = ssl.create_default_context()
        ssl_context.set_alpn_protocols([alpn])
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=url.host, https_compatible=True)
    try:
        await tls.do_handshake()
        selected = tls.selected_alpn_protocol()
        if selected != alpn and not (selected is None and alpn == "http/1.1"):
            raise StreamUnsupported(f"TLS selected {selected or 'no protocol'}, not {alpn}")
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


# -- HTTP/2: RFC 8441 extended CONNECT ---------------------------------------------


class H2WebSocket:
    """A :class:`Transport`: a WebSocket on one HTTP/2 stream (RFC 8441).

    One task receives (it also answers pings and opens flow-control windows);
    others may send. Writes to the socket go through one lock, and the DATA
    of one WebSocket frame is never interleaved with another's.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config)
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
        self._h2.initiate_connection()
        await self._flush()
        while not self._settings_seen:
            await self._pump()
        if not self._h2.remote_settings.enable_connect_protocol:
            raise StreamUnsupported("the server does not offer RFC 8441 (extended CONNECT)")
        self._id = self._h2.get_next_available_stream_id()
        request = [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", scheme.encode("ascii")),
            (b":path", STREAM_PATH.encode("ascii")),
            (b":authority", authority.encode("ascii")),
            (b"sec-websocket-version", b"13"),
        ]
        self._h2.send_headers(self._id, request + _header_list(headers))
        await self._flush()
        while self._status is None and not self._ended:
            await self._pump()
        if self._status != 200:
            while not self._ended:
                await self._pump()
            raise _problem(self._status or 502, self._headers, bytes(self._body))

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


@asynccontextmanager
async def open_h2_transport(
    url: httpx.URL, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None
) -> AsyncIterator[Transport]:
    """An RFC 8441 WebSocket to ``/v1/stream`` on a new HTTP/2 connection of its own."""
    ws = H2WebSocket(await _connect(url, ssl_context, alpn="h2"))
    try:
        await ws.handshake(f"{url.host}:{_port(url)}", url.scheme, headers)
        yield ws
    finally:
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            await ws.aclose()


__all__ = [
    "MessageStream",
    "StreamClosed",
    "StreamUnsupported",
    "Transport",
    "open_stream",
]
