"""A lean multiplexed HTTP/2 client (h2c prior knowledge, or TLS with ALPN h2).

httpx costs the harness about 1 ms of CPU per request, as much as the bare
Quart-Trio app costs the server, so on a small machine it would make the
harness, not the server, the limit. This client drives the ``h2`` state
machine directly on one trio socket: one reader task per connection
dispatches responses to waiting requests; writes go through one lock.

When the server sends GOAWAY (Hypercorn does after ``keep_alive_max_requests``
requests on a connection), requests on streams above its last stream id
were never processed and are retried on a new connection; the others still
get their answers on the old one, which closes when the server closes it.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import attrs
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

RECEIVE_BYTES = 65_536
WINDOW_BYTES = 2**31 - 1
DEFAULT_WINDOW_BYTES = 65_535
MAX_STREAMS = 120  # Hypercorn's h2_max_concurrent_streams is 128
MAX_ATTEMPTS = 3
# Hypercorn sends GOAWAY after keep_alive_max_requests (1000) requests on a
# connection and then cannot answer the streams it still had in flight: the
# client opens a fresh connection before that, and gives up on a stream the
# GOAWAY left unanswered after GOAWAY_GRACE_S.
ROTATE_AFTER_REQUESTS = 900
GOAWAY_GRACE_S = 2.0


class TransportError(Exception):
    """No HTTP answer: the connection failed or closed under the request."""


class MaybeProcessed(TransportError):
    """The connection went away under the request; the server may have handled it."""


class _Refused(Exception):
    """The server never processed this stream (GOAWAY below it): safe to retry."""


@attrs.define
class _Pending:
    done: trio.Event = attrs.field(factory=trio.Event)
    status: int = 0
    body: bytearray = attrs.field(factory=bytearray)
    error: Exception | None = None


class _Connection:
    def __init__(self, stream: trio.abc.Stream, authority: bytes, scheme: bytes) -> None:
        self._stream = stream
        self._authority = authority
        self._scheme = scheme
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._write_lock = trio.Lock()
        self._window = trio.Event()
        self._pending: dict[int, _Pending] = {}
        self._reader = trio.CancelScope()
        self.usable = True
        self.goaway = False
        self.started = 0

    async def start(self, nursery: trio.Nursery) -> None:
        self._h2.initiate_connection()
        self._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW_BYTES})
        self._h2.increment_flow_control_window(WINDOW_BYTES - DEFAULT_WINDOW_BYTES)
        await self._flush()
        nursery.start_soon(self._read_loop)

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> _Pending:
        pending = _Pending()
        async with self._write_lock:
            if not self.usable:
                raise _Refused("connection going away")
            stream_id = self._h2.get_next_available_stream_id()
            block = [
                (b":method", method.encode()), (b":scheme", self._scheme),
                (b":authority", self._authority), (b":path", target.encode()),
                *((k.lower().encode(), v.encode()) for k, v in headers),
            ]
            if body:
                block.append((b"content-length", str(len(body)).encode()))
            self._pending[stream_id] = pending
            self.started += 1
            try:
                self._h2.send_headers(stream_id, block, end_stream=not body)
                await self._flush()
            except (h2.exceptions.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._pending.pop(stream_id, None)
                raise _Refused(str(exc)) from exc
        try:
            if body:
                await self._send_body(stream_id, body, pending)
            while not pending.done.is_set():
                with trio.move_on_after(GOAWAY_GRACE_S):
                    await pending.done.wait()
                if not pending.done.is_set() and self.goaway:
                    self._pending.pop(stream_id, None)
                    raise MaybeProcessed("GOAWAY left this stream unanswered")
        except (h2.exceptions.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._pending.pop(stream_id, None)
            raise MaybeProcessed(str(exc)) from exc
        finally:
            if not self.usable and not self._pending:
                self._reader.cancel()
        if pending.error is not None:
            raise pending.error
        return pending

    def retire(self) -> None:
        """Take no new requests; close once the ones in flight are answered."""
        self.usable = False
        if not self._pending:
            self._reader.cancel()

    async def _send_body(self, stream_id: int, body: bytes, pending: _Pending) -> None:
        """Send DATA as the flow-control windows allow; wait for updates without the lock."""
        view = memoryview(body)
        while view and not pending.done.is_set():
            async with self._write_lock:
                try:
                    window = self._h2.local_flow_control_window(stream_id)
                except h2.exceptions.StreamClosedError:
                    return  # answered (or reset) before the whole body went out
                size = min(window, self._h2.max_outbound_frame_size, len(view))
                if size > 0:
                    chunk, view = view[:size], view[size:]
                    self._h2.send_data(stream_id, bytes(chunk), end_stream=not view)
                    await self._flush()
                    continue
                window_changed = self._window
            await window_changed.wait()

    async def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            await self._stream.send_all(data)

    async def _read_loop(self) -> None:
        error: Exception = TransportError("connection closed")
        try:
            with self._reader:
                await self._read_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h2.exceptions.ProtocolError) as exc:
            error = TransportError(str(exc))
        finally:
            self.usable = False
            for pending in self._pending.values():
                pending.error = pending.error or error
                pending.done.set()
            self._pending.clear()
            self._window.set()
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _read_forever(self) -> None:
        while True:
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                return
            for event in self._h2.receive_data(data):
                self._on_event(event)
            async with self._write_lock:
                await self._flush()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            if (p := self._pending.get(event.stream_id)) is not None:
                p.status = int(dict(event.headers or [])[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            if (p := self._pending.get(event.stream_id)) is not None:
                p.body += event.data or b""
            self._h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            if (p := self._pending.pop(event.stream_id or 0, None)) is not None:
                if isinstance(event, h2.events.StreamReset):
                    p.error = _Refused("stream refused") if event.error_code == 7 else TransportError("reset")
                p.done.set()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
            self._window = trio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.usable = False
            self.goaway = True
            last = event.last_stream_id or 0
            for stream_id in [s for s in self._pending if s > last]:
                p = self._pending.pop(stream_id)
                p.error = _Refused("above GOAWAY's last stream")
                p.done.set()


class H2Client:
    """One logical HTTP/2 client; reconnects after GOAWAY. Use as an async context manager."""

    def __init__(self, url: str, *, verify: bool = True) -> None:
        split = urlsplit(url)
        self._host = split.hostname or "127.0.0.1"
        self._tls = split.scheme == "https"
        self._port = split.port or (443 if self._tls else 80)
        self._authority = f"{self._host}:{self._port}".encode()
        self._verify = verify
        self._conn: _Connection | None = None
        self._connect_lock = trio.Lock()
        self._streams = trio.Semaphore(MAX_STREAMS)
        self._nursery: trio.Nursery | None = None
        self._cm = trio.open_nursery()
        self.reconnects = 0
        self.goaways = 0

    async def __aenter__(self) -> H2Client:
        self._nursery = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._cm.__aexit__(None, None, None)

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, bytes]:
        async with self._streams:
            for _ in range(MAX_ATTEMPTS):
                conn = await self._connection()
                try:
                    pending = await conn.request(method, target, headers, body)
                except _Refused:
                    continue
                return pending.status, bytes(pending.body)
        raise TransportError("refused on every attempt")

    async def _connection(self) -> _Connection:
        async with self._connect_lock:
            if self._conn is not None and self._conn.started >= ROTATE_AFTER_REQUESTS:
                self._conn.retire()
            if self._conn is None or not self._conn.usable:
                assert self._nursery is not None
                if self._conn is not None:
                    self.reconnects += 1
                    self.goaways += self._conn.goaway
                stream: trio.abc.Stream
                if self._tls:
                    ctx = ssl.create_default_context()
                    ctx.set_alpn_protocols(["h2"])
                    if not self._verify:
                        ctx.check_hostname = False
                        ctx.verify_mode = ssl.CERT_NONE
                    stream = await trio.open_ssl_over_tcp_stream(self._host, self._port, ssl_context=ctx)
                else:
                    stream = await trio.open_tcp_stream(self._host, self._port)
                self._conn = _Connection(stream, self._authority, b"https" if self._tls else b"http")
                await self._conn.start(self._nursery)
            return self._conn
