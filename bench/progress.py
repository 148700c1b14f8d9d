"""A minimal progress bar on stderr (no dependency): elapsed time, operations, errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

import trio

WIDTH = 30
TICK_S = 0.5


async def show(start: float, end: float, counts: Callable[[], tuple[int, int]], *, label: str) -> None:
    """Redraw until cancelled; ``end`` may be infinite (request-count runs)."""
    stream = sys.stderr
    try:
        while True:
            now = trio.current_time()
            done, errors = counts()
            if end == float("inf"):
                bar = "?" * WIDTH
                when = f"{now - start:6.1f} s"
            else:
                frac = min(1.0, max(0.0, (now - start) / (end - start)))
                bar = "#" * int(frac * WIDTH) + "." * (WIDTH - int(frac * WIDTH))
                when = f"{now - start:6.1f}/{end - start:.0f} s"
            stream.write(f"\r{label} [{bar}] {when}  {done} ops  {errors} errors ")
            stream.flush()
            await trio.sleep(TICK_S)
    finally:
        stream.write("\n")
        stream.flush()
