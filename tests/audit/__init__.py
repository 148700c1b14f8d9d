"""Helpers of the audit tests: a fixed wall clock, blocking-call runners, an fsync spy."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")

# 2026-01-02T03:04:05.678Z
FIXED_TIME_S = 1_767_323_045.678
FIXED_TIME = "2026-01-02T03:04:05.678Z"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TEST_TIMEOUT_S = 30.0


def fixed_clock() -> float:
    return FIXED_TIME_S


async def inline(fn: Callable[[], T], /) -> T:
    """Run the blocking call in trio's thread: keeps autojump_clock deterministic."""
    await trio.lowlevel.checkpoint()
    return fn()


def slow(delay_s: float) -> Callable[[Callable[[], T]], Awaitable[T]]:
    """A runner whose every blocking call takes ``delay_s`` of trio time."""

    async def run(fn: Callable[[], T], /) -> T:
        await trio.sleep(delay_s)
        return fn()

    return run


class FsyncSpy:
    """Counts fsync calls on segment files and on directories; can fail."""

    def __init__(self) -> None:
        self.files = 0
        self.directories = 0
        self.failures_left = 0
        self.error = OSError(28, "No space left on device")

    def __call__(self, fd: int) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise self.error
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.directories += 1
        else:
            self.files += 1


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit-*.jsonl"))


def is_sealed(path: Path) -> bool:
    return not path.stat().st_mode & 0o222


def records(directory: Path) -> list[dict[str, Any]]:
    """Every audit line in ``directory``, in segment order."""
    found = []
    for path in segments(directory):
        for line in path.read_bytes().splitlines():
            found.append(json.loads(line))
    return found
