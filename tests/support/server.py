"""Run a real pqmsg server in the test's trio loop, on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from pqmsg.clock import WallClock, system_clock
from pqmsg.server import serve
from pqmsg.settings import Settings


def make_settings(data_dir: Path, **sections: object) -> Settings:
    """Embedded defaults on an ephemeral port, with generous rate limits.

    Signatures are checked in process: no helper processes per test server
    (tests/nurseries/test_verifier.py and tests/e2e/test_verify_helpers.py
    run them, and spawned servers keep the default).
    """
    settings = Settings(data_dir=data_dir)
    settings = settings.replace("http.binds", ("127.0.0.1:0",))
    settings = settings.replace("auth.verify_processes", 0)
    settings = settings.replace("audit.key", b"k" * 32)
    for path, value in sections.items():
        settings = settings.replace(path.replace("__", "."), value)
    return settings


@attrs.frozen
class RunningServer:
    url: str
    settings: Settings
    stop: trio.Event

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@asynccontextmanager
async def running_server(settings: Settings, *, clock: WallClock = system_clock) -> AsyncIterator[RunningServer]:
    """Serve until the block ends, then drain like SIGTERM would."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(settings, shutdown_trigger=stop.wait, clock=clock, task_status=task_status)
        )
        url = binds[0].replace("://0.0.0.0", "://127.0.0.1")
        try:
            yield RunningServer(url=url, settings=settings, stop=stop)
        finally:
            stop.set()
