"""Redis from Trio: redis-py's asyncio client, driven through trio-asyncio.

:func:`open_redis` yields a :class:`RedisClient` that wraps the few commands
the server needs (a registered Lua script, ``SET NX`` with expiry, ``PING``,
``PUBLISH`` and subscriptions) as Trio-flavoured methods. The caller must
already run inside ``trio_asyncio.open_loop()`` (the composition root opens
it; tests open it in a fixture).

Resources and errors:

- Nothing connects at open: the first command does, so the server starts
  while Redis is down and its services apply their failure policies.
- Every command is bounded by ``timeout_s`` twice over: redis-py's socket
  and connect timeouts, and a Trio ``fail_after`` around the whole call (a
  script may need ``SCRIPT LOAD`` and a second round trip after Redis lost
  its script cache). A dead or hung Redis therefore answers within
  ``timeout_s``.
- Connection errors, timeouts, ``OSError`` and writes refused by a read-only
  replica become :class:`RedisUnavailable`. Any other Redis error is a bug
  and propagates as it is.
- redis-py does not retry here (a retried ``SET NX`` or token-bucket script
  could be applied twice). Reconnection needs no retry: the pool checks
  each connection as it hands it out and reconnects a stale one, so the
  first command after Redis comes back succeeds.
- :class:`RedisHealth` and :func:`probe_redis` let a service report whether
  its Redis answers, and notice recovery without traffic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, final

import attrs
import redis.asyncio as aredis
import redis.exceptions
import trio
import trio_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.maint_notifications import MaintNotificationsConfig

#: How long closing the client or a subscription may take on the way out.
CLOSE_GRACE_S = 1.0
#: How often a service pings Redis to keep its health current without traffic.
PROBE_INTERVAL_S = 1.0

#: Errors that mean "Redis cannot serve this now", not "our request is wrong".
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a failover left us on a replica
    OSError,
)

T = TypeVar("T")
ScriptArg = str | int | float | bytes


class RedisUnavailable(Exception):
    """Redis could not be reached, or did not answer within the timeout."""


@final
class RedisScript:
    """A Lua script registered with a :class:`RedisClient` (run by SHA1)."""

    def __init__(self, script: AsyncScript) -> None:
        self._script = script

    @property
    def sha(self) -> str:
        return str(self._script.sha)


@attrs.frozen
class PubSubMessage:
    channel: str
    data: bytes


@final
class Subscription:
    """Messages published on the channels of one ``subscribe()`` call.

    Redis pub/sub is fire-and-forget: messages published while the
    connection is down are lost, so a subscriber that sees
    :class:`RedisUnavailable` must subscribe again and re-read its source of
    truth.
    """

    def __init__(self, pubsub: aredis.client.PubSub) -> None:
        self._pubsub = pubsub

    async def receive(self) -> PubSubMessage:
        """Wait (without a deadline) for the next message."""
        while True:
            try:
                message = await trio_asyncio.aio_as_trio(self._pubsub.get_message)(
                    ignore_subscribe_messages=True, timeout=None
                )
            except REDIS_DOWN_ERRORS as exc:
                raise RedisUnavailable(f"redis subscription lost: {_describe(exc)}") from exc
            if message is not None and message["type"] == "message":
                return PubSubMessage(channel=message["channel"].decode(), data=message["data"])


@final
class RedisClient:
    """Trio-flavoured access to one Redis (see the module docstring)."""

    def __init__(self, client: aredis.Redis, *, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s

    def register_script(self, source: str) -> RedisScript:
        """Prepare a Lua script; it is loaded into Redis on first use."""
        return RedisScript(self._client.register_script(source))

    async def run_script(
        self, script: RedisScript, *, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        """``EVALSHA``, loading the script first if Redis does not know it."""
        return await self._call("EVALSHA", script._script, keys=list(keys), args=list(args))

    async def set_nx(
        self, key: str, value: ScriptArg, *, ex_s: int | None = None, px_ms: int | None = None
    ) -> bool:
        """``SET key value NX [EX|PX]``: True if the key was set, False if it existed."""
        result = await self._call("SET", self._client.set, key, value, nx=True, ex=ex_s, px=px_ms)
        return bool(result)

    async def ping(self) -> None:
        await self._call("PING", self._client.ping)

    async def publish(self, channel: str, message: bytes) -> int:
        """Publish; returns how many subscribers (across all replicas) got it."""
        return int(await self._call("PUBLISH", self._client.publish, channel, message))

    @asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[Subscription]:
        """Subscribe on a dedicated connection; confirmed before this yields."""
        pubsub = self._client.pubsub()
        try:
            await self._call("SUBSCRIBE", self._confirmed_subscribe, pubsub, channels)
            yield Subscription(pubsub)
        finally:
            with trio.move_on_after(CLOSE_GRACE_S, shield=True):
                await trio_asyncio.aio_as_trio(pubsub.aclose)()

    @staticmethod
    async def _confirmed_subscribe(pubsub: aredis.client.PubSub, channels: Sequence[str]) -> None:
        # SUBSCRIBE only sends the command. Waiting for every confirmation
        # means a PUBLISH issued after subscribe() returns is seen.
        await pubsub.subscribe(*channels)
        pending = set(channels)
        while pending:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "subscribe":
                pending.discard(message["channel"].decode())

    async def _call(
        self, what: str, function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        try:
            with trio.fail_after(self._timeout_s):
                result: T = await trio_asyncio.aio_as_trio(function)(*args, **kwargs)
                return result
        except trio.TooSlowError as exc:
            raise RedisUnavailable(f"redis {what} timed out after {self._timeout_s} s") from exc
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable(f"redis {what} failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@asynccontextmanager
async def open_redis(url: str, *, timeout_s: float) -> AsyncIterator[RedisClient]:
    """A :class:`RedisClient` for ``url``; closes its connection pool on exit.

    Must be entered inside ``trio_asyncio.open_loop()``.
    """
    client = aredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        # With maintenance notifications (on by default over RESP3), the pool
        # stops discarding connections the server closed, and the first
        # command after a Redis restart would fail.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    try:
        yield RedisClient(client, timeout_s=timeout_s)
    finally:
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            await trio_asyncio.aio_as_trio(client.aclose)()


@attrs.define
class RedisHealth:
    """Whether a service's last Redis call succeeded, and how many failed."""

    healthy: bool = True
    detail: str | None = None
    failures: int = 0

    def succeeded(self) -> None:
        self.healthy = True
        self.detail = None

    def failed(self, exc: RedisUnavailable, *, count: bool = True) -> None:
        self.healthy = False
        self.detail = str(exc)
        if count:
            self.failures += 1


async def probe_redis(
    redis: RedisClient,
    health: RedisHealth,
    *,
    interval_s: float = PROBE_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping every ``interval_s`` so health follows Redis without traffic.

    Without it, a replica whose ``/health`` says 503 gets no traffic from
    its load balancer and so would never see Redis recover. Probe failures
    change health but are not counted as failed requests.
    """
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        try:
            await redis.ping()
        except RedisUnavailable as exc:
            health.failed(exc, count=False)
        else:
            health.succeeded()
