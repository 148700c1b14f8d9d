"""Round trips to PostgreSQL per storage call, counted on the wire.

Every crossing of the trio-asyncio bridge and every wait for the server
costs the single event-loop thread, so the hot calls have a budget: a send
(stored, duplicate or refused) is one round trip, and so is the device
lookup of request authentication. A counting TCP relay sits between the
pool and the server and counts the client's messages that wait for an
answer: ``Q`` (simple query), ``S`` (Sync, the end of an extended-protocol
exchange) and ``H`` (Flush, which asyncpg sends to prepare a statement).

Also here: what a connection carries back into the pool now that release
sends no reset query (no open transaction, no LISTEN).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
import trio_asyncio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import DeviceMismatch, NotFound
from pqmsg.settings import StorageSettings
from pqmsg.storage.base import Sender
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
                await bus.publish("message", new_id(), 1)
                # Both of the pool's connections, while the listener listens.
                async with bus._pool.acquire() as first, bus._pool.acquire() as second:
                    for con in (first, second):
                        assert await con.fetch("SELECT pg_listening_channels()") == []
                nursery.cancel_scope.cancel()
