"""The asyncio loop (trio-asyncio) that asyncpg and redis-py run in.

trio-asyncio's loop turns every error asyncio reports to its exception
handler (an orphaned future's "exception was never retrieved", a callback
that raised) into an exception in the loop's nursery, which would end the
whole server. asyncpg reports exactly such an orphan when PostgreSQL kills a
connection under it (``ConnectionError: unexpected connection_lost() call``),
while the call that was waiting on that connection already failed and was
answered with a 503. So the server's loop logs these reports instead: the
failures that matter reach the caller through the awaited call itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio_asyncio

log = logging.getLogger("pqmsg.aioloop")


def log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log what asyncio reports (with its exception), without raising it anywhere."""
    exception = context.get("exception")
    message = context.get("message") or "unhandled error in the asyncio loop"
    log.warning("asyncio: %s: %r", message, exception)


@asynccontextmanager
async def open_aio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """A trio-asyncio loop whose stray asyncio errors are logged, not raised."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(log_asyncio_error)
        yield loop
