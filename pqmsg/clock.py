"""Wall-clock time, injected.

Durations and timeouts use trio's clock (``trio.current_time``, ``trio.sleep``)
so tests can run on ``autojump_clock``. Wall-clock timestamps (request skew,
``created_at``, token expiry) come from a :data:`WallClock` passed to whoever
needs one; only the composition root picks :func:`system_clock`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WallClock = Callable[[], float]


def system_clock() -> float:
    """Unix seconds now."""
    return time.time()
