"""The replay cache: each (account, device, nonce) is accepted once per window.

:meth:`ReplayCache.record` remembers a nonce for ``auth.replay_window_s``
and says whether it was fresh. The caller records a nonce only after the
request's signature verified (PROTOCOL.md §3), so forged requests cannot
burn other devices' nonces.

Backends: without Redis the nonces live in this process, in expiry order,
and a pruning loop forgets expired ones (memory is bounded by the accepted
requests of one window). With Redis every replica shares them: one
``SET <prefix>nonce:<account>:<device>:<nonce> 1 NX EX <window>`` per
request, and a probe loop keeps :attr:`ReplayStatistics.healthy` current.
Sends and bundle fetches record theirs in the same script as their rate-limit
token (:mod:`pqmsg.nurseries.admission`), on the same keys.

The cache FAILS CLOSED: when Redis cannot be reached, :meth:`record`
raises :class:`Unavailable` (503, reason ``replay_cache_unavailable``),
because a request that cannot be checked for replay must not be accepted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal, Protocol, final

import attrs
import trio

from pqmsg.errors import Unavailable
from pqmsg.redisconn import (
    PROBE_INTERVAL_S,
    RedisClient,
    RedisHealth,
    RedisUnavailable,
    probe_redis,
)
from pqmsg.settings import Settings

#: How often expired nonces are forgotten (in-process backend).
PRUNE_INTERVAL_S = 10.0
#: Retry-After of the 503 when Redis is down.
UNAVAILABLE_RETRY_AFTER_S = 2.0

Backend = Literal["memory", "redis"]
_Nonce = tuple[str, int, str]


@attrs.frozen
class ReplayStatistics:
    backend: Backend
    healthy: bool
    detail: str | None
    # Loops running in the service's nursery.
    tasks: int
    # Nonces held in this process (0 with Redis).
    entries: int
    # Checks that could not reach Redis (each one a 503).
    failures: int


class _NonceStore(Protocol):
    async def add(self, nonce: _Nonce) -> bool: ...

    def __len__(self) -> int: ...


@final
class _MemoryNonces:
    """Nonce -> expiry on Trio's clock, oldest first (one window for all)."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._expiries: OrderedDict[_Nonce, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiries)

    async def add(self, nonce: _Nonce) -> bool:
        now = trio.current_time()
        expiry = self._expiries.get(nonce)
        if expiry is not None and now < expiry:
            return False
        self._expiries[nonce] = now + self._window_s
        # Re-recording an expired, not yet pruned nonce keeps expiry order.
        self._expiries.move_to_end(nonce)
        return True

    def prune(self) -> None:
        now = trio.current_time()
        while self._expiries:
            nonce, expiry = next(iter(self._expiries.items()))
            if expiry > now:
                return
            del self._expiries[nonce]

    async def prune_forever(
        self, interval_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            self.prune()


@final
class _RedisNonces:
    def __init__(self, redis: RedisClient, *, key_prefix: str, window_s: int) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._window_s = window_s

    def __len__(self) -> int:
        return 0

    @property
    def window_s(self) -> int:
        return self._window_s

    def key(self, nonce: _Nonce) -> str:
        account, device, value = nonce
        return f"{self._prefix}nonce:{account}:{device}:{value}"

    async def add(self, nonce: _Nonce) -> bool:
        return await self._redis.set_nx(self.key(nonce), 1, ex_s=self._window_s)


@final
class ReplayCache:
    """Remembers accepted nonces. Made by :func:`open_replay_cache`."""

    def __init__(
        self, store: _NonceStore, *, backend: Backend, health: RedisHealth, nursery: trio.Nursery
    ) -> None:
        self._store = store
        self._backend: Backend = backend
        self._health = health
        self._nursery = nursery

    async def record(self, account: str, device: int, nonce: str) -> bool:
        """True if ``nonce`` is fresh for this device (and now recorded), False if a replay.

        Raises :class:`Unavailable` when Redis cannot be reached.
        """
        try:
            fresh = await self._store.add((account, device, nonce))
        except RedisUnavailable as exc:
            raise self.failed(exc) from exc
        self._health.succeeded()
        return fresh

    # For a caller that records a nonce in a script of its own
    # (pqmsg.nurseries.admission): the key and expiry, then the outcome.

    def redis_nonce(self, account: str, device: int, nonce: str) -> tuple[str, int] | None:
        """The nonce's Redis key and expiry in seconds; None when nonces live here."""
        store = self._store
        if isinstance(store, _RedisNonces):
            return store.key((account, device, nonce)), store.window_s
        return None

    def succeeded(self) -> None:
        """A nonce check reached Redis."""
        self._health.succeeded()

    def failed(self, exc: RedisUnavailable) -> Unavailable:
        """Count a nonce check that could not reach Redis; returns the 503 to raise."""
        self._health.failed(exc)
        return Unavailable(
            "replay protection unavailable",
            retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            reason="replay_cache_unavailable",
        )

    def statistics(self) -> ReplayStatistics:
        return ReplayStatistics(
            backend=self._backend,
            healthy=self._health.healthy,
            detail=self._health.detail,
            tasks=len(self._nursery.child_tasks),
            entries=len(self._store),
            failures=self._health.failures,
        )


@asynccontextmanager
async def open_replay_cache(
    settings: Settings,
    *,
    redis: RedisClient | None = None,
    probe_interval_s: float = PROBE_INTERVAL_S,
) -> AsyncIterator[ReplayCache]:
    """Run the replay cache: in process, or shared through ``redis``.

    The window is ``settings.auth.replay_window_s``; Redis keys start with
    ``settings.limits.key_prefix``. The service's nursery runs the pruner
    (in process) or the health probe (Redis); neither holds anything to
    flush, so on exit they are cancelled. The Redis client belongs to the
    caller and stays open.
    """
    window_s = settings.auth.replay_window_s
    health = RedisHealth()
    async with trio.open_nursery() as nursery:
        store: _NonceStore
        backend: Backend
        if redis is None:
            memory = _MemoryNonces(window_s)
            await nursery.start(memory.prune_forever, PRUNE_INTERVAL_S)
            store, backend = memory, "memory"
        else:
            prefix = settings.limits.key_prefix
            store = _RedisNonces(redis, key_prefix=prefix, window_s=window_s)
            backend = "redis"
            await nursery.start(partial(probe_redis, redis, health, interval_s=probe_interval_s))
        try:
            yield ReplayCache(store, backend=backend, health=health, nursery=nursery)
        finally:
            nursery.cancel_scope.cancel()
