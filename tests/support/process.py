"""Run ``pqmsg serve`` as a real subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import trio

from pqmsg.client import Client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class ServerProcess:
    process: trio.Process
    url: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()


async def wait_until_live(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            try:
                if (await http.get("/health/live")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


@asynccontextmanager
async def server_process(
    data_dir: Path, *, port: int | None = None, env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> AsyncIterator[ServerProcess]:
    """Start the server, wait until it answers, and kill it at the end if still running."""
    port = port or free_port()
    stderr_path = data_dir.parent / f"server-{port}.log"
    full_env = {**os.environ, "PQMSG_AUDIT_KEY": "00" * 32, **(env or {})}
    with stderr_path.open("ab") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "pqmsg", "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", str(data_dir), *args],
            env=full_env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with trio.fail_after(20):
            await wait_until_live(url)
        yield ServerProcess(process, url, stderr_path)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10, shield=True):
            await process.wait()


@asynccontextmanager
async def two_replicas(
    tmp_path: Path, env: Mapping[str, str]
) -> AsyncIterator[tuple[ServerProcess, ServerProcess, Client, Client]]:
    """Two server processes on one ``env`` (its shared PostgreSQL and Redis): A, B and an SDK client on each."""
    async with (
        server_process(tmp_path / "a", env=env) as a,
        server_process(tmp_path / "b", env=env) as b,
        Client(a.url) as on_a,
        Client(b.url) as on_b,
    ):
        yield a, b, on_a, on_b
