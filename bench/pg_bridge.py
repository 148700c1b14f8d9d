"""Compare ways of driving asyncpg from Trio: our bridge against ``triopg``.

Prints, for plain asyncio (the floor), ``pqmsg.storage.pgbridge`` and
``triopg`` (when importable):

- round-trip latency of ``SELECT 1`` on a held connection, and with an
  acquire/release around each query (median and p99, microseconds);
- throughput of that query from 8 concurrent tasks over a 4-connection pool;
- cancellation: ``pg_sleep(10)`` under ``trio.move_on_after(0.2)``: how long
  the cancelled call took to return, how soon after that the server really
  stopped the sleep, whether the next query on the same connection works and
  how long it took, and how many server connections the database has after.

``triopg`` 0.6.0 is not a dependency; install it with its missing dependency
somewhere outside the project and point ``--extra-path`` at it::

    pip install --no-deps --target DIR triopg==0.6.0 async_generator
    python bench/pg_bridge.py --extra-path DIR

Run from the repository root with the project installed (``pip install -e .``).
Needs a PostgreSQL server; ``--dsn`` defaults to the local test database.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import trio
import trio_asyncio

from pqmsg.storage.pgbridge import open_pg_pool

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CONCURRENCY = 8
POOL_SIZE = 4
SLEEP_QUERY = "SELECT pg_sleep(10)"
CANCEL_AFTER_S = 0.2

Query = Callable[[str], Awaitable[Any]]
# A pool under test: acquire() yields an object with an awaitable fetchval(query).
PoolFactory = Callable[[str, int], AbstractAsyncContextManager[Any]]


def _percentiles(samples_s: list[float]) -> str:
    ordered = sorted(samples_s)
    median = statistics.median(ordered) * 1e6
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1e6
    return f"median {median:7.1f} us   p99 {p99:7.1f} us"


async def _timed(query: Query, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await query("SELECT 1")
        samples.append(time.perf_counter() - start)
    return samples


# -- plain asyncio: the floor ---------------------------------------------------


async def _asyncio_figures(dsn: str, n: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
    try:
        async with pool.acquire() as con:
            held = await _timed(con.fetchval, n)

        async def pooled(query: str) -> Any:
            async with pool.acquire() as con:
                return await con.fetchval(query)

        per_query = await _timed(pooled, n)
        start = time.perf_counter()
        await asyncio.gather(*(_timed(pooled, n // CONCURRENCY) for _ in range(CONCURRENCY)))
        rate = n / (time.perf_counter() - start)
    finally:
        await pool.close()
    print("asyncio + asyncpg (floor)")
    print(f"  held connection      {_percentiles(held)}")
    print(f"  acquire per query    {_percentiles(per_query)}")
    print(f"  {CONCURRENCY} tasks / {POOL_SIZE} conns   {rate:8.0f} queries/s")


# -- Trio: the bridge and triopg --------------------------------------------------


@asynccontextmanager
async def _bridge_pool(dsn: str, size: int) -> AsyncIterator[Any]:
    async with open_pg_pool(dsn, min_size=size, max_size=size) as pool:
        yield pool


def _triopg_factory() -> PoolFactory | None:
    try:
        import triopg
    except ImportError:
        return None

    @asynccontextmanager
    async def factory(dsn: str, size: int) -> AsyncIterator[Any]:
        async with triopg.create_pool(dsn, min_size=size, max_size=size) as pool:
            yield pool

    return factory


async def _trio_figures(name: str, factory: PoolFactory, dsn: str, n: int) -> None:
    async with factory(dsn, POOL_SIZE) as pool:
        async with pool.acquire() as con:
            held = await _timed(con.fetchval, n)

        async def pooled(query: str) -> Any:
            async with pool.acquire() as con:
                return await con.fetchval(query)

        per_query = await _timed(pooled, n)
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(_timed, pooled, n // CONCURRENCY)
        rate = n / (time.perf_counter() - start)
        print(name)
        print(f"  held connection      {_percentiles(held)}")
        print(f"  acquire per query    {_percentiles(per_query)}")
        print(f"  {CONCURRENCY} tasks / {POOL_SIZE} conns   {rate:8.0f} queries/s")
        await _cancellation(pool, dsn)


async def _until_server_stopped(admin: Any) -> float:
    """Poll until the server runs no ``pg_sleep``; returns how long that took (s)."""
    start = time.perf_counter()
    for _ in range(10_000):
        sleeping = await trio_asyncio.aio_as_trio(admin.fetchval)(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE state = 'active' AND query = $1 AND pid <> pg_backend_pid()",
            SLEEP_QUERY,
        )
        if not sleeping:
            break
        await trio.sleep(0.001)
    return time.perf_counter() - start


async def _cancellation(pool: Any, dsn: str) -> None:
    admin = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
    try:
        async with pool.acquire() as con:
            start = time.perf_counter()
            with trio.move_on_after(CANCEL_AFTER_S) as scope:
                await con.execute(SLEEP_QUERY)
            returned_s = time.perf_counter() - start
            stopped_s = await _until_server_stopped(admin)
            start = time.perf_counter()
            value = await con.fetchval("SELECT 42")
            next_ms = (time.perf_counter() - start) * 1e3
        async with pool.acquire() as con:
            again = await con.fetchval("SELECT 43")
        backends = await trio_asyncio.aio_as_trio(admin.fetchval)(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
    finally:
        await trio_asyncio.aio_as_trio(admin.close)()
    print(
        f"  cancel pg_sleep(10) after {CANCEL_AFTER_S}s: cancelled={scope.cancelled_caught},"
        f" call returned after {returned_s:.3f}s, server stopped the sleep"
        f" {stopped_s * 1e3:.1f} ms later,"
    )
    print(
        f"    next query on the same connection {'ok' if value == 42 else 'FAILED'}"
        f" in {next_ms:.1f} ms, pool reusable: {'yes' if again == 43 else 'NO'},"
        f" server connections of this database: {backends} (pool size {POOL_SIZE})"
    )


async def _trio_main(dsn: str, n: int) -> None:
    async with trio_asyncio.open_loop():
        await _trio_figures("trio + pqmsg.storage.pgbridge", _bridge_pool, dsn, n)
        triopg = _triopg_factory()
        if triopg is None:
            print("triopg: not importable (see --extra-path)")
        else:
            await _trio_figures("trio + triopg 0.6.0", triopg, dsn, n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("-n", type=int, default=4000, help="queries per measurement")
    parser.add_argument("--extra-path", help="a directory holding triopg and async_generator")
    args = parser.parse_args(argv)
    if args.extra_path:
        sys.path.insert(0, args.extra_path)
    print(f"{args.n} queries per figure, python {sys.version.split()[0]}")
    asyncio.run(_asyncio_figures(args.dsn, args.n))
    trio.run(_trio_main, args.dsn, args.n)


if __name__ == "__main__":
    main()
