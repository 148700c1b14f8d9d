"""Redis from Trio: redis-py's asyncio client, driven through trio-asyncio.

:func:`open_redis` yields a :class:`RedisClient` that wraps the few commands
the server needs (a registered Lua script, ``SET NX`` with expiry, ``PING``,
``PUBLISH`` and subscriptions) as Trio-flavoured methods. The caller must
already run inside ``trio_asyncio.open_loop()`` (the composition root opens
it; tests open it in a fixture).

Resources and errors:

- Nothing connects at open: the first command does, so the server starts
  while Redis is down and its services apply their failure policies.
- Every command is bounded by ``timeout_s``: a Trio deadline around the
  whole call (a script may need ``SCRIPT LOAD`` and a second round trip
  after Redis lost its script cache), and redis-py's connect timeout. A
  dead or hung Redis therefore answers within ``timeout_s``. redis-py's
  socket timeout is off: it armed an asyncio timer for every reply read,
  three per send, and added nothing, because a call the Trio deadline cuts
  off is cancelled inside redis-py, which then drops that connection (so a
  late reply is never read as the answer to another command).
- Connection errors, timeouts, ``OSError`` and writes refused by a read-only
  replica become :class:`RedisUnavailable`. Any other Redis error is a bug
  and propagates as it is.
- redis-py does not retry here (a retried ``SET NX`` or token-bucket script
  could be applied twice). Reconnection needs no retry: the pool checks
  each connection as it hands it out and reconnects a stale one, so the
  first command after Redis comes back succeeds.
- :class:`RedisHealth` and :func:`probe_redis` let a service report whether
  its Redis answers, and notice recovery without traffic.

Auto-pipelining (like a group commit): ``set_nx``, ``run_script`` and
``publish`` do not cross into asyncio themselves. They queue their command
and wait; one batcher task (in the nursery of :func:`open_redis`) takes
everything queued (at most :data:`MAX_BATCH`) and runs it in ONE
``trio_asyncio`` crossing: a lone command as it is, several as one
non-transactional pipeline on one connection. Commands are independent, so
this changes no semantics:

- Each caller gets its own answer; a command's own error (say
  ``WRONGTYPE``) reaches only its caller.
- A pipeline that fails as a whole (connection lost, timeout) answers every
  caller of the batch with the :class:`RedisUnavailable` its command alone
  would have raised. Each caller also keeps its own ``timeout_s`` deadline,
  counted from when it queued, so waiting behind a batch never stretches it.
- ``EVALSHA`` answered ``NOSCRIPT`` did not run: the batch loads the
  script and runs those commands again, in the same crossing.
- A caller cancelled (or timed out) while queued is dropped and never runs;
  once its batch has been taken, its answer is discarded.
- Closing answers every queued caller :class:`RedisUnavailable`.

``ping`` (the health probe) and subscriptions keep a crossing of their own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar, cast, final

import attrs
import redis.asyncio as aredis
import redis.exceptions
import trio
import trio_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.maint_notifications import MaintNotificationsConfig
from redis.utils import HIREDIS_AVAILABLE

#: How long closing the client or a subscription may take on the way out.
CLOSE_GRACE_S = 1.0
#: How often a service pings Redis to keep its health current without traffic.
PROBE_INTERVAL_S = 1.0
#: The most commands one pipeline carries; the rest go in the next one.
MAX_BATCH = 128

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


@attrs.frozen
class RedisClientStatistics:
    """Batched commands, the crossings that ran them, and how many were pipelines."""

    commands_total: int
    crossings_total: int
    pipelines_total: int


@final
class _Queued:
    """One caller's command waiting for (or in) a batch."""

    __slots__ = ("answered", "direct", "error", "result", "script", "stage", "state", "waiter", "what")

    def __init__(
        self,
        what: str,
        direct: Callable[[], Awaitable[Any]],
        stage: Callable[[Any], object],
        script: AsyncScript | None = None,
    ) -> None:
        self.what = what
        #: Runs the command alone (asyncio side), as the unbatched path does.
        self.direct = direct
        #: Queues the command on a redis-py pipeline.
        self.stage = stage
        #: The script of an EVALSHA, to load it after a NOSCRIPT.
        self.script = script
        self.state: Literal["queued", "taken", "dropped"] = "queued"
        self.result: Any = None
        #: This command's own error, or the batch's failure (shared by its callers).
        self.error: BaseException | None = None
        self.answered = False
        self.waiter: trio.lowlevel.Task | None = None

    def answer(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.answered:
            self.answered = True
            self.result, self.error = result, error
            if self.waiter is not None:
                trio.lowlevel.reschedule(self.waiter)
                self.waiter = None

    async def wait(self) -> None:
        """Until answered. Cancelled while still queued: dropped, it never runs."""
        if self.answered:
            await trio.lowlevel.checkpoint()
            return
        self.waiter = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Called at once when the caller is cancelled (or times out),
            # before the batcher can take the command. Already taken: it
            # may have run (a SET NX may have recorded its nonce) and its
            # answer is discarded. That is fine: the caller is abandoning
            # its request anyway, and the unbatched path had the same
            # window (a command sent before its crossing was cancelled).
            self.waiter = None
            if self.state == "queued":
                self.state = "dropped"
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


@final
class RedisClient:
    """Trio-flavoured access to one Redis (see the module docstring).

    Made by :func:`open_redis`, which also runs the batcher; a client made
    directly (no batcher) sends each command in its own crossing.
    """

    def __init__(self, client: aredis.Redis, *, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._queue: deque[_Queued] = deque()
        self._wakeup = trio.Event()
        self._batching = False
        self._closed = False
        self._commands = 0
        self._crossings = 0
        self._pipelines = 0

    def statistics(self) -> RedisClientStatistics:
        return RedisClientStatistics(
            commands_total=self._commands,
            crossings_total=self._crossings,
            pipelines_total=self._pipelines,
        )

    def register_script(self, source: str) -> RedisScript:
        """Prepare a Lua script; it is loaded into Redis on first use."""
        return RedisScript(self._client.register_script(source))

    async def run_script(
        self, script: RedisScript, *, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        """``EVALSHA``, loading the script first if Redis does not know it."""
        aio_script, key_list, arg_list = script._script, list(keys), list(args)
        if not self._batching:
            return await self._call("EVALSHA", aio_script, keys=key_list, args=arg_list)
        return await self._submit(
            _Queued(
                "EVALSHA",
                lambda: aio_script(keys=key_list, args=arg_list),
                # By SHA, without redis-py's per-execute SCRIPT EXISTS: a
                # NOSCRIPT is handled after the pipeline (see _execute).
                lambda pipe: pipe.evalsha(aio_script.sha, len(key_list), *key_list, *arg_list),
                aio_script,
            )
        )

    async def set_nx(
        self, key: str, value: ScriptArg, *, ex_s: int | None = None, px_ms: int | None = None
    ) -> bool:
        """``SET key value NX [EX|PX]``: True if the key was set, False if it existed."""
        if not self._batching:
            result = await self._call("SET", self._client.set, key, value, nx=True, ex=ex_s, px=px_ms)
            return bool(result)
        client = self._client
        result = await self._submit(
            _Queued(
                "SET",
                lambda: client.set(key, value, nx=True, ex=ex_s, px=px_ms),
                lambda pipe: pipe.set(key, value, nx=True, ex=ex_s, px=px_ms),
            )
        )
        return bool(result)

    async def ping(self) -> None:
        await self._call("PING", self._client.ping)

    async def publish(self, channel: str, message: bytes) -> int:
        """Publish; returns how many subscribers (across all replicas) got it."""
        if not self._batching:
            return int(await self._call("PUBLISH", self._client.publish, channel, message))
        client = self._client
        return int(
            await self._submit(
                _Queued(
                    "PUBLISH",
                    lambda: client.publish(channel, message),
                    lambda pipe: pipe.publish(channel, message),
                )
            )
        )

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


    # Auto-pipelining (see the module docstring).

    async def _submit(self, command: _Queued) -> Any:
        """Queue ``command`` for the batcher and wait for its answer."""
        if self._closed:
            raise RedisUnavailable(f"redis {command.what} failed: the client is closed")
        self._queue.append(command)
        self._wakeup.set()
        # The caller's own deadline, counted from now: waiting behind a
        # running batch never stretches it. A bare cancel scope, not
        # fail_after (a generator on top), as this runs for every command.
        with trio.CancelScope(relative_deadline=self._timeout_s) as deadline:
            await command.wait()
        if deadline.cancelled_caught:
            raise RedisUnavailable(f"redis {command.what} timed out after {self._timeout_s} s")
        error = command.error
        if error is None:
            return command.result
        if isinstance(error, RedisUnavailable):
            raise error
        if isinstance(error, trio.TooSlowError):
            raise RedisUnavailable(f"redis {command.what} timed out after {self._timeout_s} s") from error
        if isinstance(error, REDIS_DOWN_ERRORS):
            raise RedisUnavailable(f"redis {command.what} failed: {_describe(error)}") from error
        raise error  # a bug (e.g. WRONGTYPE): as it is, to its caller only

    async def _batch_forever(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batcher: run what is queued, one batch (one crossing) at a time."""
        self._batching = True
        task_status.started()
        batch: list[_Queued] = []
        try:
            while True:
                while not self._queue:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                batch = self._take()
                if batch:
                    await self._run(batch)
                    batch = []
        finally:
            self._closed = True
            # Cancelled (the client is closing): answer the batch it was
            # running, and everything still queued.
            while self._queue:
                command = self._queue.popleft()
                if command.state == "queued":
                    batch.append(command)
            for command in batch:
                command.answer(error=RedisUnavailable(f"redis {command.what} failed: the client is closed"))

    def _take(self) -> list[_Queued]:
        batch: list[_Queued] = []
        while self._queue and len(batch) < MAX_BATCH:
            command = self._queue.popleft()
            if command.state == "queued":
                command.state = "taken"
                batch.append(command)
        return batch

    async def _run(self, batch: list[_Queued]) -> None:
        self._commands += len(batch)
        self._crossings += 1
        if len(batch) > 1:
            self._pipelines += 1
        try:
            with trio.fail_after(self._timeout_s):
                outcomes = await trio_asyncio.aio_as_trio(self._execute)(batch)
        except Exception as exc:
            # The batch failed as a whole: each caller translates it as its
            # command alone would have (timeout, Redis down, or a bug).
            for command in batch:
                command.answer(error=exc)
            return
        for command, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                command.answer(error=outcome)
            else:
                command.answer(result=outcome)

    async def _execute(self, batch: list[_Queued]) -> list[Any]:
        """(asyncio side) Each command's result, or its own error."""
        if len(batch) == 1:
            try:
                return [await batch[0].direct()]
            except Exception as exc:
                return [exc]
        results = await self._pipeline(batch)
        # NOSCRIPT: Redis lost its script cache, so those EVALSHAs did not
        # run. Load each script once and run just them again.
        again = [
            index
            for index, (command, result) in enumerate(zip(batch, results, strict=True))
            if command.script is not None and isinstance(result, redis.exceptions.NoScriptError)
        ]
        if again:
            scripts = {id(batch[index].script): batch[index].script for index in again}
            for script in scripts.values():
                assert script is not None
                script.sha = await self._client.script_load(script.script)
            for index, result in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
                results[index] = result
        return results

    async def _pipeline(self, batch: list[_Queued]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for command in batch:
                command.stage(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results


_ConnectionClass = TypeVar("_ConnectionClass", bound=type[aredis.connection.AbstractConnection])


def hiredis_packing(base: _ConnectionClass) -> _ConnectionClass:
    """``base`` (a redis-py asyncio connection class) packing commands with hiredis.

    redis-py's synchronous connections pack commands in C with hiredis when
    it is installed; its asyncio connections always use the Python packer,
    which was most of the CPU a pipeline of small commands cost. This uses
    redis-py's own hiredis serializer, so the bytes on the wire are the same
    (``tests/test_redisconn_batching.py`` compares them). Without hiredis,
    ``base`` is returned as it is.
    """
    if not HIREDIS_AVAILABLE:
        return base
    serializer = HiredisRespSerializer()

    def pack_command(self: object, *args: Any) -> list[bytes]:
        packed: list[bytes] = serializer.pack(*args)
        return packed

    packing = type(f"HiredisPacking{base.__name__}", (base,), {"pack_command": pack_command})
    return cast(_ConnectionClass, packing)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@asynccontextmanager
async def open_redis(url: str, *, timeout_s: float) -> AsyncIterator[RedisClient]:
    """A :class:`RedisClient` for ``url``; closes its connection pool on exit.

    Must be entered inside ``trio_asyncio.open_loop()``.
    """
    client = aredis.Redis.from_url(
        url,
        socket_timeout=None,  # the Trio deadlines bound every call (see the module docstring)
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        # With maintenance notifications (on by default over RESP3), the pool
        # stops discarding connections the server closed, and the first
        # command after a Redis restart would fail.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    pool = client.connection_pool
    pool.connection_class = hiredis_packing(pool.connection_class)
    try:
        redis_client = RedisClient(client, timeout_s=timeout_s)
        async with trio.open_nursery() as nursery:
            await nursery.start(redis_client._batch_forever)
            try:
                yield redis_client
            finally:
                nursery.cancel_scope.cancel()
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
