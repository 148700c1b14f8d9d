"""The notifier: wakes long polls and streams when a device's queue grows.

Waiting costs no database polling: a request that found its queue empty
subscribes here and sleeps until :meth:`Notifier.publish` names its device.
``publish`` is called after a send committed, so a woken waiter always finds
the message. With a bus (PostgreSQL LISTEN/NOTIFY or Redis pub/sub), a
publish also reaches the waiters of every other replica; the notifier's
nursery owns the loop that forwards local publishes to the bus, through a
bounded channel so a slow bus never delays a send. The loop hands the bus
everything queued at once (at most :data:`FORWARD_BATCH`), so under load a
bus carries many wake-ups per publish instead of one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Literal, Protocol

import attrs
import trio

log = logging.getLogger("pqmsg.notify")

FORWARD_QUEUE = 10_000
#: The most wake-ups the forward loop hands the bus at once.
FORWARD_BATCH = 256
DRAIN_S = 2.0
WakeKind = Literal["message", "close"]
#: Why a subscription ended: its device was revoked or deleted, a newer
#: stream of the same device replaced it, or the server is draining.
CloseReason = Literal["revoked", "replaced", "shutdown"]


class DeviceClosed(Exception):
    """The wait ended for good: the device went away, or see ``reason``."""

    def __init__(self, reason: CloseReason = "revoked") -> None:
        super().__init__(reason)
        self.reason: CloseReason = reason


@attrs.frozen
class Wake:
    """One wake-up as it crosses the bus: who published it, and for which device."""

    origin: str
    kind: WakeKind
    account: str
    device: int

    def encode(self) -> str:
        return f"{self.origin} {self.kind} {self.account}:{self.device}"

    @classmethod
    def decode(cls, payload: str) -> Wake | None:
        """The wake-up in ``payload``, or None (logged) when it is malformed."""
        try:
            origin, kind, address = payload.split(" ")
            account, _, device = address.rpartition(":")
            if kind not in ("message", "close") or not account:
                raise ValueError(kind)
            return cls(origin, kind, account, int(device))  # type: ignore[arg-type]
        except ValueError:
            log.warning("ignoring a malformed wake-up on the bus")
            return None


class BusUnavailable(Exception):
    """The wake-up bus could not carry a publish (the replica keeps serving)."""


class Bus(Protocol):
    """Carries wake-ups between replicas."""

    healthy: bool
    detail: str | None

    async def publish_many(self, items: Sequence[tuple[WakeKind, str, int]]) -> None:
        """Send wake-ups, ``(kind, account, device)`` each, to the other replicas.

        All or none; BusUnavailable if they cannot be sent.
        """

    async def listen(
        self,
        deliver: Callable[[WakeKind, str, int], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver other replicas' wake-ups until cancelled."""


@attrs.frozen
class NotifierStatistics:
    healthy: bool
    detail: str | None
    tasks: int
    waiters: int
    streams: int
    published_total: int
    forward_dropped_total: int


class Subscription:
    """One waiter's view of a device queue; re-armed at every wake-up."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.closed = False
        self.reason: CloseReason | None = None
        self._event = trio.Event()

    def _fire(self) -> None:
        self._event.set()

    def _close(self, reason: CloseReason) -> None:
        """End the subscription; the first reason given is the one reported."""
        if not self.closed:
            self.closed, self.reason = True, reason
        self._event.set()

    async def wait(self) -> None:
        """Until a publish names this device; DeviceClosed if it went away."""
        await self._event.wait()
        # Re-arm before the caller fetches: a publish from now on wakes the
        # next wait, so nothing falls between the fetch and the next wait.
        self._event = trio.Event()
        if self.closed:
            raise DeviceClosed(self.reason or "revoked")


class Notifier:
    def __init__(self, send_channel: trio.MemorySendChannel[tuple[WakeKind, str, int]] | None) -> None:
        self._subs: defaultdict[tuple[str, int], set[Subscription]] = defaultdict(set)
        self._forward = send_channel
        self._published = 0
        self._forward_dropped = 0
        self._nursery: trio.Nursery | None = None
        self._bus: Bus | None = None
        self._forward_healthy = True
        self._forward_detail: str | None = None
        self._draining = False
        self._forwarded = trio.Event()

    @contextmanager
    def subscribe(self, account: str, device: int, *, stream: bool = False) -> Iterator[Subscription]:
        sub = Subscription(stream)
        if self._draining:
            # A request admitted just before the drain must not wait either.
            sub._close("shutdown")
        key = (account, device)
        if stream:
            # One stream per device on this replica: the newest replaces the others.
            for older in self._subs.get(key, ()):
                if older.stream:
                    older._close("replaced")
        self._subs[key].add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[key]

    def has_stream(self, account: str, device: int) -> bool:
        return any(sub.stream for sub in self._subs.get((account, device), ()))

    def publish(self, account: str, device: int) -> None:
        self._published += 1
        self.deliver("message", account, device)
        self._send_to_bus("message", account, device)

    def close_device(self, account: str, device: int) -> None:
        self.deliver("close", account, device)
        self._send_to_bus("close", account, device)

    def shutdown(self) -> None:
        """End every wait on this replica (the server is draining)."""
        self._draining = True
        for subs in self._subs.values():
            for sub in subs:
                sub._close("shutdown")

    def deliver(self, kind: WakeKind, account: str, device: int) -> None:
        """Wake this replica's waiters (the bus calls this for remote publishes)."""
        for sub in self._subs.get((account, device), ()):
            if kind == "close":
                sub._close("revoked")
            else:
                sub._fire()

    def _send_to_bus(self, kind: WakeKind, account: str, device: int) -> None:
        if self._forward is None:
            return
        try:
            self._forward.send_nowait((kind, account, device))
        except trio.WouldBlock:
            self._forward_dropped += 1

    def statistics(self) -> NotifierStatistics:
        waiters = sum(len(s) for s in self._subs.values())
        streams = sum(1 for subs in self._subs.values() for sub in subs if sub.stream)
        healthy, detail = self._forward_healthy, self._forward_detail
        if self._bus is not None and not self._bus.healthy:
            healthy, detail = False, self._bus.detail
        return NotifierStatistics(
            healthy=healthy,
            detail=detail,
            tasks=len(self._nursery.child_tasks) if self._nursery else 0,
            waiters=waiters,
            streams=streams,
            published_total=self._published,
            forward_dropped_total=self._forward_dropped,
        )

    async def _forward_loop(
        self,
        bus: Bus,
        receive: trio.MemoryReceiveChannel[tuple[WakeKind, str, int]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        async with receive:
            try:
                await self._forward_all(bus, receive)
            finally:
                self._forwarded.set()

    async def _forward_all(
        self, bus: Bus, receive: trio.MemoryReceiveChannel[tuple[WakeKind, str, int]]
    ) -> None:
        async for first in receive:
            batch = [first]
            while len(batch) < FORWARD_BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await bus.publish_many(batch)
            except BusUnavailable as exc:  # a lost wake-up delays, it never loses data
                self._forward_healthy = False
                self._forward_detail = f"wake-up bus publish failed: {exc}"
                log.warning("wake-up bus publish failed: %s", exc)
            else:
                self._forward_healthy, self._forward_detail = True, None


@asynccontextmanager
async def open_notifier(*, bus: Bus | None = None) -> AsyncIterator[Notifier]:
    """The notifier service; with ``bus``, wake-ups also cross replicas."""
    if bus is None:
        yield Notifier(None)
        return
    send, receive = trio.open_memory_channel[tuple[WakeKind, str, int]](FORWARD_QUEUE)
    notifier = Notifier(send)
    notifier._bus = bus
    async with trio.open_nursery() as nursery:
        notifier._nursery = nursery
        await nursery.start(notifier._forward_loop, bus, receive)
        await nursery.start(bus.listen, notifier.deliver)
        try:
            yield notifier
        finally:
            # Closing the channel ends the forward loop once it has sent what
            # is queued; the deadline bounds that drain. Then stop listening.
            await send.aclose()
            with trio.move_on_after(DRAIN_S, shield=True):
                await notifier._forwarded.wait()
            nursery.cancel_scope.cancel()
