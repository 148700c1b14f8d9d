"""Streams that end early must not hold their connection (``pqmsg.hypercorn_leaks``).

Each test serves a bare app with ``hypercorn.trio.serve`` on loopback and
talks to it with a raw ``h2`` client (h2c, prior knowledge), or raw HTTP/1.1
bytes, so it can do what client libraries do not: stop reading, reset a
stream, send WebSocket data before the server has accepted. "Patched" runs
all four Hypercorn patches, as ``pqmsg.server`` does; "unpatched" reverts
``pqmsg.hypercorn_leaks`` only.

A connection that holds nothing is closed by ``keep_alive_timeout``
(``pqmsg.hypercorn_drain`` restarts that timer, and closes with GOAWAY). So
"the connection is released" is checked as "the server closes it within
``RELEASE_BOUND_S``", and a leak as "still open after ``HELD_S``", ten
keep-alive timeouts. The client never closes first: it keeps reading.
"""

from __future__ import annotations

import importlib.metadata
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
from hypercorn.config import Config
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio import serve
from quart_trio import QuartTrio

from pqmsg import hypercorn_drain, hypercorn_h2_errors, hypercorn_leaks, hypercorn_patch

HOST = "127.0.0.1"
AUTHORITY = b"localhost"
TEST_DEADLINE_S = 30
KEEP_ALIVE_TIMEOUT_S = 0.1
RELEASE_BOUND_S = 2.0
HELD_S = 1.0
# Teardown waits this long for what an unpatched server leaks.
GRACEFUL_TIMEOUT_S = 1.0
# HTTP/2's initial window: a client that never acknowledges data stalls the
# response once it has received this much (RFC 9113 §6.9.2).
INITIAL_WINDOW_BYTES = 65_535
BIG_BODY_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 16 * 1024
# Chunks an app may feed into a stream after the client reset it. Cancelled
# at its next checkpoint, it feeds a few; one that never yields feeds forever.
SPIN_LIMIT = 10_000
SPIN_ROUNDS = 5
UNPATCHED_MAX_SPIN_ROUNDS = 30
RECEIVE_BYTES = 65_536
# A masked WebSocket text frame, "hi" (RFC 6455 §5.2), as a client sends it.
WEBSOCKET_FRAME = b"\x81\x82abcd\x09\x0b"

OTHER_PATCHES = (hypercorn_patch, hypercorn_drain, hypercorn_h2_errors)


@pytest.fixture
def patched() -> Iterator[None]:
    """All four patches, in the server's order; restore the prior state after."""
    with restored():
        for patch in (*OTHER_PATCHES, hypercorn_leaks):
            patch.apply()
        yield


@pytest.fixture
def unpatched() -> Iterator[None]:
    """The three other patches, without ``hypercorn_leaks``; restore after."""
    with restored():
        hypercorn_leaks.revert()
        for patch in OTHER_PATCHES:
            patch.apply()
        yield


@contextmanager
def restored() -> Iterator[None]:
    """Put the four patches back the way the block found them."""
    were_applied = [(patch, patch.is_applied()) for patch in (hypercorn_leaks, *OTHER_PATCHES)]
    try:
        yield
    finally:
        for patch, was_applied in were_applied:
            if was_applied:
                patch.apply()
            else:
                patch.revert()


# -- apps and server ------------------------------------------------------------


@attrs.define
class AppState:
    """What the app did; ``reset_sent`` is set by the client side."""

    handler_ended: trio.Event = attrs.Factory(trio.Event)
    body_sent: trio.Event = attrs.Factory(trio.Event)
    reset_sent: bool = False
    spun: bool = False


def make_app(state: AppState) -> QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/big")
    async def big() -> bytes:
        return b"x" * BIG_BODY_BYTES

    @app.route("/endless")
    async def endless() -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            # Never awaits: only Hypercorn's send can let it be cancelled.
            fed_after_reset = 0
            while True:
                if state.reset_sent:
                    fed_after_reset += 1
                    if fed_after_reset > SPIN_LIMIT:
                        state.spun = True
                        return
                yield b"y" * CHUNK_BYTES

        return chunks()

    @app.websocket("/ws")
    async def ws() -> None:
        try:
            await trio.sleep_forever()  # not accepted yet: until the client leaves
        finally:
            state.handler_ended.set()

    return app


def make_raw_app(state: AppState) -> Callable[..., Awaitable[None]]:
    """An ASGI app that never reads ``http.disconnect``, as ASGI allows."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            for event in ("startup", "shutdown"):
                assert (await receive())["type"] == f"lifespan.{event}"
                await send({"type": f"lifespan.{event}.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * BIG_BODY_BYTES})
        state.body_sent.set()

    return app


@asynccontextmanager
async def serving(app: object) -> AsyncIterator[int]:
    """Serve ``app`` on a free loopback port until the block ends; yield the port."""
    config = Config()
    config.bind = [f"{HOST}:0"]
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    stop = trio.Event()

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        try:
            yield int(binds[0].rsplit(":", 1)[1])
        finally:
            stop.set()


# -- clients ---------------------------------------------------------------------


class H2Client:
    """An h2c connection with the default windows, which it never reopens."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[H2Client]:
        async with await trio.open_tcp_stream(HOST, port) as stream:
            client = cls(stream)
            client.h2.initiate_connection()
            await client.flush()
            # Extended CONNECT needs the server's SETTINGS (RFC 8441 §3).
            await client.receive_until(h2.events.RemoteSettingsChanged)
            yield client

    async def flush(self) -> None:
        if data := self.h2.data_to_send():
            await self.stream.send_all(data)

    async def receive(self) -> list[h2.events.Event]:
        data = await self.stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise EOFError("the server closed the connection")
        events = self.h2.receive_data(data)
        await self.flush()
        return events

    async def receive_until(self, kind: type[h2.events.Event]) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        while not any(isinstance(event, kind) for event in seen):
            seen += await self.receive()
        return seen

    async def get(self, path: bytes) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", AUTHORITY)]
        self.h2.send_headers(stream_id, [*headers, (b":path", path)], end_stream=True)
        await self.flush()
        return stream_id

    async def released_by_server(self) -> bool:
        """Read until the server closes the connection: True within the bound, else False."""
        with trio.move_on_after(RELEASE_BOUND_S):
            try:
                while True:
                    await self.receive()
            except EOFError:
                return True
        return False

    async def still_open_after(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            try:
                while True:
                    await self.receive()
            except EOFError:
                return False
        return True

    def abort(self) -> None:
        """Close the socket so the kernel sends RST (SO_LINGER 0): the client is gone."""
        self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stream.socket.close()


def websocket_connect(path: bytes, version: bytes = b"13") -> list[tuple[bytes, bytes]]:
    """An RFC 8441 extended CONNECT for a WebSocket over HTTP/2."""
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":authority", AUTHORITY),
        (b":path", path),
        (b"sec-websocket-version", version),
    ]


async def stall_then_reset(client: H2Client, path: bytes, state: AppState | None = None) -> None:
    """Take a response until the window is spent, then reset the stream."""
    stream_id = await client.get(path)
    received = 0
    while received < INITIAL_WINDOW_BYTES:
        for event in await client.receive():
            if isinstance(event, h2.events.DataReceived):
                received += event.flow_controlled_length
    client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    if state is not None:
        state.reset_sent = True  # before the send: a spinning app would not let us back
    await client.flush()


async def read_then_reset(client: H2Client, state: AppState) -> None:
    """Read (and credit) a streamed response for a while, then reset it: the window is open."""
    stream_id = await client.get(b"/endless")
    received = 0
    while received < 4 * INITIAL_WINDOW_BYTES:
        for event in await client.receive():
            if isinstance(event, h2.events.DataReceived):
                received += event.flow_controlled_length
                client.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
    client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    state.reset_sent = True  # before the send: a spinning app would not let us back
    await client.flush()


async def endless_response_reset(port: int, state: AppState, *, window_open: bool) -> bool:
    """Reset an endless response; return whether the app fed the gone stream ``SPIN_LIMIT`` chunks."""
    state.reset_sent, state.spun = False, False
    async with H2Client.connect(port) as client:
        if window_open:
            await read_then_reset(client, state)
        else:
            await stall_then_reset(client, b"/endless", state)
        await client.still_open_after(KEEP_ALIVE_TIMEOUT_S)
    return state.spun


async def refused_websocket_h2(port: int) -> int:
    """Open a WebSocket over HTTP/2, send a frame before the app accepts, leave; return the status."""
    async with H2Client.connect(port) as client:
        stream_id = client.h2.get_next_available_stream_id()
        client.h2.send_headers(stream_id, websocket_connect(b"/ws"))
        client.h2.send_data(stream_id, WEBSOCKET_FRAME)
        await client.flush()
        events = await client.receive_until(h2.events.StreamEnded)
        (response,) = (e for e in events if isinstance(e, h2.events.ResponseReceived))
        client.abort()
    return int(dict(response.headers)[b":status"])


async def refused_websocket_h1(port: int) -> int:
    """The same over HTTP/1.1: the upgrade request and a frame in one write."""
    async with await trio.open_tcp_stream(HOST, port) as stream:
        head = (
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await stream.send_all(head + WEBSOCKET_FRAME)
        response = b""
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(RECEIVE_BYTES)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return int(response.split(b" ", 2)[1])


async def refused_websocket(port: int, *, http2: bool) -> int:
    return await (refused_websocket_h2 if http2 else refused_websocket_h1)(port)


# -- leak 1: a stream's buffer outlives the stream -------------------------------


@pytest.mark.usefixtures("patched")
async def test_reset_of_a_stalled_response_releases_the_connection() -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app(AppState())) as port, H2Client.connect(port) as client:
            await stall_then_reset(client, b"/big")
            assert await client.released_by_server()


@pytest.mark.usefixtures("unpatched")
async def test_unpatched_reset_of_a_stalled_response_holds_the_connection() -> None:
    """The unsent body stays buffered, so the connection is never idle."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app(AppState())) as port, H2Client.connect(port) as client:
            await stall_then_reset(client, b"/big")
            assert await client.still_open_after(HELD_S)


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("window_open", [False, True], ids=["stalled", "reading"])
async def test_app_sending_into_a_reset_stream_is_cancelled(window_open: bool) -> None:
    """Closing the buffer must not let a send loop that never awaits spin."""
    state = AppState()
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app(state)) as port:
            for _ in range(SPIN_ROUNDS):
                assert not await endless_response_reset(port, state, window_open=window_open)


@pytest.mark.usefixtures("unpatched")
async def test_unpatched_app_sending_into_a_reset_stream_spins() -> None:
    """Upstream's own buffer close (an open window) already lets it spin; not every round."""
    state = AppState()
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app(state)) as port:
            for _ in range(UNPATCHED_MAX_SPIN_ROUNDS):
                if await endless_response_reset(port, state, window_open=True):
                    break
    assert state.spun, "no round spun"


@pytest.mark.parametrize(
    ("fixture", "released"), [("patched", True), ("unpatched", False)], ids=["patched", "unpatched"]
)
async def test_app_blocked_on_a_stalled_response_is_woken_when_the_client_leaves(
    fixture: str, released: bool, request: pytest.FixtureRequest
) -> None:
    """An app that never reads ``http.disconnect`` (Quart-Trio apps are cancelled instead)."""
    request.getfixturevalue(fixture)
    state = AppState()
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_raw_app(state)) as port:
            async with H2Client.connect(port) as client:
                await client.get(b"/")
                await client.receive_until(h2.events.ResponseReceived)
                client.abort()
            with trio.move_on_after(RELEASE_BOUND_S if released else HELD_S):
                await state.body_sent.wait()
            assert state.body_sent.is_set() is released


# -- leak 2: a refused WebSocket stream is never closed --------------------------


@pytest.mark.parametrize(
    ("fixture", "released"), [("patched", True), ("unpatched", False)], ids=["patched", "unpatched"]
)
async def test_refused_websocket_handshake_releases_the_connection(
    fixture: str, released: bool, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(fixture)
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app(AppState())) as port, H2Client.connect(port) as client:
            # Version 12: Hypercorn refuses the handshake itself, with 400.
            client.h2.send_headers(1, websocket_connect(b"/ws", version=b"12"))
            await client.flush()
            events = await client.receive_until(h2.events.StreamEnded)
            (response,) = (e for e in events if isinstance(e, h2.events.ResponseReceived))
            assert dict(response.headers)[b":status"] == b"400"
            if released:
                assert await client.released_by_server()
            else:
                assert await client.still_open_after(HELD_S)


@pytest.mark.parametrize("http2", [True, False], ids=["h2c", "http1.1"])
@pytest.mark.parametrize(
    ("fixture", "released"), [("patched", True), ("unpatched", False)], ids=["patched", "unpatched"]
)
async def test_websocket_refused_for_data_before_accept_ends_its_handler(
    fixture: str, released: bool, http2: bool, request: pytest.FixtureRequest
) -> None:
    """Unpatched, the handler outlives even the client: it waits for the graceful deadline."""
    request.getfixturevalue(fixture)
    state = AppState()
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app(state)) as port:
            assert await refused_websocket(port, http2=http2) == 400
            with trio.move_on_after(RELEASE_BOUND_S if released else HELD_S):
                await state.handler_ended.wait()
            assert state.handler_ended.is_set() is released


# -- the patch itself --------------------------------------------------------------

TARGETS = (
    (H2Protocol, "_close_stream"),
    (H2Protocol, "handle"),
    (HTTPStream, "app_send"),
    (WSStream, "handle"),
)


def current() -> tuple[object, ...]:
    return tuple(vars(owner)[name] for owner, name in TARGETS)


@pytest.mark.usefixtures("unpatched")
def test_apply_is_idempotent_and_revert_restores_hypercorn() -> None:
    upstream = current()
    hypercorn_leaks.apply()
    patched = current()
    hypercorn_leaks.apply()

    assert hypercorn_leaks.is_applied()
    assert current() == patched
    assert all(new is not old for new, old in zip(patched, upstream, strict=True))

    hypercorn_leaks.revert()
    hypercorn_leaks.revert()
    assert not hypercorn_leaks.is_applied()
    assert current() == upstream


@pytest.mark.usefixtures("unpatched")
def test_applies_with_the_other_patches_in_any_order_and_undoes_none() -> None:
    for patch in OTHER_PATCHES:
        patch.revert()
    hypercorn_leaks.apply()
    for patch in OTHER_PATCHES:
        patch.apply()
    assert all(patch.is_applied() for patch in (*OTHER_PATCHES, hypercorn_leaks))

    hypercorn_leaks.revert()
    assert all(patch.is_applied() for patch in OTHER_PATCHES)
    hypercorn_leaks.apply()
    for patch in OTHER_PATCHES:
        patch.revert()
        assert hypercorn_leaks.is_applied()
        patch.apply()


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_another_hypercorn_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.19.0")

    with pytest.raises(hypercorn_leaks.HypercornLeaksError, match=r"0\.19\.0"):
        hypercorn_leaks.apply()
    assert not hypercorn_leaks.is_applied()


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_an_unrecognised_target_and_patches_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def someone_elses_handle(self: WSStream, event: object) -> None:
        pass

    monkeypatch.setattr(WSStream, "handle", someone_elses_handle)
    upstream_close_stream = H2Protocol._close_stream

    with pytest.raises(hypercorn_leaks.HypercornLeaksError, match="handle is not the function"):
        hypercorn_leaks.apply()
    assert WSStream.handle is someone_elses_handle
    assert H2Protocol._close_stream is upstream_close_stream
