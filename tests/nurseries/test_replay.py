"""The replay cache: a nonce is accepted once per window, in process or through Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from pqmsg.aioloop import open_aio_loop
from pqmsg.nurseries.replay import PRUNE_INTERVAL_S, ReplayCache, open_replay_cache
from pqmsg.redisconn import RedisClient, open_redis
from pqmsg.settings import AuthSettings, LimitSettings, Settings
from tests.support.redis_server import SHARED_REDIS_URL, random_prefix, raw_command

WINDOW_S = 60
SETTINGS = Settings(auth=AuthSettings(skew_window_s=20, replay_window_s=WINDOW_S))
ACCOUNT = "0b6f0d55-6a43-4a8e-9d0e-2f6a3c1d9e11"
OTHER_ACCOUNT = "7c1e8f7a-3b0f-4a51-8a41-6c9b1f0d2e33"
NONCE = "bm9uY2Utb25lLXR3by10aHJlZQ"
REDIS_TEST_TIMEOUT_S = 10.0


@pytest.fixture
async def cache() -> AsyncIterator[ReplayCache]:
    async with open_replay_cache(SETTINGS) as service:
        yield service


# In process, on the virtual clock.


async def test_a_nonce_is_fresh_once(cache: ReplayCache, autojump_clock: object) -> None:
    assert await cache.record(ACCOUNT, 1, NONCE) is True
    assert await cache.record(ACCOUNT, 1, NONCE) is False
    assert await cache.record(ACCOUNT, 1, NONCE) is False


async def test_nonces_are_per_account_and_device(
    cache: ReplayCache, autojump_clock: object
) -> None:
    assert await cache.record(ACCOUNT, 1, NONCE)

    assert await cache.record(ACCOUNT, 2, NONCE)
    assert await cache.record(OTHER_ACCOUNT, 1, NONCE)
    assert await cache.record(ACCOUNT, 1, NONCE + "x")


async def test_a_replay_within_the_window_is_caught(
    cache: ReplayCache, autojump_clock: object
) -> None:
    start = trio.current_time()
    assert await cache.record(ACCOUNT, 1, NONCE)

    await trio.sleep_until(start + WINDOW_S - 0.001)
    assert await cache.record(ACCOUNT, 1, NONCE) is False


async def test_a_nonce_is_forgotten_after_the_window(
    cache: ReplayCache, autojump_clock: object
) -> None:
    # Off the pruner's beat (every 10 s from the start): the lookup decides.
    start = trio.current_time() + 5
    await trio.sleep_until(start)
    assert await cache.record(ACCOUNT, 1, NONCE)

    await trio.sleep_until(start + WINDOW_S)
    assert await cache.record(ACCOUNT, 1, NONCE) is True
    # Accepted again means recorded again, for a whole new window.
    await trio.sleep_until(start + 2 * WINDOW_S - 0.001)
    assert await cache.record(ACCOUNT, 1, NONCE) is False


async def test_expired_nonces_are_pruned(cache: ReplayCache, autojump_clock: object) -> None:
    start = trio.current_time()
    for i in range(100):
        await cache.record(ACCOUNT, 1, f"{NONCE}{i}")
    await trio.sleep_until(start + 30)
    await cache.record(ACCOUNT, 2, NONCE)
    assert cache.statistics().entries == 101

    # The first prune after the window drops the first hundred only.
    await trio.sleep_until(start + WINDOW_S + PRUNE_INTERVAL_S + 0.5)
    assert cache.statistics().entries == 1
    await trio.sleep_until(start + 30 + WINDOW_S + PRUNE_INTERVAL_S + 0.5)
    assert cache.statistics().entries == 0


async def test_rerecording_an_unpruned_nonce_keeps_it_for_a_new_window(
    cache: ReplayCache, autojump_clock: object
) -> None:
    start = trio.current_time()
    await cache.record(ACCOUNT, 1, NONCE)
    await cache.record(ACCOUNT, 1, "later-nonce-aaaaaaaa")
    # Expired, but the pruner (every 10 s) has not run since.
    await trio.sleep_until(start + WINDOW_S + 0.001)
    assert await cache.record(ACCOUNT, 1, NONCE) is True

    await trio.sleep_until(start + WINDOW_S + PRUNE_INTERVAL_S + 0.5)
    assert cache.statistics().entries == 1
    assert await cache.record(ACCOUNT, 1, NONCE) is False


async def test_memory_statistics(cache: ReplayCache, autojump_clock: object) -> None:
    await cache.record(ACCOUNT, 1, NONCE)

    stats = cache.statistics()

    assert stats.backend == "memory"
    assert (stats.healthy, stats.detail, stats.failures) == (True, None, 0)
    assert (stats.tasks, stats.entries) == (1, 1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.entries = 0  # type: ignore[misc]


async def test_closing_stops_the_pruner(autojump_clock: object) -> None:
    async with open_replay_cache(SETTINGS) as service:
        assert service.statistics().tasks == 1
    assert service.statistics().tasks == 0


# Through Redis (the shared server on :6379, a fresh key prefix per test).


@pytest.fixture
async def redis() -> AsyncIterator[RedisClient]:
    async with open_aio_loop(), open_redis(SHARED_REDIS_URL, timeout_s=2.0) as client:
        yield client


def redis_settings(prefix: str) -> Settings:
    return attrs.evolve(SETTINGS, limits=LimitSettings(key_prefix=prefix))


@pytest.mark.redis
async def test_redis_nonce_is_fresh_once(redis: RedisClient) -> None:
    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with open_replay_cache(redis_settings(random_prefix()), redis=redis) as cache:
            assert await cache.record(ACCOUNT, 1, NONCE) is True
            assert await cache.record(ACCOUNT, 1, NONCE) is False
            assert await cache.record(ACCOUNT, 2, NONCE) is True
            assert await cache.record(OTHER_ACCOUNT, 1, NONCE) is True
            stats = cache.statistics()

    assert (stats.backend, stats.healthy, stats.failures, stats.entries) == ("redis", True, 0, 0)
    assert stats.tasks == 1


@pytest.mark.redis
async def test_redis_nonce_lives_for_the_window(redis: RedisClient) -> None:
    prefix = random_prefix()
    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with open_replay_cache(redis_settings(prefix), redis=redis) as cache:
            await cache.record(ACCOUNT, 3, NONCE)
            key = f"{prefix}nonce:{ACCOUNT}:3:{NONCE}"
            ttl_s = await raw_command(SHARED_REDIS_URL, "TTL", key)

    assert ttl_s in (WINDOW_S - 1, WINDOW_S)


@pytest.mark.redis
async def test_a_nonce_recorded_by_one_replica_is_a_replay_at_another(redis: RedisClient) -> None:
    settings = redis_settings(random_prefix())
    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with (
            open_redis(SHARED_REDIS_URL, timeout_s=2.0) as other_redis,
            open_replay_cache(settings, redis=redis) as replica_a,
            open_replay_cache(settings, redis=other_redis) as replica_b,
        ):
            assert await replica_a.record(ACCOUNT, 1, NONCE) is True
            assert await replica_b.record(ACCOUNT, 1, NONCE) is False
            assert await replica_b.record(ACCOUNT, 1, NONCE + "b") is True
            assert await replica_a.record(ACCOUNT, 1, NONCE + "b") is False


@pytest.mark.redis
async def test_concurrent_replays_admit_exactly_one(redis: RedisClient) -> None:
    settings = redis_settings(random_prefix())
    results: list[bool] = []

    async def attempt(cache: ReplayCache) -> None:
        results.append(await cache.record(ACCOUNT, 1, NONCE))

    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with (
            open_replay_cache(settings, redis=redis) as cache,
            trio.open_nursery() as nursery,
        ):
            for _ in range(20):
                nursery.start_soon(attempt, cache)

    assert sorted(results) == [False] * 19 + [True]
