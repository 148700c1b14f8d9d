"""The embedded SQLite backend.

One connection serves every call. sqlite3 blocks, so each storage call is
one hop to a worker thread (``trio.to_thread.run_sync``) behind a
``CapacityLimiter(1)``: calls queue in FIFO order, a call runs all its
statements (and its whole transaction) in that single hop, and
:meth:`SqliteStorage.pool_statistics` reports the limiter: ``in_use`` is 1
while a call runs, ``waiting`` counts the calls queued behind it. (A
dedicated thread fed by a queue measured the same within noise, 50 to
100 us per hop, so the simpler one won.)

A call that has reached its thread is not abandoned on cancellation: it
finishes (or rolls back) before the connection serves anyone else.

Errors: ``sqlite3`` errors that mean the database cannot serve (locked past
the busy timeout, I/O, full disk, ...) become
:class:`pqmsg.errors.StorageUnavailable`; any other sqlite3 error is a bug
and propagates unchanged. The SQL lives in ``sqlite_accounts``,
``sqlite_keys`` and ``sqlite_messages``.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Concatenate, Final, NoReturn, ParamSpec, TypeVar, final

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
from pqmsg.storage.sqlite_connection import connect, schema_version, unavailable

__all__ = ["SqliteStorage", "migrate_sqlite", "open_sqlite_storage"]

BUSY_TIMEOUT_S: Final = 5.0
CLOSE_GRACE_S: Final = 10.0
PURGE_BATCH: Final = 2000  # rows per purge call, so purges never hold the connection long

_P = ParamSpec("_P")
_T = TypeVar("_T")


@asynccontextmanager
async def open_sqlite_storage(
    path: Path, *, clock: WallClock = system_clock, busy_timeout_s: float = BUSY_TIMEOUT_S
) -> AsyncIterator[SqliteStorage]:
    """Open (creating and migrating) the database at ``path``; close it on exit.

    Raises StorageUnavailable when the file cannot be opened or migrated.
    Closing waits for the call in progress, shielded, at most
    :data:`CLOSE_GRACE_S`.
    """
    limiter = trio.CapacityLimiter(1)
    opener = functools.partial(connect, path, busy_timeout_s=busy_timeout_s, now=clock())
    try:
        conn = await trio.to_thread.run_sync(opener, limiter=limiter)
    except sqlite3.Error as exc:
        _reraise(exc)
    storage = SqliteStorage(conn, limiter)
    try:
        yield storage
    finally:
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            await storage.aclose()


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


@final
class SqliteStorage:
    """:class:`pqmsg.storage.base.Backend` on one SQLite connection."""

    name = "sqlite"

    def __init__(self, conn: sqlite3.Connection, limiter: trio.CapacityLimiter) -> None:
        self._conn = conn
        self._limiter = limiter
        self._closed = False

    def pool_statistics(self) -> PoolStatistics:
        stats = self._limiter.statistics()
        return PoolStatistics(
            idle=0 if self._closed else 1 - stats.borrowed_tokens,
            in_use=stats.borrowed_tokens,
            max_size=1,
            waiting=stats.tasks_waiting,
        )

    async def aclose(self) -> None:
        """Close the connection once the call in progress is done."""
        async with self._limiter:
            if not self._closed:
                self._closed = True
                await trio.to_thread.run_sync(self._conn.close)

    async def _call(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn(connection, ...)`` on a worker thread: one hop per storage call."""
        if self._closed:
            raise StorageUnavailable("the database is closed")
        job = functools.partial(fn, self._conn, *args, **kwargs)
        try:
            return await trio.to_thread.run_sync(job, limiter=self._limiter)
        except sqlite3.ProgrammingError as exc:
            if self._closed:  # closed while this call waited for its turn
                raise StorageUnavailable("the database is closed") from exc
            raise
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
    ) -> StoreResult:
        return await self._call(
            messages.store_messages,
            sender,
            message_id,
            recipient,
            copies,
            now,
            idempotency_window_s,
        )

    async def fetch_messages(
        self, account: str, device: int, *, limit: int
    ) -> tuple[tuple[QueuedMessage, ...], bool]:
        return await self._call(messages.fetch_messages, account, device, limit)

    async def ack_messages(self, account: str, device: int, ids: Sequence[str]) -> int:
        return await self._call(messages.ack_messages, account, device, ids)

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
