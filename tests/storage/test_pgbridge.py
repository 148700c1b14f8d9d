"""The asyncpg bridge against the real PostgreSQL server on loopback.

Also home of the throwaway-database helpers the other PostgreSQL test
modules import: each session creates ``pqmsg_test_<random>`` databases on the
running server and drops them at teardown.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import trio
import trio_asyncio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import StorageUnavailable
from pqmsg.storage import pgbridge
from pqmsg.storage.pgbridge import PgPool, open_pg_pool
from pqmsg.storage.postgres import PostgresStorage
from tests.support.postgres import (
    ADMIN_URL,
    create_throwaway_database,
    drop_throwaway_database,
    raw_connection,
)

pytestmark = pytest.mark.postgres

DEADLINE_S = 20  # absolute bound of every test here
SLEEP_QUERY = "SELECT pg_sleep(10)"


async def backends(url: str, application_name: str, *, query: str | None = None) -> int:
    """Server processes of this client (optionally those running ``query``)."""
    async with raw_connection(url) as con:
        count = await trio_asyncio.aio_as_trio(con.fetchval)(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND ($2::text IS NULL OR (query = $2 AND state = 'active'))",
            application_name,
            query,
        )
    return int(count)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    url = create_throwaway_database()
    try:
        yield url
    finally:
        drop_throwaway_database(url)


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    async with open_aio_loop() as loop:
        yield loop


@pytest.fixture
def app_name() -> str:
    """A per-test application_name, to find this test's server processes."""
    return f"pqmsg-test-{secrets.token_hex(4)}"


@pytest.fixture
async def pool(pg_url: str, app_name: str, aio_loop: object) -> AsyncIterator[PgPool]:
    async with open_pg_pool(
        pg_url, min_size=1, max_size=3, acquire_timeout_s=2, application_name=app_name
    ) as pool:
        yield pool


async def test_queries_round_trip(pool: PgPool) -> None:
    with trio.fail_after(DEADLINE_S):
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT $1::int + 1", 41) == 42
            row = await con.fetchrow("SELECT 'a' AS x, $1::bytea AS y", b"\x00\xff")
            assert row is not None
            assert (row["x"], row[1]) == ("a", b"\x00\xff")
            await con.execute("CREATE TEMP TABLE t (n int)")
            await con.executemany("INSERT INTO t VALUES ($1)", [(1,), (2,), (3,)])
            rows = await con.fetch("SELECT n FROM t ORDER BY n")
            assert [r["n"] for r in rows] == [1, 2, 3]


async def test_statistics_follow_the_pool(pool: PgPool) -> None:
    with trio.fail_after(DEADLINE_S):
        stats = pool.statistics()
        assert (stats.size, stats.idle, stats.in_use, stats.max_size) == (1, 1, 0, 3)
        async with pool.acquire(), pool.acquire() as second:
            await second.fetchval("SELECT 1")
            stats = pool.statistics()
            assert (stats.size, stats.idle, stats.in_use) == (2, 0, 2)
        stats = pool.statistics()
        assert (stats.size, stats.idle, stats.in_use, stats.waiting) == (2, 2, 0, 0)


async def test_exhausted_pool_fails_fast_and_counts_waiters(pg_url: str, aio_loop: object) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_pg_pool(pg_url, min_size=1, max_size=1, acquire_timeout_s=0.3) as pool:
            async with pool.acquire():
                waiting: list[int] = []

                async def watch() -> None:
                    await trio.sleep(0.1)
                    waiting.append(pool.statistics().waiting)

                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    with pytest.raises(StorageUnavailable):
                        async with pool.acquire():
                            pass  # pragma: no cover - never acquired
                assert 0.3 <= trio.current_time() - start < 1.5
                assert waiting == [1]
            assert pool.statistics().waiting == 0
            async with pool.acquire() as con:  # usable again once released
                assert await con.fetchval("SELECT 1") == 1


async def test_cancelled_query_stops_on_the_server(
    pool: PgPool, pg_url: str, app_name: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with pool.acquire() as con:
            start = trio.current_time()
            with trio.move_on_after(0.2) as scope:
                await con.execute(SLEEP_QUERY)
            assert scope.cancelled_caught
            assert trio.current_time() - start < 1.0
            # The same connection works next, once the server confirmed.
            assert await con.fetchval("SELECT 7") == 7
            assert await backends(pg_url, app_name, query=SLEEP_QUERY) == 0
        stats = pool.statistics()
        assert (stats.in_use, stats.idle) == (0, stats.size)
        assert stats.size <= stats.max_size
        # No connection leaked: the server sees exactly the pool's.
        assert await backends(pg_url, app_name) == stats.size


async def test_cancelled_transaction_rolls_back(pool: PgPool, pg_url: str, app_name: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with pool.acquire() as con:
            await con.execute("CREATE TABLE IF NOT EXISTS cancelled (n int)")
            with trio.move_on_after(0.2):
                async with con.transaction():
                    await con.execute("INSERT INTO cancelled VALUES (1)")
                    await con.execute(SLEEP_QUERY)
            assert await con.fetchval("SELECT count(*) FROM cancelled") == 0
            async with con.transaction():
                await con.execute("INSERT INTO cancelled VALUES (2)")
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT count(*) FROM cancelled") == 1
        assert await backends(pg_url, app_name, query=SLEEP_QUERY) == 0


async def test_transaction_rolls_back_on_error(pool: PgPool) -> None:
    with trio.fail_after(DEADLINE_S):
        async with pool.acquire() as con:
            await con.execute("CREATE TEMP TABLE t (n int PRIMARY KEY)")
            with pytest.raises(asyncpg.UniqueViolationError):  # SQL errors pass through
                async with con.transaction():
                    await con.execute("INSERT INTO t VALUES (1)")
                    await con.execute("INSERT INTO t VALUES (1)")
            assert await con.fetchval("SELECT count(*) FROM t") == 0
            with pytest.raises(asyncpg.DataError):  # bad arguments are not "unavailable"
                await con.fetchval("SELECT $1::uuid", "not-a-uuid")


async def test_deadlock_the_server_breaks_is_unavailable(pool: PgPool) -> None:
    """A transaction aborted to break a deadlock changed nothing: retry later (503)."""
    with trio.fail_after(DEADLINE_S):
        async with pool.acquire() as con:
            await con.execute("CREATE TABLE IF NOT EXISTS pair (n int PRIMARY KEY)")
            await con.execute("INSERT INTO pair VALUES (1), (2) ON CONFLICT DO NOTHING")
        both_locked = trio.Event()
        first: list[int] = []
        failures: list[StorageUnavailable] = []

        async def lock(mine: int, theirs: int) -> None:
            try:
                async with pool.acquire() as con, con.transaction():
                    await con.execute("SELECT 1 FROM pair WHERE n = $1 FOR UPDATE", mine)
                    first.append(mine)
                    if len(first) == 2:
                        both_locked.set()
                    await both_locked.wait()
                    await con.execute("SELECT 1 FROM pair WHERE n = $1 FOR UPDATE", theirs)
            except StorageUnavailable as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock, 1, 2)
            nursery.start_soon(lock, 2, 1)
        assert len(failures) == 1
        assert isinstance(failures[0].__cause__, asyncpg.DeadlockDetectedError)


async def test_killed_connection_is_unavailable_then_replaced(
    pool: PgPool, pg_url: str, app_name: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with pool.acquire() as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
            async with raw_connection(pg_url) as admin:
                await trio_asyncio.aio_as_trio(admin.execute)(
                    "SELECT pg_terminate_backend($1)", pid
                )
            with pytest.raises(StorageUnavailable):
                await con.fetchval("SELECT 1")
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
        assert await backends(pg_url, app_name) == pool.statistics().size


async def test_unreachable_server_fails_fast(aio_loop: object) -> None:
    with trio.fail_after(DEADLINE_S):
        start = trio.current_time()
        with pytest.raises(StorageUnavailable):
            async with open_pg_pool(
                "postgresql://postgres@127.0.0.1:1/postgres", min_size=1, max_size=1
            ):
                pass  # pragma: no cover - never opened
        assert trio.current_time() - start < 2


async def test_pool_closes_its_connections(pg_url: str, app_name: str, aio_loop: object) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_pg_pool(pg_url, min_size=2, max_size=2, application_name=app_name):
            assert await backends(pg_url, app_name) == 2
        # Closing waited for the server to see the connections go.
        for _ in range(50):
            if await backends(pg_url, app_name) == 0:
                break
            await trio.sleep(0.02)
        assert await backends(pg_url, app_name) == 0


async def test_needs_a_trio_asyncio_loop() -> None:
    with pytest.raises(RuntimeError, match="trio-asyncio loop"):
        async with open_pg_pool(ADMIN_URL, min_size=1, max_size=1):
            pass  # pragma: no cover - never opened


# -- one-shot statements: acquire, query, release in one crossing ---------------


async def test_one_shot_queries_round_trip(pool: PgPool) -> None:
    with trio.fail_after(DEADLINE_S):
        assert await pool.fetchval("SELECT $1::int + 1", 41) == 42
        row = await pool.fetchrow("SELECT 'a' AS x, $1::bytea AS y", b"\x00\xff")
        assert row is not None
        assert (row["x"], row[1]) == ("a", b"\x00\xff")
        assert await pool.fetchrow("SELECT 1 WHERE false") is None
        rows = await pool.fetch("SELECT n FROM generate_series(1, 3) AS n ORDER BY n")
        assert [r["n"] for r in rows] == [1, 2, 3]
        assert await pool.execute("CREATE TABLE IF NOT EXISTS one_shot (n int)") == "CREATE TABLE"
        assert await pool.execute("INSERT INTO one_shot VALUES (1), (2)") == "INSERT 0 2"
        with pytest.raises(asyncpg.DataError):  # SQL errors pass through
            await pool.fetchval("SELECT $1::uuid", "not-a-uuid")
        with pytest.raises(asyncpg.UndefinedTableError):
            await pool.execute("SELECT * FROM no_such_table")
        stats = pool.statistics()
        assert (stats.in_use, stats.idle, stats.waiting) == (0, stats.size, 0)


async def test_one_shot_is_one_crossing(pool: PgPool, monkeypatch: pytest.MonkeyPatch) -> None:
    crossings: list[str] = []
    real_aio_call = pgbridge.aio_call

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        crossings.append(getattr(fn, "__name__", repr(fn)))
        return await real_aio_call(fn, *args, **kwargs)

    monkeypatch.setattr(pgbridge, "aio_call", counting)
    with trio.fail_after(DEADLINE_S):
        assert await pool.fetchval("SELECT 1") == 1
        assert len(crossings) == 1
        crossings.clear()
        async with pool.acquire() as con:  # what it replaces: three
            assert await con.fetchval("SELECT 1") == 1
        assert len(crossings) == 3


async def test_one_shot_exhausted_pool_is_unavailable_in_time(
    pg_url: str, aio_loop: object
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_pg_pool(pg_url, min_size=1, max_size=1, acquire_timeout_s=0.3) as pool:
            async with pool.acquire():
                waiting: list[int] = []

                async def watch() -> None:
                    await trio.sleep(0.1)
                    waiting.append(pool.statistics().waiting)

                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    with pytest.raises(StorageUnavailable) as caught:
                        await pool.fetchval("SELECT 1")
                assert caught.value.detail == "no database connection became available in time"
                assert 0.3 <= trio.current_time() - start < 1.5
                assert waiting == [1]
            stats = pool.statistics()
            assert (stats.size, stats.in_use, stats.waiting) == (1, 0, 0)
            assert await pool.fetchval("SELECT 1") == 1  # usable once released


async def test_cancelled_one_shot_query_stops_on_the_server(
    pool: PgPool, pg_url: str, app_name: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        assert pool.statistics().size == 1  # so the sleep gets this connection
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await pool.execute(SLEEP_QUERY)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 1.0
        # Back in the pool, idle, once the server confirmed the cancel...
        stats = pool.statistics()
        assert (stats.in_use, stats.idle) == (0, stats.size)
        assert await backends(pg_url, app_name, query=SLEEP_QUERY) == 0
        # ... and clean: the same connection serves the next call.
        assert await pool.fetchval("SELECT pg_backend_pid()") == pid
        assert await backends(pg_url, app_name) == pool.statistics().size


async def test_cancel_while_acquiring_leaks_nothing(pg_url: str, aio_loop: object) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_pg_pool(pg_url, min_size=1, max_size=1, acquire_timeout_s=5) as pool:
            async with pool.acquire():
                with trio.move_on_after(0.2) as scope:
                    await pool.fetchval("SELECT 1")
                assert scope.cancelled_caught
                assert pool.statistics().waiting == 0
            assert pool.statistics().in_use == 0
            assert await pool.fetchval("SELECT 2") == 2


async def test_one_shot_killed_mid_query_is_unavailable_then_replaced(
    pool: PgPool, pg_url: str, app_name: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        failures: list[StorageUnavailable] = []

        async def sleep() -> None:
            try:
                await pool.execute(SLEEP_QUERY)
            except StorageUnavailable as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleep)
            async with raw_connection(pg_url) as admin:
                terminated = None
                while not terminated:
                    await trio.sleep(0.05)
                    terminated = await trio_asyncio.aio_as_trio(admin.fetchval)(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = $1 AND query = $2 AND state = 'active'",
                        app_name,
                        SLEEP_QUERY,
                    )
        assert len(failures) == 1
        assert pool.statistics().in_use == 0
        assert await pool.fetchval("SELECT 1") == 1  # the next call works
        assert await backends(pg_url, app_name) == pool.statistics().size


async def test_storage_deadline_covers_one_shot_acquire(pg_url: str, aio_loop: object) -> None:
    """The query timeout bounds a one-shot call, waiting for a connection included."""
    with trio.fail_after(DEADLINE_S):
        async with open_pg_pool(pg_url, min_size=1, max_size=1, acquire_timeout_s=10) as pool:
            storage = PostgresStorage(pool, query_timeout_s=0.3)
            async with pool.acquire():
                start = trio.current_time()
                with pytest.raises(StorageUnavailable) as caught:
                    await storage.ping()
                assert caught.value.detail == "the database did not answer in time"
                assert trio.current_time() - start < 1.5
            await storage.ping()
