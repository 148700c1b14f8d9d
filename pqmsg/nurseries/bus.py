"""Wake-ups between replicas over Redis pub/sub.

A send committed on replica B must end a long poll parked on replica A at
once. The notifier of each replica publishes ``origin kind account:device``
lines on one channel and delivers what the others publish to its own
waiters. The origin is the publishing replica's id, so a replica ignores its
own echo (it already woke its local waiters).

One PUBLISH carries every wake-up the notifier had queued, one per line
(at most ``FORWARD_BATCH``): under load that is one command, and one
message for each subscriber to read, per batch instead of per send. A
message of one line is the format of one wake-up, so a replica reads
either.

Pub/sub is fire-and-forget: a wake-up published while a replica's
subscription is down is lost. That costs latency, never data: messages are
in the database, and a long poll ends at its ``wait`` at the latest. The
listener resubscribes with a capped backoff and reports its health.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence

import trio

from pqmsg.nurseries.notify import BusUnavailable, Wake, WakeKind
from pqmsg.redisconn import RedisClient, RedisUnavailable

log = logging.getLogger("pqmsg.bus")

CHANNEL = "wake"
RETRY_MIN_S = 0.1
RETRY_MAX_S = 5.0

Deliver = Callable[[WakeKind, str, int], None]


class RedisBus:
    """Publishes and receives wake-ups; :meth:`listen` runs in the notifier's nursery."""

    def __init__(self, redis: RedisClient, *, prefix: str) -> None:
        self._redis = redis
        self._channel = prefix + CHANNEL
        self._origin = secrets.token_hex(8)
        self.healthy = True
        self.detail: str | None = None

    async def publish_many(self, items: Sequence[tuple[WakeKind, str, int]]) -> None:
        """Publish ``items`` as one message, one wake-up per line."""
        if not items:
            return
        payload = "\n".join(
            Wake(self._origin, kind, account, device).encode() for kind, account, device in items
        ).encode()
        try:
            await self._redis.publish(self._channel, payload)
        except RedisUnavailable as exc:
            raise BusUnavailable(str(exc)) from exc

    async def listen(
        self, deliver: Deliver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver other replicas' wake-ups until cancelled; resubscribe on failure."""
        backoff = RETRY_MIN_S
        started = False
        while True:
            try:
                async with self._redis.subscribe(self._channel) as subscription:
                    self.healthy, self.detail = True, None
                    backoff = RETRY_MIN_S
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        message = await subscription.receive()
                        self._dispatch(message.data, deliver)
            except RedisUnavailable as exc:
                self.healthy, self.detail = False, f"wake-up bus: {exc}"
                log.warning("wake-up bus subscription lost: %s (retrying in %.1fs)", exc, backoff)
                if not started:
                    # Serve anyway: long polls still end at their wait.
                    started = True
                    task_status.started()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)

    def _dispatch(self, data: bytes, deliver: Deliver) -> None:
        text = data.decode("ascii", errors="replace")
        if text.startswith(self._origin + " "):
            return  # our own echo: every line of a message has one origin
        for line in text.split("\n"):
            wake = Wake.decode(line)
            if wake is not None and wake.origin != self._origin:
                deliver(wake.kind, wake.account, wake.device)
