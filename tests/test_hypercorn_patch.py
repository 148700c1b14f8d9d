"""Hypercorn's trio worker must survive HTTP/2 clients that leave mid-response.

The end-to-end tests run a real Quart-Trio app under ``hypercorn.trio.serve``
on loopback h2c. Each round opens ``CONNECTIONS_PER_ROUND`` connections that
send GOAWAY while the body is in flight (see
``tests.support.h2_clients.walk_away_mid_response``).

Why the reproduction is repeated rather than scheduled: the fatal
interleaving needs a task to hold Hypercorn's send lock, about to call
``send_all``, at the moment the reading task enters ``send_eof``, and to run
before that task resumes. Trio reverses each scheduling batch at random, and
socket readiness depends on the kernel, so a test cannot force that order
from outside Hypercorn. The load keeps the odds per connection high instead:
clients open every flow-control window and wait for body data, so
``send_task`` is busy writing when GOAWAY arrives. Connections with more
streams also catch app tasks sending headers; Hypercorn logs those losses
rather than dying. On the development machine all of 300 fresh unpatched
servers died by the third round. The fatal GOAWAY came in the first round,
and the death surfaced a few milliseconds later. The patched test runs
``PATCHED_ROUNDS`` rounds, 80 chances to die.
"""

from __future__ import annotations

import importlib.metadata
import logging
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from quart_trio import QuartTrio

from pqmsg import hypercorn_patch
from tests.support.h2_clients import fetch, walk_away_mid_response

HOST = "127.0.0.1"
BODY_BYTES = 256 * 1024  # 16 DATA frames at the default 16 KiB: send_task stays busy.
CONNECTIONS_PER_ROUND = 10
MAX_STREAMS_PER_CONNECTION = 4
UNPATCHED_MAX_ROUNDS = 20
PATCHED_ROUNDS = 8
TEST_DEADLINE_S = 20
# Unpatched Hypercorn dies a few milliseconds after the GOAWAY that kills it.
# The last round can finish before that happens.
DEATH_GRACE_S = 2
# More than a loopback socket buffers, so a peer that never reads blocks send_all.
UNREAD_BYTES = 32 * 1024 * 1024


def make_app() -> QuartTrio:
    """A body big enough to be mid-stream when clients leave, and a health route."""
    app = QuartTrio(__name__)

    @app.route("/body")
    async def body() -> bytes:
        await trio.lowlevel.checkpoint()  # answer from a later scheduling step
        return b"b" * BODY_BYTES

    @app.route("/ping")
    async def ping() -> bytes:
        return b"pong"

    return app


@attrs.define
class ServerRun:
    """A ``serve()`` call in the background: its port, and how it ended."""

    port: int = 0
    ended: trio.Event = attrs.Factory(trio.Event)
    error: ExceptionGroup[Exception] | None = None


@asynccontextmanager
async def serving(app: QuartTrio) -> AsyncIterator[ServerRun]:
    """Serve ``app`` over h2c on a free loopback port until the block ends.

    When ``serve()`` raises, the error is recorded in ``ServerRun.error`` and
    not raised into the test: a server dying is the outcome these tests look at.
    Leaving the block can take Hypercorn's ``graceful_timeout`` (3 s). Hypercorn
    0.18.0 sometimes strands an app task in ``StreamBuffer.push`` after a
    disconnect, with or without this patch, and only that timeout cancels it.
    """
    config = Config()
    config.bind = [f"{HOST}:0"]
    run = ServerRun()
    stop = trio.Event()

    async def run_serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
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


async def disconnect_round(server: ServerRun) -> list[bool]:
    """Run one round of clients leaving mid-response; stop early if the server dies."""
    outcomes: list[bool] = []

    async def one_client(streams: int) -> None:
        outcomes.append(await walk_away_mid_response(HOST, server.port, "/body", streams=streams))

    async with trio.open_nursery() as nursery:

        async def stop_when_server_dies() -> None:
            await server.ended.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_when_server_dies)
        async with trio.open_nursery() as clients:
            for index in range(CONNECTIONS_PER_ROUND):
                clients.start_soon(one_client, 1 + index % MAX_STREAMS_PER_CONNECTION)
        nursery.cancel_scope.cancel()
    return outcomes


def leaves(group: ExceptionGroup[Exception]) -> list[Exception]:
    """Every exception in ``group``, flattened."""
    found: list[Exception] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, ExceptionGroup) else [exc])
    return found


@pytest.fixture
def unpatched() -> Iterator[None]:
    """Run with Hypercorn's own ``TCPServer._close``; restore the prior state after."""
    was_applied = hypercorn_patch.is_applied()
    hypercorn_patch.revert()
    yield
    if was_applied:
        hypercorn_patch.apply()


@pytest.fixture
def patched() -> Iterator[None]:
    """Run with the fix applied; restore the prior state after."""
    was_applied = hypercorn_patch.is_applied()
    hypercorn_patch.apply()
    yield
    if not was_applied:
        hypercorn_patch.revert()


@pytest.mark.usefixtures("unpatched")
async def test_unpatched_hypercorn_dies_when_h2_clients_leave_mid_response() -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app()) as server:
            for _ in range(UNPATCHED_MAX_ROUNDS):
                await disconnect_round(server)
                if server.ended.is_set():
                    break
            with trio.move_on_after(DEATH_GRACE_S):
                await server.ended.wait()
            assert server.ended.is_set(), "disconnect load did not kill unpatched serve()"

    assert server.error is not None
    errors = leaves(server.error)
    assert errors, server.error
    for error in errors:
        assert isinstance(error, trio.BusyResourceError), errors
        # The exact race: protocol_send's send_all finds send_eof inside the stream.
        frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
        assert frames[-3:-1] == ["protocol_send", "send_all"], frames


@pytest.mark.usefixtures("patched")
async def test_patched_hypercorn_survives_h2_clients_leaving_mid_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with serving(make_app()) as server:
            for round_number in range(PATCHED_ROUNDS):
                outcomes = await disconnect_round(server)
                assert outcomes == [True] * CONNECTIONS_PER_ROUND, (round_number, server.error)

            assert await fetch(HOST, server.port, "/ping") == (200, b"pong")
            assert not server.ended.is_set(), server.error

    assert server.error is None
    # An app task that loses the race does not kill the server. Hypercorn logs
    # "Error in ASGI Framework" for it instead, so the fix must silence that too.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.mark.usefixtures("patched")
async def test_patched_close_does_not_wait_for_a_sender_stuck_on_a_silent_peer() -> None:
    """Waiting for ``send_lock`` here would hang until the peer reads.

    A sender blocked on a full socket buffer holds the lock inside a shielded
    ``send_all``. Only closing the socket wakes it.
    """
    closed_events: list[Event] = []

    class RecordingProtocol:
        async def handle(self, event: Event) -> None:
            closed_events.append(event)

    with trio.fail_after(TEST_DEADLINE_S):
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        port = listeners[0].socket.getsockname()[1]
        # The nursery is outermost so that, if _close fails, closing the streams
        # first wakes the shielded sender and the nursery can exit.
        async with trio.open_nursery() as nursery:
            async with (
                listeners[0],
                await trio.open_tcp_stream(HOST, port),  # the peer that never reads
                await listeners[0].accept() as server_stream,
            ):
                tcp_server = TCPServer(
                    app=None,  # type: ignore[arg-type]  # _close and protocol_send never use it
                    config=Config(),
                    context=WorkerContext(None),
                    state={},
                    stream=server_stream,  # type: ignore[arg-type]  # h2c: a plain SocketStream
                )
                tcp_server.protocol = RecordingProtocol()  # type: ignore[assignment]
                nursery.start_soon(tcp_server.protocol_send, RawData(b"x" * UNREAD_BYTES))
                await trio.testing.wait_all_tasks_blocked()
                assert tcp_server.send_lock.locked()

                with trio.fail_after(1):
                    await tcp_server._close()

    assert [type(event) for event in closed_events] == [Closed]


@pytest.mark.usefixtures("unpatched")
def test_apply_is_idempotent_and_revert_restores_hypercorn() -> None:
    upstream_close = TCPServer._close
    hypercorn_patch.apply()
    patched_close = TCPServer._close
    hypercorn_patch.apply()

    assert hypercorn_patch.is_applied()
    assert TCPServer._close is patched_close is not upstream_close

    hypercorn_patch.revert()
    hypercorn_patch.revert()
    assert not hypercorn_patch.is_applied()
    assert TCPServer._close is upstream_close


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_another_hypercorn_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.19.0")

    with pytest.raises(hypercorn_patch.HypercornPatchError, match=r"0\.19\.0"):
        hypercorn_patch.apply()
    assert not hypercorn_patch.is_applied()


@pytest.mark.usefixtures("unpatched")
def test_apply_refuses_an_unrecognised_close(monkeypatch: pytest.MonkeyPatch) -> None:
    async def someone_elses_close(self: TCPServer) -> None:
        await self.stream.aclose()

    monkeypatch.setattr(TCPServer, "_close", someone_elses_close)

    with pytest.raises(hypercorn_patch.HypercornPatchError, match="not the function"):
        hypercorn_patch.apply()
    assert TCPServer._close is someone_elses_close
