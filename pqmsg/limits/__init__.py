"""Token buckets behind one interface: in-process, or shared through Redis.

:mod:`pqmsg.limits.bucket` holds the arithmetic (GCRA, the token bucket
kept as one timestamp), :mod:`pqmsg.limits.memory` and
:mod:`pqmsg.limits.redis_store` the two stores. The service that uses them is
:mod:`pqmsg.nurseries.limiter`.
"""
