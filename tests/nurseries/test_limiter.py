"""The rate limiter: exact bucket timing in process, the same rules through Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import RateLimited
from pqmsg.limits.bucket import EPSILON_S, take
from pqmsg.limits.memory import SWEEP_INTERVAL_S
from pqmsg.nurseries.limiter import LIMITERS, RateLimiter, open_rate_limiter
from pqmsg.redisconn import RedisClient, open_redis
from pqmsg.settings import LimitSettings, RateLimit
from tests.support.redis_server import SHARED_REDIS_URL, random_prefix, raw_command

# 3 at once, then one every 2 s.
SLOW = RateLimit(per_s=0.5, burst=3)
SETTINGS = LimitSettings(registration=SLOW, bundle=RateLimit(per_s=4.0, burst=1))
REDIS_TEST_TIMEOUT_S = 10.0


@pytest.fixture
async def limiter() -> AsyncIterator[RateLimiter]:
    async with open_rate_limiter(SETTINGS) as service:
        yield service


async def rejection(limiter: RateLimiter, name: str, key: str) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await limiter.check(name, key)
    return info.value


async def drain(limiter: RateLimiter, name: str, key: str, count: int) -> None:
    for _ in range(count):
        await limiter.check(name, key)


# In process, on the virtual clock.


async def test_burst_then_exact_retry_after(limiter: RateLimiter, autojump_clock: object) -> None:
    await drain(limiter, "registration", "198.51.100.7", SLOW.burst)

    error = await rejection(limiter, "registration", "198.51.100.7")

    assert error.retry_after_s == 2.0
    assert error.status == 429
    assert error.headers() == {"Retry-After": "2"}


async def test_refill_is_exact(limiter: RateLimiter, autojump_clock: object) -> None:
    await drain(limiter, "registration", "ip", SLOW.burst)
    start = trio.current_time()

    await trio.sleep_until(start + 1.999)
    assert (await rejection(limiter, "registration", "ip")).retry_after_s == pytest.approx(0.001)
    await trio.sleep_until(start + 2.0)
    await limiter.check("registration", "ip")
    assert (await rejection(limiter, "registration", "ip")).retry_after_s == 2.0


async def test_fractional_retry_after_rounds_up_in_the_header(
    limiter: RateLimiter, autojump_clock: object
) -> None:
    await limiter.check("bundle", "device")

    error = await rejection(limiter, "bundle", "device")

    assert error.retry_after_s == 0.25
    assert error.headers() == {"Retry-After": "1"}


async def test_waiting_the_retry_after_always_succeeds(
    limiter: RateLimiter, autojump_clock: object
) -> None:
    for _ in range(20):
        try:
            await limiter.check("bundle", "device")
        except RateLimited as error:
            await trio.sleep(error.retry_after_s)
            await limiter.check("bundle", "device")


async def test_buckets_are_per_key_and_per_limiter(
    limiter: RateLimiter, autojump_clock: object
) -> None:
    await drain(limiter, "registration", "a", SLOW.burst)
    await rejection(limiter, "registration", "a")

    await limiter.check("registration", "b")
    await limiter.check("provisioning", "a")


async def test_rejects_are_counted_per_limiter(
    limiter: RateLimiter, autojump_clock: object
) -> None:
    await drain(limiter, "registration", "a", SLOW.burst)
    await rejection(limiter, "registration", "a")
    await rejection(limiter, "registration", "a")
    await limiter.check("bundle", "x")
    await rejection(limiter, "bundle", "x")

    stats = limiter.statistics()

    assert dict(stats.rejects) == {"registration": 2, "provisioning": 0, "bundle": 1, "send": 0}
    assert (stats.backend, stats.healthy, stats.detail, stats.redis_failures) == (
        "memory",
        True,
        None,
        0,
    )
    assert stats.tasks == 1


async def test_statistics_are_a_snapshot(limiter: RateLimiter, autojump_clock: object) -> None:
    before = limiter.statistics()
    await limiter.check("bundle", "x")
    await rejection(limiter, "bundle", "x")

    assert before.rejects["bundle"] == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        before.buckets = 5  # type: ignore[misc]


async def test_sweeper_drops_full_buckets_only(
    limiter: RateLimiter, autojump_clock: object
) -> None:
    start = trio.current_time()
    # Full again after 3 * 2 s: dropped by the first sweep.
    await drain(limiter, "registration", "early", SLOW.burst)
    await trio.sleep_until(start + SWEEP_INTERVAL_S - 1)
    # Full again 2 s from now, after the first sweep: kept until the second.
    await limiter.check("registration", "late")
    assert limiter.statistics().buckets == 2

    await trio.sleep_until(start + SWEEP_INTERVAL_S + 0.5)
    assert limiter.statistics().buckets == 1
    await trio.sleep_until(start + 2 * SWEEP_INTERVAL_S + 0.5)
    assert limiter.statistics().buckets == 0


async def test_a_swept_bucket_starts_full(limiter: RateLimiter, autojump_clock: object) -> None:
    await drain(limiter, "registration", "ip", SLOW.burst)
    await trio.sleep(SWEEP_INTERVAL_S + 1)
    assert limiter.statistics().buckets == 0

    await drain(limiter, "registration", "ip", SLOW.burst)
    await rejection(limiter, "registration", "ip")


async def test_unknown_limiter_is_a_bug(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="unknown rate limiter"):
        await limiter.check("login", "x")


async def test_closing_stops_the_sweeper(autojump_clock: object) -> None:
    async with open_rate_limiter(SETTINGS) as service:
        assert service.statistics().tasks == 1
    assert service.statistics().tasks == 0


@given(
    per_s=st.sampled_from([0.1, 0.5, 2.0, 3.0, 50.0]),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=200),
)
def test_no_window_admits_more_than_burst_plus_refill(
    per_s: float, burst: int, gaps: list[float]
) -> None:
    limit = RateLimit(per_s=per_s, burst=burst)
    now, tat, admitted = 0.0, None, []
    for gap in gaps:
        now += gap
        taken = take(tat, now, limit)
        tat = taken.tat
        if taken.verdict.allowed:
            admitted.append(now)
        else:
            # Retry-After is honest: a request then would fit.
            assert take(tat, now + taken.verdict.wait_s, limit).verdict.allowed

    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j] - first
            assert j - i + 1 <= burst + window * per_s + EPSILON_S * per_s + 1e-6


# Through Redis (the shared server on :6379, a fresh key prefix per test).


@pytest.fixture
async def redis() -> AsyncIterator[RedisClient]:
    async with open_aio_loop(), open_redis(SHARED_REDIS_URL, timeout_s=2.0) as client:
        yield client


def redis_settings(prefix: str) -> LimitSettings:
    return attrs.evolve(SETTINGS, key_prefix=prefix, send=RateLimit(per_s=20.0, burst=2))


@pytest.mark.redis
async def test_redis_burst_then_retry_after(redis: RedisClient) -> None:
    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with open_rate_limiter(redis_settings(random_prefix()), redis=redis) as limiter:
            await drain(limiter, "registration", "ip", SLOW.burst)
            error = await rejection(limiter, "registration", "ip")
            stats = limiter.statistics()

    # Redis's clock moved on a little while the burst went through.
    assert 1.9 < error.retry_after_s <= 2.0
    assert error.headers() == {"Retry-After": "2"}
    assert stats.rejects["registration"] == 1
    assert (stats.backend, stats.healthy, stats.buckets, stats.tasks) == ("redis", True, 0, 1)


@pytest.mark.redis
async def test_redis_refills_after_retry_after(redis: RedisClient) -> None:
    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with open_rate_limiter(redis_settings(random_prefix()), redis=redis) as limiter:
            await drain(limiter, "send", "device", 2)
            error = await rejection(limiter, "send", "device")
            assert 0 < error.retry_after_s <= 0.05

            await trio.sleep(error.retry_after_s)
            await limiter.check("send", "device")
            await rejection(limiter, "send", "device")


@pytest.mark.redis
async def test_replicas_share_one_bucket(redis: RedisClient) -> None:
    settings = redis_settings(random_prefix())
    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with (
            open_redis(SHARED_REDIS_URL, timeout_s=2.0) as other_redis,
            open_rate_limiter(settings, redis=redis) as replica_a,
            open_rate_limiter(settings, redis=other_redis) as replica_b,
        ):
            await drain(replica_a, "registration", "ip", SLOW.burst - 1)
            await replica_b.check("registration", "ip")
            await rejection(replica_a, "registration", "ip")
            await rejection(replica_b, "registration", "ip")
            await replica_b.check("registration", "other-ip")

            assert replica_a.statistics().rejects["registration"] == 1
            assert replica_b.statistics().rejects["registration"] == 1


@pytest.mark.redis
async def test_redis_bucket_key_expires_when_full(redis: RedisClient) -> None:
    prefix = random_prefix()
    key = f"{prefix}rl:send:device"
    with trio.fail_after(REDIS_TEST_TIMEOUT_S):
        async with open_rate_limiter(redis_settings(prefix), redis=redis) as limiter:
            await limiter.check("send", "device")
            ttl_ms = await raw_command(SHARED_REDIS_URL, "PTTL", key)
            assert isinstance(ttl_ms, int)
            assert 0 < ttl_ms <= 50

            await trio.sleep(0.1)
            assert await raw_command(SHARED_REDIS_URL, "EXISTS", key) == 0
            # And a vanished bucket is a full one.
            await drain(limiter, "send", "device", 2)


def test_every_limiter_has_settings() -> None:
    settings = LimitSettings()
    for name in LIMITERS:
        assert isinstance(getattr(settings, name), RateLimit)
        assert getattr(settings, f"{name}_on_failure") in ("open", "closed")
