"""The storage contract on PostgreSQL, and what only this backend has:
versioned migrations under an advisory lock, row locking under concurrent
calls through several pool connections, the query deadline, the pool's
statistics, and flat cost as the queue grows.

Each session creates a throwaway database on the running server, migrates it
once, and empties it before every test; migration tests make their own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import pytest
import trio
import trio_asyncio

from pqmsg.aioloop import open_aio_loop
from pqmsg.errors import DeviceMismatch, Forbidden, StorageUnavailable
from pqmsg.settings import StorageSettings
from pqmsg.storage.base import Bundle, KeyUpload, Sender
from pqmsg.storage.migrate import load_migrations
from pqmsg.storage.pgbridge import PgConnection, open_pg_pool
from pqmsg.storage.postgres import PostgresStorage, migrate_postgres, open_postgres_storage
from pqmsg.storage.postgres_messages import ACK_SQL, FETCH_SQL, STORE_SQL
from tests.storage.contract import (
    MAX_KEYS,
    StorageContract,
    copies,
    device_of,
    ec_keys,
    make_account,
    new_id,
    pq_keys,
    pqlr,
    queue_of,
    send,
    spk,
)
from tests.support.postgres import (
    create_throwaway_database,
    drop_throwaway_database,
    raw_connection,
)

pytestmark = pytest.mark.postgres

DEADLINE_S = 20.0
POOL_MAX = 8


def pg_settings(url: str, **changes: Any) -> StorageSettings:
    return StorageSettings(database_url=url, pool_min_size=1, pool_max_size=POOL_MAX, **changes)


@pytest.fixture(scope="module")
def migrated_url() -> Iterator[str]:
    url = create_throwaway_database()
    try:
        trio.run(migrate_postgres, pg_settings(url))
        yield url
    finally:
        drop_throwaway_database(url)


@pytest.fixture
def fresh_url() -> Iterator[str]:
    url = create_throwaway_database()
    try:
        yield url
    finally:
        drop_throwaway_database(url)


async def _empty(url: str) -> None:
    async with raw_connection(url) as con:
        tables = await trio_asyncio.aio_as_trio(con.fetchval)(
            "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        )
        await trio_asyncio.aio_as_trio(con.execute)(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")


@pytest.fixture
async def storage(migrated_url: str) -> AsyncIterator[PostgresStorage]:
    async with open_aio_loop():
        with trio.fail_after(DEADLINE_S):
            await _empty(migrated_url)
        # Not under the deadline's scope: the storage runs its batchers in a nursery of its own.
        async with open_postgres_storage(pg_settings(migrated_url)) as db:
            yield db


class TestPostgresStorage(StorageContract):
    pass


# -- migrations -----------------------------------------------------------------


async def _recorded_versions(url: str) -> list[int]:
    async with raw_connection(url) as con:
        rows = await trio_asyncio.aio_as_trio(con.fetch)(
            "SELECT version FROM schema_migrations ORDER BY version"
        )
    return [row["version"] for row in rows]


async def test_open_migrates_a_fresh_database_once(fresh_url: str, now: float) -> None:
    every = [m.version for m in load_migrations("postgres")]
    async with open_aio_loop():
        with trio.fail_after(DEADLINE_S):
            async with open_postgres_storage(pg_settings(fresh_url)) as db:
                account = await make_account(db, now)
            assert await _recorded_versions(fresh_url) == every
            # Reopening applies nothing and keeps the data.
            async with open_postgres_storage(pg_settings(fresh_url)) as db:
                assert await db.active_device_ids(account) == (1,)
            assert await _recorded_versions(fresh_url) == every
            assert await migrate_postgres(pg_settings(fresh_url)) == 0


async def test_replicas_starting_together_migrate_once(fresh_url: str) -> None:
    applied: list[int] = []

    async def replica() -> None:
        applied.append(await migrate_postgres(pg_settings(fresh_url)))

    async with open_aio_loop():
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(replica)
            # Each migration is its own transaction, so with several the
            # replicas may take turns; between them each is applied once.
            assert sum(applied) == len(load_migrations("postgres"))
            assert len(applied) == 4
            assert await _recorded_versions(fresh_url) == [
                m.version for m in load_migrations("postgres")
            ]


def test_migrate_opens_its_own_loop(fresh_url: str) -> None:
    """``pqmsg migrate`` calls it from plain Trio, without a trio-asyncio loop."""
    assert trio.run(migrate_postgres, pg_settings(fresh_url)) == len(load_migrations("postgres"))


# -- concurrency through several connections -------------------------------------


async def test_concurrent_bundles_use_several_connections(
    storage: PostgresStorage, now: float
) -> None:
    with trio.fail_after(DEADLINE_S):
        account = await make_account(storage, now, devices=2)
        for device in (1, 2):
            await storage.put_keys(
                account,
                device,
                KeyUpload(spk(1), pqlr(999), ec_keys(*range(1, 31)), pq_keys(*range(1, 31))),
                max_per_kind=MAX_KEYS,
                now=now,
            )
        bundles: list[Bundle | None] = []
        peak = 0

        async def fetch() -> None:
            nonlocal peak
            bundles.append(await storage.take_bundle(account, None))
            peak = max(peak, storage.pool_statistics().in_use)

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(fetch)

        assert peak > 1  # the calls really ran side by side
        entries = [e for b in bundles if b is not None for e in b.devices]
        assert len(entries) == 80
        for device in (1, 2):
            mine = [e for e in entries if e.device == device]
            ec = sorted(e.one_time_prekey.key_id for e in mine if e.one_time_prekey)
            pq = sorted(e.pq_prekey.key_id for e in mine if e.pq_prekey and not e.pq_last_resort)
            assert ec == pq == list(range(1, 31))
            assert sum(e.pq_last_resort for e in mine) == 10


async def test_send_and_revoke_race_leaves_no_copy_for_the_revoked(
    storage: PostgresStorage, now: float
) -> None:
    with trio.fail_after(DEADLINE_S):
        alice = await make_account(storage, now)
        bob = await make_account(storage, now, devices=2)
        outcomes: list[str] = []
        underway = trio.Event()

        async def sender() -> None:
            for i in range(20):
                try:
                    await send(storage, Sender(alice, 1), bob, copies(1, 2), now)
                    outcomes.append("stored")
                except DeviceMismatch:
                    outcomes.append("mismatch")
                if i == 4:
                    underway.set()

        async def revoker() -> None:
            await underway.wait()
            assert await storage.revoke_device(bob, 2, now=now)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(revoker)

        # Every send either reached both devices before the revocation (and
        # its copy for device 2 was deleted with it) or was refused after.
        assert len(outcomes) == 20 and set(outcomes) <= {"stored", "mismatch"}
        assert await queue_of(storage, bob, 2) == []
        assert len(await queue_of(storage, bob, 1)) == outcomes.count("stored")


async def _identical_sends_while_revoking(storage: PostgresStorage, now: float) -> list[str]:
    """Five sends with one id to both of bob's devices, racing device 2's revocation."""
    alice = await make_account(storage, now)
    bob = await make_account(storage, now, devices=2)
    message_id = new_id()
    outcomes: list[str] = []

    async def store() -> None:
        try:
            result = await storage.store_messages(
                Sender(alice, 1),
                message_id,
                bob,
                copies(1, 2, epoch=1),
                now=now,
                idempotency_window_s=3600,
            )
            outcomes.append("duplicate" if result.duplicate else "stored")
        except DeviceMismatch:
            outcomes.append("mismatch")

    async def revoke() -> None:
        assert await storage.revoke_device(bob, 2, now=now)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(store)
        nursery.start_soon(revoke)
    stored = outcomes.count("stored")
    assert len(await queue_of(storage, bob, 1)) == stored
    assert await queue_of(storage, bob, 2) == []
    return sorted(outcomes)


async def test_identical_sends_racing_a_revocation_store_once_or_not_at_all(
    storage: PostgresStorage, now: float
) -> None:
    with trio.fail_after(DEADLINE_S):
        for _ in range(10):
            # Either a send stored before the revocation and every other one
            # got its result, or the revocation went first and all were
            # refused: never a refusal next to a stored send.
            assert await _identical_sends_while_revoking(storage, now) in (
                ["duplicate"] * 4 + ["stored"],
                ["mismatch"] * 5,
            )


async def _claim_in_flight(
    url: str, sender: str, message_id: str, now: float, claimed: trio.Event, *, commit: bool
) -> None:
    """Claim the send id in another session, as a concurrent send would, then end."""
    async with raw_connection(url) as con:
        tx = con.transaction()
        await trio_asyncio.aio_as_trio(tx.start)()
        await trio_asyncio.aio_as_trio(con.execute)(
            "INSERT INTO sent_messages (sender_account, message_id, created_at, stored,"
            " ratchet_advances, devices) VALUES ($1, $2, $3, 7, 3, '{1}')",
            sender,
            message_id,
            now,
        )
        claimed.set()
        await trio.sleep(0.3)  # the send under test reaches the claim and waits
        await trio_asyncio.aio_as_trio(tx.commit if commit else tx.rollback)()


@pytest.mark.parametrize("commit", [True, False])
async def test_a_send_waits_for_a_concurrent_claim_of_its_id(
    storage: PostgresStorage, migrated_url: str, now: float, commit: bool
) -> None:
    with trio.fail_after(DEADLINE_S):
        alice = await make_account(storage, now)
        bob = await make_account(storage, now)
        message_id = new_id()
        claimed = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    _claim_in_flight, migrated_url, alice, message_id, now, claimed, commit=commit
                )
            )
            await claimed.wait()
            result = await storage.store_messages(
                Sender(alice, 1),
                message_id,
                bob,
                copies(1),
                now=now,
                idempotency_window_s=3600,
            )
        if commit:
            # The other send won: its recorded result, nothing stored here.
            assert (result.duplicate, result.stored, result.ratchet_advances) == (True, 7, 3)
            assert result.devices == (1,)
            assert await queue_of(storage, bob, 1) == []
        else:
            # The other send rolled back: this one claims the id and stores.
            assert (result.duplicate, result.stored) == (False, 1)
            assert await queue_of(storage, bob, 1) == [b"m->1"]


# -- deadline and pool statistics ----------------------------------------------


async def _hold_account_lock(
    url: str, account: str, locked: trio.Event, release: trio.Event
) -> None:
    """Lock the account row in another session until ``release`` is set."""
    async with raw_connection(url) as con:
        tx = con.transaction()
        await trio_asyncio.aio_as_trio(tx.start)()
        await trio_asyncio.aio_as_trio(con.execute)(
            "SELECT 1 FROM accounts WHERE account = $1 FOR UPDATE", account
        )
        locked.set()
        await release.wait()
        await trio_asyncio.aio_as_trio(tx.rollback)()


async def test_pool_statistics_show_a_blocked_call(
    storage: PostgresStorage, migrated_url: str, now: float
) -> None:
    with trio.fail_after(DEADLINE_S):
        alice = await make_account(storage, now)
        bob = await make_account(storage, now)
        locked, release = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hold_account_lock, migrated_url, bob, locked, release)
            await locked.wait()
            nursery.start_soon(send, storage, Sender(alice, 1), bob, copies(1), now)
            for _ in range(500):
                if storage.pool_statistics().in_use:
                    break
                await trio.sleep(0.01)
            stats = storage.pool_statistics()
            assert (stats.in_use, stats.max_size, stats.waiting) == (1, POOL_MAX, 0)
            release.set()
        stats = storage.pool_statistics()
        assert stats.in_use == 0 and stats.idle >= 1
        assert await queue_of(storage, bob, 1) == [b"m->1"]


async def test_call_past_the_query_deadline_is_unavailable(migrated_url: str, now: float) -> None:
    async with open_aio_loop():
        with trio.fail_after(DEADLINE_S):
            await _empty(migrated_url)
            settings = pg_settings(migrated_url, query_timeout_s=0.5)
            async with open_postgres_storage(settings) as db:
                alice = await make_account(db, now)
                bob = await make_account(db, now)
                locked, release = trio.Event(), trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_hold_account_lock, migrated_url, bob, locked, release)
                    await locked.wait()
                    start = trio.current_time()
                    with pytest.raises(StorageUnavailable):
                        await send(db, Sender(alice, 1), bob, copies(1), now)
                    assert 0.5 <= trio.current_time() - start < 1.5
                    release.set()
                # The abandoned send was cancelled on the server and rolled
                # back; its connection goes back to the pool (the batcher
                # that ran it, not the caller, waits for that).
                for _ in range(500):
                    if not db.pool_statistics().in_use:
                        break
                    await trio.sleep(0.01)
                assert db.pool_statistics().in_use == 0
                assert await queue_of(db, bob, 1) == []
                assert await send(db, Sender(alice, 1), bob, copies(1), now) == 1


# -- flat cost as the queue grows ----------------------------------------------

_FILL = """
INSERT INTO messages (id, recipient_account, recipient_device, sender_account, sender_device,
                      ciphertext, pq_epoch, server_ts)
SELECT gen_random_uuid(), $1, 1, $2, 1, convert_to(repeat('x', 200), 'UTF8'), NULL, $3
FROM generate_series(1, $4)
"""


async def _fill(con: PgConnection, recipient: str, sender: str, count: int, now: float) -> None:
    # Bulk load without the per-row foreign-key trigger (the rows are valid).
    await con.execute("SET session_replication_role = replica")
    await con.execute(_FILL, recipient, sender, now, count)
    await con.execute("RESET session_replication_role")
    await con.execute("ANALYZE messages")


async def _explain(con: PgConnection, sql: str, *args: object) -> tuple[set[str], int]:
    """Executes ``sql`` in a rolled-back transaction; (plan node types, buffers touched)."""
    plan: dict[str, Any] = {}
    try:
        async with con.transaction():
            raw = await con.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
            plan = json.loads(raw)[0]["Plan"]
            raise _Rollback
    except _Rollback:
        pass
    nodes: set[str] = set()
    pending = [plan]
    while pending:
        node = pending.pop()
        nodes.add(node["Node Type"])
        pending.extend(node.get("Plans", []))
    return nodes, plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


class _Rollback(Exception):
    pass


async def _queue_costs(
    con: PgConnection, recipient: str, sender: str, now: float
) -> dict[str, tuple[set[str], int]]:
    """Plan node types and buffers of fetching, acking (100) and sending (1).

    A send is one call of the ``store_messages`` function: its plan shows a
    Function Scan only, and its buffers are those of every statement inside
    (lookups, the claim, the copy, the epoch, the record). Each operation
    runs twice and the second run counts, so the function's first-call
    planning and catalog reads are not charged to the queue.
    """
    head = await con.fetch(FETCH_SQL, recipient, 1, 100)
    ids = [str(row["id"]) for row in head]
    window = 3600.0
    send_args = (
        sender, 1, new_id(), recipient, now, now - window, [new_id()], [1], [b"c"], [None], None
    )
    operations: dict[str, tuple[str, tuple[object, ...]]] = {
        "fetch": (FETCH_SQL, (recipient, 1, 101)),
        "ack": (ACK_SQL, (recipient, 1, ids)),
        "send": (STORE_SQL, send_args),
    }
    costs = {}
    for name, (sql, args) in operations.items():
        await _explain(con, sql, *args)
        costs[name] = await _explain(con, sql, *args)
    return costs


@pytest.mark.slow
async def test_queue_costs_the_same_with_a_million_messages(
    storage: PostgresStorage, migrated_url: str, now: float
) -> None:
    with trio.fail_after(180):
        alice = await make_account(storage, now)
        bob = await make_account(storage, now)
        async with open_pg_pool(migrated_url, min_size=1, max_size=1) as pool:
            async with pool.acquire() as con:
                await _fill(con, bob, alice, 1_000, now)
                small = await _queue_costs(con, bob, alice, now)
                await _fill(con, bob, alice, 999_000, now)
                assert await con.fetchval("SELECT count(*) FROM messages") == 1_000_000
                large = await _queue_costs(con, bob, alice, now)
        # A budget of blocks that does not grow with the queue: index walks
        # only (a sequential scan of a million rows touches ~30,000 blocks).
        # A send is the whole store_messages function (about 30 blocks).
        budget = {"fetch": 20, "ack": 6 * 100, "send": 60}
        for name, limit in budget.items():
            assert small[name][1] <= limit and large[name][1] <= limit, (name, small, large)
            assert not large[name][0] & {"Seq Scan", "Sort"}, (name, large)


async def _link_while_revoking(storage: PostgresStorage, now: float) -> list[str]:
    account = await make_account(storage, now, devices=2)
    token = new_id().encode()
    await storage.create_provisioning_token(account, token, expires_at=now + 600)
    outcomes: list[str] = []

    async def link() -> None:
        try:
            device = await storage.link_device(token, device_of("new"), now=now)
            outcomes.append(f"linked {device}")
        except Forbidden:
            outcomes.append("refused")

    async def revoke() -> None:
        assert await storage.revoke_device(account, 2, now=now)
        outcomes.append("revoked")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(link)
        nursery.start_soon(revoke)
    return sorted(outcomes)


async def test_linking_and_revoking_together_do_not_deadlock(
    storage: PostgresStorage, now: float
) -> None:
    with trio.fail_after(DEADLINE_S):
        for _ in range(15):
            # Linked first (device 3), or refused because revoking dropped
            # the account's tokens; never a deadlock the server had to break.
            assert await _link_while_revoking(storage, now) in (
                ["linked 3", "revoked"],
                ["refused", "revoked"],
            )


async def _delete_while_revoking(storage: PostgresStorage, now: float) -> dict[str, object]:
    alice = await make_account(storage, now)
    bob = await make_account(storage, now, devices=2)
    # Ratchet state keyed by bob's device 2 as a sender: both calls delete it.
    await send(storage, Sender(bob, 2), alice, copies(1, epoch=1), now)
    results: dict[str, object] = {}

    async def delete() -> None:
        results["delete"] = await storage.delete_account(bob)

    async def revoke() -> None:
        results["revoke"] = await storage.revoke_device(bob, 2, now=now)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete)
        nursery.start_soon(revoke)
    assert await storage.get_identity_key(bob) is None
    return results


async def test_deleting_and_revoking_together_do_not_deadlock(
    storage: PostgresStorage, now: float
) -> None:
    with trio.fail_after(DEADLINE_S):
        for _ in range(15):
            results = await _delete_while_revoking(storage, now)
            # Whichever went first, both finished (the revocation finding
            # nothing left if the deletion won); no deadlock was broken.
            assert results["delete"] == (1, 2)
            assert results["revoke"] in (True, False)
