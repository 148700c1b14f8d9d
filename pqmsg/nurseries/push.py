"""The push dispatcher service: content-free wake-ups, off the send path.

:func:`open_push_dispatcher` owns a nursery of :data:`DISPATCH_WORKERS`
workers, one shared HTTP/2 ``httpx.AsyncClient`` and one circuit breaker
per configured provider. The message path calls the synchronous
:meth:`PushDispatcher.wake`, which only puts ``(account, device)`` into a
bounded queue: it never awaits, never raises, and when the queue is full
the wake-up is dropped and counted (``overflow_total``). So a slow, failing
or switched-off provider never fails or delays a message send.

``wake`` already skips devices with an open stream, a wake-up queued, or
one attempted within ``coalesce_s``. A worker takes a wake-up, looks up
the push target and checks again, now that time has passed: it skips the
wake-up if the device has no token, has an open stream, or had a wake-up
attempted within ``coalesce_s``; it counts it ``disabled`` if the
provider is not configured, or ``breaker_open`` if that provider's breaker
refuses it; otherwise it sends, under ``request_timeout_s``, and counts
the :data:`pqmsg.push.PushOutcome`. A ``dead_token`` is dropped from storage.
A timeout counts as ``failed``. Nothing is retried: the message stays
queued, and the next message stored for the device wakes it again.

Errors: senders translate every network and provider error into an
outcome; a storage failure while looking up or dropping a token is logged
and counted, and the worker goes on. Anything else is a bug and
propagates. Credentials are read when the service opens; a provider that is
configured wrongly raises :class:`pqmsg.settings.SettingsError` then.

Shutdown: on exit ``wake`` stops accepting (counted as ``closed``), the
workers drain the queue for at most ``grace_s``, then whatever is left is
cancelled and the HTTP client closed (shielded, bounded by ``grace_s``).
"""

from __future__ import annotations

import collections
import logging
import types
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Final, Literal, Protocol, final, get_args

import attrs
import httpx
import trio

from pqmsg.clock import WallClock
from pqmsg.errors import StorageUnavailable
from pqmsg.push import PROVIDERS, PushOutcome, PushSender
from pqmsg.push.apns import apns_sender_from_settings
from pqmsg.push.breaker import CircuitBreaker
from pqmsg.push.fcm import fcm_sender_from_settings
from pqmsg.settings import PushSettings
from pqmsg.storage.base import PushProvider, PushTarget

log = logging.getLogger(__name__)

DISPATCH_WORKERS: Final = 8
DRAIN_GRACE_S: Final = 10.0

#: ``pqmsg_push_requests_total{outcome}``: a :data:`PushOutcome` when the
#: provider was asked; ``breaker_open`` when its breaker held the wake-up
#: back; ``disabled`` when the device's provider is not configured.
RequestOutcome = Literal["sent", "dead_token", "failed", "rejected", "breaker_open", "disabled"]
REQUEST_OUTCOMES: Final[tuple[RequestOutcome, ...]] = get_args(RequestOutcome)

#: Wake-ups that never got as far as a provider: another is queued or was
#: attempted within ``coalesce_s`` (``coalesced``); the device has an open
#: stream (``streaming``); it has no push token (``no_token``); storage
#: failed (``storage_error``); the dispatcher is shutting down (``closed``);
#: no provider is configured at all, so there is nothing to look up
#: (``push_off``, the default: no storage call per stored message).
SkipReason = Literal["coalesced", "streaming", "no_token", "storage_error", "closed", "push_off"]
SKIP_REASONS: Final[tuple[SkipReason, ...]] = get_args(SkipReason)

_Key = tuple[str, int]


class PushTargets(Protocol):
    """The part of :class:`pqmsg.storage.base.Storage` the dispatcher uses."""

    async def get_push_target(self, account: str, device: int) -> PushTarget | None: ...

    async def drop_push_token(self, target: PushTarget) -> int: ...


@attrs.frozen
class ProviderStatistics:
    """One provider: ``state`` is a breaker state, or ``disabled`` (gauge 0)."""

    enabled: bool
    state: Literal["closed", "half_open", "open", "disabled"]
    state_value: int


@attrs.frozen
class PushStatistics:
    """A snapshot for ``/health`` and ``/metrics``.

    ``healthy`` is False only once the dispatcher has stopped: an open
    breaker is a provider's outage, shown per provider and alerted on, but
    taking this server out of rotation would not bring pushes back.
    """

    healthy: bool
    detail: str
    tasks: int
    queue_depth: int
    queue_capacity: int
    overflow_total: int
    providers: Mapping[PushProvider, ProviderStatistics]
    requests: Mapping[tuple[PushProvider, RequestOutcome], int]
    skipped: Mapping[SkipReason, int]


def default_http_client() -> httpx.AsyncClient:
    """One HTTP/2 client for both providers; deadlines come from cancel scopes."""
    return httpx.AsyncClient(http2=True, timeout=None)


@final
class PushDispatcher:
    """Queues wake-ups and sends them; made by :func:`open_push_dispatcher`."""

    def __init__(
        self,
        settings: PushSettings,
        *,
        storage: PushTargets,
        has_stream: Callable[[str, int], bool],
        senders: Mapping[PushProvider, PushSender | None],
        queue: trio.MemorySendChannel[_Key],
    ) -> None:
        self._settings = settings
        self._storage = storage
        self._has_stream = has_stream
        self._senders = senders
        self._breakers = {
            p: CircuitBreaker(settings.breaker) for p, s in senders.items() if s is not None
        }
        self._queue = queue
        self._closed = False
        self._pending: set[_Key] = set()
        # Last attempt per device, oldest first (times only grow).
        self._attempts: collections.OrderedDict[_Key, float] = collections.OrderedDict()
        self._overflow = 0
        self._requests = dict.fromkeys(((p, o) for p in PROVIDERS for o in REQUEST_OUTCOMES), 0)
        self._skipped = dict.fromkeys(SKIP_REASONS, 0)
        self._workers = 0
        self._idle = trio.Event()

    def wake(self, account: str, device: int) -> None:
        """Queue a wake-up for the device; never blocks, never raises."""
        key = (account, device)
        if self._closed:
            self._skipped["closed"] += 1
        elif self._has_stream(account, device):
            self._skipped["streaming"] += 1
        elif not self._breakers:
            self._skipped["push_off"] += 1
        elif key in self._pending or self._recently_attempted(key):
            self._skipped["coalesced"] += 1
        else:
            try:
                self._queue.send_nowait(key)
            except trio.WouldBlock:
                self._overflow += 1
            else:
                self._pending.add(key)

    def statistics(self) -> PushStatistics:
        providers = {p: self._provider_statistics(p) for p in PROVIDERS}
        queue = self._queue.statistics()
        detail = ", ".join(f"{p} {s.state}" for p, s in providers.items())
        return PushStatistics(
            healthy=not self._closed,
            detail=detail if not self._closed else "stopped",
            tasks=self._workers,
            queue_depth=queue.current_buffer_used,
            queue_capacity=int(queue.max_buffer_size),
            overflow_total=self._overflow,
            providers=types.MappingProxyType(providers),
            requests=types.MappingProxyType(dict(self._requests)),
            skipped=types.MappingProxyType(dict(self._skipped)),
        )

    def _provider_statistics(self, provider: PushProvider) -> ProviderStatistics:
        breaker = self._breakers.get(provider)
        if breaker is None:
            return ProviderStatistics(enabled=False, state="disabled", state_value=0)
        return ProviderStatistics(
            enabled=True, state=breaker.state, state_value=breaker.state_value
        )

    def _recently_attempted(self, key: _Key) -> bool:
        at = self._attempts.get(key)
        return at is not None and trio.current_time() < at + self._settings.coalesce_s

    def _note_attempt(self, key: _Key) -> None:
        now = trio.current_time()
        self._attempts[key] = now
        self._attempts.move_to_end(key)
        while self._attempts:
            oldest_key, at = next(iter(self._attempts.items()))
            if at + self._settings.coalesce_s > now:
                break
            del self._attempts[oldest_key]

    async def _work(
        self,
        queue: trio.MemoryReceiveChannel[_Key],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._workers += 1
        try:
            async with queue:
                task_status.started()
                async for key in queue:
                    self._pending.discard(key)
                    await self._deliver(*key)
        finally:
            self._workers -= 1
            if self._workers == 0:
                self._idle.set()

    async def _deliver(self, account: str, device: int) -> None:
        key = (account, device)
        try:
            target = await self._storage.get_push_target(account, device)
        except StorageUnavailable:
            log.warning("push: storage unavailable, wake-up skipped")
            self._skipped["storage_error"] += 1
            return
        # No await from these checks until the attempt is noted: they still
        # hold when the request goes out, whatever other workers do.
        if target is None:
            self._skipped["no_token"] += 1
        elif self._has_stream(account, device):
            self._skipped["streaming"] += 1
        elif self._recently_attempted(key):
            self._skipped["coalesced"] += 1
        else:
            await self._attempt(key, target)

    async def _attempt(self, key: _Key, target: PushTarget) -> None:
        sender = self._senders.get(target.provider)
        breaker = self._breakers.get(target.provider)
        if sender is None or breaker is None:
            self._requests[target.provider, "disabled"] += 1
        elif not breaker.allow():
            self._requests[target.provider, "breaker_open"] += 1
        else:
            self._note_attempt(key)
            outcome = await self._send(sender, breaker, target.token)
            self._requests[target.provider, outcome] += 1
            if outcome == "dead_token":
                await self._drop(target)

    async def _send(self, sender: PushSender, breaker: CircuitBreaker, token: str) -> PushOutcome:
        """Send under the request deadline; every allowed request is recorded."""
        outcome: PushOutcome = "failed"
        try:
            with trio.move_on_after(self._settings.request_timeout_s) as deadline:
                outcome = await sender.send(token)
            if deadline.cancelled_caught:
                log.warning("push: %s gave no answer in time (failed)", sender.provider)
        finally:
            # Also when cancelled from outside: a half-open probe must not leak.
            if outcome == "failed":
                breaker.record_failure()
            else:
                breaker.record_success()
        return outcome

    async def _drop(self, target: PushTarget) -> None:
        try:
            removed = await self._storage.drop_push_token(target)
        except StorageUnavailable:
            log.warning("push: storage unavailable, dead %s token kept", target.provider)
            return
        log.info("push: dropped a dead %s token (%d devices)", target.provider, removed)

    async def _drain(self) -> None:
        """Stop accepting and wait until the workers have emptied the queue."""
        self._closed = True
        self._queue.close()
        await self._idle.wait()


@asynccontextmanager
async def open_push_dispatcher(
    settings: PushSettings,
    *,
    storage: PushTargets,
    has_stream: Callable[[str, int], bool],
    clock: WallClock,
    http_client_factory: Callable[[], httpx.AsyncClient] | None = None,
    workers: int = DISPATCH_WORKERS,
    grace_s: float = DRAIN_GRACE_S,
) -> AsyncIterator[PushDispatcher]:
    """Run the push dispatcher; see the module docstring."""
    client = (http_client_factory or default_http_client)()
    try:
        senders: dict[PushProvider, PushSender | None] = {
            "fcm": await fcm_sender_from_settings(settings, client, clock=clock),
            "apns": await apns_sender_from_settings(settings, client, clock=clock),
        }
        for provider, sender in senders.items():
            log.info("push: %s %s", provider, "enabled" if sender else "disabled (not configured)")
        send_queue, receive_queue = trio.open_memory_channel[_Key](settings.queue_size)
        dispatcher = PushDispatcher(
            settings, storage=storage, has_stream=has_stream, senders=senders, queue=send_queue
        )
        async with trio.open_nursery() as nursery:
            async with receive_queue:
                for _ in range(workers):
                    await nursery.start(dispatcher._work, receive_queue.clone())
            try:
                yield dispatcher
            finally:
                with trio.move_on_after(grace_s, shield=True) as drain:
                    await dispatcher._drain()
                if drain.cancelled_caught:
                    left = send_queue.statistics().current_buffer_used
                    log.warning(
                        "push: drain took longer than %ss, %d wake-ups abandoned", grace_s, left
                    )
                nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(grace_s, shield=True):
            await client.aclose()
