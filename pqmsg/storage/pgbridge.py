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
- Crossings: every ``aio_call`` costs the single event-loop thread an
  asyncio Task, futures and a Trio reschedule. A statement run through
  ``acquire()`` makes three (acquire, query, release); the pool's one-shot
  methods (:meth:`PgPool.fetchrow` and friends) run all three steps as one
  asyncio coroutine, so one crossing, for every call that is one statement.

Why not ``triopg``: see ``bench/pg_bridge.py`` and the README. In short, it
needs the unmaintained ``async_generator``, is untyped (``__getattr__``
proxies), and has no error translation, bounded acquire or statistics; its
latency and cancellation behaviour are the same as this bridge's because
both are the same ``aio_as_trio`` call.
"""

from __future__ import annotations

import asyncio
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
    """The pool as asyncpg sees it, plus the calls waiting for a connection.

    ``waiting`` is approximate: it counts calls between starting to acquire
    and holding a connection (or giving up), including the time spent
    opening a new connection; a call that finds one idle is never counted.
    """

    size: int  # open connections
    idle: int
    in_use: int
    max_size: int
    waiting: int


async def aio_call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run the asyncio coroutine function ``fn`` from Trio (a cancel scope cancels it)."""
    return cast(T, await trio_asyncio.aio_as_trio(fn)(*args, **kwargs))


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection-level failure (see :data:`UNAVAILABLE_ERRORS`)."""
    if not isinstance(exc, UNAVAILABLE_ERRORS):
        return False
    # InterfaceError itself means a closed connection or pool; its
    # subclasses (bad client configuration or arguments, unsupported
    # features) are mistakes to surface, not outages.
    return not (isinstance(exc, asyncpg.InterfaceError) and type(exc) is not asyncpg.InterfaceError)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn connection-level failures into :class:`StorageUnavailable`."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        if not is_unavailable(exc):
            raise
        logger.warning("database unavailable: %s", type(exc).__name__)
        raise StorageUnavailable() from exc


def rows_affected(status: str) -> int:
    """The row count of a command status such as ``DELETE 3`` or ``INSERT 0 1``."""
    return int(status.rsplit(" ", 1)[-1])


class PgQueries(Protocol):
    """What runs one statement: a borrowed :class:`PgConnection`, or the
    :class:`PgPool` itself (its one-shot methods borrow a connection for the
    statement alone). Query functions that issue a single statement take
    this, so the storage can hand them the pool and spend one crossing."""

    async def execute(self, query: str, *args: object) -> str: ...

    async def fetch(self, query: str, *args: object) -> list[Row]: ...

    async def fetchrow(self, query: str, *args: object) -> Row | None: ...

    async def fetchval(self, query: str, *args: object) -> Any: ...


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
    """A pool of connections; use :meth:`acquire` to borrow one.

    A single statement needs no borrowed connection: :meth:`execute`,
    :meth:`fetch`, :meth:`fetchrow` and :meth:`fetchval` borrow one for the
    statement alone, in one crossing of the bridge instead of three. Use
    :meth:`acquire` for transactions and several statements in a row.
    """

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

    # -- one-shot statements: acquire, query and release in one crossing ------

    async def execute(self, query: str, *args: object) -> str:
        """Run one statement on a connection borrowed for it alone; see :meth:`_one_shot`."""
        return cast(str, await self._one_shot("execute", query, args))

    async def fetch(self, query: str, *args: object) -> list[Row]:
        """All rows of one statement, on a connection borrowed for it alone."""
        return cast("list[Row]", await self._one_shot("fetch", query, args))

    async def fetchrow(self, query: str, *args: object) -> Row | None:
        """The first row of one statement, on a connection borrowed for it alone."""
        return cast("Row | None", await self._one_shot("fetchrow", query, args))

    async def fetchval(self, query: str, *args: object) -> Any:
        """The first value of one statement, on a connection borrowed for it alone."""
        return await self._one_shot("fetchval", query, args)

    async def _one_shot(self, method: str, query: str, args: tuple[object, ...]) -> Any:
        """Acquire, run ``con.<method>(query, *args)`` and release: ONE crossing.

        Same contract as ``async with pool.acquire() as con: await
        con.<method>(...)``, which costs three crossings of the bridge (an
        asyncio Task, futures and a Trio reschedule each, on the one
        event-loop thread); here the three steps are one asyncio coroutine,
        :meth:`_one_shot_aio`, run by one ``aio_call``:

        - no connection within the acquire timeout (pool exhausted, or
          connecting too slow): :class:`StorageUnavailable` ("no database
          connection became available in time"), as :meth:`acquire`;
        - a connection-level failure mid-statement: the connection is
          terminated, never reused, and :class:`StorageUnavailable` raised;
          SQL errors pass through unchanged;
        - cancellation: a Trio cancel scope that fires cancels the asyncio
          task (``aio_as_trio``), once; asyncpg sends the server a
          CancelRequest, and the coroutine's ``finally`` releases the
          connection, which waits (bounded by the cleanup grace) for the
          server to confirm before the connection is idle again, or
          terminates it. Trio waits for the task to end, so when the caller
          sees ``Cancelled`` the connection is back or gone.
        """
        with translate_errors():
            return await aio_call(self._one_shot_aio, method, query, args)

    async def _one_shot_aio(self, method: str, query: str, args: tuple[object, ...]) -> Any:
        """The asyncio side of :meth:`_one_shot` (runs as one asyncio Task).

        Why not asyncpg's ``Pool.fetchrow``: it acquires with no timeout, so
        an exhausted pool would hang the call until the caller's deadline
        instead of failing fast; it also cannot terminate the connection on
        a connection-level failure before releasing it.
        """
        raw_pool = self._raw
        # Approximate, as documented on PgPoolStatistics.waiting: a call
        # counts from the moment its task starts acquiring until it has a
        # connection (or gives up). A call that finds an idle connection
        # never suspends in between, so it is never seen waiting.
        self._waiting += 1
        try:
            # asyncio.timeout rather than acquire(timeout=...): asyncpg's
            # timeout is a wait_for, one more Task per call, the cost this
            # path exists to avoid. Cancelled here, asyncpg's acquire puts
            # the holder back (Pool._acquire_impl), so nothing leaks.
            async with asyncio.timeout(self._acquire_timeout_s):
                con = await raw_pool.acquire()
        except TimeoutError:
            logger.warning("database unavailable: no connection within the acquire timeout")
            raise StorageUnavailable("no database connection became available in time") from None
        finally:
            self._waiting -= 1
        try:
            return await getattr(con, method)(query, *args)
        except UNAVAILABLE_ERRORS as exc:
            if is_unavailable(exc):
                # The same rule as acquire()'s ``except StorageUnavailable``:
                # asyncpg may hold the connection in a half-finished protocol
                # state, so it never serves another call. Terminating detaches
                # it from its holder; the release below is then a no-op.
                con.terminate()
            raise
        finally:
            await self._release_aio(con)

    async def _release_aio(self, con: Any) -> None:
        """Give ``con`` back to the pool from asyncio; never raises but CancelledError.

        ``Pool.release`` is safe after a cancelled query (asyncpg 0.32,
        ``pool.py``, ``PoolConnectionHolder.release``): it waits for the
        server to acknowledge the CancelRequest (``_wait_for_cancellation``),
        rolls back an open transaction (``Connection._reset``), then runs our
        no-op reset; all bounded by ``timeout``, and any failure or timeout
        there terminates the connection instead of returning it dirty. It
        runs the release under ``asyncio.shield``.

        Errors are logged, not raised, as :meth:`_release`: the statement's
        own outcome is what the caller must see. A cancel that arrives while
        this awaits (the statement had already finished; Trio cancels the
        task only once, so not when the statement itself was cancelled) is
        absorbed: the shielded release carries on, bounded, in the
        background, and the caller gets the statement's result, as the
        shielded :meth:`_release` gives it. A CancelledError already in
        flight from the statement keeps propagating past this ``finally``.
        """
        try:
            await self._raw.release(con, timeout=self._cleanup_grace_s)
        except asyncio.CancelledError:
            logger.debug("release cancelled; it finishes in the background")
        except Exception as exc:
            logger.debug("release failed: %s", type(exc).__name__)

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
