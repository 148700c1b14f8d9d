"""Round trips to PostgreSQL per storage call, counted on the wire.

Every crossing of the trio-asyncio bridge and every wait for the server
costs the single event-loop thread, so the hot calls have a budget: a send
(stored, duplicate or refused) is one round trip, and so is the device
lookup of request authentication. A counting TCP relay sits between the
pool and the server and counts the client's messages that wait for an
answer: ``Q`` (simple query), ``S`` (Sync, the end of an extended-protocol
exchange) and ``H`` (Flush, which asyncpg sends to prepare a statement).

A call that is one statement is also one crossing of the trio-asyncio
bridge (acquire, statement and release in one asyncio coroutine), counted
by wrapping ``pgbridge.aio_call``.

Also here: what a connection carries back into the pool now that release
sends no reset query (no open transaction, no LISTEN).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
import trio_asyncio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import DeviceMismatch, NotFound
from pqmsg.settings import StorageSettings
from pqmsg.storage import pgbridge
from pqmsg.storage.base import PushTarget, Sender
from pqmsg.storage.pgbridge import open_pg_pool
from pqmsg.storage.pgbus import open_pg_bus
from pqmsg.storage.postgres import PostgresStorage, open_postgres_storage
from tests.storage.contract import WINDOW_S, copies, make_account, new_id
from tests.support.postgres import (
    create_throwaway_database,
    drop_throwaway_database,
    raw_connection,
)

pytestmark = pytest.mark.postgres

DEADLINE_S = 20.0
# Frontend messages after which the client waits for the server.
WAITING_TYPES = frozenset(b"QSH")
# Untyped requests before the startup message (SSL, GSSAPI encryption).
_NEGOTIATION_CODES = (80877103, 80877104)


class RoundTripCounter:
    """A TCP relay to the server that counts the client's round trips."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self.round_trips = 0

    async def serve(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(*self._upstream) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, server, client)
                await self._count_and_pipe(client, server)
                nursery.cancel_scope.cancel()

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        async for chunk in source:
            await sink.send_all(chunk)
        await sink.send_eof()

    async def _count_and_pipe(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        buffer = bytearray()
        started = False
        async for chunk in source:
            await sink.send_all(chunk)
            buffer += chunk
            while True:
                length = self._next_length(buffer, started)
                if length is None or len(buffer) < length:
                    break
                if not started:
                    started = struct.unpack("!i", buffer[4:8])[0] not in _NEGOTIATION_CODES
                elif buffer[0] in WAITING_TYPES:
                    self.round_trips += 1
                del buffer[:length]

    @staticmethod
    def _next_length(buffer: bytearray, started: bool) -> int | None:
        """The whole length of the first message in ``buffer``; None if not known yet.

        Before startup the messages are untyped (length, then a request code
        or the protocol version); after it, a type byte precedes the length.
        """
        if not started:
            return struct.unpack("!i", buffer[:4])[0] if len(buffer) >= 8 else None
        return struct.unpack("!i", buffer[1:5])[0] + 1 if len(buffer) >= 5 else None


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    url = create_throwaway_database()
    try:
        yield url
    finally:
        drop_throwaway_database(url)


@asynccontextmanager
async def counted(url: str) -> AsyncIterator[tuple[RoundTripCounter, str]]:
    """A counter relaying to ``url``'s server, and the URL that goes through it."""
    parts = urlsplit(url)
    counter = RoundTripCounter(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, counter.serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        relayed = parts._replace(netloc=netloc, query="sslmode=disable")
        yield counter, urlunsplit(relayed)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def storage_and_counter(url: str) -> AsyncIterator[tuple[PostgresStorage, RoundTripCounter]]:
    async with open_aio_loop(), counted(url) as (counter, relayed):
        # One connection, so every call after the first finds its
        # statements prepared: the steady state of a busy pool.
        settings = StorageSettings(database_url=relayed, pool_min_size=1, pool_max_size=1)
        async with open_postgres_storage(settings) as db:
            yield db, counter


class Trips:
    """Counts the round trips of one block: ``with trips: ...``, then ``trips.last``."""

    def __init__(self, counter: RoundTripCounter) -> None:
        self._counter = counter
        self._before = 0
        self.last = -1

    def __enter__(self) -> Trips:
        self._before = self._counter.round_trips
        return self

    def __exit__(self, *_: object) -> None:
        self.last = self._counter.round_trips - self._before


async def test_a_send_is_one_round_trip(
    storage_and_counter: tuple[PostgresStorage, RoundTripCounter], now: float
) -> None:
    db, counter = storage_and_counter
    trips = Trips(counter)
    with trio.fail_after(DEADLINE_S):
        alice = await make_account(db, now)
        bob = await make_account(db, now, devices=2)
        sender = Sender(alice, 1)

        async def store(message_id: str, recipient: str, *devices: int) -> bool:
            result = await db.store_messages(
                sender,
                message_id,
                recipient,
                copies(*devices, epoch=1),
                now=now,
                idempotency_window_s=WINDOW_S,
            )
            return result.duplicate

        await store(new_id(), bob, 1, 2)  # prepares the statement
        message_id = new_id()
        with trips:
            assert not await store(message_id, bob, 1, 2)
        assert trips.last == 1
        with trips:
            assert await store(message_id, bob, 1, 2)
        assert trips.last == 1
        with trips, pytest.raises(DeviceMismatch):
            await store(new_id(), bob, 1)
        assert trips.last == 1
        with trips, pytest.raises(NotFound):
            await store(new_id(), new_id(), 1)
        assert trips.last == 1


async def test_authentication_lookup_is_one_round_trip(
    storage_and_counter: tuple[PostgresStorage, RoundTripCounter], now: float
) -> None:
    db, counter = storage_and_counter
    trips = Trips(counter)
    with trio.fail_after(DEADLINE_S):
        alice = await make_account(db, now)
        await db.get_device_auth(alice, 1)  # prepares the statement
        with trips:
            auth = await db.get_device_auth(alice, 1)
        assert auth is not None and not auth.revoked
        assert trips.last == 1


class Crossings:
    """Counts crossings of the trio-asyncio bridge (``pgbridge.aio_call``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = pgbridge.aio_call

        async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await real(fn, *args, **kwargs)

        monkeypatch.setattr(pgbridge, "aio_call", counting)


async def test_hot_calls_are_one_round_trip_and_one_crossing(
    storage_and_counter: tuple[PostgresStorage, RoundTripCounter],
    now: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db, counter = storage_and_counter
    with trio.fail_after(DEADLINE_S):
        alice = await make_account(db, now)
        bob = await make_account(db, now)
        await db.set_push_target(bob, 1, PushTarget(provider="apns", token="t"))
        sender = Sender(alice, 1)

        async def send() -> None:
            await db.store_messages(
                sender, new_id(), bob, copies(1), now=now, idempotency_window_s=WINDOW_S
            )

        async def ack() -> None:
            queued, _ = await db.fetch_messages(bob, 1, limit=10)
            await db.ack_messages(bob, 1, [queued[0].id])

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "store_messages": send,
            "get_device_auth": partial(db.get_device_auth, alice, 1),
            "touch_device": partial(db.touch_device, alice, 1, now=now),
            "fetch_messages": partial(db.fetch_messages, bob, 1, limit=10),
            "get_push_target": partial(db.get_push_target, bob, 1),
            "ping": db.ping,
            "purge_idempotency": partial(db.purge_idempotency, older_than=now - WINDOW_S),
        }
        for call in calls.values():
            await call()  # prepares the statements
        await ack()
        crossings = Crossings(monkeypatch)
        trips = Trips(counter)
        for name, call in calls.items():
            crossings.count = 0
            with trips:
                await call()
            assert (name, trips.last, crossings.count) == (name, 1, 1)
        await send()
        crossings.count = 0
        with trips:
            await ack()  # a fetch, then an ack
        assert (trips.last, crossings.count) == (2, 2)


async def test_bus_publishes_are_one_round_trip_and_one_crossing(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_aio_loop(), counted(url) as (counter, relayed):
        async with open_pg_bus(relayed, timeout_s=5) as bus:
            with trio.fail_after(DEADLINE_S):
                account = new_id()
                await bus.publish_many([("message", account, 1)])  # prepares the statement
                crossings = Crossings(monkeypatch)
                trips = Trips(counter)
                with trips:
                    await bus.publish_many([("message", account, 1)])
                assert (trips.last, crossings.count) == (1, 1)
                crossings.count = 0
                with trips:
                    await bus.publish_many([("message", account, d) for d in range(1, 6)])
                assert (trips.last, crossings.count) == (1, 1)
                with trips:
                    await bus.publish_many([])
                assert (trips.last, crossings.count) == (0, 1)
                assert bus.statistics().published_total == 1 + 1 + 5


# -- what a released connection carries back -----------------------------------


async def test_released_connection_has_no_open_transaction(url: str) -> None:
    async with open_aio_loop():
        with trio.fail_after(DEADLINE_S):
            async with open_pg_pool(url, min_size=1, max_size=1) as pool:
                async with pool.acquire() as con:
                    await con.execute("CREATE TABLE IF NOT EXISTS left_open (n int)")
                    pid = await con.fetchval("SELECT pg_backend_pid()")
                    # What no code path does, and the pool must still undo.
                    await con.execute("BEGIN")
                    await con.execute("INSERT INTO left_open VALUES (1)")
                async with pool.acquire() as con:
                    assert await con.fetchval("SELECT pg_backend_pid()") == pid
                    assert await con.fetchval("SELECT txid_current_if_assigned()") is None
                    assert await con.fetchval("SELECT count(*) FROM left_open") == 0
                async with raw_connection(url) as admin:
                    state = await trio_asyncio.aio_as_trio(admin.fetchval)(
                        "SELECT state FROM pg_stat_activity WHERE pid = $1", pid
                    )
                assert state == "idle"


async def test_bus_pool_connections_do_not_listen(url: str) -> None:
    """The LISTEN connection is the bus's own, never one of its pool's."""

    def deliver(*_: object) -> None:
        pass

    async with open_aio_loop(), open_pg_bus(url, timeout_s=5) as bus:
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(bus.listen, deliver)
                assert bus.healthy
                await bus.publish_many([("message", new_id(), 1)])
                # Both of the pool's connections, while the listener listens.
                async with bus._pool.acquire() as first, bus._pool.acquire() as second:
                    for con in (first, second):
                        assert await con.fetch("SELECT pg_listening_channels()") == []
                nursery.cancel_scope.cancel()
