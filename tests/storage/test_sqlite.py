"""The storage contract on the embedded SQLite backend, and what only it has:
migrations, the one-connection pool, error translation, reopening."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from pqmsg.errors import StorageUnavailable
from pqmsg.storage.base import PoolStatistics, Sender
from pqmsg.storage.migrate import load_migrations
from pqmsg.storage.sqlite import SqliteStorage, migrate_sqlite, open_sqlite_storage
from tests.storage.contract import WINDOW_S, StorageContract, copies, make_account, new_id
from tests.support.sqlite_locks import write_locked

DEADLINE_S = 20.0


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(tmp_path / "db" / "pqmsg.sqlite3") as db:
            yield db


class TestSqliteStorage(StorageContract):
    pass


async def test_migrations_are_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    versions = [m.version for m in load_migrations("sqlite")]
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path, clock=lambda: 1234.5) as db:
            account = await make_account(db, 1.0)
        async with open_sqlite_storage(path) as db:  # reopening applies nothing again
            assert await db.active_device_ids(account) == (1,)
    assert migrate_sqlite(path) == versions[-1]
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
        (mode,) = raw.execute("PRAGMA journal_mode").fetchone()
    raw.close()
    assert [row[0] for row in rows] == versions
    assert rows[0][1:] == ("init", 1234.5)
    assert mode == "wal"


def test_migrate_creates_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "pqmsg.sqlite3"
    assert migrate_sqlite(path) == len(load_migrations("sqlite"))
    assert path.is_file()


async def test_pool_statistics_count_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            account = await make_account(db, 1.0)
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    for at in (2.0, 3.0, 4.0):
                        nursery.start_soon(partial(db.touch_device, account, 1, now=at))
                        await trio.testing.wait_all_tasks_blocked()
                    # One batch holds the connection (waiting for the lock), two
                    # calls queue for the next one.
                    assert db.pool_statistics() == PoolStatistics(
                        idle=0, in_use=1, max_size=1, waiting=2
                    )
                    release()
            assert db.pool_statistics() == PoolStatistics(idle=1, in_use=0, max_size=1, waiting=0)
            auth = await db.get_device_auth(account, 1)
            assert auth is not None and auth.last_seen_at == 4.0


async def test_a_locked_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path, busy_timeout_s=0.05) as db:
            alice = await make_account(db, 1.0)
            with write_locked(path), pytest.raises(StorageUnavailable) as refused:
                await db.store_messages(
                    Sender(alice, 1),
                    new_id(),
                    alice,
                    copies(1),
                    now=2.0,
                    idempotency_window_s=WINDOW_S,
                )
            assert refused.value.status == 503
            assert "SQLITE_BUSY" in refused.value.detail
            # Nothing half-done is left behind, and the connection serves again.
            messages, _ = await db.fetch_messages(alice, 1, limit=10)
            assert messages == ()
            await db.ping()


async def test_a_queued_call_can_be_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            account = await make_account(db, 1.0)
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(db.touch_device, account, 1, now=2.0))
                    await trio.testing.wait_all_tasks_blocked()
                    with trio.move_on_after(0.05) as queued:
                        await db.touch_device(account, 1, now=3.0)
                    assert queued.cancelled_caught
                    assert db.pool_statistics().waiting == 0
                    release()
            auth = await db.get_device_auth(account, 1)
            assert auth is not None and auth.last_seen_at == 2.0


async def test_a_closed_database_is_unavailable(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(tmp_path / "pqmsg.sqlite3") as db:
            pass
        with pytest.raises(StorageUnavailable):
            await db.ping()


async def test_a_call_queued_behind_closing_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcome: list[BaseException] = []

    async def queued_fetch(db: SqliteStorage, account: str) -> None:
        try:
            await db.fetch_messages(account, 1, limit=1)
        except StorageUnavailable as exc:
            outcome.append(exc)

    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            account = await make_account(db, 1.0)
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(db.touch_device, account, 1, now=2.0))
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(db.aclose)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(queued_fetch, db, account)
                    await trio.testing.wait_all_tasks_blocked()
                    release()
    assert len(outcome) == 1


async def test_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "not-a-database"
    path.write_bytes(b"this is not an SQLite file, just some bytes" * 100)
    with trio.fail_after(DEADLINE_S), pytest.raises(StorageUnavailable):
        async with open_sqlite_storage(path):
            pass
