"""A circuit breaker per push provider: a pure state machine on trio's clock.

::

    closed ──(failure share >= failure_ratio over window_s,
    ▲          at least min_requests results)──▶ open
    │                                             │
    │                                   (cool_down_s passed)
    │                                             ▼
    └──(half_open_probes successes)──────── half_open ──(any failure)──▶ open

Closed, every request is allowed and its result goes into a sliding window
of ``window_s`` seconds, kept as at most about :data:`WINDOW_BUCKETS` buckets
so memory does not grow with the request rate: a result is forgotten between
``window_s`` and ``window_s * (1 + 1 / WINDOW_BUCKETS)`` seconds after it was
recorded. The breaker opens when the failures are at least
``failure_ratio`` of the results in the window and there are at least
``min_requests`` of them. Open, nothing is allowed.
Half-open, ``half_open_probes`` requests are let through and no more; a
failure of any reopens the breaker for another cool-down, and once all of
them have succeeded it closes with an empty window.

The breaker does no I/O and starts no task: time is read from ``now``
(``trio.current_time`` unless a test injects another clock), and the
open -> half-open transition happens when :meth:`CircuitBreaker.allow` or
:attr:`CircuitBreaker.state` next looks. Results of requests allowed
before the breaker opened may arrive while it is open: they are ignored.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Final, Literal, final

import trio

from pqmsg.settings import BreakerSettings

BreakerState = Literal["closed", "half_open", "open"]

#: The values of the ``pqmsg_push_circuit_state`` gauge.
STATE_VALUES: Final[dict[BreakerState, int]] = {"closed": 0, "half_open": 1, "open": 2}

#: How many buckets the failure-rate window is kept in.
WINDOW_BUCKETS: Final = 10


@final
class CircuitBreaker:
    """One provider's breaker. Not thread-safe; trio tasks may share it."""

    def __init__(
        self, settings: BreakerSettings, *, now: Callable[[], float] = trio.current_time
    ) -> None:
        self._settings = settings
        self._now = now
        self._bucket_s = settings.window_s / WINDOW_BUCKETS
        # [bucket start, successes, failures], oldest first.
        self._window: collections.deque[list[float]] = collections.deque()
        self._state: BreakerState = "closed"
        self._opened_at = 0.0
        self._probes_sent = 0
        self._probe_successes = 0

    @property
    def state(self) -> BreakerState:
        """``closed``, ``half_open`` or ``open``, as of now."""
        if self._state == "open" and self._now() >= self._opened_at + self._settings.cool_down_s:
            self._state = "half_open"
            self._probes_sent = 0
            self._probe_successes = 0
        return self._state

    @property
    def state_value(self) -> int:
        """The state as the gauge shows it: 0 closed, 1 half-open, 2 open."""
        return STATE_VALUES[self.state]

    def allow(self) -> bool:
        """Whether a request may go out now; a half-open True is one of the probes.

        Every True must be followed by exactly one ``record_*`` call.
        """
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and self._probes_sent < self._settings.half_open_probes:
            self._probes_sent += 1
            return True
        return False

    def record_success(self) -> None:
        """The provider answered as a healthy provider does."""
        state = self.state
        if state == "closed":
            self._count(failed=False)
        elif state == "half_open":
            self._probe_successes += 1
            if self._probe_successes >= self._settings.half_open_probes:
                self._state = "closed"
                self._window.clear()

    def record_failure(self) -> None:
        """The provider failed (5xx, 429, timeout, dropped connection)."""
        state = self.state
        if state == "closed":
            self._count(failed=True)
            if self._tripped():
                self._open()
        elif state == "half_open":
            self._open()

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._now()
        self._window.clear()

    def _count(self, *, failed: bool) -> None:
        now = self._now()
        self._expire(now)
        if not self._window or now >= self._window[-1][0] + self._bucket_s:
            self._window.append([now, 0, 0])
        self._window[-1][2 if failed else 1] += 1

    def _expire(self, now: float) -> None:
        # A bucket leaves the window once all of it is older than window_s.
        while self._window and self._window[0][0] + self._bucket_s <= now - self._settings.window_s:
            self._window.popleft()

    def _tripped(self) -> bool:
        successes = sum(bucket[1] for bucket in self._window)
        failures = sum(bucket[2] for bucket in self._window)
        total = successes + failures
        # A division, not ratio * total: 0.14 * 50 is a hair above 7 in floats.
        return (
            total >= self._settings.min_requests
            and failures / total >= self._settings.failure_ratio
        )
