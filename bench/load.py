"""Drive a :class:`~bench.scenario.Workload`: closed loop or open loop (fixed arrival rate).

Closed loop: ``concurrency`` workers, each starting its next operation as
soon as the previous one answers; throughput is whatever the server gives.
Open loop: operations start on a fixed schedule (``rate`` per second)
whatever the answers, so a slow server cannot slow the arrivals down;
latency counts from the scheduled start (no coordinated omission). At most
``concurrency`` operations are outstanding; an arrival beyond that is
skipped and counted (``dropped``), a sign that the server is past saturation.

Both stop by themselves: at the deadline, or after ``requests`` operations
in the measured window; operations still running then get ``DRAIN_S``.
"""

from __future__ import annotations

import math

import trio

from bench.options import Options
from bench.scenario import Workload

DRAIN_S = 5.0


class Budget:
    """The measured window: a deadline, or a count of operations after the warm-up."""

    def __init__(self, opts: Options, start: float) -> None:
        self.measure_from = start + opts.warmup_s
        self.deadline = math.inf if opts.requests else self.measure_from + opts.duration_s
        self.remaining = opts.requests or 0
        self.counted = opts.requests is not None

    def take(self) -> bool:
        now = trio.current_time()
        if now >= self.deadline:
            return False
        if self.counted and now >= self.measure_from:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True


async def closed_loop(work: Workload, opts: Options, budget: Budget) -> None:
    async with trio.open_nursery() as refills:

        async def worker() -> None:
            while budget.take():
                await work.op(refills)

        with trio.move_on_after(_hard_limit(opts)):
            async with trio.open_nursery() as workers:
                for _ in range(opts.concurrency):
                    workers.start_soon(worker)
        refills.cancel_scope.cancel()


async def open_loop(work: Workload, opts: Options, budget: Budget) -> None:
    assert opts.rate is not None
    interval = 1.0 / opts.rate
    outstanding = 0

    async def one(scheduled: float, nursery: trio.Nursery) -> None:
        nonlocal outstanding
        try:
            await work.op(nursery, scheduled)
        finally:
            outstanding -= 1

    async with trio.open_nursery() as refills:
        with trio.move_on_after(_hard_limit(opts)):
            async with trio.open_nursery() as ops:
                t0 = trio.current_time()
                for i in range(10**9):
                    scheduled = t0 + i * interval
                    await trio.sleep_until(scheduled)
                    if not budget.take():
                        break
                    if outstanding >= opts.concurrency:
                        if scheduled >= budget.measure_from:
                            work.rec.dropped += 1
                        continue
                    outstanding += 1
                    ops.start_soon(one, scheduled, refills)
                ops.cancel_scope.deadline = trio.current_time() + DRAIN_S
        refills.cancel_scope.cancel()


def _hard_limit(opts: Options) -> float:
    """No run outlives this, whatever the server does: the loops always stop."""
    if opts.requests:
        return opts.warmup_s + 600.0
    return opts.warmup_s + opts.duration_s + DRAIN_S
