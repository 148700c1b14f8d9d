"""Hypercorn's trio worker must drain keep-alive connections promptly at shutdown.

Each test serves a small Quart-Trio app with ``hypercorn.trio.serve`` on
loopback and fires the shutdown trigger. Like ``pqmsg.server``, the trigger
sets the app's drain event, which ends parked requests just as Hypercorn
sets ``terminated``. The patched tests apply ``pqmsg.hypercorn_patch`` and
then ``pqmsg.hypercorn_drain``, as the server does.

Drain times are real time (the sockets are real), checked against bounds
far from the graceful timeout: with ``GRACEFUL_TIMEOUT_S`` configured, serve()
must return within ``DRAIN_BOUND_S`` when nothing is in flight. Patched, it
takes a few milliseconds.
Trio never fires a deadline early, so "waited the whole graceful timeout" is
checked as ``>=``.

Why requests in flight run for several rounds: whether unpatched Hypercorn
loses an HTTP/2 response depends on whether the app's task or ``send_task``
runs first after the response (see the module docstring of
``pqmsg.hypercorn_drain``). Each round ends the handler after a different
number of checkpoints, so the response lands at different points of the
shutdown. Unpatched, about half the rounds lose the response.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from quart import request
from quart_trio import QuartTrio

from pqmsg import hypercorn_drain, hypercorn_patch

HOST = "127.0.0.1"
GRACEFUL_TIMEOUT_S = 10.0
# serve() must return this soon after the trigger when nothing is in flight.
DRAIN_BOUND_S = 2.0
# For the test that a slow request still holds the drain, up to the deadline.
SHORT_GRACEFUL_TIMEOUT_S = 0.5
SLOW_HANDLER_S = 30.0
# Unpatched, every idle connection holds the drain this long.
UNPATCHED_GRACEFUL_TIMEOUT_S = 1.0
IN_FLIGHT_ROUNDS = 10
UNPATCHED_MAX_ROUNDS = 30
# Larger than the 16 KiB default frame: several DATA frames and flow control.
LARGE_BODY_BYTES = 100_000
KEEP_ALIVE_TIMEOUT_S = 0.1
# More than loopback buffers hold; sending it for this long fills them.
UNREAD_BYTES = 32 * 1024 * 1024
FILL_BUFFERS_S = 0.2
TEST_DEADLINE_S = 30
RECEIVE_BYTES = 65_536


@pytest.fixture
def patched() -> Iterator[None]:
    """Both patches, in the server's order; restore the prior state after."""
    close_was_applied = hypercorn_patch.is_applied()
    drain_was_applied = hypercorn_drain.is_applied()
    hypercorn_patch.apply()
    hypercorn_drain.apply()
    yield
    restore(drain_was_applied, close_was_applied)


@pytest.fixture
def unpatched() -> Iterator[None]:
    """Hypercorn's own drain, with ``pqmsg.hypercorn_patch`` applied; restore after."""
    close_was_applied = hypercorn_patch.is_applied()
    drain_was_applied = hypercorn_drain.is_applied()
    hypercorn_patch.apply()
    hypercorn_drain.revert()
    yield
    restore(drain_was_applied, close_was_applied)


def restore(drain_was_applied: bool, close_was_applied: bool) -> None:
    """Put both patches back the way the test found them."""
    for patch, was_applied in (
        (hypercorn_drain, drain_was_applied),
        (hypercorn_patch, close_was_applied),
    ):
        if was_applied:
            patch.apply()
        else:
            patch.revert()


def make_app(parked: trio.Event, drain: trio.Event) -> QuartTrio:
    """A quick route, a long poll that ends at drain, and a handler slower than any drain."""
    app = QuartTrio(__name__)

    @app.route("/")
    async def index() -> bytes:
        return b"ok"

    @app.route("/park")
    async def park() -> bytes:
        parked.set()
        await drain.wait()
        # Varies where in Hypercorn's shutdown the response lands.
        for _ in range(request.args.get("checkpoints", 0, type=int)):
            await trio.lowlevel.checkpoint()
        return b"p" * request.args.get("bytes", 2, type=int)

    @app.route("/later")
    async def later() -> Any:
        async def body() -> AsyncIterator[bytes]:
            await drain.wait()
            yield b"late body"

        return body(), 200

    @app.route("/slow")
    async def slow() -> bytes:
        parked.set()
        await trio.sleep(SLOW_HANDLER_S)
        return b"late"

    return app


@attrs.define
class Served:
    """A ``serve()`` call in the background and the app's events."""

    url: str
    port: int
    parked: trio.Event
    shutdown: trio.Event
    ended: trio.Event

    async def shut_down(self) -> float:
        """Fire the shutdown trigger; return the seconds until serve() returned."""
        fired_at = trio.current_time()
        self.shutdown.set()
        await self.ended.wait()
        return trio.current_time() - fired_at


@asynccontextmanager
async def serving(
    *, graceful_timeout_s: float, keep_alive_timeout_s: float | None = None
) -> AsyncIterator[Served]:
    """Serve the app on a free loopback port; shut down when the block ends at the latest."""
    parked, drain, shutdown, ended = trio.Event(), trio.Event(), trio.Event(), trio.Event()
    config = Config()
    config.bind = [f"{HOST}:0"]
    config.graceful_timeout = graceful_timeout_s
    if keep_alive_timeout_s is not None:
        config.keep_alive_timeout = keep_alive_timeout_s

    async def trigger() -> None:
        await shutdown.wait()
        drain.set()  # parked requests answer now, as pqmsg.server's long polls do

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(
            make_app(parked, drain), config, shutdown_trigger=trigger, task_status=task_status
        )
        ended.set()

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        port = int(binds[0].rsplit(":", 1)[1])
        try:
            yield Served(binds[0], port, parked, shutdown, ended)
        finally:
            shutdown.set()


def client(served: Served, *, http2: bool) -> httpx.AsyncClient:
    """HTTP/1.1, or h2c with prior knowledge. No client timeouts: tests use fail_after."""
    return httpx.AsyncClient(base_url=served.url, http1=not http2, http2=http2, timeout=None)


async def shut_down_during(
    served: Served, send: Callable[[], Awaitable[httpx.Response]]
) -> tuple[httpx.Response | httpx.TransportError, float]:
    """Start a request, fire the trigger once its handler runs; return its outcome and the drain time."""
    outcome: list[httpx.Response | httpx.TransportError] = []

    async def request_() -> None:
        try:
            outcome.append(await send())
        except httpx.TransportError as error:
            outcome.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_)
        await served.parked.wait()
        drain_s = await served.shut_down()
    return outcome[0], drain_s


async def receive_until_closed(
    stream: trio.SocketStream, connection: h2.connection.H2Connection
) -> list[h2.events.Event]:
    """Every HTTP/2 event the server sends until it closes the connection."""
    events: list[h2.events.Event] = []
    while data := await stream.receive_some(RECEIVE_BYTES):
        events.extend(connection.receive_data(data))
    return events


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
async def test_idle_keep_alive_connection_does_not_hold_the_drain(http2: bool) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(graceful_timeout_s=GRACEFUL_TIMEOUT_S) as served:
            async with client(served, http2=http2) as http:
                response = await http.get("/")
                assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                drain_s = await served.shut_down()

    assert drain_s < DRAIN_BOUND_S


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("requests", [0, 1], ids=["preface-only", "after-a-request"])
async def test_idle_h2c_connection_gets_goaway_then_close(requests: int) -> None:
    """Prior-knowledge h2c; with no request the connection is idle from its preface on."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(graceful_timeout_s=GRACEFUL_TIMEOUT_S) as served:
            stream = await trio.open_tcp_stream(HOST, served.port)
            async with stream:
                connection = h2.connection.H2Connection(
                    h2.config.H2Configuration(client_side=True, header_encoding=None)
                )
                connection.initiate_connection()
                if requests:
                    headers = [
                        (":method", "GET"),
                        (":scheme", "http"),
                        (":authority", HOST),
                        (":path", "/"),
                    ]
                    connection.send_headers(1, headers, end_stream=True)
                await stream.send_all(connection.data_to_send())
                # Wait until the server speaks HTTP/2 (and answered, if asked).
                wanted = h2.events.StreamEnded if requests else h2.events.RemoteSettingsChanged
                seen: list[h2.events.Event] = []
                while not any(isinstance(event, wanted) for event in seen):
                    seen.extend(connection.receive_data(await stream.receive_some(RECEIVE_BYTES)))

                drain_s = await served.shut_down()
                events = await receive_until_closed(stream, connection)

    assert drain_s < DRAIN_BOUND_S
    assert events, "the server closed without GOAWAY"
    goaway = events[-1]
    assert isinstance(goaway, h2.events.ConnectionTerminated), events
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == requests


async def _one_h2c_request(served: Served, path: str) -> tuple[list[h2.events.Event], int]:
    """GET ``path`` over h2c until its stream ends; the events and the server's writes."""
    writes: list[int] = []
    upstream = trio.SocketStream.send_all

    async def counted(self: trio.SocketStream, data: Any) -> None:
        writes.append(len(data))
        await upstream(self, data)

    stream = await trio.open_tcp_stream(HOST, served.port)
    async with stream:
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        connection.initiate_connection()
        await stream.send_all(connection.data_to_send())
        events: list[h2.events.Event] = []
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events):
            events.extend(connection.receive_data(await stream.receive_some(RECEIVE_BYTES)))
        await stream.send_all(connection.data_to_send())  # the SETTINGS ack
        await trio.sleep(0.05)  # the server is quiet now
        request = [(":method", "GET"), (":scheme", "http"), (":authority", HOST), (":path", path)]
        connection.send_headers(1, request, end_stream=True)
        trio.SocketStream.send_all = counted  # type: ignore[method-assign]
        try:
            await stream.send_all(connection.data_to_send())
            events = []
            while not any(isinstance(e, h2.events.StreamEnded) for e in events):
                events.extend(connection.receive_data(await stream.receive_some(RECEIVE_BYTES)))
        finally:
            trio.SocketStream.send_all = upstream  # type: ignore[method-assign]
    return events, len(writes) - 1  # minus the request this client wrote


@pytest.mark.parametrize("fixture", ["patched", "unpatched"])
async def test_a_small_h2_response_is_one_write(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """HEADERS, DATA and END_STREAM leave in one write (two when the scheduler
    runs the writer between the app's headers and body); upstream writes
    three times."""
    request.getfixturevalue(fixture)
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(graceful_timeout_s=GRACEFUL_TIMEOUT_S) as served:
            events, writes = await _one_h2c_request(served, "/")
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in data) == b"ok"
    if fixture == "patched":
        assert writes in (1, 2)
        assert data[-1].stream_ended is not None  # END_STREAM rides on the DATA frame
    else:
        assert writes == 3


@pytest.mark.usefixtures("patched")
async def test_h2_headers_leave_before_a_body_that_comes_later() -> None:
    """A response whose body is not ready is not held back by the write batching."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(graceful_timeout_s=GRACEFUL_TIMEOUT_S) as served:
            stream = await trio.open_tcp_stream(HOST, served.port)
            async with stream:
                connection = h2.connection.H2Connection(
                    h2.config.H2Configuration(client_side=True, header_encoding=None)
                )
                connection.initiate_connection()
                request = [
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":authority", HOST),
                    (":path", "/later"),
                ]
                connection.send_headers(1, request, end_stream=True)
                await stream.send_all(connection.data_to_send())
                events: list[h2.events.Event] = []
                while not any(isinstance(e, h2.events.ResponseReceived) for e in events):
                    events.extend(connection.receive_data(await stream.receive_some(RECEIVE_BYTES)))
                # The headers arrived while the body still waits for the drain.
                assert not any(isinstance(e, h2.events.DataReceived) for e in events)
                await served.shut_down()


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("body_bytes", [2, LARGE_BODY_BYTES], ids=["small", "large"])
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
async def test_response_in_flight_at_shutdown_is_delivered(http2: bool, body_bytes: int) -> None:
    """The connection closes after the response, not before it and not at the deadline."""
    with trio.fail_after(TEST_DEADLINE_S):
        for checkpoints in range(IN_FLIGHT_ROUNDS):
            async with serving(graceful_timeout_s=GRACEFUL_TIMEOUT_S) as served:
                async with client(served, http2=http2) as http:
                    path = f"/park?checkpoints={checkpoints}&bytes={body_bytes}"
                    outcome, drain_s = await shut_down_during(served, partial(http.get, path))

            assert isinstance(outcome, httpx.Response), (checkpoints, outcome)
            assert (outcome.status_code, len(outcome.content)) == (200, body_bytes), checkpoints
            assert drain_s < DRAIN_BOUND_S, checkpoints


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
async def test_slow_request_holds_the_drain_until_the_graceful_timeout(http2: bool) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(graceful_timeout_s=SHORT_GRACEFUL_TIMEOUT_S) as served:
            async with client(served, http2=http2) as http:
                outcome, drain_s = await shut_down_during(served, partial(http.get, "/slow"))

    assert SHORT_GRACEFUL_TIMEOUT_S <= drain_s < SHORT_GRACEFUL_TIMEOUT_S + DRAIN_BOUND_S
    assert isinstance(outcome, httpx.RemoteProtocolError), outcome


@pytest.mark.usefixtures("patched")
async def test_goaway_to_a_peer_that_stopped_reading_does_not_hold_the_close() -> None:
    """The idle close writes its GOAWAY under a deadline; a shielded wait would hang here."""

    class ClosedRecorder:
        def __init__(self, protocol: H2Protocol) -> None:
            self.protocol = protocol
            self.events: list[Event] = []

        async def handle(self, event: Event) -> None:
            self.events.append(event)

    with trio.fail_after(TEST_DEADLINE_S):
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        port = listeners[0].socket.getsockname()[1]
        async with (
            listeners[0],
            await trio.open_tcp_stream(HOST, port),  # the peer that never reads
            await listeners[0].accept() as server_stream,
        ):
            with trio.move_on_after(FILL_BUFFERS_S):
                await server_stream.send_all(b"x" * UNREAD_BYTES)
            config, context = Config(), WorkerContext(None)
            tcp_server = TCPServer(
                app=None,  # type: ignore[arg-type]  # the close path never uses it
                config=config,
                context=context,
                state={},
                stream=server_stream,  # type: ignore[arg-type]  # h2c: a plain SocketStream
            )
            h2_protocol = H2Protocol(
                None,  # type: ignore[arg-type]
                config,
                context,
                None,  # type: ignore[arg-type]
                ConnectionState({}),
                False,
                None,
                None,
                tcp_server.protocol_send,
            )
            h2_protocol.connection.initiate_connection()
            h2_protocol.connection.data_to_send()  # already "sent": the buffers are full
            recorder = ClosedRecorder(h2_protocol)
            tcp_server.protocol = recorder  # type: ignore[assignment]

            started = trio.current_time()
            await tcp_server._initiate_server_close()
            took_s = trio.current_time() - started

    assert took_s < hypercorn_drain.GOAWAY_SEND_TIMEOUT_S + DRAIN_BOUND_S
    assert [type(event) for event in recorder.events] == [Closed]


@pytest.mark.usefixtures("patched")
async def test_keep_alive_timeout_closes_an_idle_connection_after_a_response() -> None:
    """Upstream never started the idle timer again after a response (same cause)."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(
            graceful_timeout_s=GRACEFUL_TIMEOUT_S, keep_alive_timeout_s=KEEP_ALIVE_TIMEOUT_S
        ) as served:
            stream = await trio.open_tcp_stream(HOST, served.port)
            async with stream:
                await stream.send_all(f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
                received = b""
                with trio.fail_after(DRAIN_BOUND_S):
                    while data := await stream.receive_some(RECEIVE_BYTES):
                        received += data

    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(b"\r\n\r\nok")


@pytest.mark.usefixtures("unpatched")
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
async def test_unpatched_idle_keep_alive_connection_holds_the_drain(http2: bool) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(graceful_timeout_s=UNPATCHED_GRACEFUL_TIMEOUT_S) as served:
            async with client(served, http2=http2) as http:
                await http.get("/")
                drain_s = await served.shut_down()

    assert drain_s >= UNPATCHED_GRACEFUL_TIMEOUT_S


@pytest.mark.usefixtures("unpatched")
async def test_unpatched_h2_loses_a_response_in_flight_at_shutdown() -> None:
    """Stops at the first lost response; about every other round loses one."""
    lost: httpx.TransportError | None = None
    with trio.fail_after(TEST_DEADLINE_S + UNPATCHED_MAX_ROUNDS * UNPATCHED_GRACEFUL_TIMEOUT_S):
        for checkpoints in range(UNPATCHED_MAX_ROUNDS):
            async with serving(graceful_timeout_s=UNPATCHED_GRACEFUL_TIMEOUT_S) as served:
                async with client(served, http2=True) as http:
                    path = f"/park?checkpoints={checkpoints % IN_FLIGHT_ROUNDS}"
                    outcome, _ = await shut_down_during(served, partial(http.get, path))
            if isinstance(outcome, httpx.TransportError):
                lost = outcome
                break

    # Headers and body arrived, END_STREAM never did; then the connection closed.
    assert isinstance(lost, httpx.RemoteProtocolError), "no round lost its response"


@pytest.mark.usefixtures("unpatched")
def test_apply_is_idempotent_and_revert_restores_hypercorn() -> None:
    upstream = (TCPServer.protocol_send, TCPServer._initiate_server_close, H2Protocol.stream_send)
    hypercorn_drain.apply()
    hypercorn_drain.apply()
    assert hypercorn_drain.is_applied()
    assert TCPServer.protocol_send is not upstream[0]

    hypercorn_drain.revert()
    hypercorn_drain.revert()
    assert not hypercorn_drain.is_applied()
    assert (
        TCPServer.protocol_send,
        TCPServer._initiate_server_close,
        H2Protocol.stream_send,
    ) == upstream


@pytest.mark.usefixtures("unpatched")
def test_apply_works_before_or_after_the_close_patch() -> None:
    hypercorn_patch.revert()
    hypercorn_drain.apply()
    hypercorn_patch.apply()
    assert hypercorn_drain.is_applied() and hypercorn_patch.is_applied()


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_another_hypercorn_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.19.0")

    with pytest.raises(hypercorn_drain.HypercornDrainError, match=r"0\.19\.0"):
        hypercorn_drain.apply()
    assert not hypercorn_drain.is_applied()


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_an_unrecognised_target_and_patches_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream_protocol_send = TCPServer.protocol_send

    async def someone_elses_stream_send(self: H2Protocol, event: object) -> None:
        pass

    monkeypatch.setattr(H2Protocol, "stream_send", someone_elses_stream_send)

    with pytest.raises(
        hypercorn_drain.HypercornDrainError, match="stream_send is not the function"
    ):
        hypercorn_drain.apply()
    assert H2Protocol.stream_send is someone_elses_stream_send
    assert TCPServer.protocol_send is upstream_protocol_send
