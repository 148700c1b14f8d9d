"""Admission: a request's nonce and its rate-limit token, in one step.

A send (and a bundle fetch) must pass two shared checks after its input was
validated: its nonce must be fresh (the last check of PROTOCOL.md §3) and
its device's bucket must hold a token. Through Redis, asked separately,
that is two commands, and the request waits twice; here it is one script,
which records the nonce and, only if it was fresh, takes the token:

- a replay takes no token, so replaying someone's captured request cannot
  drain their bucket;
- a request refused by its bucket has still used its nonce, as before
  (it was authenticated and answered);
- the route validates its input before it admits the request, so bad
  input (a 400) records no nonce and takes no token: it changes nothing,
  not even in Redis. A replayed request with bad input is therefore a 400
  rather than a 401 ``replay``; it changes nothing either way.

Failures follow the stricter of the two services: when Redis cannot be
reached the request is refused with the replay cache's 503
(``replay_cache_unavailable``), since a nonce that cannot be checked must
not be accepted, whatever the limiter's own policy. Both services count the
failure, and both see Redis answer again, so ``/health`` and the metrics
read as they did with two commands.

Without Redis (the embedded default) nothing is shared and nothing is
saved: the replay cache and the limiter are asked in turn, in that order.

The script touches two keys; both live in the one Redis the server uses
(a Redis Cluster would need them in one hash slot, which this layout does
not give).
"""

from __future__ import annotations

from typing import final

from pqmsg.limits.bucket import Verdict
from pqmsg.limits.redis_store import TAKE_TOKEN_LUA
from pqmsg.nurseries.limiter import RateLimiter
from pqmsg.nurseries.replay import ReplayCache
from pqmsg.redisconn import RedisClient, RedisUnavailable

#: KEYS[1]: the nonce, KEYS[2]: the bucket. ARGV[1]: the nonce's expiry in
#: seconds, ARGV[2]: microseconds per token, ARGV[3]: burst.
#: Returns {fresh (0|1), allowed (0|1), wait in ms}; a replay is {0, 0, 0}
#: and leaves the bucket alone. TIME is read before the first write.
ADMIT_LUA = TAKE_TOKEN_LUA + """
local now = redis_now()
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return {0, 0, 0}
end
local verdict = take_token(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), now)
return {1, verdict[1], verdict[2]}
"""


@final
class Admission:
    """Records nonces and takes tokens together; see the module docstring."""

    def __init__(
        self, replay: ReplayCache, limiter: RateLimiter, *, redis: RedisClient | None = None
    ) -> None:
        self._replay = replay
        self._limiter = limiter
        self._scripted = (redis, redis.register_script(ADMIT_LUA)) if redis is not None else None

    async def admit(self, account: str, device: int, nonce: str, limiter: str, key: str) -> bool:
        """Record ``nonce`` for the device and take a token from ``(limiter, key)``.

        False for a replay (no token taken). Raises :class:`RateLimited`
        when the bucket is empty and :class:`Unavailable` when the checks
        cannot be made.
        """
        nonce_key = self._replay.redis_nonce(account, device, nonce)
        bucket = self._limiter.redis_bucket(limiter, key)
        if self._scripted is None or nonce_key is None or bucket is None:
            if not await self._replay.record(account, device, nonce):
                return False
            await self._limiter.check(limiter, key)
            return True
        redis, script = self._scripted
        key_of_nonce, window_s = nonce_key
        try:
            fresh, allowed, wait_ms = await redis.run_script(
                script,
                keys=[key_of_nonce, bucket.key],
                args=[window_s, bucket.interval_us, bucket.burst],
            )
        except RedisUnavailable as exc:
            self._limiter.failed(exc)
            raise self._replay.failed(exc) from exc
        self._replay.succeeded()
        if not fresh:
            self._limiter.succeeded()
            return False
        self._limiter.settle(limiter, Verdict(allowed=bool(allowed), wait_s=int(wait_ms) / 1000))
        return True
