"""The Redis wake-up bus on the real Redis: wake-ups packed per PUBLISH, echoes ignored."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from pqmsg.aioloop import open_aio_loop
from pqmsg.nurseries.bus import CHANNEL, RedisBus
from pqmsg.nurseries.notify import FORWARD_BATCH, WakeKind, open_notifier
from pqmsg.redisconn import RedisClient, open_redis
from tests.support.redis_server import SHARED_REDIS_URL, random_prefix

pytestmark = pytest.mark.redis

Delivered = list[tuple[WakeKind, str, int]]


class Received(list[tuple[WakeKind, str, int]]):
    """Wake-ups a listener delivered; :meth:`wait_for` a count of them."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()

    def deliver(self, kind: WakeKind, account: str, device: int) -> None:
        self.append((kind, account, device))
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        while len(self) < count:
            self._changed = trio.Event()
            await self._changed.wait()


@pytest.fixture
async def redis() -> AsyncIterator[RedisClient]:
    async with open_aio_loop(), open_redis(SHARED_REDIS_URL, timeout_s=2.0) as client:
        yield client


async def test_one_publish_carries_many_wake_ups_and_a_replica_skips_its_echo(redis: RedisClient) -> None:
    prefix = random_prefix()
    here, there = RedisBus(redis, prefix=prefix), RedisBus(redis, prefix=prefix)
    at_here, at_there = Received(), Received()
    sent: Delivered = [("message", "a", 1), ("close", "a", 2), ("message", "b", 7)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(here.listen, at_here.deliver)
            await nursery.start(there.listen, at_there.deliver)
            before = redis.statistics().commands_total
            await here.publish_many(sent)
            await here.publish_many([])  # nothing to send: no command
            assert redis.statistics().commands_total == before + 1
            await at_there.wait_for(len(sent))
            # A wake-up in the one-line format arrives as before.
            await redis.publish(prefix + CHANNEL, b"0123456789abcdef message c:3")
            await at_there.wait_for(len(sent) + 1)
            nursery.cancel_scope.cancel()
    assert list(at_there) == [*sent, ("message", "c", 3)]
    assert list(at_here) == [("message", "c", 3)]  # its own three were an echo


async def test_a_malformed_line_costs_only_that_line(redis: RedisClient) -> None:
    prefix = random_prefix()
    bus = RedisBus(redis, prefix=prefix)
    received = Received()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.listen, received.deliver)
            await redis.publish(prefix + CHANNEL, b"o1 message a:1\nnot a wake-up\no1 message b:2")
            await received.wait_for(2)
            nursery.cancel_scope.cancel()
    assert list(received) == [("message", "a", 1), ("message", "b", 2)]


async def test_the_notifier_forwards_a_burst_in_few_publishes(redis: RedisClient) -> None:
    prefix = random_prefix()
    remote = RedisBus(redis, prefix=prefix)
    received = Received()
    burst = 2 * FORWARD_BATCH + 10
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(remote.listen, received.deliver)
            before = redis.statistics().commands_total
            async with open_notifier(bus=RedisBus(redis, prefix=prefix)) as notifier:
                for device in range(1, burst + 1):
                    notifier.publish("acct", device)  # a burst: no checkpoint between
                await received.wait_for(burst)
            nursery.cancel_scope.cancel()
    assert list(received) == [("message", "acct", d) for d in range(1, burst + 1)]
    # At most FORWARD_BATCH wake-ups per PUBLISH, and no more PUBLISHes than needed.
    assert redis.statistics().commands_total - before == 3
