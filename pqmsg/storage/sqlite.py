"""The embedded SQLite backend: one connection, group commit.

sqlite3 blocks, and with ``synchronous=FULL`` every COMMIT pays an fsync
(about 1.4 ms, most of the database thread's time when each send committed
on its own). So the calls share their commits: a storage call queues its
work and waits; a single writer task takes every call queued at that
moment, at most :data:`BATCH_MAX_CALLS`, and runs them in order in ONE
worker-thread hop (``trio.to_thread.run_sync``) inside one
``BEGIN IMMEDIATE ... COMMIT``, each call in its own ``SAVEPOINT`` (see
:func:`pqmsg.storage.sqlite_connection.run_batch`). Calls that arrive while a
batch runs form the next one, so batches grow with the load and a lone call
still goes straight through.

The writer is a task of the nursery that :func:`open_sqlite_storage`
holds for as long as the storage is open; closing stops it, and the context
waits for it. It lives in the storage's own cancel scope, not a caller's, so
a request cancelled mid-call does not stop it. It never raises: a failure of
a batch outside its calls (a bug) is logged and answers that batch's calls
StorageUnavailable.

Durability is unchanged: every caller of a batch, readers included, is
answered only after the COMMIT returned, so no one sees or is told of data
that is not on disk; the batch merely shares that one fsync. A call that
raises is rolled back to its savepoint alone and its caller gets its own
error. If the COMMIT fails, or a call's error made SQLite roll back the
whole transaction, nothing of the batch is stored and every call that had
not failed on its own gets :class:`~pqmsg.errors.StorageUnavailable` (a
retry is correct: sends are idempotent).

:meth:`SqliteStorage.pool_statistics` reports the one connection: ``in_use``
is 1 while a batch runs, ``waiting`` counts the calls queued for the next
one; :meth:`SqliteStorage.batch_statistics` counts batches and calls, whose
ratio is the mean batch size.

Cancellation: a call cancelled while queued is dropped and never runs. Once
its batch has taken it, the caller waits for the batch (its work commits or
rolls back with the others) and then the cancellation takes effect. Closing
lets the running batch finish, answers the queued calls with
StorageUnavailable, and closes the connection.

Errors: ``sqlite3`` errors that mean the database cannot serve (locked past
the busy timeout, I/O, full disk, ...) become
:class:`pqmsg.errors.StorageUnavailable`; any other sqlite3 error is a bug
and propagates unchanged. The SQL lives in ``sqlite_accounts``,
``sqlite_keys`` and ``sqlite_messages``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Concatenate, Final, Generic, NoReturn, ParamSpec, TypeVar, final

import attrs
import outcome
import trio

from pqmsg.clock import WallClock, system_clock
from pqmsg.errors import StorageUnavailable
from pqmsg.storage import sqlite_accounts as accounts
from pqmsg.storage import sqlite_keys as keys
from pqmsg.storage import sqlite_messages as messages
from pqmsg.storage.base import (
    Bundle,
    DeviceAuth,
    DeviceInfo,
    KeyCounts,
    KeyStatus,
    KeyUpload,
    NewDevice,
    OutgoingCopy,
    PoolStatistics,
    ProvisioningGrant,
    PushTarget,
    QueuedMessage,
    Sender,
    StoreResult,
)
from pqmsg.storage.sqlite_connection import connect, run_batch, schema_version, unavailable

__all__ = ["BatchStatistics", "SqliteStorage", "migrate_sqlite", "open_sqlite_storage"]

BUSY_TIMEOUT_S: Final = 5.0
CLOSE_GRACE_S: Final = 10.0
PURGE_BATCH: Final = 2000  # rows per purge call, so purges never hold the connection long
BATCH_MAX_CALLS: Final = 64  # calls per commit, so one batch never holds its callers long

_P = ParamSpec("_P")
_T = TypeVar("_T")

logger = logging.getLogger(__name__)


@asynccontextmanager
async def open_sqlite_storage(
    path: Path, *, clock: WallClock = system_clock, busy_timeout_s: float = BUSY_TIMEOUT_S
) -> AsyncIterator[SqliteStorage]:
    """Open (creating and migrating) the database at ``path``; close it on exit.

    Raises StorageUnavailable when the file cannot be opened or migrated.
    Closing waits for the batch in progress, shielded, at most
    :data:`CLOSE_GRACE_S`; past that its callers are answered
    StorageUnavailable and its thread is left to finish on its own.
    """
    limiter = trio.CapacityLimiter(1)
    opener = functools.partial(connect, path, busy_timeout_s=busy_timeout_s, now=clock())
    try:
        conn = await trio.to_thread.run_sync(opener, limiter=limiter)
    except sqlite3.Error as exc:
        _reraise(exc)
    storage = SqliteStorage(conn, limiter)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage._serve, name=f"sqlite writer ({path.name})")
        try:
            yield storage
        finally:
            with trio.move_on_after(CLOSE_GRACE_S, shield=True):
                await storage.aclose()
            storage._abandon()  # a no-op unless the grace ran out with a batch running


def migrate_sqlite(path: Path, *, clock: WallClock = system_clock) -> int:
    """Create or migrate the database at ``path`` (blocking); returns its schema version."""
    try:
        conn = connect(path, busy_timeout_s=BUSY_TIMEOUT_S, now=clock())
        try:
            return schema_version(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        _reraise(exc)


def _reraise(exc: sqlite3.Error) -> NoReturn:
    """Raise StorageUnavailable for errors of the database, else ``exc`` itself."""
    translated = unavailable(exc)
    if translated is None:
        raise exc
    raise translated from exc


@attrs.frozen
class BatchStatistics:
    """Group commit since opening: ``calls / batches`` is the mean batch size."""

    batches: int  # transactions run (each one COMMIT, one thread hop)
    calls: int  # storage calls they carried


@final
class _Call(Generic[_T]):
    """One storage call, from its queueing to its answer."""

    __slots__ = ("answered", "job", "result", "taken")

    def __init__(self, job: Callable[[sqlite3.Connection], _T]) -> None:
        self.job = job
        self.taken = False  # in a batch: it runs (or ran) whatever the caller does
        self.result: outcome.Outcome[_T] | None = None
        self.answered = trio.Event()

    def answer(self, result: outcome.Outcome[_T]) -> None:
        self.result = result
        self.answered.set()


def _closed() -> outcome.Error:
    return outcome.Error(StorageUnavailable("the database is closed"))


@final
class SqliteStorage:
    """:class:`pqmsg.storage.base.Backend` on one SQLite connection.

    Made by :func:`open_sqlite_storage`, which starts its writer (:meth:`_serve`).
    """

    name = "sqlite"

    def __init__(self, conn: sqlite3.Connection, limiter: trio.CapacityLimiter) -> None:
        self._conn = conn
        self._limiter = limiter  # the thread hops of this connection, one at a time
        self._queue: dict[_Call[Any], None] = {}  # FIFO, with O(1) removal on cancel
        self._wakeup = trio.lowlevel.ParkingLot()  # the idle writer parks here
        self._running = False  # a batch is in its thread
        self._closed = False  # no more calls are queued
        self._abandoned = False  # the batch's thread outlived the close grace
        self._writer = trio.CancelScope()  # cancelled by _abandon (or the run's end)
        self._stopped = trio.Event()  # the writer is done
        self._disconnected: trio.Event | None = None  # set once the connection closed
        self._batches = 0
        self._batched_calls = 0

    def pool_statistics(self) -> PoolStatistics:
        in_use = int(self._running)
        return PoolStatistics(
            idle=0 if self._closed else 1 - in_use,
            in_use=in_use,
            max_size=1,
            waiting=len(self._queue),
        )

    def batch_statistics(self) -> BatchStatistics:
        return BatchStatistics(batches=self._batches, calls=self._batched_calls)

    async def aclose(self) -> None:
        """Let the running batch finish, refuse the queued calls, close the connection."""
        self._stop_queueing()
        await self._stopped.wait()
        if self._disconnected is not None:  # closing already, or closed
            await self._disconnected.wait()
            return
        self._disconnected = trio.Event()
        try:
            if not self._abandoned:  # else a thread still uses it
                await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)
        finally:
            self._disconnected.set()

    def _stop_queueing(self) -> None:
        """Take no more calls; answer the queued ones StorageUnavailable."""
        self._closed = True
        queued, self._queue = list(self._queue), {}
        for call in queued:
            call.answer(_closed())
        self._wakeup.unpark_all()

    def _abandon(self) -> None:
        """Stop waiting for the batch in progress (the close grace ran out)."""
        if not self._stopped.is_set():
            self._abandoned = True
            self._stop_queueing()
            self._writer.cancel()

    async def _serve(self) -> None:
        """The writer (a task of the storage's nursery): run the queued calls in
        batches until closed."""
        try:
            with self._writer:
                while batch := await self._next_batch():
                    await self._run(batch)
        finally:
            self._stop_queueing()
            self._stopped.set()

    async def _next_batch(self) -> list[_Call[Any]]:
        """The calls queued now, oldest first, at most BATCH_MAX_CALLS; [] once closed."""
        while not self._queue:
            if self._closed:
                return []
            await self._wakeup.park()
        batch = list(itertools.islice(self._queue, BATCH_MAX_CALLS))
        for call in batch:
            del self._queue[call]
            call.taken = True
        return batch

    async def _run(self, batch: list[_Call[Any]]) -> None:
        """One thread hop, one transaction; then answer every call of the batch."""
        self._batches += 1
        self._batched_calls += len(batch)
        self._running = True
        results: list[outcome.Outcome[Any]] | None = None
        lost = "the database is closed"  # unless the batch completes
        try:
            # abandon_on_cancel: only _abandon cancels the writer (after the grace).
            results = await trio.to_thread.run_sync(
                run_batch,
                self._conn,
                [call.job for call in batch],
                limiter=self._limiter,
                abandon_on_cancel=True,
            )
        except Exception:
            logger.exception("a batch of %d storage calls failed outside its calls", len(batch))
            lost = "the database is unavailable"
        finally:
            self._running = False
            for index, call in enumerate(batch):
                call.answer(
                    results[index]
                    if results is not None
                    else outcome.Error(StorageUnavailable(lost))
                )

    async def _call(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Queue ``fn(connection, ...)`` for the next batch; its result once committed."""
        if self._closed:
            raise StorageUnavailable("the database is closed")
        call = _Call(lambda conn: fn(conn, *args, **kwargs))
        self._queue[call] = None
        self._wakeup.unpark()
        try:
            await call.answered.wait()
        except BaseException:
            if not call.taken:  # still queued (or refused by closing): it never runs
                self._queue.pop(call, None)
                raise
            with trio.CancelScope(shield=True):  # it runs: wait for its batch's end
                await call.answered.wait()
            raise
        assert call.result is not None
        try:
            return call.result.unwrap()
        except sqlite3.ProgrammingError:
            raise  # a bug (the connection is closed only once no call is left)
        except sqlite3.Error as exc:
            _reraise(exc)

    # -- accounts and devices -------------------------------------------------

    async def create_account(
        self, account: str, identity_key: bytes, device: NewDevice, *, now: float
    ) -> None:
        await self._call(accounts.create_account, account, identity_key, device, now)

    async def delete_account(self, account: str) -> tuple[int, ...]:
        return await self._call(accounts.delete_account, account)

    async def get_identity_key(self, account: str) -> bytes | None:
        return await self._call(accounts.get_identity_key, account)

    async def get_device_auth(self, account: str, device: int) -> DeviceAuth | None:
        return await self._call(accounts.get_device_auth, account, device)

    async def touch_device(self, account: str, device: int, *, now: float) -> None:
        await self._call(accounts.touch_device, account, device, now)

    async def list_devices(self, account: str) -> tuple[DeviceInfo, ...]:
        return await self._call(accounts.list_devices, account)

    async def active_device_ids(self, account: str) -> tuple[int, ...]:
        return await self._call(accounts.active_device_ids, account)

    async def revoke_device(self, account: str, device: int, *, now: float) -> bool:
        """See :func:`pqmsg.storage.sqlite_accounts.revoke_device` for the tokens rule."""
        return await self._call(accounts.revoke_device, account, device, now)

    async def create_provisioning_token(
        self, account: str, token_hash: bytes, *, expires_at: float
    ) -> None:
        await self._call(accounts.create_provisioning_token, account, token_hash, expires_at)

    async def get_provisioning_grant(
        self, token_hash: bytes, *, now: float
    ) -> ProvisioningGrant | None:
        return await self._call(accounts.get_provisioning_grant, token_hash, now)

    async def link_device(self, token_hash: bytes, device: NewDevice, *, now: float) -> int:
        return await self._call(accounts.link_device, token_hash, device, now)

    # -- keys -----------------------------------------------------------------

    async def put_keys(
        self, account: str, device: int, upload: KeyUpload, *, max_per_kind: int, now: float
    ) -> KeyCounts:
        return await self._call(keys.put_keys, account, device, upload, max_per_kind, now)

    async def key_status(self, account: str, device: int) -> KeyStatus:
        return await self._call(keys.key_status, account, device)

    async def take_bundle(self, account: str, device: int | None) -> Bundle | None:
        return await self._call(keys.take_bundle, account, device)

    async def count_stale_signed_prekeys(self, *, older_than: float) -> int:
        return await self._call(keys.count_stale_signed_prekeys, older_than)

    # -- messages -------------------------------------------------------------

    async def store_messages(
        self,
        sender: Sender,
        message_id: str,
        recipient: str,
        copies: Sequence[OutgoingCopy],
        *,
        now: float,
        idempotency_window_s: float,
        sender_key: bytes | None = None,
    ) -> StoreResult:
        return await self._call(
            messages.store_messages,
            sender,
            message_id,
            recipient,
            copies,
            now,
            idempotency_window_s,
            sender_key,
        )

    async def fetch_messages(
        self, account: str, device: int, *, limit: int, device_key: bytes | None = None
    ) -> tuple[tuple[QueuedMessage, ...], bool]:
        return await self._call(messages.fetch_messages, account, device, limit, device_key)

    async def ack_messages(
        self, account: str, device: int, ids: Sequence[str], *, device_key: bytes | None = None
    ) -> int:
        return await self._call(messages.ack_messages, account, device, ids, device_key)

    async def purge_idempotency(self, *, older_than: float) -> int:
        # In batches, each its own call, so sends and fetches interleave.
        total = 0
        while True:
            purged = await self._call(messages.purge_sends, older_than, PURGE_BATCH)
            total += purged
            if purged < PURGE_BATCH:
                return total

    # -- push -----------------------------------------------------------------

    async def set_push_target(self, account: str, device: int, target: PushTarget) -> None:
        await self._call(messages.set_push_target, account, device, target)

    async def delete_push_target(self, account: str, device: int) -> bool:
        return await self._call(messages.delete_push_target, account, device)

    async def get_push_target(self, account: str, device: int) -> PushTarget | None:
        return await self._call(messages.get_push_target, account, device)

    async def drop_push_token(self, target: PushTarget) -> int:
        return await self._call(messages.drop_push_token, target)

    # -- lifecycle ------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(messages.ping)
