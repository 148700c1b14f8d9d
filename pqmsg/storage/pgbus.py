"""Wake-ups between replicas over PostgreSQL LISTEN/NOTIFY.

For deployments with PostgreSQL and no Redis: :class:`PgBus` implements the
notifier's :class:`pqmsg.nurseries.notify.Bus`, like the Redis bus.
:meth:`PgBus.publish_many` sends the notifier's queued wake-ups, each
``pg_notify('pqmsg_wake', '<origin> <kind> <account>:<device>')``, in one
statement on the pool's one-shot path (one crossing of the trio-asyncio
bridge);
:meth:`PgBus.listen` (run by the notifier's nursery) holds one dedicated
connection that LISTENs and delivers other replicas' wake-ups.
The origin, random per bus, lets a replica ignore its own echo.

NOTIFY is fire-and-forget: a wake-up sent while a listener is reconnecting
is lost. That costs latency, never data (messages are in the database and a
long poll ends at its ``wait``). The listener notices a dead connection at
once when the server closes it, and within ``HEARTBEAT_S`` when the network
silently drops it; it reconnects with a capped backoff and reports health.

Resources: :func:`open_pg_bus` owns a two-connection pool for publishes;
the listening connection lives inside ``listen`` and is closed when it ends.
It must never come from a pool: pooled connections go back without an
``UNLISTEN`` (see :func:`pqmsg.storage.pgbridge.open_pg_pool`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import attrs
import trio

from pqmsg.errors import StorageUnavailable
from pqmsg.nurseries.notify import BusUnavailable, Wake, WakeKind
from pqmsg.storage.pgbridge import PgPool, aio_call, open_pg_pool, translate_errors

log = logging.getLogger("pqmsg.pgbus")

CHANNEL = "pqmsg_wake"
RETRY_MIN_S = 0.1
RETRY_MAX_S = 5.0
HEARTBEAT_S = 10.0
RECEIVE_BUFFER = 1_000
APPLICATION_NAME = "pqmsg-bus"

Deliver = Callable[[WakeKind, str, int], None]

# One pg_notify per element, in array order (a plain scan of unnest); the
# transaction's notifications are delivered in the order they were sent.
_NOTIFY_MANY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"


@attrs.frozen
class PgBusStatistics:
    healthy: bool
    published_total: int
    delivered_total: int
    dropped_total: int  # arrived faster than delivered: buffer full
    reconnects_total: int


class PgBus:
    """Publishes and receives wake-ups; :meth:`listen` runs in the notifier's nursery."""

    def __init__(self, pool: PgPool, dsn: str, *, timeout_s: float, application_name: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._application_name = application_name
        self._origin = secrets.token_hex(8)
        self.healthy = True
        self.detail: str | None = None
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._reconnects = 0

    async def publish_many(self, items: Iterable[tuple[WakeKind, str, int]]) -> None:
        """Send several wake-ups, ``(kind, account, device)`` each, in ONE statement.

        One round trip and one crossing of the trio-asyncio bridge for the
        lot, instead of one each. All or none are sent (notifications are
        delivered when their transaction commits, and this is one
        statement), in the items' order; PostgreSQL folds identical
        payloads of one transaction into one, harmless for wake-ups.
        BusUnavailable if they cannot be sent; nothing is sent for no
        items. The notifier's forward loop hands its queued wake-ups here.
        """
        payloads = [Wake(self._origin, kind, a, d).encode() for kind, a, d in items]
        if not payloads:
            return
        await self._notify(_NOTIFY_MANY, payloads)
        self._published += len(payloads)

    async def _notify(self, query: str, payloads: list[str]) -> None:
        """Run a pg_notify statement on the pool's one-shot path: one crossing."""
        try:
            with trio.fail_after(self._timeout_s):
                await self._pool.execute(query, CHANNEL, payloads)
        except (StorageUnavailable, trio.TooSlowError) as exc:
            raise BusUnavailable("the database cannot carry wake-ups now") from exc

    async def listen(
        self, deliver: Deliver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver other replicas' wake-ups until cancelled; reconnect on failure."""
        backoff = RETRY_MIN_S
        started = False
        while True:
            try:
                async with self._listening() as received:
                    self.healthy, self.detail = True, None
                    backoff = RETRY_MIN_S
                    if not started:
                        started = True
                        task_status.started()
                    await self._deliver_all(received, deliver)
            except StorageUnavailable as exc:
                self.healthy, self.detail = False, f"wake-up bus: {exc.detail}"
                log.warning("wake-up bus connection lost (retrying in %.1fs)", backoff)
            if not started:
                # Serve anyway: long polls still end at their wait.
                started = True
                task_status.started()
            self._reconnects += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)

    def statistics(self) -> PgBusStatistics:
        return PgBusStatistics(
            healthy=self.healthy,
            published_total=self._published,
            delivered_total=self._delivered,
            dropped_total=self._dropped,
            reconnects_total=self._reconnects,
        )

    @asynccontextmanager
    async def _listening(self) -> AsyncIterator[_Listening]:
        """A dedicated connection LISTENing on :data:`CHANNEL`."""
        send, receive = trio.open_memory_channel[str](RECEIVE_BUFFER)

        # asyncpg calls these from the asyncio loop, which trio-asyncio runs
        # on the Trio thread, so the channel's sync methods are safe here.
        def on_notify(_con: Any, _pid: int, _channel: str, payload: str) -> None:
            try:
                send.send_nowait(payload)
            except trio.WouldBlock:
                self._dropped += 1
            except trio.ClosedResourceError:
                pass  # arrived as the connection went away

        def on_lost(_con: Any) -> None:
            send.close()

        with translate_errors(), trio.fail_after(self._timeout_s):
            raw = await aio_call(
                asyncpg.connect,
                self._dsn,
                timeout=self._timeout_s,
                server_settings={"application_name": self._application_name},
            )
        try:
            raw.add_termination_listener(on_lost)
            with translate_errors(), trio.fail_after(self._timeout_s):
                await aio_call(raw.add_listener, CHANNEL, on_notify)
            yield _Listening(raw, receive, timeout_s=self._timeout_s)
        finally:
            send.close()
            receive.close()
            with trio.move_on_after(self._timeout_s, shield=True):
                try:
                    await aio_call(raw.close)
                except Exception as exc:  # closing a dead connection
                    log.debug("closing the listen connection failed: %s", type(exc).__name__)
            if not raw.is_closed():
                raw.terminate()

    async def _deliver_all(self, received: _Listening, deliver: Deliver) -> None:
        while True:
            payload = await received.next_payload()
            if payload is not None:
                self._dispatch(payload, deliver)

    def _dispatch(self, payload: str, deliver: Deliver) -> None:
        wake = Wake.decode(payload)
        if wake is not None and wake.origin != self._origin:
            self._delivered += 1
            deliver(wake.kind, wake.account, wake.device)


class _Listening:
    """Payloads of a LISTENing connection, with a heartbeat on quiet lines."""

    def __init__(
        self, raw: Any, receive: trio.MemoryReceiveChannel[str], *, timeout_s: float
    ) -> None:
        self._raw = raw
        self._receive = receive
        self._timeout_s = timeout_s

    async def next_payload(self) -> str | None:
        """The next payload, or None after a quiet heartbeat interval.

        Raises StorageUnavailable when the connection is lost, or does not
        answer the heartbeat in time.
        """
        with trio.move_on_after(HEARTBEAT_S):
            try:
                return await self._receive.receive()
            except trio.EndOfChannel:
                raise StorageUnavailable("the LISTEN connection was closed") from None
        try:
            with translate_errors(), trio.fail_after(self._timeout_s):
                await aio_call(self._raw.fetchval, "SELECT 1")
        except trio.TooSlowError as exc:
            raise StorageUnavailable("the LISTEN connection stopped answering") from exc
        return None


@asynccontextmanager
async def open_pg_bus(
    dsn: str, *, timeout_s: float = 5.0, application_name: str = APPLICATION_NAME
) -> AsyncIterator[PgBus]:
    """A wake-up bus on the database at ``dsn`` (inside a trio-asyncio loop).

    ``timeout_s`` bounds a publish, connecting the listener, and its
    heartbeat; ``application_name`` marks its server connections. Pass the
    bus to :func:`pqmsg.nurseries.notify.open_notifier`.
    """
    async with open_pg_pool(
        dsn,
        min_size=1,
        max_size=2,
        acquire_timeout_s=timeout_s,
        application_name=application_name,
    ) as pool:
        yield PgBus(pool, dsn, timeout_s=timeout_s, application_name=application_name)
