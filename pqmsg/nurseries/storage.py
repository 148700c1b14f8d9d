"""The storage service: the database backend and its housekeeping loops.

:func:`open_storage` opens the backend (embedded SQLite under the data dir,
or PostgreSQL when ``PQMSG_DATABASE_URL`` says so) and runs three loops in
its own nursery:

- cleanup, every ``storage.cleanup_interval_s``: forget send ids older than
  ``messages.idempotency_window_s``;
- stale scan, every ``keys.stale_scan_interval_s``: count active devices
  whose signed prekey is older than ``keys.signed_prekey_max_age_s`` (the
  ``pqmsg_signed_prekey_stale_devices`` gauge reads the cached count);
- health, every :data:`HEALTH_INTERVAL_S`: ping the database, within
  ``storage.query_timeout_s``.

Handlers call :attr:`StorageService.db` directly; metrics and ``/health``
read :meth:`StorageService.statistics`.

Errors: a :class:`~pqmsg.errors.StorageUnavailable` in a loop marks the
service unhealthy (``detail`` says why) and the loop tries again at its next
tick; the next successful ping marks it healthy. Any other exception is a
bug: it propagates out of the nursery and stops the server. On exit the
loops are cancelled (they hold nothing to flush), then the backend is
closed, shielded, within :data:`CLOSE_GRACE_S`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, final

import attrs
import trio

from pqmsg.clock import WallClock, system_clock
from pqmsg.errors import StorageUnavailable
from pqmsg.settings import Settings
from pqmsg.storage.base import Backend, PoolStatistics
from pqmsg.storage.sqlite import open_sqlite_storage

#: How often the health loop pings the database.
HEALTH_INTERVAL_S = 5.0
#: How long closing the backend may take on exit.
CLOSE_GRACE_S = 10.0


@attrs.frozen
class StorageStatistics:
    backend: str  # "sqlite" or "postgres"
    healthy: bool
    detail: str | None  # why it is unhealthy
    tasks: int  # loops running in the service's nursery
    pool: PoolStatistics
    stale_signed_prekey_devices: int


class BackendOpener(Protocol):
    def __call__(
        self, settings: Settings, *, clock: WallClock
    ) -> AbstractAsyncContextManager[Backend]: ...


def open_backend(
    settings: Settings, *, clock: WallClock = system_clock
) -> AbstractAsyncContextManager[Backend]:
    """The configured backend: PostgreSQL for a ``postgresql://`` URL, else SQLite.

    SQLite creates the database's folder (mode 0700) if needed. PostgreSQL
    must be opened inside a trio-asyncio loop.
    """
    if settings.uses_postgres:
        from pqmsg.storage.postgres import open_postgres_storage

        return open_postgres_storage(settings.storage)
    return open_sqlite_storage(settings.sqlite_path, clock=clock)


@final
class StorageService:
    """The open backend and its health. Made by :func:`open_storage`."""

    def __init__(
        self, db: Backend, nursery: trio.Nursery, settings: Settings, clock: WallClock
    ) -> None:
        self._db = db
        self._nursery = nursery
        self._settings = settings
        self._clock = clock
        self._healthy = True
        self._detail: str | None = None
        self._stale = 0

    @property
    def db(self) -> Backend:
        return self._db

    def statistics(self) -> StorageStatistics:
        return StorageStatistics(
            backend=self._db.name,
            healthy=self._healthy,
            detail=self._detail,
            tasks=len(self._nursery.child_tasks),
            pool=self._db.pool_statistics(),
            stale_signed_prekey_devices=self._stale,
        )

    async def _start_loops(self) -> None:
        settings = self._settings
        start = self._nursery.start
        await start(self._every, settings.storage.cleanup_interval_s, self._purge)
        await start(self._every, settings.keys.stale_scan_interval_s, self._scan_stale)
        await start(self._every, HEALTH_INTERVAL_S, self._ping)

    async def _every(
        self,
        interval_s: float,
        work: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``work`` now and then every ``interval_s``; outages only mark us unhealthy."""
        task_status.started()
        while True:
            try:
                await work()
            except StorageUnavailable as exc:
                self._healthy, self._detail = False, exc.detail
            await trio.sleep(interval_s)

    async def _purge(self) -> None:
        window_s = self._settings.messages.idempotency_window_s
        await self._db.purge_idempotency(older_than=self._clock() - window_s)

    async def _scan_stale(self) -> None:
        max_age_s = self._settings.keys.signed_prekey_max_age_s
        older_than = self._clock() - max_age_s
        self._stale = await self._db.count_stale_signed_prekeys(older_than=older_than)

    async def _ping(self) -> None:
        timeout_s = self._settings.storage.query_timeout_s
        with trio.move_on_after(timeout_s) as scope:
            await self._db.ping()
        if scope.cancelled_caught:
            self._healthy = False
            self._detail = f"the database did not answer within {timeout_s:g} s"
        else:
            self._healthy, self._detail = True, None


@asynccontextmanager
async def open_storage(
    settings: Settings,
    *,
    clock: WallClock = system_clock,
    backend: BackendOpener = open_backend,
) -> AsyncIterator[StorageService]:
    """Open the backend, run the housekeeping loops, and close both on exit.

    Raises StorageUnavailable when the database cannot be opened. ``backend``
    opens the database (tests wrap the real one to inject faults).
    """
    # The backend shields its own close (within its grace); entering and
    # leaving it with ``async with`` keeps the nursery it may hold nested.
    async with backend(settings, clock=clock) as db, trio.open_nursery() as nursery:
        service = StorageService(db, nursery, settings, clock)
        await service._start_loops()
        try:
            yield service
        finally:
            nursery.cancel_scope.cancel()
