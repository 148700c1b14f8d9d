"""asyncpg driven from Trio through trio-asyncio: a small, typed bridge.

Everything here must run inside a trio-asyncio loop
(``async with trio_asyncio.open_loop():``); the composition root opens one,
tests open their own. Each call runs the asyncpg coroutine as an asyncio task
and waits for it from Trio (``trio_asyncio.aio_as_trio``), so:

- Cancellation: a Trio cancel scope that fires cancels the asyncio task;
  asyncpg then sends a CancelRequest to the server and the connection waits
  for the server to acknowledge it before its next command or before it goes
  back to the pool. A cancelled ``pg_sleep`` really stops on the server.
- Errors: connection-level failures (refused, reset, server shutting down,
  pool closing, acquire deadline) are translated here, at the edge, into
  :class:`pqmsg.errors.StorageUnavailable`. SQL errors (constraint
  violations and the like) pass through unchanged for the backend to map.
- Resources: :func:`open_pg_pool` owns the asyncpg pool; a connection goes
  back to the pool when its ``acquire()`` block ends, under a shielded,
  bounded cleanup (an open transaction is rolled back; no reset query is
  sent, see :func:`_keep_session`); one that cannot be cleaned up in time
  is terminated rather than returned dirty.

Why not ``triopg``: see ``bench/pg_bridge.py`` and the README. In short, it
needs the unmaintained ``async_generator``, is untyped (``__getattr__``
proxies), and has no error translation, bounded acquire or statistics; its
latency and cancellation behaviour are the same as this bridge's because
both are the same ``aio_as_trio`` call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol, TypeVar, cast

import asyncpg
import attrs
import trio
import trio_asyncio

from pqmsg.errors import StorageUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Failures that mean "the database cannot be reached right now".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError of connect too
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ...
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing" (not subclasses)
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    # The server aborted the transaction to break a deadlock or a
    # serialization conflict: nothing was changed and a retry may succeed.
    asyncpg.exceptions.TransactionRollbackError,
    # A connection the server killed while asyncpg was between two protocol
    # states ("cannot switch to state ...; another operation is in progress").
    asyncpg.exceptions._base.InternalClientError,
)

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_CLEANUP_GRACE_S = 5.0


class Row(Protocol):
    """A result row (``asyncpg.Record``): by column name or position."""

    def __getitem__(self, key: int | str, /) -> Any: ...


@attrs.frozen
class PgPoolStatistics:
    """The pool as asyncpg sees it, plus the calls waiting for a connection."""

    size: int  # open connections
    idle: int
    in_use: int
    max_size: int
    waiting: int


async def aio_call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run the asyncio coroutine function ``fn`` from Trio (a cancel scope cancels it)."""
    return cast(T, await trio_asyncio.aio_as_trio(fn)(*args, **kwargs))


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn connection-level failures into :class:`StorageUnavailable`."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        # InterfaceError itself means a closed connection or pool; its
        # subclasses (bad client configuration or arguments, unsupported
        # features) are mistakes to surface, not outages.
        if isinstance(exc, asyncpg.InterfaceError) and type(exc) is not asyncpg.InterfaceError:
            raise
        logger.warning("database unavailable: %s", type(exc).__name__)
        raise StorageUnavailable() from exc


def rows_affected(status: str) -> int:
    """The row count of a command status such as ``DELETE 3`` or ``INSERT 0 1``."""
    return int(status.rsplit(" ", 1)[-1])


class PgConnection:
    """One pooled connection, lent for the duration of an ``acquire()`` block."""

    def __init__(self, raw: Any, *, cleanup_grace_s: float) -> None:
        self._raw = raw
        self._cleanup_grace_s = cleanup_grace_s

    async def execute(self, query: str, *args: object) -> str:
        with translate_errors():
            return await aio_call(self._raw.execute, query, *args)

    async def executemany(self, query: str, args: Sequence[Sequence[object]]) -> None:
        with translate_errors():
            await aio_call(self._raw.executemany, query, args)

    async def fetch(self, query: str, *args: object) -> list[Row]:
        with translate_errors():
            return await aio_call(self._raw.fetch, query, *args)

    async def fetchrow(self, query: str, *args: object) -> Row | None:
        with translate_errors():
            return await aio_call(self._raw.fetchrow, query, *args)

    async def fetchval(self, query: str, *args: object) -> Any:
        with translate_errors():
            return await aio_call(self._raw.fetchval, query, *args)

    @asynccontextmanager
    async def transaction(self, *, isolation: str | None = None) -> AsyncIterator[None]:
        """Run the block in a transaction: commit on success, else roll back.

        The rollback runs shielded under the cleanup grace; a connection that
        cannot roll back in time is terminated (never reused mid-transaction).
        """
        tx = self._raw.transaction(isolation=isolation)
        with translate_errors():
            await aio_call(tx.start)
        try:
            yield
        except BaseException:
            await self._rollback(tx)
            raise
        with translate_errors():
            await aio_call(tx.commit)

    async def _rollback(self, tx: Any) -> None:
        with trio.move_on_after(self._cleanup_grace_s, shield=True) as scope:
            try:
                await aio_call(tx.rollback)
                return
            except Exception as exc:  # the original error matters more
                logger.debug("rollback failed: %s", type(exc).__name__)
        if scope.cancelled_caught or not self._raw.is_closed():
            self._raw.terminate()


class PgPool:
    """A pool of connections; use :meth:`acquire` to borrow one."""

    def __init__(self, raw: Any, *, acquire_timeout_s: float, cleanup_grace_s: float) -> None:
        self._raw = raw
        self._acquire_timeout_s = acquire_timeout_s
        self._cleanup_grace_s = cleanup_grace_s
        self._waiting = 0

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[PgConnection]:
        """Borrow a connection for the block; it returns to the pool after.

        Raises :class:`StorageUnavailable` when no connection can be had
        within the acquire timeout (pool exhausted, or the server down and
        reconnecting fails).
        """
        raw = await self._acquire_raw()
        try:
            yield PgConnection(raw, cleanup_grace_s=self._cleanup_grace_s)
        except StorageUnavailable:
            # The connection failed mid-operation: asyncpg may hold it in a
            # half-finished protocol state, so it never serves another call.
            raw.terminate()
            raise
        finally:
            await self._release(raw)

    async def _acquire_raw(self) -> Any:
        raw = None
        self._waiting += 1
        try:
            with translate_errors(), trio.move_on_after(self._acquire_timeout_s):
                raw = await aio_call(self._raw.acquire)
        finally:
            self._waiting -= 1
        if raw is None:
            logger.warning("database unavailable: no connection within the acquire timeout")
            raise StorageUnavailable("no database connection became available in time")
        return raw

    async def _release(self, raw: Any) -> None:
        # Release errors are logged, not raised: the block's own outcome
        # (perhaps a committed change) is what the caller must see, and
        # asyncpg terminates a connection it cannot reset.
        with trio.move_on_after(self._cleanup_grace_s, shield=True) as scope:
            try:
                await aio_call(self._raw.release, raw, timeout=self._cleanup_grace_s)
            except Exception as exc:
                logger.debug("release failed: %s", type(exc).__name__)
        if scope.cancelled_caught:
            raw.terminate()

    def statistics(self) -> PgPoolStatistics:
        size = self._raw.get_size()
        idle = self._raw.get_idle_size()
        return PgPoolStatistics(
            size=size,
            idle=idle,
            in_use=size - idle,
            max_size=self._raw.get_max_size(),
            waiting=self._waiting,
        )


async def _keep_session(_con: Any) -> None:
    """The pool's reset on release: nothing to send, so no round trip.

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL;`` on every release, one more round trip per
    call. Sending nothing is safe because:

    - an open transaction is still rolled back: ``PoolConnectionHolder.release``
      (asyncpg 0.32, ``pool.py``) awaits ``Connection._reset()``, which sends
      ``ROLLBACK`` when the protocol reports a transaction (open or failed),
      before it calls this custom reset;
    - nothing borrowing a pooled connection leaves session state behind: no
      ``SET``, no cursors (fetches read whole results), no advisory locks
      but transaction-scoped ones (migrations), no ``LISTEN`` (the wake-up bus
      listens on a connection of its own, outside any pool; see
      :mod:`pqmsg.storage.pgbus`). :class:`PgConnection` offers no way to
      register a listener either.

    Code that needs session state must undo it before its block ends.
    """


@asynccontextmanager
async def open_pg_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    acquire_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    cleanup_grace_s: float = DEFAULT_CLEANUP_GRACE_S,
    application_name: str = "pqmsg",
) -> AsyncIterator[PgPool]:
    """Open an asyncpg pool on the current trio-asyncio loop.

    ``acquire_timeout_s`` bounds both connecting and waiting for a free
    connection, so a dead server fails calls fast instead of hanging them.
    On exit the pool waits (shielded, up to ``cleanup_grace_s``) for its
    connections to close, then terminates whatever is left.
    """
    if trio_asyncio.current_loop.get() is None:
        raise RuntimeError("open_pg_pool needs a trio-asyncio loop (trio_asyncio.open_loop())")
    with translate_errors():
        raw = await aio_call(
            asyncpg.create_pool,
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=acquire_timeout_s,
            command_timeout=None,  # deadlines are Trio cancel scopes
            server_settings={"application_name": application_name},
            reset=_keep_session,
        )
    try:
        yield PgPool(raw, acquire_timeout_s=acquire_timeout_s, cleanup_grace_s=cleanup_grace_s)
    finally:
        with trio.move_on_after(cleanup_grace_s, shield=True) as scope:
            try:
                await aio_call(raw.close)
            except Exception as exc:
                logger.debug("pool close failed: %s", type(exc).__name__)
        if scope.cancelled_caught or not raw.is_closing():
            raw.terminate()
