"""Rate limiting: one token bucket per (limiter, key), in process or in Redis.

The four limiters are named after the settings that configure them:
``registration`` (per client IP), ``provisioning`` (per account),
``bundle`` (per requesting device and target) and ``send`` (per sender
device). :meth:`RateLimiter.check` raises :class:`RateLimited` (429 with
Retry-After) when a bucket is empty, and counts the reject for
``pqmsg_rate_limit_rejects_total{limiter}``.

Backends: without Redis the buckets live in this process and a sweeper
loop drops full ones (:mod:`pqmsg.limits.memory`); with Redis every replica
shares them (:mod:`pqmsg.limits.redis_store`) and a probe loop keeps
:attr:`LimiterStatistics.healthy` current. The send and bundle buckets are
taken together with the request's nonce (:mod:`pqmsg.nurseries.admission`).

Redis failures: a check that cannot reach Redis follows the limiter's
``<name>_on_failure`` setting. ``"open"`` lets the request through;
``"closed"`` raises :class:`Unavailable` (503, reason
``limiter_unavailable``). Either way the failure is counted and the
limiter reports unhealthy until Redis answers again; nothing needs a
restart. A request's nonce needs Redis too and fails closed, so with Redis
down an authenticated request never gets as far as an open limiter: the
policy matters for registration and linking.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from types import MappingProxyType
from typing import Literal, final

import attrs
import trio

from pqmsg.errors import RateLimited, Unavailable
from pqmsg.limits.bucket import BucketStore, Verdict
from pqmsg.limits.memory import SWEEP_INTERVAL_S, MemoryBuckets
from pqmsg.limits.redis_store import RedisBucket, RedisBuckets
from pqmsg.redisconn import (
    PROBE_INTERVAL_S,
    RedisClient,
    RedisHealth,
    RedisUnavailable,
    probe_redis,
)
from pqmsg.settings import FailurePolicy, LimitSettings, RateLimit

LIMITERS = ("registration", "provisioning", "bundle", "send")
#: Retry-After of a 503 when Redis is down and the policy is "closed".
UNAVAILABLE_RETRY_AFTER_S = 2.0

Backend = Literal["memory", "redis"]


@attrs.frozen
class LimiterStatistics:
    backend: Backend
    healthy: bool
    detail: str | None
    # Loops running in the service's nursery.
    tasks: int
    # 429s per limiter, every limiter present from the start.
    rejects: Mapping[str, int]
    # Checks that could not reach Redis (whatever the policy made of them).
    redis_failures: int
    # Buckets held in this process (0 with Redis).
    buckets: int


@final
class RateLimiter:
    """Checks requests against the configured buckets. Made by :func:`open_rate_limiter`."""

    def __init__(
        self,
        settings: LimitSettings,
        store: BucketStore,
        *,
        backend: Backend,
        health: RedisHealth,
        nursery: trio.Nursery,
    ) -> None:
        self._limits: dict[str, tuple[RateLimit, FailurePolicy]] = {
            name: (getattr(settings, name), getattr(settings, f"{name}_on_failure"))
            for name in LIMITERS
        }
        self._store = store
        self._backend: Backend = backend
        self._health = health
        self._nursery = nursery
        self._rejects = dict.fromkeys(LIMITERS, 0)

    async def check(self, limiter: str, key: str) -> None:
        """Take a token for ``key`` from bucket ``limiter``, or raise.

        Raises :class:`RateLimited` when the bucket is empty, and
        :class:`Unavailable` when Redis is down and the limiter fails closed.
        ``ValueError`` for an unknown limiter name (a bug in the caller).
        """
        try:
            limit, on_failure = self._limits[limiter]
        except KeyError:
            raise ValueError(f"unknown rate limiter {limiter!r}") from None
        try:
            verdict = await self._store.take(limiter, key, limit)
        except RedisUnavailable as exc:
            self.failed(exc)
            if on_failure == "open":
                return
            raise Unavailable(
                "rate limiter unavailable",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
                reason="limiter_unavailable",
            ) from exc
        self.settle(limiter, verdict)

    # For a caller that takes a token in a script of its own
    # (pqmsg.nurseries.admission): the bucket, then the outcome.

    def redis_bucket(self, limiter: str, key: str) -> RedisBucket | None:
        """Where bucket ``(limiter, key)`` lives in Redis; None when buckets live here."""
        store = self._store
        if not isinstance(store, RedisBuckets):
            return None
        try:
            limit, _ = self._limits[limiter]
        except KeyError:
            raise ValueError(f"unknown rate limiter {limiter!r}") from None
        return store.bucket(limiter, key, limit)

    def settle(self, limiter: str, verdict: Verdict) -> None:
        """Account for a token taken (or refused) in Redis; raises :class:`RateLimited`."""
        self._health.succeeded()
        if not verdict.allowed:
            self._rejects[limiter] += 1
            raise RateLimited(
                f"too many {limiter} requests; retry in {verdict.wait_s:.3g} s",
                retry_after_s=verdict.wait_s,
            )

    def succeeded(self) -> None:
        """Redis answered (a script that did not get as far as the bucket)."""
        self._health.succeeded()

    def failed(self, exc: RedisUnavailable) -> None:
        """Count a check that could not reach Redis."""
        self._health.failed(exc)

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            backend=self._backend,
            healthy=self._health.healthy,
            detail=self._health.detail,
            tasks=len(self._nursery.child_tasks),
            rejects=MappingProxyType(dict(self._rejects)),
            redis_failures=self._health.failures,
            buckets=len(self._store),
        )


@asynccontextmanager
async def open_rate_limiter(
    settings: LimitSettings,
    *,
    redis: RedisClient | None = None,
    probe_interval_s: float = PROBE_INTERVAL_S,
) -> AsyncIterator[RateLimiter]:
    """Run the rate limiter: in process, or shared through ``redis``.

    The service's nursery runs the sweeper (in process) or the health probe
    (Redis). Neither holds anything to flush, so on exit they are cancelled.
    The Redis client belongs to the caller and stays open.
    """
    health = RedisHealth()
    async with trio.open_nursery() as nursery:
        store: BucketStore
        backend: Backend
        if redis is None:
            memory = MemoryBuckets()
            await nursery.start(memory.sweep_forever, SWEEP_INTERVAL_S)
            store, backend = memory, "memory"
        else:
            store, backend = RedisBuckets(redis, key_prefix=settings.key_prefix), "redis"
            await nursery.start(partial(probe_redis, redis, health, interval_s=probe_interval_s))
        try:
            yield RateLimiter(settings, store, backend=backend, health=health, nursery=nursery)
        finally:
            nursery.cancel_scope.cancel()
