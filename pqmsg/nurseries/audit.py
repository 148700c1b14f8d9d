"""The audit writer: security events as scrubbed JSON lines, in their own nursery.

Request handlers call :meth:`AuditWriter.record`; it scrubs the event at once
(see :mod:`pqmsg.audit.pseudonym`) and puts the line on a bounded queue. One
writer task takes whatever is queued, up to :data:`MAX_BATCH_EVENTS`, and
appends it in one write to the open segment (see :mod:`pqmsg.audit.segments`)
from a worker thread.

Backpressure: when the queue is full, ``record`` waits up to
``enqueue_timeout_s`` for room, then drops the event. A drop is never
silent: it is counted (``dropped_total``, the ``pqmsg_audit_dropped_total``
metric) and logged, at most one warning per :data:`DROP_LOG_INTERVAL_S`
that says how many were dropped since the last one.

Durability (``AuditSettings.fsync``): ``always`` fsyncs each batch before
its events count as written; ``interval`` fsyncs every ``fsync_interval_s``
(trio's clock) from a second task; ``never`` leaves it to the OS.

Errors: a failed write or fsync (disk full, I/O error) marks the service
unhealthy with a detail for ``/health``, seals the segment it was writing
and retries the rest of the batch in a fresh segment after each of
:data:`WRITE_RETRY_DELAYS_S`; then the batch is dropped and counted. The
server keeps serving; the next successful write makes the service healthy
again. After an fsync error under ``always`` the batch is written again, so
an event may appear twice, never vanish unnoticed. Failing to open the
first segment at start is not retried: the server must not run without
its audit log.

Shutdown: on exit the queue is closed (later events are dropped and
counted), the writer drains what was queued and the last segment is
sealed, all shielded and bounded by ``grace_period_s``. If the grace period
runs out, whatever is still queued is counted as dropped and logged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Final, Protocol, TypeVar, final

import attrs
import trio

from pqmsg.audit.events import check_event, check_outcome
from pqmsg.audit.pseudonym import DetailValue, Pseudonymizer, random_key
from pqmsg.audit.segments import AppendFailed, Fsync, SegmentLog
from pqmsg.clock import WallClock
from pqmsg.settings import AuditSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH_EVENTS: Final = 1000
WRITE_RETRY_DELAYS_S: Final = (0.1, 0.5, 2.0)
DROP_LOG_INTERVAL_S: Final = 10.0
DEFAULT_GRACE_PERIOD_S: Final = 5.0
FULL: Final = "the queue is full"
CLOSED: Final = "the audit writer is closed"


class RunBlocking(Protocol):
    """Runs a blocking call without blocking trio (a worker thread by default)."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def run_in_thread(fn: Callable[[], T], /) -> T:
    """The default :class:`RunBlocking`: a worker thread, abandoned on cancel."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@attrs.frozen
class AuditStatistics:
    healthy: bool
    detail: str | None
    tasks: int
    queue_depth: int
    queue_capacity: int
    events_total: int
    dropped_total: int
    segment: str
    bytes_written: int


@final
class AuditWriter:
    """Records audit events; made by :func:`open_audit_writer`."""

    def __init__(
        self,
        settings: AuditSettings,
        *,
        pseudonyms: Pseudonymizer,
        log: SegmentLog,
        clock: WallClock,
        run_blocking: RunBlocking,
        nursery: trio.Nursery,
    ) -> None:
        self._settings = settings
        self.pseudonyms = pseudonyms
        self._log = log
        self._clock = clock
        self._run_blocking = run_blocking
        self._nursery = nursery
        self._send, self._receive = trio.open_memory_channel[bytes](settings.queue_size)
        self._lock = trio.Lock()
        self._writer_done = trio.Event()
        self._writer_scope = trio.CancelScope(shield=True)
        self._in_flight = 0
        self._events_total = 0
        self._dropped_total = 0
        self._unreported_drops = 0
        self._last_drop_reason = ""
        self._next_drop_log_at = -math.inf
        self._detail: str | None = None

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(
            healthy=self._detail is None,
            detail=self._detail,
            tasks=len(self._nursery.child_tasks),
            queue_depth=self._send.statistics().current_buffer_used,
            queue_capacity=self._settings.queue_size,
            events_total=self._events_total,
            dropped_total=self._dropped_total,
            segment=self._log.name,
            bytes_written=self._log.bytes_written,
        )

    async def record(
        self,
        event: str,
        *,
        outcome: str,
        request_id: str | None = None,
        account: str | None = None,
        device: int | None = None,
        ip: str | None = None,
        target_account: str | None = None,
        target_device: int | None = None,
        detail: Mapping[str, DetailValue] | None = None,
    ) -> None:
        """Queue one event, waiting at most ``enqueue_timeout_s`` for room.

        If there is no room by then (or the writer is closed, or the caller
        is cancelled while waiting) the event is dropped, counted and
        logged. Raises :class:`ValueError` for a malformed event name or
        outcome (a bug in the caller).
        """
        line = self._line(
            event, outcome, request_id, account, device, ip, target_account, target_device, detail
        )
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._drop(1, f"{event}: {CLOSED}")
            return
        else:
            await trio.lowlevel.checkpoint()
            return
        queued, why = False, FULL
        try:
            with trio.move_on_after(self._settings.enqueue_timeout_s):
                await self._send.send(line)
                queued = True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            why = CLOSED
        finally:
            if not queued:  # also when the caller is cancelled while waiting
                self._drop(1, f"{event}: {why}")

    def record_nowait(
        self,
        event: str,
        *,
        outcome: str,
        request_id: str | None = None,
        account: str | None = None,
        device: int | None = None,
        ip: str | None = None,
        target_account: str | None = None,
        target_device: int | None = None,
        detail: Mapping[str, DetailValue] | None = None,
    ) -> bool:
        """Like :meth:`record` without waiting: False when the event was dropped.

        Call it from trio's thread (a sync function in a trio task).
        """
        line = self._line(
            event, outcome, request_id, account, device, ip, target_account, target_device, detail
        )
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self._drop(1, f"{event}: {FULL}")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._drop(1, f"{event}: {CLOSED}")
            return False
        return True

    def _line(
        self,
        event: str,
        outcome: str,
        request_id: str | None,
        account: str | None,
        device: int | None,
        ip: str | None,
        target_account: str | None,
        target_device: int | None,
        detail: Mapping[str, DetailValue] | None,
    ) -> bytes:
        return self.pseudonyms.line(
            time=self._clock(),
            event=check_event(event),
            outcome=check_outcome(outcome),
            request_id=request_id,
            account=account,
            device=device,
            ip=ip,
            target_account=target_account,
            target_device=target_device,
            detail=detail,
        )

    def _drop(self, count: int, why: str) -> None:
        """Count dropped events; log them, at most once per interval."""
        self._dropped_total += count
        self._unreported_drops += count
        self._last_drop_reason = why
        now = trio.current_time()
        if now >= self._next_drop_log_at:
            self._next_drop_log_at = now + DROP_LOG_INTERVAL_S
            self._report_drops()

    def _report_drops(self) -> None:
        if self._unreported_drops:
            logger.warning(
                "audit: dropped %d event(s) since the last report (latest: %s); %d in total",
                self._unreported_drops,
                self._last_drop_reason,
                self._dropped_total,
            )
            self._unreported_drops = 0

    def _failed(self, error: OSError) -> None:
        detail = f"audit write failed: {error.strerror or type(error).__name__}"
        if self._detail is None:
            logger.error("%s; retrying in a new segment", detail)
        self._detail = detail

    async def _write_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Write batches of queued lines until the queue is closed and empty.

        Shielded: when the code around the service is cancelled (a crash
        elsewhere in the server), what was queued is still written, within
        the grace period; :meth:`_shutdown` then cancels this scope itself.
        """
        try:
            with self._writer_scope:
                task_status.started()
                async for first in self._receive:
                    batch = [first]
                    while len(batch) < MAX_BATCH_EVENTS:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    self._in_flight = len(batch)
                    await self._write_batch(batch)
                    self._in_flight = 0
        finally:
            self._writer_done.set()

    async def _write_batch(self, lines: list[bytes]) -> None:
        sync = self._settings.fsync == "always"
        for delay in (*WRITE_RETRY_DELAYS_S, None):
            try:
                async with self._lock:
                    await self._run_blocking(partial(self._log.append, lines, sync=sync))
            except AppendFailed as exc:
                self._events_total += exc.written
                lines = lines[exc.written :]
                self._in_flight = len(lines)
                self._failed(exc.error)
                if delay is None:
                    break
                await trio.sleep(delay)
            else:
                self._events_total += len(lines)
                self._detail = None
                return
        self._drop(len(lines), f"writing failed {len(WRITE_RETRY_DELAYS_S) + 1} times")

    async def _sync_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Under the ``interval`` policy: fsync what was written, periodically."""
        task_status.started()
        while True:
            await trio.sleep(self._settings.fsync_interval_s)
            if not self._log.needs_sync:
                continue
            async with self._lock:
                try:
                    await self._run_blocking(self._log.sync)
                except OSError as exc:
                    self._failed(exc)

    async def _drain(self) -> None:
        """Stop accepting, write everything queued, seal the last segment."""
        await self._send.aclose()
        await self._writer_done.wait()
        async with self._lock:
            try:
                await self._run_blocking(self._log.close)
            except OSError as exc:
                self._failed(exc)

    async def _shutdown(self, grace_period_s: float) -> None:
        """Drain within the grace period; count and log whatever was left."""
        with trio.move_on_after(grace_period_s, shield=True) as scope:
            await self._drain()
        self._writer_scope.cancel()
        if scope.cancelled_caught:
            left = self._receive.statistics().current_buffer_used + self._in_flight
            self._dropped_total += left
            logger.error(
                "audit: the %.1f s grace period ran out with %d event(s) unwritten; "
                "the next start seals the last segment",
                grace_period_s,
                left,
            )
        self._report_drops()  # what the rate limit held back
        self._receive.close()


@asynccontextmanager
async def open_audit_writer(
    settings: AuditSettings,
    directory: Path,
    *,
    clock: WallClock,
    fsync: Fsync = os.fsync,
    run_blocking: RunBlocking = run_in_thread,
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
) -> AsyncIterator[AuditWriter]:
    """Run the audit writer for ``directory`` (see the module docstring).

    ``fsync`` and ``run_blocking`` are seams for tests; the server passes
    neither. Without ``settings.key`` the pseudonym key is random for this
    process (a warning says so).
    """
    key = settings.key
    if key is None:
        logger.warning(
            "PQMSG_AUDIT_KEY is not set: audit pseudonyms are random for this process and "
            "cannot be correlated across restarts or worker processes"
        )
        key = random_key()
    log = SegmentLog(
        directory,
        max_segment_bytes=settings.max_segment_bytes,
        clock=clock,
        fsync=None if settings.fsync == "never" else fsync,
    )
    await run_blocking(log.open)
    async with trio.open_nursery() as nursery:
        writer = AuditWriter(
            settings,
            pseudonyms=Pseudonymizer(key),
            log=log,
            clock=clock,
            run_blocking=run_blocking,
            nursery=nursery,
        )
        await nursery.start(writer._write_loop)
        if settings.fsync == "interval":
            await nursery.start(writer._sync_loop)
        try:
            yield writer
        finally:
            await writer._shutdown(grace_period_s)
            nursery.cancel_scope.cancel()
