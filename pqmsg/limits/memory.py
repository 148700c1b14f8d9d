"""Token buckets in this process, on Trio's clock.

Memory stays bounded: a bucket is dropped by :meth:`MemoryBuckets.sweep`
once it is full again (its ``tat`` has passed), which is at most
``burst / per_s`` after its last accepted request, plus one sweep interval.
"""

from __future__ import annotations

from typing import final

import trio

from pqmsg.limits.bucket import Verdict, take
from pqmsg.settings import RateLimit

#: How often full buckets are dropped.
SWEEP_INTERVAL_S = 10.0
#: Buckets examined between checkpoints, so a big sweep does not stall the loop.
SWEEP_BATCH = 10_000


@final
class MemoryBuckets:
    """Buckets keyed by ``(limiter, key)``; see :mod:`pqmsg.limits.bucket`."""

    def __init__(self) -> None:
        self._tats: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        return len(self._tats)

    async def take(self, limiter: str, key: str, limit: RateLimit) -> Verdict:
        bucket = (limiter, key)
        taken = take(self._tats.get(bucket), trio.current_time(), limit)
        if taken.verdict.allowed:
            self._tats[bucket] = taken.tat
        return taken.verdict

    async def sweep(self) -> int:
        """Drop every full bucket; returns how many were dropped."""
        dropped = 0
        snapshot = list(self._tats)
        for start in range(0, len(snapshot), SWEEP_BATCH):
            now = trio.current_time()
            for bucket in snapshot[start : start + SWEEP_BATCH]:
                # Re-read: the bucket may have been used since the snapshot.
                tat = self._tats.get(bucket)
                if tat is not None and tat <= now:
                    del self._tats[bucket]
                    dropped += 1
            await trio.lowlevel.checkpoint()
        return dropped

    async def sweep_forever(
        self,
        interval_s: float = SWEEP_INTERVAL_S,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            await self.sweep()
