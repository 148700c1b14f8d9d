"""Admission: the nonce and the rate-limit token in one step, in process and in Redis.

The same rules hold on both backends: a fresh nonce takes a token, a replay
takes none, a refused token still uses the nonce, and limits are the
limiter's own. Through Redis it is one script (one command per request).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import RateLimited
from pqmsg.nurseries.admission import Admission
from pqmsg.nurseries.limiter import RateLimiter, open_rate_limiter
from pqmsg.nurseries.replay import ReplayCache, open_replay_cache
from pqmsg.redisconn import RedisClient, open_redis
from pqmsg.settings import AuthSettings, LimitSettings, RateLimit, Settings
from tests.support.redis_server import SHARED_REDIS_URL, random_prefix, raw_command

ACCOUNT = "0b6f0d55-6a43-4a8e-9d0e-2f6a3c1d9e11"
DEVICE_KEY = f"{ACCOUNT}:1"
# 3 at once, then one every 100 s: nothing refills during a test.
SEND = RateLimit(per_s=0.01, burst=3)
WINDOW_S = 60
TEST_TIMEOUT_S = 10.0


@attrs.frozen
class Gate:
    admission: Admission
    replay: ReplayCache
    limiter: RateLimiter
    prefix: str
    redis: RedisClient | None = None


@asynccontextmanager
async def open_gate(backend: str) -> AsyncIterator[Gate]:
    prefix = random_prefix()
    limits = LimitSettings(key_prefix=prefix, send=SEND)
    settings = Settings(auth=AuthSettings(skew_window_s=20, replay_window_s=WINDOW_S), limits=limits)
    if backend == "memory":
        async with open_rate_limiter(limits) as limiter, open_replay_cache(settings) as replay:
            yield Gate(Admission(replay, limiter), replay, limiter, prefix)
        return
    async with (
        open_aio_loop(),
        open_redis(SHARED_REDIS_URL, timeout_s=2.0) as redis,
        open_rate_limiter(limits, redis=redis) as limiter,
        open_replay_cache(settings, redis=redis) as replay,
    ):
        yield Gate(Admission(replay, limiter, redis=redis), replay, limiter, prefix, redis)


BACKENDS = pytest.mark.parametrize(
    "backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)]
)


@BACKENDS
async def test_a_fresh_nonce_takes_a_token_and_a_replay_takes_none(backend: str) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_gate(backend) as gate:
            assert await gate.admission.admit(ACCOUNT, 1, "nonce-0000000001", "send", DEVICE_KEY)
            # Replays, as many as an attacker likes: refused, and the bucket keeps its tokens.
            for _ in range(10):
                assert not await gate.admission.admit(ACCOUNT, 1, "nonce-0000000001", "send", DEVICE_KEY)
            assert await gate.admission.admit(ACCOUNT, 1, "nonce-0000000002", "send", DEVICE_KEY)
            assert await gate.admission.admit(ACCOUNT, 1, "nonce-0000000003", "send", DEVICE_KEY)
            # The burst of 3 is spent by the three fresh nonces only.
            with pytest.raises(RateLimited) as refused:
                await gate.admission.admit(ACCOUNT, 1, "nonce-0000000004", "send", DEVICE_KEY)
            stats = gate.limiter.statistics()

    # Redis runs on its own clock: a few milliseconds passed since the first token.
    assert 99.0 <= refused.value.retry_after_s <= 100.0
    assert stats.rejects["send"] == 1
    assert stats.healthy


@BACKENDS
async def test_a_refused_token_still_uses_the_nonce(backend: str) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_gate(backend) as gate:
            for n in range(SEND.burst):
                assert await gate.admission.admit(ACCOUNT, 1, f"nonce-spend-{n:05d}", "send", DEVICE_KEY)
            with pytest.raises(RateLimited):
                await gate.admission.admit(ACCOUNT, 1, "nonce-refused-0001", "send", DEVICE_KEY)
            # Answered 429 once, the same request cannot come back as new.
            assert not await gate.admission.admit(ACCOUNT, 1, "nonce-refused-0001", "send", DEVICE_KEY)
            assert not await gate.replay.record(ACCOUNT, 1, "nonce-refused-0001")


@BACKENDS
async def test_nonces_and_buckets_are_the_services_own(backend: str) -> None:
    """A nonce admitted here is a replay for the replay cache, and the reverse;
    tokens come out of the limiter's bucket."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_gate(backend) as gate:
            assert await gate.replay.record(ACCOUNT, 1, "nonce-by-the-cache")
            assert not await gate.admission.admit(ACCOUNT, 1, "nonce-by-the-cache", "send", DEVICE_KEY)
            assert await gate.admission.admit(ACCOUNT, 1, "nonce-by-admission", "send", DEVICE_KEY)
            assert not await gate.replay.record(ACCOUNT, 1, "nonce-by-admission")
            # Other devices have their own nonces.
            assert await gate.admission.admit(ACCOUNT, 2, "nonce-by-admission", "send", f"{ACCOUNT}:2")

            await gate.limiter.check("send", DEVICE_KEY)
            await gate.limiter.check("send", DEVICE_KEY)
            with pytest.raises(RateLimited):
                await gate.limiter.check("send", DEVICE_KEY)


@pytest.mark.redis
async def test_through_redis_it_is_one_command_with_the_services_keys() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_gate("redis") as gate:
            assert gate.redis is not None
            before = gate.redis.statistics().commands_total
            assert await gate.admission.admit(ACCOUNT, 1, "nonce-one-command", "send", DEVICE_KEY)
            after = gate.redis.statistics().commands_total
            nonce_ttl = await raw_command(
                SHARED_REDIS_URL, "TTL", f"{gate.prefix}nonce:{ACCOUNT}:1:nonce-one-command"
            )
            bucket_ttl_ms = await raw_command(SHARED_REDIS_URL, "PTTL", f"{gate.prefix}rl:send:{DEVICE_KEY}")

    assert after - before == 1
    assert nonce_ttl in (WINDOW_S - 1, WINDOW_S)
    # One token out of a bucket refilled every 100 s: full again in 100 s.
    assert 99_000 <= int(bucket_ttl_ms) <= 100_000  # type: ignore[call-overload]


@pytest.mark.redis
async def test_concurrent_replays_through_redis_admit_exactly_one_and_take_one_token() -> None:
    results: list[bool] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_gate("redis") as gate:

            async def attempt() -> None:
                results.append(await gate.admission.admit(ACCOUNT, 1, "nonce-concurrent", "send", DEVICE_KEY))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(attempt)
            # Two tokens of three are left.
            await gate.limiter.check("send", DEVICE_KEY)
            await gate.limiter.check("send", DEVICE_KEY)
            with pytest.raises(RateLimited):
                await gate.limiter.check("send", DEVICE_KEY)

    assert sorted(results) == [False] * 19 + [True]
