"""Coalescing of concurrent PostgreSQL calls: many callers, one statement.

Every statement costs the event-loop thread a crossing of the trio-asyncio
bridge and an asyncpg round trip, and a committing one costs PostgreSQL a
WAL flush. Under load many requests make the same hot call at once (the
device lookup of authentication, a send), so a :class:`Coalescer` queues
those calls and a batcher task runs whatever is queued when it wakes as one
statement: a lone call still goes straight through, a busy server pays one
crossing, one round trip and one flush for a whole batch.

What callers see is what the call alone gives them:

- Each caller gets its own answer: its value, or its own error. The batch
  function (given to the coalescer) maps one statement's rows back to the
  calls and turns a refused call into that call's error only.
- A batch statement that PostgreSQL rolled back (an SQL error, a deadlock,
  a serialization failure) changed nothing, so its calls are run again one
  by one, each as it would have run alone, and each gets that outcome. A
  batch that could not reach the database, timed out or whose COMMIT is in
  doubt is not retried: every caller gets ``StorageUnavailable``, as a lone
  call would.
- Durability: a batch statement is one implicit transaction, so nobody is
  answered before the COMMIT that holds their change returned.
- Cancellation and deadlines: a caller cancelled while its call is still
  queued drops it (it never runs). Once taken, the caller waits for its
  batch to end, as a lone statement's caller waits for the statement to be
  cancelled: a batch is cut off at its earliest caller's deadline, so a
  caller told "unavailable" for a timeout was not stored behind its back.
- Backpressure: at most ``max_batch`` calls per statement and
  ``max_in_flight`` statements at once; the rest wait in the queue, each
  caller under its own deadline (the storage's query timeout).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Literal, TypeVar, final

import attrs
import outcome
import trio

from pqmsg.errors import StorageUnavailable

C = TypeVar("C")
R = TypeVar("R")

#: Runs a batch of calls as one statement; one outcome per call, in order.
BatchRunner = Callable[[Sequence[C]], Awaitable[list[outcome.Outcome[R]]]]
#: Runs one call alone (its own statement).
SingleRunner = Callable[[C], Awaitable[R]]
#: Whether a batch's failure means PostgreSQL rolled it back (safe to retry one by one).
RolledBack = Callable[[BaseException], bool]


@attrs.frozen
class CoalescerStatistics:
    calls: int  # calls run (a call run again alone after its batch failed counts once)
    batches: int  # statements run for more than one call
    retried: int  # calls run again alone after their batch was rolled back


@final
class _Pending(Generic[C, R]):
    """One caller's call, waiting for (or in) a batch."""

    __slots__ = ("call", "deadline", "result", "state", "waiter")

    def __init__(self, call: C, deadline: float) -> None:
        self.call = call
        #: The caller's deadline: its call never runs past it.
        self.deadline = deadline
        self.state: Literal["queued", "taken", "dropped", "answered"] = "queued"
        self.result: outcome.Outcome[R] | None = None
        self.waiter: trio.lowlevel.Task | None = None

    def answer(self, result: outcome.Outcome[R]) -> None:
        if self.state == "answered":
            return
        self.state = "answered"
        self.result = result
        if self.waiter is not None:
            trio.lowlevel.reschedule(self.waiter)
            self.waiter = None

    async def wait(self) -> outcome.Outcome[R]:
        if self.result is None:
            self.waiter = trio.lowlevel.current_task()

            def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                if self.state != "queued":
                    # Taken: the statement may be running. Wait for the batch
                    # to answer (it is cut off at this caller's deadline and
                    # always answers), so a caller that gives up learns of it
                    # only once its statement has finished or been cancelled,
                    # as with a lone statement.
                    return trio.lowlevel.Abort.FAILED
                self.waiter = None
                self.state = "dropped"
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            await trio.lowlevel.checkpoint()
        assert self.result is not None
        return self.result


class Coalescer(Generic[C, R]):
    """Queue calls of one kind and run them in batches; see the module docstring.

    Without its batcher running (:meth:`run`), :meth:`submit` runs each call
    alone.
    """

    def __init__(
        self,
        *,
        batch: BatchRunner[C, R],
        single: SingleRunner[C, R],
        rolled_back: RolledBack,
        max_batch: int = 64,
        max_in_flight: int = 1,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be positive")
        self._batch = batch
        self._single = single
        self._rolled_back = rolled_back
        self._max_batch = max_batch
        self._slots = trio.Semaphore(max_in_flight)
        self._queue: deque[_Pending[C, R]] = deque()
        self._wakeup = trio.Event()
        self._running = False
        self._closed = False
        self._calls = 0
        self._batches = 0
        self._retried = 0

    def statistics(self) -> CoalescerStatistics:
        return CoalescerStatistics(calls=self._calls, batches=self._batches, retried=self._retried)

    async def submit(self, call: C) -> R:
        """Run ``call``, in a batch when the batcher runs; its value or its error."""
        if not self._running:
            if self._closed:
                raise StorageUnavailable("the storage is closing")
            self._calls += 1
            return await self._single(call)
        pending: _Pending[C, R] = _Pending(call, trio.current_effective_deadline())
        self._queue.append(pending)
        self._wakeup.set()
        return (await pending.wait()).unwrap()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batcher, until cancelled; then every queued call gets StorageUnavailable."""
        try:
            async with trio.open_nursery() as nursery:
                self._running = True
                task_status.started()
                while True:
                    while not self._queue:
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                    await self._slots.acquire()
                    taken = self._take()
                    if taken:
                        nursery.start_soon(self._run_batch, taken)
                    else:
                        self._slots.release()
        finally:
            self._running = False
            self._closed = True
            closing = StorageUnavailable("the storage is closing")
            while self._queue:
                self._queue.popleft().answer(outcome.Error(closing))

    def _take(self) -> list[_Pending[C, R]]:
        taken: list[_Pending[C, R]] = []
        while self._queue and len(taken) < self._max_batch:
            pending = self._queue.popleft()
            if pending.state == "queued":
                pending.state = "taken"
                taken.append(pending)
        return taken

    async def _run_batch(self, taken: list[_Pending[C, R]]) -> None:
        # The batch never outlives its callers: it is cut off at the earliest
        # caller's deadline, so a caller told "unavailable" after its
        # deadline was not stored after all (the statement is cancelled).
        try:
            with trio.CancelScope(deadline=min(p.deadline for p in taken)):
                await self._answer(taken)
            timed_out = StorageUnavailable("the database did not answer in time")
            for pending in taken:
                pending.answer(outcome.Error(timed_out))  # a no-op for those answered
        except BaseException as exc:
            # Cancelled (closing) or a bug: nobody is left waiting for ever.
            failed = (
                exc if isinstance(exc, Exception) else StorageUnavailable("the storage is closing")
            )
            for pending in taken:
                pending.answer(outcome.Error(failed))
            raise
        finally:
            self._slots.release()

    async def _answer(self, taken: list[_Pending[C, R]]) -> None:
        self._calls += len(taken)
        if len(taken) == 1:
            taken[0].answer(await outcome.acapture(self._single, taken[0].call))
            return
        self._batches += 1
        try:
            results = await self._batch([p.call for p in taken])
        except Exception as exc:
            if not self._rolled_back(exc):
                for pending in taken:
                    pending.answer(outcome.Error(exc))
                return
            # Nothing of the batch was stored: each call again, alone.
            self._retried += len(taken)
            for pending in taken:
                pending.answer(await outcome.acapture(self._single, pending.call))
            return
        for pending, result in zip(taken, results, strict=True):
            pending.answer(result)
