"""Redis going away: each policy holds, answers fast, and recovery needs no help.

Every test runs its own redis-server and stops it (connection refused) or
pauses it with SIGSTOP (connections hang: the timeout path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import attrs
import pytest
import trio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import RateLimited, Unavailable
from pqmsg.nurseries.admission import Admission
from pqmsg.nurseries.limiter import RateLimiter, open_rate_limiter
from pqmsg.nurseries.replay import ReplayCache, open_replay_cache
from pqmsg.redisconn import RedisClient, RedisUnavailable, open_redis
from pqmsg.settings import AuthSettings, LimitSettings, Settings
from tests.support.redis_server import RedisServer, private_redis_server, random_prefix

pytestmark = pytest.mark.redis

REDIS_TIMEOUT_S = 0.3
# "Answers quickly": well under a second, whatever Redis is doing.
FAST_S = 1.0
TEST_TIMEOUT_S = 30.0
PROBE_INTERVAL_S = 0.05
# Defaults: registration and provisioning fail closed, bundle and send open.
LIMITS = LimitSettings(key_prefix=random_prefix(), redis_timeout_s=REDIS_TIMEOUT_S)
SETTINGS = Settings(auth=AuthSettings(skew_window_s=20, replay_window_s=60), limits=LIMITS)
ACCOUNT = "0b6f0d55-6a43-4a8e-9d0e-2f6a3c1d9e11"


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with private_redis_server() as server:
            yield server


@pytest.fixture
async def redis(private_redis: RedisServer) -> AsyncIterator[RedisClient]:
    async with (
        open_aio_loop(),
        open_redis(private_redis.url, timeout_s=REDIS_TIMEOUT_S) as client,
    ):
        yield client


@pytest.fixture
async def limiter(redis: RedisClient) -> AsyncIterator[RateLimiter]:
    async with open_rate_limiter(LIMITS, redis=redis, probe_interval_s=3600) as service:
        yield service


@pytest.fixture
async def cache(redis: RedisClient) -> AsyncIterator[ReplayCache]:
    async with open_replay_cache(SETTINGS, redis=redis, probe_interval_s=3600) as service:
        yield service


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    """Seconds ``call`` took, whether it returned or raised."""
    start = trio.current_time()
    try:
        await call()
    finally:
        elapsed = trio.current_time() - start
    return elapsed


async def expect_unavailable(call: Callable[[], Awaitable[object]], reason: str) -> float:
    start = trio.current_time()
    with pytest.raises(Unavailable) as info:
        await call()
    elapsed = trio.current_time() - start
    assert (info.value.status, info.value.reason, info.value.retry_after_s) == (503, reason, 2.0)
    assert info.value.headers() == {"Retry-After": "2"}
    return elapsed


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (the caller bounds the wait)."""
    while True:
        if predicate():
            return
        await trio.sleep(0.01)


async def break_redis(server: RedisServer, how: str) -> None:
    if how == "stopped":
        await server.stop()
    else:
        server.pause()


async def mend_redis(server: RedisServer, how: str) -> None:
    if how == "stopped":
        await server.start()
    else:
        server.resume()


FAULTS = pytest.mark.parametrize("how", ["stopped", "hung"])


@FAULTS
async def test_limiter_failure_policies(
    private_redis: RedisServer, limiter: RateLimiter, how: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await limiter.check("registration", "ip")  # loads the script
        await break_redis(private_redis, how)

        for name in ("bundle", "send"):
            assert await timed(partial(limiter.check, name, "k")) < FAST_S
        for name in ("registration", "provisioning"):
            call = partial(limiter.check, name, "k")
            assert await expect_unavailable(call, "limiter_unavailable") < FAST_S

        stats = limiter.statistics()
        assert (stats.healthy, stats.redis_failures) == (False, 4)
        assert stats.detail is not None and "redis" in stats.detail
        assert set(stats.rejects.values()) == {0}

        await mend_redis(private_redis, how)
        # The first call after Redis is back succeeds (after a restart, this
        # also reloads the script Redis forgot), and limits still hold.
        for _ in range(LIMITS.registration.burst):
            await limiter.check("registration", "ip-after")
        with pytest.raises(RateLimited):
            await limiter.check("registration", "ip-after")
        stats = limiter.statistics()
        assert (stats.healthy, stats.detail, stats.redis_failures) == (True, None, 4)


@FAULTS
async def test_admission_fails_closed_whatever_the_limiters_policy(
    private_redis: RedisServer, limiter: RateLimiter, cache: ReplayCache, redis: RedisClient, how: str
) -> None:
    # "send" fails open on its own; with its nonce it must not.
    admission = Admission(cache, limiter, redis=redis)
    with trio.fail_after(TEST_TIMEOUT_S):
        assert await admission.admit(ACCOUNT, 1, "nonce-before-the-fault", "send", "d")
        await break_redis(private_redis, how)

        call = partial(admission.admit, ACCOUNT, 1, "nonce-during-the-fault", "send", "d")
        assert await expect_unavailable(call, "replay_cache_unavailable") < FAST_S
        assert (cache.statistics().healthy, cache.statistics().failures) == (False, 1)
        assert (limiter.statistics().healthy, limiter.statistics().redis_failures) == (False, 1)

        await mend_redis(private_redis, how)
        # After a restart Redis forgot the script too; the first call loads it again.
        assert await admission.admit(ACCOUNT, 1, "nonce-after-the-fault", "send", "d") is True
        assert await admission.admit(ACCOUNT, 1, "nonce-after-the-fault", "send", "d") is False
        assert (cache.statistics().healthy, limiter.statistics().healthy) == (True, True)


@FAULTS
async def test_replay_cache_fails_closed(
    private_redis: RedisServer, cache: ReplayCache, how: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        assert await cache.record(ACCOUNT, 1, "nonce-before-the-fault")
        await break_redis(private_redis, how)

        for nonce in ("nonce-during-the-fault", "nonce-before-the-fault"):
            call = partial(cache.record, ACCOUNT, 1, nonce)
            assert await expect_unavailable(call, "replay_cache_unavailable") < FAST_S
        stats = cache.statistics()
        assert (stats.healthy, stats.failures) == (False, 2)

        await mend_redis(private_redis, how)
        assert await cache.record(ACCOUNT, 1, "nonce-after-the-fault") is True
        assert await cache.record(ACCOUNT, 1, "nonce-after-the-fault") is False
        stats = cache.statistics()
        assert (stats.healthy, stats.detail, stats.failures) == (True, None, 2)


async def test_health_follows_redis_without_traffic(
    private_redis: RedisServer, redis: RedisClient
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            open_rate_limiter(LIMITS, redis=redis, probe_interval_s=PROBE_INTERVAL_S) as limiter,
            open_replay_cache(SETTINGS, redis=redis, probe_interval_s=PROBE_INTERVAL_S) as cache,
        ):
            assert limiter.statistics().tasks == cache.statistics().tasks == 1
            await private_redis.stop()
            await wait_until(lambda: not limiter.statistics().healthy)
            await wait_until(lambda: not cache.statistics().healthy)

            await private_redis.start()
            await wait_until(lambda: limiter.statistics().healthy)
            await wait_until(lambda: cache.statistics().healthy)
            # Probes are not requests: nothing failed for a client.
            assert limiter.statistics().redis_failures == cache.statistics().failures == 0


async def test_services_start_while_redis_is_down(private_redis: RedisServer) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await private_redis.stop()
        async with (
            open_aio_loop(),
            open_redis(private_redis.url, timeout_s=REDIS_TIMEOUT_S) as redis,
            open_rate_limiter(LIMITS, redis=redis, probe_interval_s=3600) as limiter,
            open_replay_cache(SETTINGS, redis=redis, probe_interval_s=3600) as cache,
        ):
            await limiter.check("send", "device")
            with pytest.raises(Unavailable):
                await cache.record(ACCOUNT, 1, "nonce-while-down")

            await private_redis.start()
            await limiter.check("registration", "ip")
            assert await cache.record(ACCOUNT, 1, "nonce-while-down") is True


@FAULTS
async def test_client_calls_raise_redis_unavailable_fast(
    private_redis: RedisServer, redis: RedisClient, how: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await redis.ping()
        await break_redis(private_redis, how)

        for call in (redis.ping, partial(redis.publish, "ch", b"x")):
            start = trio.current_time()
            with pytest.raises(RedisUnavailable):
                await call()
            assert trio.current_time() - start < FAST_S

        await mend_redis(private_redis, how)
        await redis.ping()


async def test_pubsub_round_trip_and_loss(private_redis: RedisServer, redis: RedisClient) -> None:
    channel = random_prefix() + "events"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with redis.subscribe(channel) as subscription:
            assert await redis.publish(channel, b"hello") == 1
            message = await subscription.receive()
            assert attrs.astuple(message) == (channel, b"hello")

            await private_redis.stop()
            with pytest.raises(RedisUnavailable):
                await subscription.receive()

        await private_redis.start()
        async with redis.subscribe(channel) as subscription:
            assert await redis.publish(channel, b"again") == 1
            assert (await subscription.receive()).data == b"again"
