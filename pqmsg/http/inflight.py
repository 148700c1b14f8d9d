"""Admission control: a bounded number of requests in flight, the rest shed.

Requests borrow a token from a :class:`trio.CapacityLimiter` without
waiting; when none is left the edge answers 503 at once (load shedding)
instead of queueing. A long poll or stream *parks* while it waits for
messages: it gives its token back for the wait, so thousands of idle long
polls do not starve requests that have work to do. Parked requests have a
bound of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from pqmsg.errors import Unavailable

RETRY_AFTER_OVERLOAD_S = 1


@attrs.frozen
class InFlightStatistics:
    in_flight: int
    limit: int
    parked: int
    parked_limit: int


class InFlight:
    """The admission limiter; its statistics read the limiter's own state."""

    def __init__(self, limit: int, *, parked_limit: int) -> None:
        self._limiter = trio.CapacityLimiter(limit)
        self._parked_limit = parked_limit
        self._parked = 0
        # Borrowers that gave their token back and were cancelled before
        # taking one again: their final release is a no-op.
        self._tokenless: set[object] = set()

    def try_admit(self, borrower: object) -> bool:
        try:
            self._limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            return False
        return True

    def release(self, borrower: object) -> None:
        if borrower in self._tokenless:
            self._tokenless.discard(borrower)
            return
        self._limiter.release_on_behalf_of(borrower)

    @asynccontextmanager
    async def parked(self, borrower: object) -> AsyncIterator[None]:
        """Give the token back while waiting; take one again (waiting if need be) after."""
        if self._parked >= self._parked_limit:
            raise Unavailable(
                "too many waiting long polls", retry_after_s=RETRY_AFTER_OVERLOAD_S, reason="overloaded"
            )
        self._parked += 1
        self._limiter.release_on_behalf_of(borrower)
        self._tokenless.add(borrower)
        try:
            yield
        finally:
            self._parked -= 1
        # Back to work: wait for a token like any admitted request would.
        await self._limiter.acquire_on_behalf_of(borrower)
        self._tokenless.discard(borrower)

    def statistics(self) -> InFlightStatistics:
        stats = self._limiter.statistics()
        return InFlightStatistics(
            in_flight=stats.borrowed_tokens,
            limit=int(stats.total_tokens),
            parked=self._parked,
            parked_limit=self._parked_limit,
        )
