"""The audit log's files: append-only segments, rotation, sealing and export.

A writer appends to one *open* segment at a time,
``audit-<UTC start, %Y%m%dT%H%M%SZ>-<seq>.jsonl``, created with ``O_EXCL``
(so writers in several worker processes never share a file), opened with
``O_APPEND`` and never truncated. While open it is mode 0640 and its writer
holds an exclusive ``flock`` on it. When it would grow past
``max_segment_bytes`` (or the writer stops, or a write fails) the writer
*seals* it: fsync (unless the policy is ``never``), ``chmod 0440``, close.
A sealed (read-only) segment is closed: nothing writes to it again, and
only closed segments are exported.

A writer that died without sealing leaves an *orphan*: writable, but
unlocked. Every writer seals the orphans it finds when it opens a segment,
so a crash delays the export of the last segment until the next start;
it never loses it. Empty orphans are left alone: they hold no events, and
an empty file may be a segment another writer is just creating.

Everything here blocks; the writer service calls it from a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from pqmsg.clock import WallClock

Fsync = Callable[[int], None]

OPEN_MODE: Final = 0o640
CLOSED_MODE: Final = 0o440
SEGMENT_RE: Final = re.compile(r"audit-(\d{8}T\d{6}Z)-(\d{6,})\.jsonl")
_COPY_CHUNK_BYTES: Final = 1024 * 1024
_RELATIVE_RE: Final = re.compile(r"(\d+)([smhd])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AppendFailed(Exception):
    """An append stopped on an :class:`OSError` after ``written`` whole lines."""

    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(f"audit append failed after {written} lines: {error}")
        self.written = written
        self.error = error


def segment_name(start_s: float, seq: int) -> str:
    stamp = datetime.fromtimestamp(start_s, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"audit-{stamp}-{seq:06d}.jsonl"


def _segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if SEGMENT_RE.fullmatch(p.name))


def _is_closed(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222


def closed_segments(directory: Path) -> list[Path]:
    """The sealed segments in ``directory``, oldest first."""
    return [p for p in _segments(directory) if _is_closed(p.stat())]


def seal_orphans(directory: Path, *, fsync: Fsync | None) -> list[Path]:
    """Seal the non-empty writable segments no live writer holds; return them."""
    sealed = []
    for path in _segments(directory):
        if _is_closed(path.stat()):
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's open segment
            st = os.fstat(fd)
            if st.st_size == 0 or _is_closed(st):
                continue
            if fsync is not None:
                fsync(fd)
            os.fchmod(fd, CLOSED_MODE)
            sealed.append(path)
        finally:
            os.close(fd)  # also releases the lock
    return sealed


def _fsync_directory(directory: Path, fsync: Fsync) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class SegmentLog:
    """One writer's segments (blocking; one caller at a time).

    ``fsync`` is None for the ``never`` policy; otherwise it is used when a
    segment is created (its directory entry), sealed, or :meth:`sync` ed.
    Any :class:`OSError` abandons the open segment (sealed as far as
    possible), so the next append starts a fresh one: a torn last line can
    end a segment, but never sits in the middle of one.
    """

    def __init__(
        self, directory: Path, *, max_segment_bytes: int, clock: WallClock, fsync: Fsync | None
    ) -> None:
        self._directory = directory
        self._max_bytes = max_segment_bytes
        self._clock = clock
        self._fsync = fsync
        self._fd: int | None = None
        self._seq = 0
        self._size = 0
        self._dirty = False
        self.name = ""
        self.bytes_written = 0

    @property
    def needs_sync(self) -> bool:
        """Whether the open segment has writes an fsync has not covered yet."""
        return self._fd is not None and self._dirty and self._fsync is not None

    def open(self) -> None:
        """Create the directory and the first segment, sealing orphans."""
        self._directory.mkdir(parents=True, exist_ok=True)
        self._open_next()

    def append(self, lines: Sequence[bytes], *, sync: bool) -> None:
        """Append newline-terminated ``lines``, rotating as needed; fsync if ``sync``.

        Raises :class:`AppendFailed` with the number of leading lines that
        are in the file (with ``sync``: that were made durable).
        """
        done = 0
        try:
            while done < len(lines):
                stop = self._fit(lines, done)
                whole_lines, error = self._write(b"".join(lines[done:stop]))
                done += whole_lines
                if error is not None:
                    raise error
            if sync:
                self._sync_open()
        except OSError as exc:
            if sync and done == len(lines):
                done = 0  # written, but not known to be durable
            self._abandon()
            raise AppendFailed(done, exc) from exc

    def sync(self) -> None:
        """fsync the open segment if it has unsynced writes."""
        try:
            self._sync_open()
        except OSError:
            self._abandon()
            raise

    def close(self) -> None:
        """Seal the open segment (fsync first unless the policy is ``never``)."""
        try:
            self._seal()
        except OSError:
            self._abandon()
            raise

    def _fit(self, lines: Sequence[bytes], start: int) -> int:
        """Rotate if ``lines[start]`` does not fit; the end of what fits now."""
        if self._fd is None:
            self._open_next()
        elif self._size and self._size + len(lines[start]) > self._max_bytes:
            self._seal()
            self._open_next()
        stop, size = start + 1, self._size + len(lines[start])
        while stop < len(lines) and size + len(lines[stop]) <= self._max_bytes:
            size += len(lines[stop])
            stop += 1
        return stop

    def _write(self, data: bytes) -> tuple[int, OSError | None]:
        """Write all of ``data``: the whole lines written, and the error if any."""
        assert self._fd is not None
        view, offset, error = memoryview(data), 0, None
        try:
            while offset < len(data):
                offset += os.write(self._fd, view[offset:])
        except OSError as exc:
            error = exc
        self._size += offset
        self.bytes_written += offset
        self._dirty = self._dirty or offset > 0
        return data.count(b"\n", 0, offset), error

    def _sync_open(self) -> None:
        if self._fd is not None and self._dirty and self._fsync is not None:
            self._fsync(self._fd)
        self._dirty = False

    def _seal(self) -> None:
        if self._fd is None:
            return
        self._sync_open()
        os.fchmod(self._fd, CLOSED_MODE)
        os.close(self._fd)
        self._fd = None

    def _abandon(self) -> None:
        """Seal what can be sealed after an error; never raises."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self._sync_open()
        with contextlib.suppress(OSError):
            os.fchmod(self._fd, CLOSED_MODE)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd, self._dirty = None, False

    def _open_next(self) -> None:
        seal_orphans(self._directory, fsync=self._fsync)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        while True:
            self._seq += 1
            name = segment_name(self._clock(), self._seq)
            try:
                fd = os.open(self._directory / name, flags, OPEN_MODE)
            except FileExistsError:
                continue  # another writer (or an earlier run) has this name
            break
        try:
            # Blocks only while a seal_orphans elsewhere looks at the file.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.fchmod(fd, OPEN_MODE)
            if self._fsync is not None:
                _fsync_directory(self._directory, self._fsync)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size, self._dirty, self.name = fd, 0, False, name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _same_file(source: Path, copy: Path) -> bool:
    try:
        if copy.stat().st_size != source.stat().st_size:
            return False
    except FileNotFoundError:
        return False
    return _sha256(copy) == _sha256(source)


def _copy_atomically(source: Path, dest: Path) -> None:
    """Copy via a hidden temporary file in ``dest``'s directory, then rename."""
    fd, temp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(_COPY_CHUNK_BYTES):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        st = source.stat()
        os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(temp, CLOSED_MODE)
        os.replace(temp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_directory(dest.parent, os.fsync)


def export_segments(directory: Path, *, since: datetime, to: Path) -> list[Path]:
    """Copy the closed segments last written at or after ``since`` into ``to``.

    The open segment of a running writer is never copied (it is not sealed
    yet). Each copy lands atomically (temporary file, fsync, rename) as a
    read-only file with the source's mtime; a segment already in ``to``
    with the same size and SHA-256 is skipped, so running this again (every
    few minutes, from cron) copies only what is new. A different file of
    the same name in ``to`` is replaced. Returns the paths written in ``to``.
    """
    if since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    to.mkdir(parents=True, exist_ok=True)
    threshold_s = since.timestamp()
    copied = []
    for source in closed_segments(directory):
        if source.stat().st_mtime < threshold_s:
            continue
        dest = to / source.name
        if _same_file(source, dest):
            continue
        _copy_atomically(source, dest)
        copied.append(dest)
    return copied


def parse_since(text: str, *, now: datetime) -> datetime:
    """An RFC 3339 timestamp, or ``now`` minus ``<n>s|m|h|d`` (``15m``), in UTC."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    text = text.strip()
    if relative := _RELATIVE_RE.fullmatch(text):
        amount, unit = relative.groups()
        return (now - timedelta(seconds=int(amount) * _UNIT_S[unit])).astimezone(UTC)
    candidate = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    try:
        moment = datetime.fromisoformat(candidate.replace("t", "T"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ValueError(
            f"expected an RFC 3339 time (2026-01-02T03:04:05Z) or an age like 15m, 2h, 1d: {text!r}"
        )
    return moment.astimezone(UTC)
