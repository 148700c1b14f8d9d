"""How long the event loop is held: a trio instrument timing every task step.

A step is the stretch between two checkpoints of one task; while it runs, no
other request makes progress. The server installs :class:`StepTimer` at
start-up and exports what it sees (``pqmsg_event_loop_slow_steps_total``,
``pqmsg_event_loop_max_step_seconds``), so a handler that holds the loop
too long (a synchronous call that should be batched or moved to a thread)
shows up in production, and ``bench/`` can measure the longest step under
load. A slow step is logged with its task's name, at most once per
``LOG_EVERY_S``.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

log = logging.getLogger("pqmsg.loopwatch")

SLOW_STEP_S = 0.010
LOG_EVERY_S = 10.0


@attrs.frozen
class StepStatistics:
    steps: int
    slow_steps: int
    max_step_s: float
    max_step_task: str | None


class StepTimer(trio.abc.Instrument):
    """Times task steps with ``time.perf_counter`` (real time, not trio's clock).

    One hook per step, not two: a step is timed from the end of the step
    before it, or from the end of the scheduler's wait for I/O, whichever
    came last (``after_io_wait`` runs once per scheduler pass, not per
    step). Between those points trio only picks the next task, so the
    figure is the step plus a few microseconds; the instrument costs the
    loop half the calls a ``before_task_step`` hook would add.
    """

    def __init__(self, slow_step_s: float = SLOW_STEP_S) -> None:
        self._slow_step_s = slow_step_s
        self._started: float | None = None
        self._steps = 0
        self._slow = 0
        self._max = 0.0
        self._max_task: str | None = None
        self._last_log = -LOG_EVERY_S

    def after_io_wait(self, timeout: float) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        now = time.perf_counter()
        started, self._started = self._started, now
        if started is None:  # installed in the middle of this step
            return
        took = now - started
        self._steps += 1
        if took > self._max:
            self._max, self._max_task = took, task.name
        if took > self._slow_step_s:
            self._slow += 1
            now = time.monotonic()
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                log.warning("event loop held for %.1f ms by %s", took * 1000, task.name)

    def statistics(self) -> StepStatistics:
        return StepStatistics(self._steps, self._slow, self._max, self._max_task)
