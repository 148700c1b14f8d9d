"""Garbage-collector settings for a long-running server process.

CPython's cyclic collector runs a young-generation pass every 700 net
allocations of container objects, and a full pass (every object the process
holds) when enough has survived. A server holding 10,000 long polls holds
millions of objects, and a full pass then holds the event loop for 0.5 to
1 s. With the default thresholds the full passes came often enough to halve
the rate at which the server could take new long polls: ``python -m bench
--spawn --idle-polls 10000`` parked 5,545 polls in 75 s, against all 10,000
in 23 s with the thresholds below.

So the server process, once its services are up, moves everything it
allocated so far (modules, settings, the app) out of the collector's reach
(``gc.freeze``: it is never garbage) and collects the young generation
every :data:`GEN0_THRESHOLD` allocations instead of 700. Memory held by
unreachable cycles waits a little longer to be freed; reference counting,
which frees everything else at once, is unaffected.
"""

from __future__ import annotations

import gc
from typing import Final

GEN0_THRESHOLD: Final = 50_000
GEN1_THRESHOLD: Final = 20
GEN2_THRESHOLD: Final = 100


def tune_for_serving() -> None:
    """Freeze what exists now and raise the collection thresholds (process-wide)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
