"""PostgreSQL going away and coming back, with the server really stopped.

This stops the shared PostgreSQL server on this machine, which other test
runs use too: the stopped window is kept to a few seconds and the server is
always started again (in a ``finally``, shielded). Deselect with
``-m "not slow"``.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio_asyncio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import StorageUnavailable
from pqmsg.settings import StorageSettings
from pqmsg.storage.base import Sender
from pqmsg.storage.postgres import PostgresStorage, open_postgres_storage
from tests.storage.contract import copies, make_account, queue_of, send
from tests.support.postgres import migrated_throwaway_database, raw_connection

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DEADLINE_S = 60.0
FAIL_FAST_S = 2.0  # a call while the server is down must fail within this


async def _cluster(url: str) -> list[str]:
    """``pg_ctlcluster VERSION NAME``, from the server's own ``cluster_name``."""
    async with open_aio_loop(), raw_connection(url) as con:
        name = await trio_asyncio.aio_as_trio(con.fetchval)("SHOW cluster_name")
    version, _, cluster = str(name).partition("/")
    if not (version.isdigit() and cluster):
        pytest.skip(f"not a pg_ctlcluster-managed server (cluster_name {name!r})")
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster]


async def _run(command: list[str]) -> None:
    await trio.run_process(command, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def pg_ctl(url: str) -> list[str]:
    return trio.run(_cluster, url)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with migrated_throwaway_database() as url:
        yield url


@pytest.fixture
async def storage(url: str) -> AsyncIterator[PostgresStorage]:
    settings = StorageSettings(
        database_url=url, pool_min_size=2, pool_max_size=4, query_timeout_s=FAIL_FAST_S
    )
    # Not under a deadline's scope: the storage runs its batchers in a nursery of its own.
    async with open_aio_loop(), open_postgres_storage(settings) as db:
        yield db


async def test_down_fails_fast_then_recovers_by_itself(
    storage: PostgresStorage, pg_ctl: list[str], now: float
) -> None:
    with trio.fail_after(DEADLINE_S):
        alice = await make_account(storage, now)
        bob = await make_account(storage, now)
        assert await send(storage, Sender(alice, 1), bob, copies(1, text="before"), now) == 1
        failures: list[BaseException] = []
        try:
            await _run([*pg_ctl, "stop", "-m", "fast"])

            async def call() -> None:
                start = trio.current_time()
                try:
                    await storage.active_device_ids(bob)
                except StorageUnavailable as exc:
                    failures.append(exc)
                assert trio.current_time() - start < FAIL_FAST_S

            # Many requests at once: each gets StorageUnavailable (503), quickly.
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(call)
            stats = storage.pool_statistics()
            assert (stats.in_use, stats.waiting) == (0, 0)
        finally:
            with trio.CancelScope(shield=True):
                await _run([*pg_ctl, "start"])
        assert len(failures) == 10
        # The same pool reconnects on its own: the next calls just work.
        assert await storage.active_device_ids(bob) == (1,)
        assert await send(storage, Sender(alice, 1), bob, copies(1, text="after"), now) == 1
        assert await queue_of(storage, bob, 1) == [b"before->1", b"after->1"]
        await storage.ping()
