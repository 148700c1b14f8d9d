"""The coalescer's own rules, on plain Trio (no database): batching, each
caller's own answer, retry one by one after a rollback, cancellation and
deadlines. What a batch means to PostgreSQL is in ``test_pg_batching``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import outcome
import pytest
import trio
import trio.testing

from pqmsg.errors import StorageUnavailable
from pqmsg.storage.pgbatch import Coalescer


class Rollback(Exception):
    """Stands for an SQL error: the statement changed nothing."""


class Doubt(Exception):
    """Stands for a lost connection: the statement's fate is unknown."""


class Runner:
    """The statements the coalescer runs: values double; a negative call is refused."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.singles: list[int] = []
        self.fail_batch: BaseException | None = None
        self.gate = trio.Event()
        self.gate.set()
        self.ran: list[int] = []

    async def batch(self, calls: Sequence[int]) -> list[outcome.Outcome[int]]:
        self.batches.append(list(calls))
        await self.gate.wait()
        if self.fail_batch is not None:
            raise self.fail_batch
        self.ran.extend(calls)
        return [outcome.capture(self._one, c) for c in calls]

    async def single(self, call: int) -> int:
        self.singles.append(call)
        await self.gate.wait()
        self.ran.append(call)
        return self._one(call)

    @staticmethod
    def _one(call: int) -> int:
        if call < 0:
            raise ValueError(f"refused {call}")
        return call * 2


@asynccontextmanager
async def running(runner: Runner, **kwargs: int) -> AsyncIterator[Coalescer[int, int]]:
    coalescer: Coalescer[int, int] = Coalescer(
        batch=runner.batch,
        single=runner.single,
        rolled_back=lambda exc: isinstance(exc, Rollback),
        **kwargs,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.run)
        yield coalescer
        nursery.cancel_scope.cancel()


async def gather(
    coalescer: Coalescer[int, int], calls: Sequence[int]
) -> dict[int, outcome.Outcome[int]]:
    answers: dict[int, outcome.Outcome[int]] = {}

    async def one(call: int) -> None:
        answers[call] = await outcome.acapture(coalescer.submit, call)

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(one, call)
    return answers


async def test_without_its_batcher_each_call_runs_alone() -> None:
    runner = Runner()
    coalescer: Coalescer[int, int] = Coalescer(
        batch=runner.batch, single=runner.single, rolled_back=lambda exc: False
    )
    assert await coalescer.submit(3) == 6
    assert runner.singles == [3] and runner.batches == []


async def test_a_lone_call_runs_alone_and_concurrent_calls_share_a_statement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = Runner()
    async with running(runner) as coalescer:
        assert await coalescer.submit(1) == 2
        assert runner.singles == [1]
        answers = await gather(coalescer, range(10, 20))
    assert {call: a.unwrap() for call, a in answers.items()} == {c: 2 * c for c in range(10, 20)}
    assert sorted(runner.ran) == [1, *range(10, 20)]
    # Queued in one scheduling round, before the batcher woke: one statement.
    assert len(runner.batches) == 1 and sorted(runner.batches[0]) == list(range(10, 20))
    assert coalescer.statistics().calls == 11


async def test_each_caller_gets_its_own_refusal(autojump_clock: trio.testing.MockClock) -> None:
    runner = Runner()
    async with running(runner) as coalescer:
        answers = await gather(coalescer, [5, -1, 7, -2, 9])
    assert answers[5].unwrap() == 10 and answers[7].unwrap() == 14 and answers[9].unwrap() == 18
    for refused in (-1, -2):
        with pytest.raises(ValueError, match=f"refused {refused}"):
            answers[refused].unwrap()


async def test_at_most_max_batch_calls_per_statement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = Runner()
    async with running(runner, max_batch=4) as coalescer:
        answers = await gather(coalescer, range(1, 14))
    assert all(a.unwrap() == 2 * c for c, a in answers.items())
    assert all(len(b) <= 4 for b in runner.batches)
    assert sorted(runner.ran) == list(range(1, 14))


async def test_a_rolled_back_batch_runs_again_call_by_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = Runner()
    async with running(runner) as coalescer:
        runner.fail_batch = Rollback("deadlock")
        answers = await gather(coalescer, [0, 1, 2, -3])
    assert [answers[c].unwrap() for c in (0, 1, 2)] == [0, 2, 4]
    with pytest.raises(ValueError, match="refused -3"):
        answers[-3].unwrap()
    assert sorted(runner.singles) == [-3, 0, 1, 2]
    assert coalescer.statistics().retried == 4


async def test_a_batch_in_doubt_is_not_run_again(autojump_clock: trio.testing.MockClock) -> None:
    runner = Runner()
    async with running(runner) as coalescer:
        runner.fail_batch = Doubt("connection lost during COMMIT")
        answers = await gather(coalescer, [0, 1, 2])
    assert runner.singles == []  # not run again
    for call in (0, 1, 2):
        with pytest.raises(Doubt):
            answers[call].unwrap()


async def test_a_caller_cancelled_while_queued_never_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = Runner()
    async with running(runner) as coalescer:
        runner.gate = trio.Event()  # the first call holds the only slot
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coalescer.submit, 1)
            await trio.sleep(1)
            with trio.move_on_after(1):
                await coalescer.submit(2)
            runner.gate.set()
        assert await coalescer.submit(3) == 6
    assert 2 not in runner.ran and runner.ran == [1, 3]


async def test_a_caller_cancelled_while_taken_waits_for_its_statement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = Runner()
    async with running(runner) as coalescer:
        runner.gate = trio.Event()
        finished: list[float] = []
        scope = trio.CancelScope()

        async def give_up() -> None:
            with scope:
                await coalescer.submit(4)
            finished.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(give_up)
            await trio.sleep(1)
            scope.cancel()  # the call is running: the caller waits for it
            await trio.sleep(5)
            assert finished == []
            runner.gate.set()
        assert finished and runner.ran == [4]


async def test_a_batch_is_cut_off_at_its_callers_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = Runner()
    async with running(runner) as coalescer:
        runner.gate = trio.Event()  # never set: the statement hangs
        start = trio.current_time()
        with trio.move_on_after(3):
            with pytest.raises(StorageUnavailable, match="in time"):
                await coalescer.submit(1)
        assert trio.current_time() - start == pytest.approx(3)
    assert runner.ran == []


async def test_closing_answers_every_queued_call(autojump_clock: trio.testing.MockClock) -> None:
    runner = Runner()
    runner.gate = trio.Event()
    answers: list[outcome.Outcome[int]] = []

    async def call(coalescer: Coalescer[int, int], value: int) -> None:
        answers.append(await outcome.acapture(coalescer.submit, value))

    async with trio.open_nursery() as outer:
        async with running(runner) as coalescer:
            for value in (1, 2, 3):
                outer.start_soon(call, coalescer, value)
            await trio.sleep(1)
    assert len(answers) == 3
    for answer in answers:
        with pytest.raises(StorageUnavailable, match="closing"):
            answer.unwrap()
    with pytest.raises(StorageUnavailable, match="closing"):
        await coalescer.submit(5)
