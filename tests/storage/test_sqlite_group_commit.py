"""Group commit on the SQLite backend: calls queued together share one
transaction (one COMMIT, one fsync), each in its own savepoint.

To put calls in one batch deterministically, another connection holds the
write lock (as another process could): the first call's batch then waits in
``BEGIN IMMEDIATE`` while the calls started after it queue, and the next
batch takes them all once the lock is released. Failures are real SQLite
ones: constraint violations, a trigger that rolls the whole transaction
back, a deferred foreign key that makes the COMMIT itself fail.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from pqmsg.errors import BadRequest, Conflict, NotFound, StorageUnavailable
from pqmsg.storage.base import PoolStatistics, Sender, StoreResult
from pqmsg.storage.sqlite import (
    BATCH_MAX_CALLS,
    CLOSE_GRACE_S,
    BatchStatistics,
    SqliteStorage,
    open_sqlite_storage,
)
from pqmsg.storage.sqlite_connection import run_batch, write
from tests.storage.contract import WINDOW_S, copies, device_of, make_account, new_id
from tests.support.sqlite_locks import write_locked

DEADLINE_S = 20.0
NOW = 10.0


class Outcomes:
    """What each concurrently started call ended with, by name."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}

    def start(self, nursery: trio.Nursery, name: str, call: Callable[[], Awaitable[Any]]) -> None:
        async def run() -> None:
            try:
                self.results[name] = await call()
            except Exception as exc:
                self.errors[name] = exc

        nursery.start_soon(run, name=name)

    @property
    def done(self) -> set[str]:
        return set(self.results) | set(self.errors)


def store(db: SqliteStorage, account: str, *, text: str = "m") -> Callable[[], Awaitable[Any]]:
    """A send from ``account`` device 1 to itself."""
    return partial(
        db.store_messages,
        Sender(account, 1),
        new_id(),
        account,
        copies(1, text=text),
        now=NOW,
        idempotency_window_s=WINDOW_S,
    )


def poison_sends(path: Path, action: str, *, setup: str | None = None) -> None:
    """A trigger that runs ``action`` when the send with text "poison" is stored."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        if setup is not None:
            raw.execute(setup)
        raw.execute(
            "CREATE TRIGGER poison AFTER INSERT ON messages"
            f" WHEN NEW.ciphertext = X'{b'poison->1'.hex()}' BEGIN {action}; END"
        )
    finally:
        raw.close()


async def queued(db: SqliteStorage, account: str) -> list[bytes]:
    messages, more = await db.fetch_messages(account, 1, limit=500)
    assert not more
    return [m.ciphertext for m in messages]


async def start_in_order(
    nursery: trio.Nursery, outcomes: Outcomes, calls: dict[str, Callable[[], Awaitable[Any]]]
) -> None:
    """Start the calls one after the other, so they queue in this order."""
    for name, call in calls.items():
        outcomes.start(nursery, name, call)
        await trio.testing.wait_all_tasks_blocked()


def grew(db: SqliteStorage, before: BatchStatistics) -> tuple[int, int]:
    """Batches and calls since ``before``."""
    now = db.batch_statistics()
    return now.batches - before.batches, now.calls - before.calls


# -- batching --------------------------------------------------------------------


async def test_calls_queued_behind_a_batch_share_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            account = await make_account(db, 1.0)
            before = db.batch_statistics()
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    await start_in_order(nursery, outcomes, {"first": store(db, account)})
                    for n in range(30):
                        outcomes.start(nursery, f"send {n}", store(db, account, text=str(n)))
                    await trio.testing.wait_all_tasks_blocked()
                    assert db.pool_statistics() == PoolStatistics(
                        idle=0, in_use=1, max_size=1, waiting=30
                    )
                    assert outcomes.done == set()
                    release()
            assert grew(db, before) == (2, 31)  # the first alone, then the 30 together
            assert outcomes.errors == {}
            assert all(r.stored == 1 for r in outcomes.results.values())
            assert len(await queued(db, account)) == 31
            assert db.pool_statistics() == PoolStatistics(idle=1, in_use=0, max_size=1, waiting=0)


async def test_concurrent_sends_commit_in_fewer_batches_than_calls(tmp_path: Path) -> None:
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(tmp_path / "pqmsg.sqlite3") as db:
            account = await make_account(db, 1.0)
            before = db.batch_statistics()
            async with trio.open_nursery() as nursery:
                for n in range(40):
                    outcomes.start(nursery, f"send {n}", store(db, account, text=str(n)))
            batches, calls = grew(db, before)
            assert calls == 40
            assert batches < calls
            assert outcomes.errors == {}
            assert sorted(await queued(db, account)) == sorted(
                f"{n}->1".encode() for n in range(40)
            )


async def test_a_batch_takes_at_most_batch_max_calls(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            account = await make_account(db, 1.0)
            before = db.batch_statistics()
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    touch = partial(db.touch_device, account, 1)
                    await start_in_order(nursery, outcomes, {"first": partial(touch, now=2.0)})
                    for n in range(BATCH_MAX_CALLS + 6):
                        outcomes.start(nursery, f"touch {n}", partial(touch, now=3.0 + n))
                    await trio.testing.wait_all_tasks_blocked()
                    release()
            assert grew(db, before) == (3, BATCH_MAX_CALLS + 7)  # 1, then 64, then 6
            assert outcomes.errors == {}
            auth = await db.get_device_auth(account, 1)
            assert auth is not None and auth.last_seen_at == 3.0 + BATCH_MAX_CALLS + 5


# -- failures ---------------------------------------------------------------------


async def test_a_failing_call_is_rolled_back_alone(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            alice = await make_account(db, 1.0)
            before = db.batch_statistics()
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    calls: dict[str, Callable[[], Awaitable[Any]]] = {
                        "first": store(db, alice, text="first"),
                        "before": store(db, alice, text="before"),
                        # A constraint violation inside its write(): a savepoint now.
                        "duplicate account": partial(
                            db.create_account, alice, b"other", device_of("9"), now=NOW
                        ),
                        # Statements ran (reads), then the call raised.
                        "unknown recipient": partial(
                            db.store_messages,
                            Sender(alice, 1),
                            new_id(),
                            new_id(),
                            copies(1),
                            now=NOW,
                            idempotency_window_s=WINDOW_S,
                        ),
                        "addressed twice": partial(
                            db.store_messages,
                            Sender(alice, 1),
                            new_id(),
                            alice,
                            copies(1, 1),
                            now=NOW,
                            idempotency_window_s=WINDOW_S,
                        ),
                        "reader": partial(db.get_identity_key, alice),
                        "after": store(db, alice, text="after"),
                    }
                    await start_in_order(nursery, outcomes, calls)
                    release()
            assert grew(db, before) == (2, len(calls))
            assert isinstance(outcomes.errors.pop("duplicate account"), Conflict)
            assert isinstance(outcomes.errors.pop("unknown recipient"), NotFound)
            assert isinstance(outcomes.errors.pop("addressed twice"), BadRequest)
            assert outcomes.errors == {}
            assert outcomes.results["reader"] == f"identity:{alice}".encode()
            assert await queued(db, alice) == [b"first->1", b"before->1", b"after->1"]
            assert await db.get_identity_key(alice) == f"identity:{alice}".encode()


async def test_a_call_that_rolls_back_the_transaction_fails_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            alice = await make_account(db, 1.0)
            # RAISE(ROLLBACK) ends the whole transaction, not just the statement.
            poison_sends(path, "SELECT RAISE(ROLLBACK, 'poisoned')")
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    await start_in_order(
                        nursery,
                        outcomes,
                        {
                            "first": store(db, alice, text="first"),
                            "before": store(db, alice, text="before"),
                            "refused": partial(
                                db.create_account, alice, b"x", device_of("9"), now=NOW
                            ),
                            "poison": store(db, alice, text="poison"),
                            "after": store(db, alice, text="after"),
                        },
                    )
                    release()
            assert isinstance(outcomes.results.pop("first"), StoreResult)
            # Its own error (a bug's, so not translated), and its own failure stays.
            poison = outcomes.errors.pop("poison")
            assert isinstance(poison, sqlite3.IntegrityError) and "poisoned" in str(poison)
            assert isinstance(outcomes.errors.pop("refused"), Conflict)
            # The others' work went with the transaction: they are told to retry.
            for name in ("before", "after"):
                lost = outcomes.errors.pop(name)
                assert isinstance(lost, StorageUnavailable), name
                assert "SQLITE_CONSTRAINT_TRIGGER" in lost.detail
            assert outcomes.results == {} and outcomes.errors == {}
            assert await queued(db, alice) == [b"first->1"]
            # The connection serves again.
            await store(db, alice, text="again")()
            assert await queued(db, alice) == [b"first->1", b"again->1"]


async def test_a_failed_commit_answers_the_whole_batch_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            alice = await make_account(db, 1.0)
            # A deferred foreign key is checked at COMMIT: the poisoned send's
            # statements succeed, and the batch's COMMIT fails.
            poison_sends(
                path,
                "INSERT INTO poisoned VALUES ('nobody')",
                setup="CREATE TABLE poisoned (account TEXT"
                " REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED)",
            )
            before = db.batch_statistics()
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    await start_in_order(
                        nursery,
                        outcomes,
                        {
                            "first": store(db, alice, text="first"),
                            "before": store(db, alice, text="before"),
                            "touch": partial(db.touch_device, alice, 1, now=5.0),
                            "refused": partial(
                                db.create_account, alice, b"x", device_of("9"), now=NOW
                            ),
                            "poison": store(db, alice, text="poison"),
                            "reader": partial(db.fetch_messages, alice, 1, limit=10),
                            "after": store(db, alice, text="after"),
                        },
                    )
                    release()
            assert grew(db, before) == (2, 7)
            assert isinstance(outcomes.results.pop("first"), StoreResult)
            assert isinstance(outcomes.errors.pop("refused"), Conflict)
            # Nobody is told of data that is not durable, readers included.
            for name in ("before", "touch", "poison", "reader", "after"):
                lost = outcomes.errors.pop(name)
                assert isinstance(lost, StorageUnavailable), name
                assert lost.status == 503
                assert "SQLITE_CONSTRAINT_FOREIGNKEY" in lost.detail
            assert outcomes.results == {} and outcomes.errors == {}
            assert await queued(db, alice) == [b"first->1"]
            auth = await db.get_device_auth(alice, 1)
            assert auth is not None and auth.last_seen_at is None
            await store(db, alice, text="again")()
            assert await queued(db, alice) == [b"first->1", b"again->1"]
    with sqlite3.connect(path) as raw:
        (sends,) = raw.execute("SELECT count(*) FROM sends").fetchone()
    raw.close()
    assert sends == 2


async def test_a_locked_database_fails_the_whole_batch(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path, busy_timeout_s=0.05) as db:
            alice = await make_account(db, 1.0)
            with write_locked(path):
                async with trio.open_nursery() as nursery:
                    for name in ("a", "b"):
                        outcomes.start(nursery, name, store(db, alice, text=name))
            assert outcomes.results == {}
            for lost in outcomes.errors.values():
                assert isinstance(lost, StorageUnavailable)
                assert "SQLITE_BUSY" in lost.detail
            assert await queued(db, alice) == []


# -- cancellation and closing -------------------------------------------------------


async def test_a_call_cancelled_while_queued_never_runs(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            alice = await make_account(db, 1.0)
            before = db.batch_statistics()
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store(db, alice, text="first"))
                    await trio.testing.wait_all_tasks_blocked()
                    with trio.CancelScope() as scope:
                        nursery.start_soon(_cancel_when_blocked, scope)
                        await store(db, alice, text="cancelled")()
                    assert scope.cancelled_caught
                    assert db.pool_statistics().waiting == 0
                    release()
            assert grew(db, before) == (1, 1)
            assert await queued(db, alice) == [b"first->1"]


async def test_a_call_cancelled_in_its_batch_waits_for_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    finished: list[bool] = []

    async def cancelled_store(db: SqliteStorage, alice: str, scope: trio.CancelScope) -> None:
        with scope:
            await store(db, alice, text="taken")()
        finished.append(scope.cancelled_caught)

    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            alice = await make_account(db, 1.0)
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    scope = trio.CancelScope()
                    nursery.start_soon(cancelled_store, db, alice, scope)
                    await trio.testing.wait_all_tasks_blocked()
                    assert db.pool_statistics().in_use == 1  # its batch waits for the lock
                    scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                    assert finished == []  # still waiting for its batch
                    release()
            assert finished == [True]  # then the cancellation took effect
            assert await queued(db, alice) == [b"taken->1"]  # and its work committed


async def test_closing_refuses_the_queued_calls_and_lets_the_batch_finish(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(path) as db:
            alice = await make_account(db, 1.0)
            with write_locked(path) as release:
                async with trio.open_nursery() as nursery:
                    await start_in_order(
                        nursery,
                        outcomes,
                        {
                            "running": store(db, alice, text="running"),
                            "queued": store(db, alice, text="queued"),
                            "queued reader": partial(db.fetch_messages, alice, 1, limit=10),
                            "close": db.aclose,
                        },
                    )
                    # The queued calls are answered at once; the batch still runs.
                    assert outcomes.done == {"queued", "queued reader"}
                    for name in ("queued", "queued reader"):
                        refused = outcomes.errors.pop(name)
                        assert isinstance(refused, StorageUnavailable)
                        assert refused.detail == "the database is closed"
                    assert db.pool_statistics() == PoolStatistics(
                        idle=0, in_use=1, max_size=1, waiting=0
                    )
                    release()
            assert outcomes.errors == {}
            assert isinstance(outcomes.results["running"], StoreResult)
            assert db.pool_statistics() == PoolStatistics(idle=0, in_use=0, max_size=1, waiting=0)
            with pytest.raises(StorageUnavailable):
                await db.ping()
        async with open_sqlite_storage(path) as db:
            assert await queued(db, alice) == [b"running->1"]


async def test_closing_waits_for_a_stuck_batch_at_most_the_grace(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    outcomes = Outcomes()
    with ExitStack() as lock:
        async with trio.open_nursery() as nursery:
            async with open_sqlite_storage(path, busy_timeout_s=60.0) as db:
                alice = await make_account(db, 1.0)
                # The batch waits for the lock far longer than the grace (in real
                # time); the mock clock moves only by jumping to the grace's end.
                lock.enter_context(write_locked(path))
                await start_in_order(nursery, outcomes, {"stuck": store(db, alice)})
                assert outcomes.done == set()
                closing_at = trio.current_time()
                mock_clock.autojump_threshold = 0
            assert trio.current_time() - closing_at == pytest.approx(CLOSE_GRACE_S)
        # The thread still waits for the lock, but its caller was answered.
        stuck = outcomes.errors.pop("stuck")
        assert isinstance(stuck, StorageUnavailable)
        assert stuck.detail == "the database is closed"
        with pytest.raises(StorageUnavailable):
            await db.ping()


async def test_leaving_the_context_closes_and_reraises(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_sqlite_storage(tmp_path / "pqmsg.sqlite3") as db:
            await db.ping()
        with pytest.raises(StorageUnavailable):
            await db.ping()
        # An exception of the block reaches the caller (grouped by the
        # writer's nursery, as with every service that owns one).
        with pytest.raises(BaseExceptionGroup) as raised:
            async with open_sqlite_storage(tmp_path / "pqmsg.sqlite3"):
                raise KeyError("the block's own")
        assert raised.group_contains(KeyError, match="the block's own")


# -- write() outside and inside a batch ------------------------------------------------


def test_write_nests_as_a_savepoint_inside_a_transaction(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER)")
    with write(conn):  # on its own: its own transaction
        assert conn.in_transaction
        conn.execute("INSERT INTO t VALUES (1)")
    assert not conn.in_transaction
    conn.execute("BEGIN IMMEDIATE")
    with write(conn):
        conn.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(ZeroDivisionError), write(conn):
        conn.execute("INSERT INTO t VALUES (3)")
        _ = 1 / 0
    assert conn.in_transaction  # the outer transaction goes on, without 3
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    conn.close()


def test_run_batch_rolls_a_failed_job_back_to_its_savepoint(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER)")

    def insert(x: int) -> Callable[[sqlite3.Connection], int]:
        return lambda c: c.execute("INSERT INTO t VALUES (?)", (x,)).rowcount

    def insert_then_fail(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (2)")  # no write(): only the batch's savepoint
        raise ValueError("half done")

    results = run_batch(conn, [insert(1), insert_then_fail, insert(3)])
    assert not conn.in_transaction  # committed
    assert [type(r) for r in results] == [outcome.Value, outcome.Error, outcome.Value]
    with pytest.raises(ValueError, match="half done"):
        results[1].unwrap()
    assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (3,)]
    conn.close()


# -- helpers -------------------------------------------------------------------------


async def _cancel_when_blocked(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()
