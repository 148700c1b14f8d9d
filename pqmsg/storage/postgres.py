"""The PostgreSQL storage backend: :class:`pqmsg.storage.base.Backend` on asyncpg.

:func:`open_postgres_storage` opens a connection pool (through
:mod:`pqmsg.storage.pgbridge`, so it must run inside a trio-asyncio loop),
applies pending migrations under an advisory lock, and yields a
:class:`PostgresStorage`. The queries live in ``postgres_accounts``,
``postgres_keys`` and ``postgres_messages``; this class bounds the whole
call by ``query_timeout_s``. A call that is one statement (the hot ones: a
send, fetch, ack, the device lookup of authentication) runs on the pool's
one-shot methods, one crossing of the trio-asyncio bridge; a call of several
statements borrows a connection for them (a crossing per statement, plus
acquire and release).

The two calls every send makes, the device lookup and the send itself, are
coalesced (:mod:`pqmsg.storage.pgbatch`): the storage opened by
:func:`open_postgres_storage` runs a batcher for each in its own nursery, and
concurrent calls share one statement (``store_messages_batch``, migration
``0003``; one ``unnest`` lookup), one crossing and one WAL flush. Each caller
still gets what its call alone gets.

Errors: a call that cannot reach the database, or does not finish within
``query_timeout_s``, raises :class:`pqmsg.errors.StorageUnavailable` (the
pool reconnects by itself on the next call). Domain errors are those named
in the contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType

import asyncpg
import outcome
import trio

from pqmsg.errors import StorageUnavailable
from pqmsg.settings import StorageSettings
from pqmsg.storage import postgres_accounts as accounts
from pqmsg.storage import postgres_keys as keys
from pqmsg.storage import postgres_messages as messages
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
from pqmsg.storage.pgbatch import Coalescer, CoalescerStatistics
from pqmsg.storage.pgbridge import PgConnection, PgPool, is_unavailable, open_pg_pool
from pqmsg.storage.postgres_migrate import apply_migrations, migrate_postgres

__all__ = ["PostgresStorage", "migrate_postgres", "open_postgres_storage"]

#: Calls per coalesced statement (see :mod:`pqmsg.storage.pgbatch`).
MAX_BATCH = 64


def rolled_back(exc: BaseException) -> bool:
    """Whether a failed statement certainly changed nothing (so its calls may run again).

    An SQL error, or a deadlock or serialization failure (which the bridge
    reports as unavailable, its cause kept), rolled the statement back. A
    lost connection, a timeout or a failed COMMIT leave it in doubt.
    """
    cause = exc.__cause__ if isinstance(exc, StorageUnavailable) else exc
    if isinstance(cause, asyncpg.exceptions.TransactionRollbackError):
        return True
    return isinstance(cause, asyncpg.PostgresError) and not is_unavailable(cause)


class PostgresStorage:
    """The relay's state in PostgreSQL; see :class:`pqmsg.storage.base.Storage`."""

    name = "postgres"

    def __init__(self, pool: PgPool, *, query_timeout_s: float) -> None:
        self._pool = pool
        self._query_timeout_s = query_timeout_s
        # Without their batchers running (see run_batchers) these run each call alone.
        self._lookups: Coalescer[tuple[str, int], DeviceAuth | None] = Coalescer(
            batch=self._lookup_batch,
            single=self._lookup_one,
            rolled_back=rolled_back,
            max_batch=MAX_BATCH,
        )
        self._stores: Coalescer[messages.StoreCall, StoreResult] = Coalescer(
            batch=self._store_batch,
            single=self._store_one,
            rolled_back=rolled_back,
            max_batch=MAX_BATCH,
        )

    async def run_batchers(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Coalesce concurrent device lookups and sends until cancelled (see pgbatch)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._lookups.run)
            await nursery.start(self._stores.run)
            task_status.started()

    def batch_statistics(self) -> dict[str, CoalescerStatistics]:
        return {"device_lookups": self._lookups.statistics(), "sends": self._stores.statistics()}

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[PgConnection]:
        """A connection for one call, the whole call bounded by the query timeout."""
        with self._deadline():
            async with self._pool.acquire() as con:
                yield con

    def _deadline(self) -> _Deadline:
        """Bound a call by the query timeout; past it, StorageUnavailable.

        For one-statement calls, which run on the pool's one-shot methods
        (``with self._deadline(): await q(self._pool, ...)``): the deadline
        covers acquiring, the statement and releasing, as for
        :meth:`_connection`.
        """
        return _Deadline(self._query_timeout_s)

    def pool_statistics(self) -> PoolStatistics:
        stats = self._pool.statistics()
        return PoolStatistics(
            idle=stats.idle, in_use=stats.in_use, max_size=stats.max_size, waiting=stats.waiting
        )

    async def ping(self) -> None:
        with self._deadline():
            await self._pool.fetchval("SELECT 1")

    # -- accounts and devices -------------------------------------------------

    async def create_account(
        self, account: str, identity_key: bytes, device: NewDevice, *, now: float
    ) -> None:
        async with self._connection() as con:
            await accounts.create_account(con, account, identity_key, device, now=now)

    async def delete_account(self, account: str) -> tuple[int, ...]:
        async with self._connection() as con:
            return await accounts.delete_account(con, account)

    async def get_identity_key(self, account: str) -> bytes | None:
        with self._deadline():
            return await accounts.get_identity_key(self._pool, account)

    async def get_device_auth(self, account: str, device: int) -> DeviceAuth | None:
        with self._deadline():
            return await self._lookups.submit((account, device))

    # The coalescers' runners need no deadline of their own: a batch runs
    # under its earliest caller's, and a call run alone under its caller's.

    async def _lookup_one(self, wanted: tuple[str, int]) -> DeviceAuth | None:
        return await accounts.get_device_auth(self._pool, *wanted)

    async def _lookup_batch(
        self, wanted: Sequence[tuple[str, int]]
    ) -> list[outcome.Outcome[DeviceAuth | None]]:
        found = await accounts.get_device_auth_many(self._pool, wanted)
        return [outcome.Value(auth) for auth in found]

    async def touch_device(self, account: str, device: int, *, now: float) -> None:
        with self._deadline():
            await accounts.touch_device(self._pool, account, device, now=now)

    async def list_devices(self, account: str) -> tuple[DeviceInfo, ...]:
        with self._deadline():
            return await accounts.list_devices(self._pool, account)

    async def active_device_ids(self, account: str) -> tuple[int, ...]:
        with self._deadline():
            return await accounts.active_device_ids(self._pool, account)

    async def revoke_device(self, account: str, device: int, *, now: float) -> bool:
        async with self._connection() as con:
            return await accounts.revoke_device(con, account, device, now=now)

    async def create_provisioning_token(
        self, account: str, token_hash: bytes, *, expires_at: float
    ) -> None:
        with self._deadline():
            await accounts.create_provisioning_token(
                self._pool, account, token_hash, expires_at=expires_at
            )

    async def get_provisioning_grant(
        self, token_hash: bytes, *, now: float
    ) -> ProvisioningGrant | None:
        with self._deadline():
            return await accounts.get_provisioning_grant(self._pool, token_hash, now=now)

    async def link_device(self, token_hash: bytes, device: NewDevice, *, now: float) -> int:
        async with self._connection() as con:
            return await accounts.link_device(con, token_hash, device, now=now)

    # -- keys -----------------------------------------------------------------

    async def put_keys(
        self, account: str, device: int, upload: KeyUpload, *, max_per_kind: int, now: float
    ) -> KeyCounts:
        async with self._connection() as con:
            return await keys.put_keys(
                con, account, device, upload, max_per_kind=max_per_kind, now=now
            )

    async def key_status(self, account: str, device: int) -> KeyStatus:
        async with self._connection() as con:
            return await keys.key_status(con, account, device)

    async def take_bundle(self, account: str, device: int | None) -> Bundle | None:
        async with self._connection() as con:
            return await keys.take_bundle(con, account, device)

    async def count_stale_signed_prekeys(self, *, older_than: float) -> int:
        with self._deadline():
            return await keys.count_stale_signed_prekeys(self._pool, older_than=older_than)

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
        messages.check_copies(copies)
        call = messages.StoreCall(
            sender, message_id, recipient, copies, now, idempotency_window_s, sender_key
        )
        with self._deadline():
            return await self._stores.submit(call)

    async def _store_one(self, call: messages.StoreCall) -> StoreResult:
        return await messages.store_messages(self._pool, call)

    async def _store_batch(
        self, calls: Sequence[messages.StoreCall]
    ) -> list[outcome.Outcome[StoreResult]]:
        return await messages.store_messages_batch(self._pool, calls)

    async def fetch_messages(
        self, account: str, device: int, *, limit: int, device_key: bytes | None = None
    ) -> tuple[tuple[QueuedMessage, ...], bool]:
        with self._deadline():
            return await messages.fetch_messages(
                self._pool, account, device, limit=limit, device_key=device_key
            )

    async def ack_messages(
        self, account: str, device: int, ids: Sequence[str], *, device_key: bytes | None = None
    ) -> int:
        with self._deadline():
            return await messages.ack_messages(
                self._pool, account, device, ids, device_key=device_key
            )

    async def purge_idempotency(self, *, older_than: float) -> int:
        with self._deadline():
            return await messages.purge_idempotency(self._pool, older_than=older_than)

    # -- push -----------------------------------------------------------------

    async def set_push_target(self, account: str, device: int, target: PushTarget) -> None:
        with self._deadline():
            await accounts.set_push_target(self._pool, account, device, target)

    async def delete_push_target(self, account: str, device: int) -> bool:
        with self._deadline():
            return await accounts.delete_push_target(self._pool, account, device)

    async def get_push_target(self, account: str, device: int) -> PushTarget | None:
        with self._deadline():
            return await accounts.get_push_target(self._pool, account, device)

    async def drop_push_token(self, target: PushTarget) -> int:
        with self._deadline():
            return await accounts.drop_push_token(self._pool, target)


@asynccontextmanager
async def open_postgres_storage(settings: StorageSettings) -> AsyncIterator[PostgresStorage]:
    """Open the pool, migrate, and yield the storage; the pool closes on exit.

    Must run inside a trio-asyncio loop. Raises
    :class:`pqmsg.errors.StorageUnavailable` when the database cannot be
    reached at start-up.
    """
    if settings.database_url is None:
        raise ValueError("open_postgres_storage needs a postgresql:// database URL")
    async with open_pg_pool(
        settings.database_url,
        min_size=min(settings.pool_min_size, settings.pool_max_size),
        max_size=settings.pool_max_size,
        acquire_timeout_s=settings.query_timeout_s,
    ) as pool:
        # Not bounded by the query timeout: a migration may rightly take long,
        # and replicas starting together wait here for the first to finish.
        await apply_migrations(pool)
        storage = PostgresStorage(pool, query_timeout_s=settings.query_timeout_s)
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run_batchers)
            yield storage
            nursery.cancel_scope.cancel()


class _Deadline:
    """``fail_after`` that raises StorageUnavailable, without generators.

    Every authenticated request enters two of these (the device lookup and,
    for a send, the store), so it is a plain cancel scope rather than a
    ``contextmanager`` around ``fail_after`` (two generators per call).
    """

    __slots__ = ("_scope",)

    def __init__(self, timeout_s: float) -> None:
        self._scope = trio.CancelScope(relative_deadline=timeout_s)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # The scope swallows only its own cancellation, which becomes
        # StorageUnavailable here, so nothing is ever suppressed.
        self._scope.__exit__(exc_type, exc, traceback)
        if self._scope.cancelled_caught:
            raise StorageUnavailable("the database did not answer in time") from trio.TooSlowError()
