"""Wake-ups between two replicas over LISTEN/NOTIFY on one throwaway database."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import pytest
import trio
import trio_asyncio

from pqmsg.aioloop import open_aio_loop
from pqmsg.nurseries.notify import DeviceClosed, WakeKind, open_notifier
from pqmsg.storage.pgbus import CHANNEL, PgBus, open_pg_bus
from tests.support.postgres import (
    create_throwaway_database,
    drop_throwaway_database,
    raw_connection,
)

pytestmark = pytest.mark.postgres

DEADLINE_S = 20.0
ACCOUNT = "5b0b0e4c-3c1b-4a53-9d0f-8a6f1de0e7a1"

Wake = tuple[WakeKind, str, int]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    url = create_throwaway_database()
    try:
        yield url
    finally:
        drop_throwaway_database(url)


class Replica:
    """A bus whose listener runs, recording what it delivers."""

    def __init__(self, bus: PgBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.delivered: list[Wake] = []
        self._arrived = trio.Event()

    def deliver(self, kind: WakeKind, account: str, device: int) -> None:
        self.delivered.append((kind, account, device))
        self._arrived.set()

    async def next_wake(self) -> Wake:
        await self._arrived.wait()
        self._arrived = trio.Event()
        return self.delivered[-1]


@pytest.fixture
async def replicas(url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    async with open_aio_loop(), AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        pair = []
        with trio.fail_after(DEADLINE_S):
            for _ in range(2):
                name = f"pqmsg-bus-test-{secrets.token_hex(4)}"
                bus = await stack.enter_async_context(open_pg_bus(url, application_name=name))
                replica = Replica(bus, name)
                await nursery.start(bus.listen, replica.deliver)
                pair.append(replica)
        yield pair[0], pair[1]
        nursery.cancel_scope.cancel()


async def test_a_publish_reaches_the_other_replica_only(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    with trio.fail_after(DEADLINE_S):
        await a.bus.publish_many([("message", ACCOUNT, 3)])
        assert await b.next_wake() == ("message", ACCOUNT, 3)
        await b.bus.publish_many([("close", ACCOUNT, 2)])
        assert await a.next_wake() == ("close", ACCOUNT, 2)
        # Each replica ignored its own echo.
        assert a.delivered == [("close", ACCOUNT, 2)]
        assert b.delivered == [("message", ACCOUNT, 3)]
        assert (a.bus.statistics().published_total, b.bus.statistics().delivered_total) == (1, 1)


async def test_publish_many_reaches_the_other_replica_in_order(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    with trio.fail_after(DEADLINE_S):
        sent: list[Wake] = [("message", ACCOUNT, 1), ("close", ACCOUNT, 2), ("message", ACCOUNT, 3)]
        await a.bus.publish_many(sent)
        await a.bus.publish_many([])  # nothing to send
        last: Wake = ("message", ACCOUNT, 4)
        await a.bus.publish_many([last])  # a marker: nothing more of the batch arrives after it
        while await b.next_wake() != last:
            pass
        assert b.delivered == [*sent, last]
        assert a.delivered == []
        assert a.bus.statistics().published_total == 4


async def test_malformed_wake_ups_are_ignored(replicas: tuple[Replica, Replica], url: str) -> None:
    a, b = replicas
    with trio.fail_after(DEADLINE_S):
        async with raw_connection(url) as con:
            for junk in ("", "x", "o message nodevice", "o shout acc:1", "o message acc:x"):
                await trio_asyncio.aio_as_trio(con.execute)(
                    "SELECT pg_notify($1, $2)", CHANNEL, junk
                )
        await a.bus.publish_many([("message", ACCOUNT, 1)])
        assert await b.next_wake() == ("message", ACCOUNT, 1)
        assert b.delivered == [("message", ACCOUNT, 1)]
        assert b.bus.healthy


async def test_listener_reconnects_after_losing_its_connection(
    replicas: tuple[Replica, Replica], url: str
) -> None:
    a, b = replicas
    with trio.fail_after(DEADLINE_S):
        async with raw_connection(url) as con:
            killed = await trio_asyncio.aio_as_trio(con.fetchval)(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                b.name,
            )
        assert killed == 1
        for _ in range(500):
            stats = b.bus.statistics()
            if stats.reconnects_total and stats.healthy:
                break
            await trio.sleep(0.01)
        assert b.bus.statistics().reconnects_total == 1
        assert b.bus.healthy
        await a.bus.publish_many([("message", ACCOUNT, 5)])
        assert await b.next_wake() == ("message", ACCOUNT, 5)


async def test_notifiers_wake_waiters_across_replicas(url: str) -> None:
    async with open_aio_loop():
        with trio.fail_after(DEADLINE_S):
            async with (
                open_pg_bus(url) as bus_a,
                open_pg_bus(url) as bus_b,
                open_notifier(bus=bus_a) as replica_a,
                open_notifier(bus=bus_b) as replica_b,
            ):
                with replica_b.subscribe(ACCOUNT, 4) as waiter:
                    replica_a.publish(ACCOUNT, 4)
                    await waiter.wait()  # woken through PostgreSQL
                with replica_b.subscribe(ACCOUNT, 4) as waiter:
                    replica_a.close_device(ACCOUNT, 4)
                    with pytest.raises(DeviceClosed):
                        await waiter.wait()
