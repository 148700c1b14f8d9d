"""The token bucket as GCRA: one "theoretical arrival time" per bucket.

A bucket of ``burst`` tokens refilled at ``per_s`` is stored as ``tat``,
the time at which it would be full again. Taking a token moves ``tat`` one
emission interval (``1 / per_s``) later; a request fits if, after taking,
the bucket would not be more than ``burst`` tokens in debt, that is if
``tat - now <= (burst - 1) * interval``. A bucket whose ``tat`` is not in
the future is full and carries no information, so stores may forget it.

The Redis store runs the same arithmetic in Lua on integer microseconds
(:mod:`pqmsg.limits.redis_store`).
"""

from __future__ import annotations

from typing import Protocol

import attrs

from pqmsg.settings import RateLimit

#: Float noise allowance: a request arriving this close to its turn fits,
#: so a client that waits exactly Retry-After is never refused.
EPSILON_S = 1e-9


@attrs.frozen
class Verdict:
    allowed: bool
    # How long until a token is available (0 when allowed).
    wait_s: float


@attrs.frozen
class Taken:
    verdict: Verdict
    # The bucket's new theoretical arrival time (unchanged when refused).
    tat: float


def take(tat: float | None, now: float, limit: RateLimit) -> Taken:
    """Try to take one token from the bucket ``tat`` (None: a full bucket)."""
    interval = 1.0 / limit.per_s
    start = now if tat is None or tat < now else tat
    allow_at = start - (limit.burst - 1) * interval
    if allow_at - now > EPSILON_S:
        return Taken(Verdict(allowed=False, wait_s=allow_at - now), start)
    return Taken(Verdict(allowed=True, wait_s=0.0), start + interval)


class BucketStore(Protocol):
    """Where buckets live: this process, or Redis shared by every replica."""

    async def take(self, limiter: str, key: str, limit: RateLimit) -> Verdict:
        """Take a token from bucket ``(limiter, key)``, or say how long to wait."""
        ...

    def __len__(self) -> int:
        """Buckets held in this process (0 when they live elsewhere)."""
        ...
