"""One bad request must not end Hypercorn's trio server (``pqmsg.hypercorn_h2_errors``).

Each probe sends one request that Hypercorn 0.18.0 mishandles in the
connection's own task, to a bare Quart-Trio app under ``hypercorn.trio.serve``
on loopback (h2c with prior knowledge, or HTTP/1.1). Unpatched, each one ends
``serve()`` with the error the module docstring traces. Patched, each gets
an answer for its own stream, and the connection and the server go on
serving. The HTTP/2 clients are raw ``h2`` state machines, so they can send
what client libraries refuse to: bytes over 0x7F in ``:path``, a CONNECT
without ``:path``, a body after the response.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress

import attrs
import h2.config
import h2.connection
import h2.events
import pytest
import trio
from h2.errors import ErrorCodes
from hypercorn.config import Config
from hypercorn.protocol import http_stream
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio import serve
from priority.priority import PriorityLoop, TooManyStreamsError
from quart import request, websocket
from quart_trio import QuartTrio

from pqmsg import hypercorn_h2_errors

HOST = "127.0.0.1"
AUTHORITY = "localhost"
LIMIT_BYTES = 1024  # the app's MAX_CONTENT_LENGTH
DECLARED_BYTES = 1024 * 1024  # what an oversized upload announces, and tries to send
# HTTP/2's initial connection window: discarded data beyond it must be credited back.
CONNECTION_WINDOW_BYTES = 65_535
RECEIVE_BYTES = 65_536
# More than the 1000 streams priority.PriorityTree holds; more than 100 levels deep.
PRIORITY_FRAMES = 1001
PRIORITY_CHAIN = 110
TEST_DEADLINE_S = 10
# Unpatched, serve() ends a few milliseconds after the request that kills it.
DEATH_GRACE_S = 2


def make_app() -> QuartTrio:
    """Routes for the probes; an upload limit that answers 413 before reading the body."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = LIMIT_BYTES

    @app.route("/ping")
    async def ping() -> bytes:
        return b"pong"

    @app.route("/upload", methods=["POST"])
    async def upload() -> bytes:
        return str(len(await request.get_data())).encode()

    @app.route("/hold")
    async def hold() -> bytes:
        await trio.sleep_forever()  # until the client leaves: Quart-Trio cancels it
        raise AssertionError("unreachable")

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        await websocket.send("hello")

    return app


# -- server ---------------------------------------------------------------------


@attrs.define
class ServerRun:
    """A ``serve()`` call in the background: its port, and how it ended."""

    port: int = 0
    ended: trio.Event = attrs.Factory(trio.Event)
    error: BaseExceptionGroup[BaseException] | None = None

    def crashes(self) -> list[type[BaseException]]:
        """The type of every exception that ended ``serve()``."""
        return [type(leaf) for leaf in leaves(self.error)] if self.error else []


def leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaves(exc)
        else:
            yield exc


@asynccontextmanager
async def serving(*, server_names: tuple[str, ...] = ()) -> AsyncIterator[ServerRun]:
    """Serve ``make_app()`` on a free loopback port until the block ends.

    When ``serve()`` raises, the error goes to ``ServerRun.error``, not into
    the test: a server dying is the outcome these tests look at.
    """
    config = Config()
    config.bind = [f"{HOST}:0"]
    config.server_names = list(server_names)
    config.h2_max_concurrent_streams = 128  # as pqmsg.server configures it
    run = ServerRun()
    stop = trio.Event()

    async def run_serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(make_app(), config, shutdown_trigger=stop.wait, task_status=task_status)
        except* Exception as group:
            run.error = group
        finally:
            run.ended.set()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run_serve)
        run.port = int(binds[0].rsplit(":", 1)[1])
        try:
            yield run
        finally:
            stop.set()


# -- clients --------------------------------------------------------------------


@attrs.define
class StreamState:
    """What the server has said on one stream."""

    status: int | None = None
    body: bytearray = attrs.Factory(bytearray)
    ended: bool = False
    reset: ErrorCodes | None = None

    @property
    def closed(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """One h2c connection that sends whatever it is told to, valid or not."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.streams: dict[int, StreamState] = {}

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[H2Client]:
        async with await trio.open_tcp_stream(HOST, port) as stream:
            client = cls(stream)
            client.h2.initiate_connection()
            await client.flush()
            yield client

    def open(
        self,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool = True,
        depends_on: int | None = None,
    ) -> int:
        """Queue a HEADERS frame on a new stream; return the stream id."""
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id, headers, end_stream=end_stream, priority_depends_on=depends_on
        )
        self.streams[stream_id] = StreamState()
        return stream_id

    async def flush(self) -> None:
        if data := self.h2.data_to_send():
            await self._stream.send_all(data)

    async def receive(self) -> None:
        """Read once from the server and record what it says; EOFError if it closed."""
        data = await self._stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise EOFError("the server closed the connection")
        for event in self.h2.receive_data(data):
            state = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if state is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                state.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                state.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                state.ended = True
            elif isinstance(event, h2.events.StreamReset):
                state.reset = ErrorCodes(event.error_code)
        await self.flush()

    async def wait_closed(self, *stream_ids: int) -> None:
        await self.flush()
        while not all(self.streams[stream_id].closed for stream_id in stream_ids):
            await self.receive()

    async def call(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int | None, bytes, ErrorCodes | None]:
        """One well-formed request on this connection: status, body, reset code."""
        stream_id = self.open(request_headers(method, path.encode()), end_stream=not body)
        if body:
            await self.send_body(stream_id, body)
        await self.wait_closed(stream_id)
        state = self.streams[stream_id]
        return state.status, bytes(state.body), state.reset

    async def send_body(self, stream_id: int, body: bytes) -> None:
        """Send ``body`` and END_STREAM, waiting for flow-control credit as needed."""
        while body:
            room = min(
                self.h2.local_flow_control_window(stream_id),
                self.h2.max_outbound_frame_size,
                len(body),
            )
            if room > 0:
                self.h2.send_data(stream_id, body[:room], end_stream=room == len(body))
                body = body[room:]
                await self.flush()
            else:
                await self.receive()

    async def upload_until_stopped(self, stream_ids: list[int], size: int) -> int:
        """Send each stream ``size`` bytes, a frame per stream in turn, as flow control
        allows, until the server resets every one. Return the bytes sent."""
        sent = dict.fromkeys(stream_ids, 0)
        while any(self.streams[stream_id].reset is None for stream_id in stream_ids):
            progressed = False
            for stream_id in stream_ids:
                if self.streams[stream_id].reset is not None or sent[stream_id] == size:
                    continue
                room = min(
                    self.h2.local_flow_control_window(stream_id),
                    self.h2.max_outbound_frame_size,
                    size - sent[stream_id],
                )
                if room > 0:
                    last = sent[stream_id] + room == size
                    self.h2.send_data(stream_id, b"x" * room, end_stream=last)
                    sent[stream_id] += room
                    progressed = True
            await self.flush()
            if not progressed:
                await self.receive()
        return sum(sent.values())


def request_headers(
    method: str, path: bytes, *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", AUTHORITY.encode()),
        (b":path", path),
        *extra,
    ]


def websocket_headers(path: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """An RFC 8441 extended CONNECT for a WebSocket over HTTP/2."""
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":authority", AUTHORITY.encode()),
        (b":path", path),
        (b"sec-websocket-version", b"13"),
        *extra,
    ]


async def http1(port: int, head: bytes) -> int:
    """Send one HTTP/1.1 request head as given; return the response's status."""
    async with await trio.open_tcp_stream(HOST, port) as stream:
        await stream.send_all(head + b"\r\n")
        response = b""
        while b"\r\n" not in response:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise EOFError("the server closed the connection")
            response += data
        return int(response.split(b" ", 2)[1])


def websocket_upgrade(*extra: bytes, connection: bytes = b"Upgrade") -> bytes:
    return b"\r\n".join(
        [
            b"GET /ws HTTP/1.1",
            b"Host: " + AUTHORITY.encode(),
            b"Upgrade: websocket",
            b"Connection: " + connection,
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
            *extra,
            b"",
        ]
    )


async def ping(port: int) -> tuple[int | None, bytes, ErrorCodes | None]:
    """A well-formed GET /ping on a fresh connection."""
    async with H2Client.connect(port) as client:
        return await client.call("GET", "/ping")


PONG = (200, b"pong", None)


# -- probes: one bad request each ----------------------------------------------------


# What the client saw: the bad request's status and reset code, and what a
# well-formed GET /ping got afterwards on the same connection (None over
# HTTP/1.1, where a 400 closes the connection).
Answer = tuple[int | None, ErrorCodes | None, tuple[int | None, bytes, ErrorCodes | None] | None]


async def bad_h2_request(
    port: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = True
) -> Answer:
    async with H2Client.connect(port) as client:
        stream_id = client.open(headers, end_stream=end_stream)
        await client.wait_closed(stream_id)
        state = client.streams[stream_id]
        return state.status, state.reset, await client.call("GET", "/ping")


async def oversized_upload(port: int) -> Answer:
    """A body over the limit, sent after the app's early 413 (bug 1)."""
    async with H2Client.connect(port) as client:
        upload = request_headers("POST", b"/upload", (b"content-length", b"%d" % DECLARED_BYTES))
        stream_id = client.open(upload, end_stream=False)
        await client.wait_closed(stream_id)
        await client.upload_until_stopped([stream_id], DECLARED_BYTES)
        state = client.streams[stream_id]
        return state.status, state.reset, await client.call("GET", "/ping")


async def priority_flood(port: int) -> Answer:
    """PRIORITY frames for more streams than the priority tree holds; no request."""
    async with H2Client.connect(port) as client:
        for stream_id in range(1, 2 * PRIORITY_FRAMES, 2):
            client.h2.prioritize(stream_id, weight=16)
        return None, None, await client.call("GET", "/ping")


async def deep_priority_chain(port: int) -> Answer:
    """Open streams that each depend on the one before, then one under the deepest."""
    async with H2Client.connect(port) as client:
        hold = request_headers("GET", b"/hold")
        parent = 0
        for _ in range(PRIORITY_CHAIN):
            parent = client.open(hold, depends_on=parent)
        await client.flush()
        client.h2.prioritize(client.open(hold), depends_on=parent)
        return None, None, await client.call("GET", "/ping")


@attrs.frozen
class Probe:
    """One bad request: what the patched server answers, what the unpatched one dies of."""

    id: str
    send: Callable[[int], Awaitable[Answer]]
    answer: Answer
    crash: type[Exception]
    server_names: tuple[str, ...] = ()


def h2_probe(
    id: str,
    headers: list[tuple[bytes, bytes]],
    answer: tuple[int, ErrorCodes | None],
    crash: type[Exception],
    *,
    end_stream: bool = True,
    server_names: tuple[str, ...] = (),
) -> Probe:
    async def send(port: int) -> Answer:
        return await bad_h2_request(port, headers, end_stream=end_stream)

    return Probe(id, send, (*answer, PONG), crash, server_names)


def h1_probe(
    id: str, head: bytes, status: int, crash: type[Exception], server_names: tuple[str, ...] = ()
) -> Probe:
    async def send(port: int) -> Answer:
        return await http1(port, head), None, None

    return Probe(id, send, (status, None, None), crash, server_names)


SERVER_NAMES = (AUTHORITY,)  # Hypercorn decodes Host only when server_names is set
PROBES = [
    Probe("oversized body after 413", oversized_upload, (413, ErrorCodes.NO_ERROR, PONG), KeyError),
    h2_probe(
        "non-ASCII :path",
        request_headers("GET", "/caf\u00e9".encode()),
        (400, None),
        UnicodeDecodeError,
    ),
    h2_probe(
        "non-ASCII :path, body to follow",
        request_headers("POST", "/caf\u00e9".encode()),
        (400, ErrorCodes.PROTOCOL_ERROR),
        UnicodeDecodeError,
        end_stream=False,
    ),
    h2_probe(
        "non-ASCII :method",
        request_headers("G\u00c9T", b"/ping"),
        (400, None),
        UnicodeDecodeError,
    ),
    h2_probe(
        "ordinary CONNECT, no :path",
        [(b":method", b"CONNECT"), (b":authority", b"example.com:443")],
        (400, None),
        UnboundLocalError,
    ),
    h2_probe(
        "WebSocket over HTTP/2, non-ASCII :path",
        websocket_headers("/caf\u00e9".encode()),
        (400, ErrorCodes.PROTOCOL_ERROR),
        UnicodeDecodeError,
        end_stream=False,
    ),
    h2_probe(
        "WebSocket over HTTP/2, non-ASCII Sec-WebSocket-Protocol",
        websocket_headers(b"/ws", (b"sec-websocket-protocol", "caf\u00e9".encode())),
        (400, None),
        UnicodeDecodeError,
        end_stream=False,
    ),
    h2_probe(
        "WebSocket over HTTP/2, non-ASCII Sec-WebSocket-Extensions",
        websocket_headers(b"/ws", (b"sec-websocket-extensions", b"\xff")),
        (400, None),
        UnicodeDecodeError,
        end_stream=False,
    ),
    h1_probe(
        "WebSocket over HTTP/1.1, non-ASCII Sec-WebSocket-Protocol",
        websocket_upgrade("Sec-WebSocket-Protocol: caf\u00e9".encode()),
        400,
        UnicodeDecodeError,
    ),
    h1_probe(
        "WebSocket over HTTP/1.1, non-ASCII Connection token",
        websocket_upgrade(connection=b"Upgrade, \xff"),
        400,
        UnicodeDecodeError,
    ),
    h2_probe(
        "HTTP/2 :authority not UTF-8, server_names set",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"\xff"), (b":path", b"/")],
        (404, None),
        UnicodeDecodeError,
        server_names=SERVER_NAMES,
    ),
    h1_probe(
        "HTTP/1.1 Host not UTF-8, server_names set",
        b"GET /ping HTTP/1.1\r\nHost: \xff\r\n",
        404,
        UnicodeDecodeError,
        server_names=SERVER_NAMES,
    ),
    Probe("1001 PRIORITY frames", priority_flood, (None, None, PONG), TooManyStreamsError),
    Probe("priority chain 110 deep", deep_priority_chain, (None, None, PONG), PriorityLoop),
]


@pytest.fixture
def unpatched() -> Iterator[None]:
    """Run with Hypercorn's own code; restore the prior state after."""
    was_applied = hypercorn_h2_errors.is_applied()
    hypercorn_h2_errors.revert()
    yield
    if was_applied:
        hypercorn_h2_errors.apply()


@pytest.fixture
def patched() -> Iterator[None]:
    """Run with the fixes applied; restore the prior state after."""
    was_applied = hypercorn_h2_errors.is_applied()
    hypercorn_h2_errors.apply()
    yield
    if not was_applied:
        hypercorn_h2_errors.revert()


# -- tests ----------------------------------------------------------------------


@pytest.mark.usefixtures("unpatched")
@pytest.mark.parametrize("probe", PROBES, ids=lambda probe: probe.id)
async def test_unpatched_hypercorn_dies_of_one_bad_request(probe: Probe) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(server_names=probe.server_names) as server:
            # The client sees its connection end, however it ends.
            with suppress(EOFError, trio.BrokenResourceError):
                await probe.send(server.port)
            with trio.move_on_after(DEATH_GRACE_S):
                await server.ended.wait()

    assert server.crashes() == [probe.crash], server.error


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("probe", PROBES, ids=lambda probe: probe.id)
async def test_patched_hypercorn_answers_the_bad_request_and_serves_on(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(server_names=probe.server_names) as server:
            assert await probe.send(server.port) == probe.answer
            assert await ping(server.port) == PONG

    assert server.error is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("streams", [1, 5])
async def test_uploads_answered_early_are_stopped_and_their_data_credited(streams: int) -> None:
    """Bug 1 on several streams of one connection.

    Five streams discard more data than the connection's whole window: unless
    its credit comes back, the upload after them stalls.
    """
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving() as server, H2Client.connect(server.port) as client:
            upload = request_headers(
                "POST", b"/upload", (b"content-length", b"%d" % DECLARED_BYTES)
            )
            stream_ids = [client.open(upload, end_stream=False) for _ in range(streams)]
            await client.wait_closed(*stream_ids)
            assert [client.streams[s].status for s in stream_ids] == [413] * streams

            sent = await client.upload_until_stopped(stream_ids, DECLARED_BYTES)

            # RFC 9113 §8.1: the response is complete, so stop sending, without error.
            assert [client.streams[s].reset for s in stream_ids] == [ErrorCodes.NO_ERROR] * streams
            assert streams == 1 or sent > CONNECTION_WINDOW_BYTES
            assert await client.call("POST", "/upload", b"x" * LIMIT_BYTES) == (200, b"1024", None)
            assert await client.call("GET", "/ping") == PONG
            assert await ping(server.port) == PONG

    assert server.error is None


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/caf\u00e9".encode(), 400),
        ("/ping?q=caf\u00e9".encode(), 400),
        (b"/a b", 400),
        (b"/a\x7f", 400),
        (b"/ping?q=caf%C3%A9", 200),
        (b"/ping?q=~!$&'()*+,;=:@/", 200),
    ],
)
async def test_http2_refuses_the_request_targets_http1_refuses(target: bytes, status: int) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving() as server:
            h1_status = await http1(
                server.port, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n"
            )
            async with H2Client.connect(server.port) as client:
                stream_id = client.open(request_headers("GET", target))
                await client.wait_closed(stream_id)

    assert (h1_status, client.streams[stream_id].status) == (status, status)
    assert server.error is None


@pytest.mark.usefixtures("unpatched")
def test_apply_is_idempotent_and_revert_restores_hypercorn() -> None:
    upstream = H2Protocol._handle_events, http_stream.valid_server_name
    hypercorn_h2_errors.apply()
    patched = H2Protocol._handle_events, http_stream.valid_server_name
    hypercorn_h2_errors.apply()

    assert hypercorn_h2_errors.is_applied()
    assert (H2Protocol._handle_events, http_stream.valid_server_name) == patched
    assert patched[0] is not upstream[0] and patched[1] is not upstream[1]

    hypercorn_h2_errors.revert()
    hypercorn_h2_errors.revert()
    assert not hypercorn_h2_errors.is_applied()
    assert (H2Protocol._handle_events, http_stream.valid_server_name) == upstream


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_another_hypercorn_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.19.0")

    with pytest.raises(hypercorn_h2_errors.HypercornH2PatchError, match=r"0\.19\.0"):
        hypercorn_h2_errors.apply()
    assert not hypercorn_h2_errors.is_applied()


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_an_unrecognised_target_and_patches_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def someone_elses(config: Config, request: object) -> bool:
        return True

    monkeypatch.setattr(http_stream, "valid_server_name", someone_elses)
    upstream_handle_events = H2Protocol._handle_events

    with pytest.raises(hypercorn_h2_errors.HypercornH2PatchError, match="not the function"):
        hypercorn_h2_errors.apply()
    assert http_stream.valid_server_name is someone_elses
    assert H2Protocol._handle_events is upstream_handle_events
