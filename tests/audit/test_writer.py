"""The audit writer service: backpressure, drain on exit, fsync policies, write errors.

Blocking file calls run inline (or delayed on trio's clock) so that
``autojump_clock`` gives exact, repeatable timings.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from pqmsg.audit import events
from pqmsg.audit.segments import segment_name
from pqmsg.nurseries.audit import (
    WRITE_RETRY_DELAYS_S,
    AuditWriter,
    RunBlocking,
    open_audit_writer,
)
from pqmsg.settings import AuditSettings
from tests.audit import (
    FIXED_TIME_S,
    KEY,
    TEST_TIMEOUT_S,
    FsyncSpy,
    fixed_clock,
    inline,
    is_sealed,
    records,
    segments,
    slow,
)

SETTINGS = AuditSettings(key=KEY, fsync="never", queue_size=100, enqueue_timeout_s=0.25)
ACCOUNT = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"
LOGGER = "pqmsg.nurseries.audit"


@asynccontextmanager
async def writer(
    directory: Path,
    settings: AuditSettings = SETTINGS,
    *,
    run_blocking: RunBlocking = inline,
    fsync: FsyncSpy | None = None,
    grace_period_s: float = 5.0,
) -> AsyncIterator[AuditWriter]:
    async with open_audit_writer(
        settings,
        directory,
        clock=fixed_clock,
        fsync=fsync or FsyncSpy(),
        run_blocking=run_blocking,
        grace_period_s=grace_period_s,
    ) as audit:
        yield audit


async def record(audit: AuditWriter, n: int) -> None:
    await audit.record(
        events.AUTH_REJECTED, outcome="rejected", account=ACCOUNT, detail={"count": n}
    )


def counts(directory: Path) -> list[int]:
    return [line["detail"]["count"] for line in records(directory)]


def drop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]


# Backpressure.


async def test_a_full_queue_makes_record_wait_then_drop_count_and_log(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = attrs.evolve(SETTINGS, queue_size=2)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, run_blocking=slow(1.0)) as audit:
            await record(audit, 1)
            await trio.testing.wait_all_tasks_blocked()  # the writer took it: 1 s to write
            await record(audit, 2)
            await record(audit, 3)
            assert audit.statistics().queue_depth == 2

            started = trio.current_time()
            await record(audit, 4)
            assert trio.current_time() - started == settings.enqueue_timeout_s
            assert not audit.record_nowait(events.AUTH_REJECTED, outcome="rejected")
            stats = audit.statistics()
            assert (stats.dropped_total, stats.queue_depth, stats.queue_capacity) == (2, 2, 2)
            # One warning at once; the second drop came within the log interval.
            assert len(drop_warnings(caplog)) == 1
            assert "auth.rejected: the queue is full" in drop_warnings(caplog)[0]

    assert counts(tmp_path) == [1, 2, 3]
    assert audit.statistics().events_total == 3
    # Shutting down reports the drop the interval held back.
    assert len(drop_warnings(caplog)) == 2
    assert drop_warnings(caplog)[1].startswith("audit: dropped 1 event(s)")


async def test_record_that_gets_room_in_time_is_not_dropped(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    settings = attrs.evolve(SETTINGS, queue_size=1, enqueue_timeout_s=0.25)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, run_blocking=slow(0.2)) as audit:
            await record(audit, 1)
            await trio.testing.wait_all_tasks_blocked()
            await record(audit, 2)
            started = trio.current_time()
            await record(audit, 3)  # room at 0.2 s, when the writer takes 2
            waited = trio.current_time() - started

    assert 0 < waited < settings.enqueue_timeout_s
    assert audit.statistics().dropped_total == 0
    assert counts(tmp_path) == [1, 2, 3]


async def test_drop_warnings_are_rate_limited_and_count_what_they_skipped(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = attrs.evolve(SETTINGS, queue_size=1)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, run_blocking=slow(12.0), grace_period_s=1.0) as audit:
            await record(audit, 1)
            await trio.testing.wait_all_tasks_blocked()
            await record(audit, 2)  # fills the queue
            for _ in range(5):
                assert not audit.record_nowait(events.AUTH_REJECTED, outcome="rejected")
            assert len(drop_warnings(caplog)) == 1
            await trio.sleep(10.0)
            assert not audit.record_nowait(events.AUTH_REJECTED, outcome="rejected")

    warnings = drop_warnings(caplog)
    # 1 at once, 5 more after the interval; then the 2 unwritten at shutdown.
    assert warnings[0].startswith("audit: dropped 1 event(s)")
    assert warnings[1].startswith("audit: dropped 5 event(s)")
    assert audit.statistics().dropped_total == 6 + 2


async def test_a_caller_cancelled_while_waiting_counts_a_drop(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    settings = attrs.evolve(SETTINGS, queue_size=1, enqueue_timeout_s=5.0)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, run_blocking=slow(10.0)) as audit:
            await record(audit, 1)
            await trio.testing.wait_all_tasks_blocked()
            await record(audit, 2)
            with trio.move_on_after(1.0):
                await record(audit, 3)
            assert audit.statistics().dropped_total == 1


# Drain on exit.


async def test_events_recorded_right_before_exit_are_all_written(tmp_path: Path) -> None:
    # Real worker threads and the real clock: the server's configuration.
    settings = attrs.evolve(SETTINGS, queue_size=1000, fsync="always")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_audit_writer(settings, tmp_path, clock=fixed_clock) as audit:
            for n in range(500):
                assert audit.record_nowait(events.KEYS_UPLOADED, outcome="ok", detail={"count": n})
            assert audit.statistics().queue_depth > 0

    assert counts(tmp_path) == list(range(500))
    stats = audit.statistics()
    assert (stats.events_total, stats.dropped_total, stats.queue_depth) == (500, 0, 0)
    assert all(is_sealed(path) for path in segments(tmp_path))


async def test_events_after_exit_are_dropped_and_counted(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path) as audit:
            await record(audit, 1)
        assert not audit.record_nowait(events.AUTH_REJECTED, outcome="rejected")
        await record(audit, 2)

    assert audit.statistics().dropped_total == 2
    assert counts(tmp_path) == [1]


async def test_drain_is_bounded_by_the_grace_period_and_counts_what_is_left(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, run_blocking=slow(3.0), grace_period_s=4.0) as audit:
            await record(audit, 1)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(2, 5):
                await record(audit, n)
            closing = trio.current_time()

    # 1 is written at 3 s; 2..4 are half-way when the grace period ends.
    assert trio.current_time() - closing == 4.0
    stats = audit.statistics()
    assert (stats.events_total, stats.dropped_total) == (1, 3)
    assert counts(tmp_path) == [1]
    assert any("with 3 event(s) unwritten" in r.getMessage() for r in caplog.records)


async def test_a_cancelled_server_still_drains_the_queue_within_the_grace_period(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    # A crash elsewhere cancels everything around the service.
    with trio.fail_after(TEST_TIMEOUT_S):
        with trio.CancelScope() as outer:
            async with writer(tmp_path, run_blocking=slow(1.0), grace_period_s=10.0) as audit:
                for n in range(3):
                    await record(audit, n)
                await trio.testing.wait_all_tasks_blocked()
                cancelled_at = trio.current_time()
                outer.cancel()
                await trio.sleep_forever()

    assert counts(tmp_path) == [0, 1, 2]
    assert audit.statistics().dropped_total == 0
    assert trio.current_time() - cancelled_at < 10.0


async def test_the_body_raising_still_drains_the_queue(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    with (
        trio.fail_after(TEST_TIMEOUT_S),
        pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom")),
    ):
        async with writer(tmp_path) as audit:
            for n in range(5):
                await record(audit, n)
            raise RuntimeError("boom")

    assert counts(tmp_path) == [0, 1, 2, 3, 4]


# fsync policies.


async def written(audit: AuditWriter, total: int) -> None:
    """Wait until ``total`` events are written (inline I/O: nothing else runs)."""
    await trio.testing.wait_all_tasks_blocked()
    assert audit.statistics().events_total == total


async def test_fsync_always_syncs_every_batch_before_counting_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    spy = FsyncSpy()
    settings = attrs.evolve(SETTINGS, fsync="always")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, fsync=spy) as audit:
            assert spy.directories == 1  # the new segment's directory entry
            for batch in range(1, 4):
                # Both are queued before the writer runs: one batch.
                assert audit.record_nowait(events.KEYS_UPLOADED, outcome="ok")
                assert audit.record_nowait(events.KEYS_UPLOADED, outcome="ok")
                await written(audit, 2 * batch)
                assert spy.files == batch
    # Closing has nothing left to sync.
    assert (spy.files, spy.directories) == (3, 1)


async def test_fsync_interval_syncs_on_trio_time_only_when_needed(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    spy = FsyncSpy()
    settings = attrs.evolve(SETTINGS, fsync="interval", fsync_interval_s=1.0)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, fsync=spy) as audit:
            assert audit.statistics().tasks == 2
            started = trio.current_time()
            for n in range(5):
                await record(audit, n)
            await written(audit, 5)
            assert spy.files == 0
            await trio.sleep(1.0 - (trio.current_time() - started) + 0.01)
            assert spy.files == 1
            await trio.sleep(5.0)
            assert spy.files == 1  # nothing new was written
            await record(audit, 5)
            await trio.sleep(1.0)
            assert spy.files == 2
            await record(audit, 6)
    assert spy.files == 3  # closing syncs what the interval had not


async def test_fsync_never_never_calls_fsync(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    spy = FsyncSpy()
    settings = attrs.evolve(SETTINGS, fsync="never", max_segment_bytes=1)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, fsync=spy) as audit:
            assert audit.statistics().tasks == 1
            for n in range(3):
                await record(audit, n)
            await trio.sleep(20)

    assert counts(tmp_path) == [0, 1, 2]
    assert len(segments(tmp_path)) == 3  # rotation and sealing without fsync
    assert (spy.files, spy.directories) == (0, 0)


# Write errors.


async def test_a_failing_disk_marks_unhealthy_then_recovers_without_losing_events(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    spy = FsyncSpy()
    settings = attrs.evolve(SETTINGS, fsync="always")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, fsync=spy) as audit:
            first = audit.statistics().segment
            # The batch's fsync fails, then the best-effort one when sealing.
            spy.failures_left = 2
            await record(audit, 1)
            await trio.testing.wait_all_tasks_blocked()
            stats = audit.statistics()
            assert not stats.healthy
            assert stats.detail == "audit write failed: No space left on device"
            await trio.sleep(WRITE_RETRY_DELAYS_S[0])
            await trio.testing.wait_all_tasks_blocked()
            stats = audit.statistics()
            assert (stats.healthy, stats.detail, stats.events_total) == (True, None, 1)
            assert stats.segment != first

    # Written again to a fresh segment; never lost (here also kept in the first).
    assert segments(tmp_path)[-1].name == stats.segment
    assert counts(tmp_path)[-1] == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1


async def test_a_write_that_fails_midway_resumes_without_loss_or_duplicates(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    allowed = [-1]  # bytes the disk takes before it is full; -1: no limit

    def filling_disk(fd: int, data: bytes | memoryview) -> int:
        if allowed[0] < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
            return real_write(fd, data)
        if allowed[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: allowed[0]]))
        allowed[0] -= n
        return n

    monkeypatch.setattr(os, "write", filling_disk)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path) as audit:
            line_bytes = len(
                audit.pseudonyms.line(
                    time=fixed_clock(),
                    event=events.AUTH_REJECTED,
                    outcome="rejected",
                    request_id=None,
                    account=ACCOUNT,
                    device=None,
                    ip=None,
                    target_account=None,
                    target_device=None,
                    detail={"count": 0},
                )
            )
            allowed[0] = 2 * line_bytes + 10  # two lines and a bit of the third
            for n in range(5):
                assert audit.record_nowait(
                    events.AUTH_REJECTED, outcome="rejected", account=ACCOUNT, detail={"count": n}
                )
            await trio.testing.wait_all_tasks_blocked()
            assert not audit.statistics().healthy
            assert audit.statistics().events_total == 2
            allowed[0] = -1  # space freed
            await trio.sleep(WRITE_RETRY_DELAYS_S[0])
            await trio.testing.wait_all_tasks_blocked()
            stats = audit.statistics()
            assert (stats.healthy, stats.events_total, stats.dropped_total) == (True, 5, 0)

    torn, whole = segments(tmp_path)
    assert len(torn.read_bytes().splitlines()) == 3  # 2 whole lines, then the torn one
    assert [line["detail"]["count"] for line in records_of(whole)] == [2, 3, 4]


def records_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_a_disk_that_stays_broken_drops_and_counts_after_the_retries(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    spy = FsyncSpy()
    settings = attrs.evolve(SETTINGS, fsync="always")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings, fsync=spy) as audit:
            spy.failures_left = 1_000_000
            await record(audit, 1)
            # Dropped right after the last retry, not before.
            await trio.sleep(sum(WRITE_RETRY_DELAYS_S) - 0.001)
            await trio.testing.wait_all_tasks_blocked()
            assert audit.statistics().dropped_total == 0
            await trio.sleep(0.002)
            await trio.testing.wait_all_tasks_blocked()
            stats = audit.statistics()
            assert (stats.healthy, stats.events_total, stats.dropped_total) == (False, 0, 1)
    # Shutting down with a broken disk does not raise either.
    assert "writing failed 4 times" in drop_warnings(caplog)[0]


# Statistics and the files.


async def test_the_writer_rotates_by_size(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    settings = attrs.evolve(SETTINGS, max_segment_bytes=1000)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, settings) as audit:
            for n in range(40):
                await audit.record(events.KEYS_UPLOADED, outcome="ok", detail={"count": n})
            await trio.testing.wait_all_tasks_blocked()
            current = audit.statistics().segment

    files = segments(tmp_path)
    assert len(files) > 3
    assert all(0 < p.stat().st_size <= 1000 for p in files)
    assert [r["detail"]["count"] for r in records(tmp_path)] == list(range(40))
    assert current == files[-1].name
    assert all(is_sealed(p) for p in files)


async def test_a_reopened_writer_starts_a_new_segment_and_leaves_the_old_intact(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        for n in range(3):
            async with writer(tmp_path) as audit:
                await audit.record(events.ACCOUNT_REGISTERED, outcome="ok", detail={"count": n})
            if n == 0:
                (first,) = segments(tmp_path)
                first_bytes = first.read_bytes()

    # The same clock second each time: the sequence number tells them apart.
    assert [p.name for p in segments(tmp_path)] == [
        segment_name(FIXED_TIME_S, s) for s in (1, 2, 3)
    ]
    assert first.read_bytes() == first_bytes
    assert [r["detail"]["count"] for r in records(tmp_path)] == [0, 1, 2]


async def test_statistics_describe_the_open_segment(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path, attrs.evolve(SETTINGS, fsync="always")) as audit:
            for n in range(3):
                await record(audit, n)
            await written(audit, 3)
            stats = audit.statistics()

    (segment,) = segments(tmp_path)
    assert stats.segment == segment.name == "audit-20260102T030405Z-000001.jsonl"
    assert stats.bytes_written == segment.stat().st_size > 0
    assert (stats.healthy, stats.tasks, stats.queue_depth, stats.queue_capacity) == (
        True,
        1,
        0,
        100,
    )
    assert audit.statistics().tasks == 0


async def test_malformed_event_names_are_refused_and_nothing_is_written(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with writer(tmp_path) as audit:
            with pytest.raises(ValueError, match="event name"):
                await audit.record("Auth Rejected", outcome="rejected")
            with pytest.raises(ValueError, match="outcome"):
                audit.record_nowait(events.AUTH_REJECTED, outcome="no way")

    assert records(tmp_path) == []
    assert audit.statistics().dropped_total == 0
