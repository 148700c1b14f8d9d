"""Auto-pipelining in RedisClient: concurrent commands share one crossing, answers stay per caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from functools import partial

import pytest
import trio
import trio.testing
from redis.exceptions import ResponseError

from pqmsg.aioloop import open_aio_loop
from pqmsg.redisconn import RedisClient, RedisScript, RedisUnavailable, open_redis
from tests.support.redis_server import (
    SHARED_REDIS_URL,
    RedisServer,
    free_port,
    private_redis_server,
    random_prefix,
    raw_command,
)

pytestmark = pytest.mark.redis

TEST_TIMEOUT_S = 20.0
CALLS = 50
#: Returns KEYS[1] incremented by ARGV[1] (a script Redis can forget).
INCRBY_LUA = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
#: LPUSH onto KEYS[1]: WRONGTYPE when it holds a string.
LPUSH_LUA = "return redis.call('LPUSH', KEYS[1], 'x')"


@pytest.fixture
async def redis() -> AsyncIterator[RedisClient]:
    async with open_aio_loop(), open_redis(SHARED_REDIS_URL, timeout_s=2.0) as client:
        yield client


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with private_redis_server() as server:
            yield server


async def test_concurrent_set_nx_share_pipelines(redis: RedisClient) -> None:
    prefix = random_prefix()
    # Every key twice: exactly one of each pair sets it.
    keys = [f"{prefix}k{i % (CALLS // 2)}" for i in range(CALLS)]
    answers: dict[int, bool] = {}

    async def set_one(index: int) -> None:
        answers[index] = await redis.set_nx(keys[index], index, ex_s=60)

    before = redis.statistics()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for index in range(CALLS):
                nursery.start_soon(set_one, index)
        after = redis.statistics()
        for key in sorted(set(keys)):
            stored = await raw_command(SHARED_REDIS_URL, "GET", key)
            winners = [i for i in range(CALLS) if keys[i] == key and answers[i]]
            assert len(winners) == 1
            assert stored == str(winners[0]).encode()

    assert sorted(answers.values()) == [False] * (CALLS // 2) + [True] * (CALLS // 2)
    assert after.commands_total - before.commands_total == CALLS
    assert after.crossings_total - before.crossings_total < CALLS
    assert after.pipelines_total > before.pipelines_total


async def test_a_lone_command_is_not_pipelined(redis: RedisClient) -> None:
    prefix = random_prefix()
    script = redis.register_script(INCRBY_LUA)
    with trio.fail_after(TEST_TIMEOUT_S):
        assert await redis.set_nx(prefix + "a", 1) is True
        assert await redis.set_nx(prefix + "a", 1) is False
        assert await redis.run_script(script, keys=[prefix + "n"], args=[2]) == 2
        assert await redis.publish(prefix + "channel", b"x") == 0
    stats = redis.statistics()
    assert (stats.commands_total, stats.crossings_total, stats.pipelines_total) == (4, 4, 0)


async def test_scripts_in_a_batch_survive_script_flush(private_redis: RedisServer) -> None:
    prefix = random_prefix()
    answers: dict[int, int] = {}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_aio_loop(), open_redis(private_redis.url, timeout_s=2.0) as redis:
            script = redis.register_script(INCRBY_LUA)
            other = redis.register_script(LPUSH_LUA)

            async def run(index: int) -> None:
                answers[index] = await redis.run_script(script, keys=[f"{prefix}n{index % 2}"], args=[1])

            for _ in range(2):  # the first round loads the scripts, the second finds them flushed
                assert await raw_command(private_redis.url, "SCRIPT", "FLUSH") == b"OK"
                async with trio.open_nursery() as nursery:
                    for index in range(10):
                        nursery.start_soon(run, index)
                    nursery.start_soon(partial(redis.run_script, other, keys=[prefix + "list"], args=[]))
            stats = redis.statistics()

    assert sorted(answers.values()) == [6, 6, 7, 7, 8, 8, 9, 9, 10, 10]
    assert stats.commands_total == 22
    assert stats.pipelines_total >= 1 and stats.crossings_total < stats.commands_total


async def test_an_error_reaches_only_its_caller(redis: RedisClient) -> None:
    prefix = random_prefix()
    script = redis.register_script(LPUSH_LUA)
    outcomes: dict[int, object] = {}

    async def set_one(index: int) -> None:
        outcomes[index] = await redis.set_nx(f"{prefix}k{index}", 1)

    async def push_onto_string() -> None:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await redis.run_script(script, keys=[prefix + "string"], args=[])
        outcomes[-1] = "raised"

    with trio.fail_after(TEST_TIMEOUT_S):
        assert await redis.set_nx(prefix + "string", "a string") is True
        before = redis.statistics()
        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(set_one, index)
            nursery.start_soon(push_onto_string)
    after = redis.statistics()

    assert outcomes == {-1: "raised", **dict.fromkeys(range(10), True)}
    assert after.pipelines_total > before.pipelines_total


async def test_unreachable_redis_answers_every_caller_unavailable() -> None:
    errors: list[str] = []

    async def set_one(redis: RedisClient, index: int) -> None:
        with pytest.raises(RedisUnavailable) as info:
            await redis.set_nx(f"k{index}", 1)
        errors.append(str(info.value))

    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_aio_loop(), open_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=2.0) as redis:
            async with trio.open_nursery() as nursery:
                for index in range(20):
                    nursery.start_soon(set_one, redis, index)
            stats = redis.statistics()

    assert len(errors) == 20
    assert all(error.startswith("redis SET failed: ConnectionError") for error in errors)
    assert stats.crossings_total < stats.commands_total == 20


async def test_a_call_cancelled_while_queued_never_runs(redis: RedisClient) -> None:
    prefix = random_prefix()
    with trio.fail_after(TEST_TIMEOUT_S):
        with trio.CancelScope() as scope:
            scope.cancel()
            await redis.set_nx(prefix + "dropped", 1)  # queued, dropped as its wait is cancelled
        assert scope.cancelled_caught
        # The batcher runs one batch at a time: once a later call is
        # answered, the dropped one would have run.
        assert await redis.set_nx(prefix + "later", 1) is True
        assert await raw_command(SHARED_REDIS_URL, "EXISTS", prefix + "dropped") == 0
    assert redis.statistics().commands_total == 1


async def test_a_call_cancelled_behind_a_running_batch_never_runs(private_redis: RedisServer) -> None:
    prefix = random_prefix()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_aio_loop(), open_redis(private_redis.url, timeout_s=5.0) as redis:
            await redis.set_nx(prefix + "connect", 1)
            private_redis.pause()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(redis.set_nx, prefix + "first", 1)  # in flight, hung
                await trio.testing.wait_all_tasks_blocked()
                with trio.CancelScope() as scope:
                    scope.deadline = trio.current_time() + 0.2
                    await redis.set_nx(prefix + "dropped", 1)  # queued behind "first"
                assert scope.cancelled_caught
                private_redis.resume()
            assert await redis.set_nx(prefix + "later", 1) is True
            assert await raw_command(private_redis.url, "EXISTS", prefix + "first") == 1
            assert await raw_command(private_redis.url, "EXISTS", prefix + "dropped") == 0
            assert redis.statistics().commands_total == 3


#: Answers its argument: a reply that says which call it belongs to.
ECHO_LUA = "return ARGV[1]"


@pytest.mark.parametrize("callers", [1, 5])
async def test_a_reply_that_came_too_late_is_never_another_calls_answer(
    private_redis: RedisServer, callers: int
) -> None:
    """redis-py has no socket timeout here: the Trio deadline must drop the connection."""
    answers: list[object] = []

    async def echo(redis: RedisClient, script: RedisScript, value: str) -> None:
        answers.append(await redis.run_script(script, keys=[], args=[value]))

    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_aio_loop(), open_redis(private_redis.url, timeout_s=0.5) as redis:
            script = redis.register_script(ECHO_LUA)
            assert await redis.run_script(script, keys=[], args=["warm"]) == b"warm"
            private_redis.pause()
            async with trio.open_nursery() as nursery:
                for index in range(callers):
                    nursery.start_soon(expect_unavailable, echo(redis, script, f"late {index}"))
            private_redis.resume()  # the late replies arrive now, on dropped connections
            async with trio.open_nursery() as nursery:
                for index in range(callers):
                    nursery.start_soon(echo, redis, script, f"fresh {index}")
    assert sorted(answers) == sorted(f"fresh {index}".encode() for index in range(callers))


async def expect_unavailable(call: Awaitable[None]) -> None:
    with pytest.raises(RedisUnavailable, match="timed out"):
        await call


async def test_closing_answers_queued_callers_unavailable(private_redis: RedisServer) -> None:
    errors: list[str] = []

    async def set_one(redis: RedisClient, index: int) -> None:
        with pytest.raises(RedisUnavailable) as info:
            await redis.set_nx(f"k{index}", 1)
        errors.append(str(info.value))

    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_aio_loop(), trio.open_nursery() as nursery:
            async with open_redis(private_redis.url, timeout_s=5.0) as redis:
                await redis.ping()
                private_redis.pause()
                for index in range(5):
                    nursery.start_soon(set_one, redis, index)
                await trio.testing.wait_all_tasks_blocked()
                assert redis.statistics().crossings_total == 1  # one hung, four queued
            private_redis.resume()
            with pytest.raises(RedisUnavailable, match="closed"):
                await redis.set_nx("after-close", 1)

    assert errors == ["redis SET failed: the client is closed"] * 5


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "pqmsg:nonce:acct:1:nonce", 1, "EX", 300, "NX"),
        ("EVALSHA", "0" * 40, 1, "pqmsg:rl:send:a:1", 1_000_000, 250_000_000, 1_700_000_000_000_000),
        ("PUBLISH", "pqmsg:wake", b"origin message acct:1\norigin message acct:2"),
        ("SET", "k\u00e9y", "v\u00e4lue \u2603"),  # UTF-8, and a space inside an argument
        ("CONFIG GET", "maxmemory"),  # a command name in two words
        ("SET", "big", b"\x00\xff" * 10_000),  # above redis-py's buffer cutoff: packed in chunks
    ],
)
def test_hiredis_packing_sends_the_bytes_redis_py_would(args: tuple[object, ...]) -> None:
    import redis.asyncio as aredis
    from redis.utils import HIREDIS_AVAILABLE

    from pqmsg.redisconn import hiredis_packing

    assert HIREDIS_AVAILABLE, "setup.cfg installs redis[hiredis]"
    plain = aredis.Connection()
    packing = hiredis_packing(aredis.Connection)()
    assert type(packing) is not aredis.Connection
    assert b"".join(packing.pack_command(*args)) == b"".join(plain.pack_command(*args))
    assert b"".join(packing.pack_commands([args, args])) == b"".join(plain.pack_commands([args, args]))


async def test_the_client_packs_with_hiredis(redis: RedisClient) -> None:
    prefix = random_prefix()
    assert await redis.set_nx(prefix + "packed", "\u2603", ex_s=60)
    assert await raw_command(SHARED_REDIS_URL, "GET", prefix + "packed") == "\u2603".encode()
    pool = redis._client.connection_pool
    assert pool.connection_class.__name__.startswith("HiredisPacking")
