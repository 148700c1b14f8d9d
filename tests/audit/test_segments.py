"""Segments: size rotation, append-only files, sealing, export and ``--since``."""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from pqmsg.audit.segments import (
    CLOSED_MODE,
    AppendFailed,
    SegmentLog,
    closed_segments,
    export_segments,
    parse_since,
    segment_name,
)
from tests.audit import FIXED_TIME_S, fixed_clock, is_sealed, segments

LINE = b'{"n":0}\n'
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def lines(count: int, start: int = 0) -> list[bytes]:
    return [b'{"n":%d}\n' % n for n in range(start, start + count)]


def open_log(directory: Path, *, max_segment_bytes: int = 1 << 20) -> SegmentLog:
    log = SegmentLog(directory, max_segment_bytes=max_segment_bytes, clock=fixed_clock, fsync=None)
    log.open()
    return log


def test_segment_names_carry_the_utc_start_and_a_sequence_number() -> None:
    assert segment_name(FIXED_TIME_S, 1) == "audit-20260102T030405Z-000001.jsonl"
    assert segment_name(0, 1234567) == "audit-19700101T000000Z-1234567.jsonl"


# Rotation.


def test_segments_rotate_before_they_would_exceed_the_size(tmp_path: Path) -> None:
    log = open_log(tmp_path, max_segment_bytes=3 * len(LINE))
    log.append(lines(7), sync=False)  # one batch, split across segments
    log.append(lines(3, start=7), sync=False)

    sizes = [len(p.read_bytes().splitlines()) for p in segments(tmp_path)]
    assert sizes == [3, 3, 3, 1]
    assert b"".join(p.read_bytes() for p in segments(tmp_path)) == b"".join(lines(10))
    assert all(p.stat().st_size <= 3 * len(LINE) for p in segments(tmp_path))
    *closed, open_one = segments(tmp_path)
    assert all(is_sealed(p) for p in closed) and not is_sealed(open_one)
    assert log.name == open_one.name
    log.close()


def test_a_line_longer_than_a_segment_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    log = open_log(tmp_path, max_segment_bytes=2 * len(LINE))
    big = b'{"n":"' + b"x" * 100 + b'"}\n'
    log.append([LINE, big, LINE], sync=False)
    log.close()

    assert [p.read_bytes() for p in segments(tmp_path)] == [LINE, big, LINE]


# Append-only.


def test_segments_are_opened_append_only(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    path = tmp_path / log.name
    fds = [
        fd
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(path)
    ]
    (fd,) = fds
    flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    log.close()

    assert flags & os.O_APPEND
    assert flags & os.O_ACCMODE == os.O_WRONLY


def test_a_crashed_writers_segment_is_sealed_by_the_next_one_and_kept(tmp_path: Path) -> None:
    crashed = tmp_path / segment_name(FIXED_TIME_S - 60, 1)
    crashed.write_bytes(LINE)
    crashed.chmod(0o640)
    empty = tmp_path / segment_name(FIXED_TIME_S - 30, 1)
    empty.touch(0o640)

    log = open_log(tmp_path)
    log.close()

    assert crashed.read_bytes() == LINE and is_sealed(crashed)
    assert not is_sealed(empty)  # no events, and maybe another writer's new file
    assert log.name not in (crashed.name, empty.name)


def test_a_second_writer_never_seals_a_live_writers_segment(tmp_path: Path) -> None:
    # Several worker processes share one audit directory.
    first = open_log(tmp_path)
    first.append(lines(1), sync=False)
    second = open_log(tmp_path)
    second.append(lines(1, start=1), sync=False)
    first.append(lines(1, start=2), sync=False)

    assert first.name != second.name
    assert not is_sealed(tmp_path / first.name)
    first.close()
    second.close()
    assert (tmp_path / first.name).read_bytes() == b"".join(lines(3)[0::2])
    assert (tmp_path / second.name).read_bytes() == lines(1, start=1)[0]


def test_a_torn_write_ends_its_segment_and_the_line_is_written_whole_in_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(tmp_path)
    real_write = os.write
    budget = [len(LINE) + 3]  # the first line and 3 bytes of the second fit

    def disk_full(fd: int, data: bytes | memoryview) -> int:
        if budget[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    batch = lines(3)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_full)
        with pytest.raises(AppendFailed) as failed:
            log.append(batch, sync=False)
    assert failed.value.written == 1
    log.append(batch[1:], sync=False)
    log.close()

    torn, whole = segments(tmp_path)
    assert torn.read_bytes() == batch[0] + batch[1][:3]
    assert whole.read_bytes() == batch[1] + batch[2]
    assert is_sealed(torn)


# Export.


def make_segments(directory: Path, count: int) -> list[Path]:
    """``count`` closed segments and one open one; mtimes one hour apart."""
    log = open_log(directory, max_segment_bytes=len(LINE))
    log.append(lines(count + 1), sync=False)
    files = segments(directory)
    for age_h, path in enumerate(reversed(files)):
        stamp = (NOW - timedelta(hours=age_h)).timestamp()
        os.utime(path, (stamp, stamp))
    return files


def test_export_copies_the_closed_segments_and_not_the_open_one(tmp_path: Path) -> None:
    *closed, open_one = make_segments(tmp_path / "audit", 3)

    copied = export_segments(tmp_path / "audit", since=NOW - timedelta(days=1), to=tmp_path / "out")

    assert [p.name for p in copied] == [p.name for p in closed]
    for source, copy in zip(closed, copied, strict=True):
        assert copy.read_bytes() == source.read_bytes()
        assert copy.stat().st_mtime == source.stat().st_mtime
        assert copy.stat().st_mode & 0o777 == CLOSED_MODE
    assert not (tmp_path / "out" / open_one.name).exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in closed]


def test_export_is_idempotent_and_repairs_a_bad_copy(tmp_path: Path) -> None:
    make_segments(tmp_path / "audit", 3)
    since = NOW - timedelta(days=1)
    first = export_segments(tmp_path / "audit", since=since, to=tmp_path / "out")

    assert export_segments(tmp_path / "audit", since=since, to=tmp_path / "out") == []
    broken = first[1]
    broken.chmod(0o640)
    broken.write_bytes(b"x" * broken.stat().st_size)  # same size, other bytes
    assert export_segments(tmp_path / "audit", since=since, to=tmp_path / "out") == [broken]
    assert broken.read_bytes() == (tmp_path / "audit" / broken.name).read_bytes()


def test_export_picks_segments_last_written_since(tmp_path: Path) -> None:
    files = make_segments(tmp_path / "audit", 4)  # closed: 4, 3, 2, 1 hours old

    copied = export_segments(
        tmp_path / "audit", since=NOW - timedelta(minutes=150), to=tmp_path / "out"
    )

    assert [p.name for p in copied] == [p.name for p in files[2:4]]


def test_export_sees_a_segment_once_the_writer_seals_it(tmp_path: Path) -> None:
    log = open_log(tmp_path / "audit")
    log.append(lines(2), sync=False)
    since = NOW - timedelta(days=365 * 100)
    assert export_segments(tmp_path / "audit", since=since, to=tmp_path / "out") == []

    log.close()

    assert [
        p.name for p in export_segments(tmp_path / "audit", since=since, to=tmp_path / "out")
    ] == [log.name]
    assert closed_segments(tmp_path / "audit") == [tmp_path / "audit" / log.name]


def test_export_needs_an_aware_since(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone"):
        export_segments(tmp_path, since=datetime(2026, 1, 1), to=tmp_path / "out")


# --since.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("90s", NOW - timedelta(seconds=90)),
        ("2026-01-01T10:00:00Z", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01t10:00:00.250z", datetime(2026, 1, 1, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2026-01-01T12:00:00+02:00", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        (" 2026-01-01T10:00:00-00:30 ", datetime(2026, 1, 1, 10, 30, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    parsed = parse_since(text, now=NOW)

    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize(
    "text", ["", "yesterday", "15", "-5m", "5 m", "1w", "2026-01-01", "2026-01-01T10:00:00"]
)
def test_parse_since_refuses_what_it_cannot_place_in_time(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_since(text, now=NOW)


def test_parse_since_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone"):
        parse_since("15m", now=datetime(2026, 1, 2))
    assert parse_since("1h", now=NOW.astimezone(timezone(timedelta(hours=5)))) == NOW - timedelta(
        hours=1
    )
