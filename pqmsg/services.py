"""The small interfaces the HTTP layer uses, and the bundle handed to the app.

Routes depend on these protocols, not on the service classes, so a backend
(in-process or Redis, SQLite or PostgreSQL) is a choice made once in the
composition root (:mod:`pqmsg.server`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from pqmsg.clock import WallClock
from pqmsg.http.inflight import InFlight
from pqmsg.loopwatch import StepTimer
from pqmsg.metrics import Metrics
from pqmsg.protocol.keycache import DeviceKeyCache
from pqmsg.settings import Settings
from pqmsg.storage.base import Backend


class HasStatistics(Protocol):
    def statistics(self) -> Any: ...


class StorageHandle(HasStatistics, Protocol):
    @property
    def db(self) -> Backend: ...


class Limiter(HasStatistics, Protocol):
    async def check(self, limiter: str, key: str) -> None:
        """Raise RateLimited (429) or Unavailable (503, fail-closed) when over the limit."""


class Replay(HasStatistics, Protocol):
    async def record(self, account: str, device: int, nonce: str) -> bool:
        """True if fresh (and now recorded); False for a replay."""


class Admission(Protocol):
    async def admit(self, account: str, device: int, nonce: str, limiter: str, key: str) -> bool:
        """Record the nonce and take a token, as one step: False for a replay.

        Raises RateLimited (429), or Unavailable (503) when the checks cannot be made.
        """


class Audit(HasStatistics, Protocol):
    async def record(
        self,
        event: str,
        *,
        outcome: str,
        request_id: str | None = None,
        account: str | None = None,
        device: int | None = None,
        ip: str | None = None,
        target_account: str | None = None,
        target_device: int | None = None,
        detail: Mapping[str, str | int | bool | None] | None = None,
    ) -> None: ...


class Verifier(HasStatistics, Protocol):
    async def verifies(self, key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether the ML-DSA-65 signature of ``message`` verifies under ``key``."""


class Waker(HasStatistics, Protocol):
    def wake(self, account: str, device: int) -> None:
        """Queue a push wake-up; never blocks, never fails the caller."""


class Notifier(HasStatistics, Protocol):
    def publish(self, account: str, device: int) -> None:
        """Wake everything waiting on that device's queue (here and on other replicas)."""

    def subscribe(self, account: str, device: int, *, stream: bool = False) -> Any:
        """A context manager yielding an object with ``async wait()``.

        A stream subscription replaces the device's older stream (closed as
        ``replaced``); push skips devices that have one.
        """

    def has_stream(self, account: str, device: int) -> bool:
        """Whether the device has an open stream on this replica."""

    def close_device(self, account: str, device: int) -> None:
        """End that device's waits and streams (revocation, deletion)."""

    def shutdown(self) -> None:
        """End every wait here: the server is draining."""


@attrs.frozen
class Services:
    """Everything the routes need, opened by the composition root."""

    settings: Settings
    clock: WallClock
    storage: StorageHandle
    limiter: Limiter
    replay: Replay
    admission: Admission
    audit: Audit
    push: Waker
    notifier: Notifier
    in_flight: InFlight
    metrics: Metrics
    loop: StepTimer
    verifier: Verifier
    device_keys: DeviceKeyCache = attrs.field(
        default=attrs.Factory(
            lambda self: DeviceKeyCache(self.settings.auth.device_key_cache), takes_self=True
        )
    )

    def component_statistics(self) -> dict[str, Any]:
        """Statistics of every supervised service, by component name."""
        return {
            "storage": self.storage.statistics(),
            "limiter": self.limiter.statistics(),
            "replay": self.replay.statistics(),
            "audit": self.audit.statistics(),
            "push": self.push.statistics(),
            "notifier": self.notifier.statistics(),
            "verifier": self.verifier.statistics(),
        }
