"""A real lock on an embedded database, taken by another connection."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def write_locked(path: Path) -> Iterator[Callable[[], None]]:
    """Another connection holds the write lock (as another process could)
    until the yielded ``release`` is called or the block ends."""
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")

    def release() -> None:
        if raw.in_transaction:
            raw.execute("ROLLBACK")

    try:
        yield release
    finally:
        release()
        raw.close()
