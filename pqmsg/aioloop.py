"""The asyncio loop (trio-asyncio) that asyncpg and redis-py run in.

trio-asyncio's loop turns every error asyncio reports to its exception
handler (an orphaned future's "exception was never retrieved", a callback
that raised) into an exception in the loop's nursery, which would end the
whole server. asyncpg reports exactly such an orphan when PostgreSQL kills a
connection under it (``ConnectionError: unexpected connection_lost() call``),
while the call that was waiting on that connection already failed and was
answered with a 503. So the server's loop logs these reports instead: the
failures that matter reach the caller through the awaited call itself.

Callbacks in runs (:func:`apply_fast_callbacks`): trio-asyncio 0.16's loop
runs ONE asyncio callback per turn, and each turn enters a cancel scope
with a deadline and waits on its queue, a Trio checkpoint per callback.
Every asyncpg and redis-py reply costs several callbacks (the read, the
future's result, the task step), so under load this bookkeeping was a
large share of the bridge's cost. The patched turn runs every callback
already queued, in the same order, up to :data:`CALLBACK_RUN` of them,
then yields once. Due timers still come first (a turn with a due timer
takes trio-asyncio's own path), other Trio tasks still run between runs,
and an empty queue still waits the way trio-asyncio does. Like asyncio's
own loop, the patched loop checks the type of a scheduled callback only in
debug mode.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from sniffio import thread_local as sniffio_library
from trio_asyncio._base import BaseTrioEventLoop
from trio_asyncio._handles import AsyncHandle

log = logging.getLogger("pqmsg.aioloop")

#: The most queued asyncio callbacks one turn of the loop runs before it yields.
CALLBACK_RUN = 64

_TurnFn = Callable[[BaseTrioEventLoop, bool], Awaitable[None]]
_original_turn: _TurnFn | None = None


async def _run_queued_callbacks(self: BaseTrioEventLoop, no_wait: bool = False) -> None:
    """One turn of trio-asyncio's main loop that runs queued callbacks in a run."""
    assert _original_turn is not None
    timers = self._timers
    if no_wait or (timers and timers[0]._when <= self.time()):
        # Closing, or a timer is due: trio-asyncio's own turn handles it first.
        await _original_turn(self, no_wait)
        return
    queue = self._q_recv
    ran = 0
    while ran < CALLBACK_RUN:
        try:
            handle = queue.receive_nowait()
        except trio.WouldBlock:
            break
        ran += 1
        # What trio-asyncio's turn does with each kind of queued object.
        if isinstance(handle, asyncio.TimerHandle):
            heapq.heappush(timers, handle)
        elif isinstance(handle, AsyncHandle):
            handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
            await handle._started.wait()
        elif not handle._cancelled:
            previous, sniffio_library.name = sniffio_library.name, "asyncio"
            try:
                handle._run()
            finally:
                sniffio_library.name = previous
    if ran:
        await trio.lowlevel.checkpoint()  # let the rest of Trio run between runs
    else:
        await _original_turn(self, no_wait)  # nothing queued: wait as trio-asyncio does


def _check_callback_when_debugging(self: BaseTrioEventLoop, callback: object, method: str) -> None:
    # asyncio's own loop checks a callback's type only in debug mode (it
    # costs an iscoroutinefunction() per call_soon); trio-asyncio always did.
    if self.get_debug():
        asyncio.BaseEventLoop._check_callback(self, callback, method)  # type: ignore[attr-defined]


#: The trio-asyncio releases whose loop internals the patch was written against.
PATCHED_RELEASES = ("0.16.",)


def apply_fast_callbacks() -> bool:
    """Patch trio-asyncio's loop (see the module docstring); idempotent.

    Another trio-asyncio release is left as it is (setup.cfg pins 0.16):
    the patch replaces one of its private methods. Returns whether the
    loop is patched.
    """
    global _original_turn
    if not trio_asyncio.__version__.startswith(PATCHED_RELEASES):
        log.info("trio-asyncio %s: its loop is not patched", trio_asyncio.__version__)
        return False
    if _original_turn is None:
        _original_turn = BaseTrioEventLoop._main_loop_one
        BaseTrioEventLoop._main_loop_one = _run_queued_callbacks
        BaseTrioEventLoop._check_callback = _check_callback_when_debugging
    return True


def log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log what asyncio reports (with its exception), without raising it anywhere."""
    exception = context.get("exception")
    message = context.get("message") or "unhandled error in the asyncio loop"
    log.warning("asyncio: %s: %r", message, exception)


@asynccontextmanager
async def open_aio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """A trio-asyncio loop whose stray asyncio errors are logged, not raised.

    Its callbacks run in runs (:func:`apply_fast_callbacks`).
    """
    apply_fast_callbacks()
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(log_asyncio_error)
        yield loop
