import asyncio
import gc
import logging

import pytest
import trio
import trio_asyncio
from trio_asyncio._base import BaseTrioEventLoop

from pqmsg import aioloop
from pqmsg.aioloop import CALLBACK_RUN, apply_fast_callbacks, open_aio_loop


def original_turn() -> object:
    return aioloop._original_turn


async def test_an_orphaned_asyncio_error_is_logged_and_the_loop_lives_on(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(10), caplog.at_level(logging.WARNING, logger="pqmsg.aioloop"):
        async with open_aio_loop() as loop:
            future = loop.create_future()
            future.set_exception(ConnectionError("unexpected connection_lost() call"))
            del future
            gc.collect()  # "Future exception was never retrieved" is reported from __del__
            await trio.sleep(0.05)
    assert "unexpected connection_lost() call" in caplog.text


async def test_queued_callbacks_run_in_order_in_runs_and_trio_runs_between_runs() -> None:
    assert apply_fast_callbacks()  # the pinned release
    assert BaseTrioEventLoop._main_loop_one is not original_turn()
    ran: list[int] = []
    trio_turns = 0
    done = trio.Event()

    async def trio_side() -> None:
        nonlocal trio_turns
        while not done.is_set():
            trio_turns += 1
            await trio.lowlevel.checkpoint()

    total = 10 * CALLBACK_RUN
    with trio.fail_after(10):
        async with open_aio_loop() as loop, trio.open_nursery() as nursery:
            nursery.start_soon(trio_side)

            def step(i: int) -> None:
                ran.append(i)
                if i + 1 < total:
                    loop.call_soon(step, i + 1)  # a chain: each callback queues the next
                else:
                    done.set()

            loop.call_soon(step, 0)
            await done.wait()
    assert ran == list(range(total))
    # The chain never empties the queue, yet Trio ran between its runs.
    assert trio_turns >= total // CALLBACK_RUN // 2


async def test_a_due_timer_is_not_starved_by_a_busy_callback_chain() -> None:
    fired = trio.Event()
    chained = 0
    with trio.fail_after(10):
        async with open_aio_loop() as loop:

            def step() -> None:
                nonlocal chained
                chained += 1
                if not fired.is_set():
                    loop.call_soon(step)

            loop.call_later(0.01, fired.set)
            loop.call_soon(step)
            await fired.wait()
    assert chained > 0


async def test_asyncio_coroutines_cross_both_ways_on_the_patched_loop() -> None:
    async def aio_side(x: int) -> int:
        await asyncio.sleep(0)
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.001, fut.set_result, x * 2)
        return int(await fut)

    with trio.fail_after(10):
        async with open_aio_loop():
            results = []
            async with trio.open_nursery() as nursery:
                async def one(i: int) -> None:
                    results.append(await trio_asyncio.aio_as_trio(aio_side)(i))

                for i in range(200):
                    nursery.start_soon(one, i)
    assert sorted(results) == [2 * i for i in range(200)]


async def test_callbacks_are_type_checked_in_debug_mode_only() -> None:
    async def not_a_callback() -> None:
        pass

    with trio.fail_after(10):
        async with open_aio_loop() as loop:
            ran = trio.Event()
            loop.call_soon(ran.set)
            await ran.wait()
            loop.set_debug(True)
            try:
                with pytest.raises(TypeError, match="coroutines cannot be used"):
                    loop.call_soon(not_a_callback)
            finally:
                loop.set_debug(False)
