"""Token buckets in Redis, shared by every replica.

One Lua script takes a token atomically. It reads the time from Redis
(``TIME``), not from the caller, so replicas whose clocks disagree still
share one consistent bucket. The arithmetic is that of
:mod:`pqmsg.limits.bucket` on integer microseconds, and each bucket key
expires exactly when the bucket is full again, so idle buckets vanish.

Keys are ``<prefix>rl:<limiter>:<key>``. Errors: :class:`RedisUnavailable`
from :mod:`pqmsg.redisconn`; the caller applies the failure policy.
"""

from __future__ import annotations

from typing import final

import attrs

from pqmsg.limits.bucket import Verdict
from pqmsg.redisconn import RedisClient
from pqmsg.settings import RateLimit

MICROS_PER_S = 1_000_000

#: The bucket arithmetic as a Lua function, shared by the scripts that take
#: tokens (this module's and :mod:`pqmsg.nurseries.admission`'s). ``now``
#: comes from Redis ``TIME``; returns {allowed (0|1), wait in ms rounded up}.
#: GET yields false for a missing key: a full bucket.
TAKE_TOKEN_LUA = """
local function take_token(key, interval, burst, now)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then
    tat = now
  end
  local allow_at = tat - (burst - 1) * interval
  if allow_at > now then
    return {0, math.ceil((allow_at - now) / 1000)}
  end
  local new_tat = tat + interval
  redis.call('SET', key, string.format('%d', new_tat),
             'PX', math.ceil((new_tat - now) / 1000))
  return {1, 0}
end
local function redis_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000000 + tonumber(time[2])
end
"""

#: KEYS[1]: the bucket. ARGV[1]: microseconds per token (integer).
#: ARGV[2]: burst. Returns {allowed (0|1), wait in ms rounded up}.
TOKEN_BUCKET_LUA = TAKE_TOKEN_LUA + """
return take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), redis_now())
"""


@attrs.frozen
class RedisBucket:
    """One bucket's key and the script arguments of its limit."""

    key: str
    interval_us: int
    burst: int


def interval_us(limit: RateLimit) -> int:
    # Integer microseconds keep the Lua arithmetic exact (doubles hold
    # integers up to 2**53; Unix time in microseconds is about 2**51).
    return max(1, round(MICROS_PER_S / limit.per_s))


@final
class RedisBuckets:
    """Buckets in Redis; see the module docstring."""

    def __init__(self, redis: RedisClient, *, key_prefix: str) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._script = redis.register_script(TOKEN_BUCKET_LUA)

    def __len__(self) -> int:
        return 0

    def bucket(self, limiter: str, key: str, limit: RateLimit) -> RedisBucket:
        return RedisBucket(f"{self._prefix}rl:{limiter}:{key}", interval_us(limit), limit.burst)

    async def take(self, limiter: str, key: str, limit: RateLimit) -> Verdict:
        bucket = self.bucket(limiter, key, limit)
        allowed, wait_ms = await self._redis.run_script(
            self._script, keys=[bucket.key], args=[bucket.interval_us, bucket.burst]
        )
        return Verdict(allowed=bool(allowed), wait_s=int(wait_ms) / 1000)
