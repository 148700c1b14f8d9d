"""Redis for tests: the shared server on :6379, or a private one to break.

Tests that only use Redis talk to the shared server with a random key
prefix (:func:`random_prefix`). Every test opens ONE ``trio_asyncio`` loop
(in its fixture) and all its Redis clients run on it: a client must not
outlive the loop its connections were made on. Tests that stop, pause or restart Redis
start their own ``redis-server`` on a free loopback port
(:func:`private_redis_server`), which never touches the disk.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

import redis.asyncio as aredis
import trio
import trio_asyncio

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def random_prefix() -> str:
    """A key prefix no other test run uses."""
    return f"pqmsg-test:{secrets.token_hex(8)}:"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def raw_command(url: str, *args: str) -> object:
    """Run one command with plain redis-py, to inspect what the code under test stored.

    Needs a running trio-asyncio loop.
    """

    async def run() -> object:
        client = aredis.Redis.from_url(url)
        try:
            return await client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()

    return await trio_asyncio.aio_as_trio(run)()


@final
class RedisServer:
    """A ``redis-server`` child process on a fixed port that tests can break."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._process: trio.Process | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start (or restart) on the same port; returns once it answers PING."""
        assert self._process is None, "already running"
        self._process = await trio.lowlevel.open_process(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with trio.fail_after(START_TIMEOUT_S):
            while not await self._answers_ping():
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}")
                await trio.sleep(0.02)

    async def stop(self) -> None:
        """Terminate the server and wait for it; a no-op when it is not running."""
        process, self._process = self._process, None
        if process is None:
            return
        self._resume(process)
        process.terminate()
        with trio.move_on_after(STOP_TIMEOUT_S, shield=True) as scope:
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
                await process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted but nothing answers (a hung Redis)."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._process is not None:
            self._resume(self._process)

    def _resume(self, process: trio.Process) -> None:
        if self._paused:
            os.kill(process.pid, signal.SIGCONT)
            self._paused = False

    async def _answers_ping(self) -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return False
        async with stream:
            try:
                await stream.send_all(b"PING\r\n")
                reply = await stream.receive_some(64)
            except (OSError, trio.BrokenResourceError):
                return False
        return reply.startswith(b"+PONG")


@asynccontextmanager
async def private_redis_server() -> AsyncIterator[RedisServer]:
    """A running private server on a free port, stopped on exit."""
    server = RedisServer(free_port())
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
