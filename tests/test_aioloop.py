import gc
import logging

import pytest
import trio

from pqmsg.aioloop import open_aio_loop


async def test_an_orphaned_asyncio_error_is_logged_and_the_loop_lives_on(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(10), caplog.at_level(logging.WARNING, logger="pqmsg.aioloop"):
        async with open_aio_loop() as loop:
            future = loop.create_future()
            future.set_exception(ConnectionError("unexpected connection_lost() call"))
            del future
            gc.collect()  # "Future exception was never retrieved" is reported from __del__
            await trio.sleep(0.05)
    assert "unexpected connection_lost() call" in caplog.text
