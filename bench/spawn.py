"""Start the server under test, or the baseline app, as a subprocess on a free port.

A server spawned here gets generous rate limits (the bench measures the
server, not its limiters' refusals), a fixed audit key, and the highest
open-file limit the machine allows (thousands of idle long polls are
thousands of sockets). It is stopped with SIGTERM (drain), then killed if
it outlives ``STOP_S``.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import trio

START_S = 30.0
STOP_S = 15.0
GENEROUS_LIMITS = {
    "PQMSG_RATE_REGISTRATION": "10000/10000",
    "PQMSG_RATE_PROVISIONING": "10000/10000",
    "PQMSG_RATE_BUNDLE": "100000/100000",
    "PQMSG_RATE_SEND": "100000/100000",
    "PQMSG_MAX_LONG_POLLS": "20000",
    "PQMSG_LOG_LEVEL": "WARNING",
    "PQMSG_AUDIT_KEY": "00" * 32,
}


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit; the new limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class Spawned:
    url: str
    pid: int
    data_dir: Path
    log_path: Path


async def wait_live(url: str, process: trio.Process) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        while process.returncode is None:
            try:
                if (await http.get("/health/live")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)
    raise RuntimeError(f"the spawned process exited with {process.returncode} before answering")


@asynccontextmanager
async def spawned(
    argv: list[str], *, out_dir: Path, name: str, env: Mapping[str, str] | None = None,
) -> AsyncIterator[Spawned]:
    """Run ``argv + ['--bind', ...]`` until the block ends."""
    port = free_port()
    data_dir = out_dir / f"{name}-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}-{port}.log"
    full_env = {**os.environ, **GENEROUS_LIMITS, **(env or {})}
    cmd = [sys.executable, *argv, "--bind", f"127.0.0.1:{port}"]
    if argv[1] == "pqmsg":
        cmd += ["--data-dir", str(data_dir)]
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=raise_nofile,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with trio.fail_after(START_S):
            await wait_live(url, process)
        yield Spawned(url, process.pid, data_dir, log_path)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_S, shield=True):
                await process.wait()
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(STOP_S, shield=True):
                    await process.wait()


def server_argv(workers: int) -> list[str]:
    return ["-m", "pqmsg", "serve", *(["--workers", str(workers)] if workers > 1 else [])]


def server_env(database_url: str | None, redis_url: str | None) -> dict[str, str]:
    env = {}
    if database_url:
        env["PQMSG_DATABASE_URL"] = database_url
    if redis_url:
        env["PQMSG_REDIS_URL"] = redis_url
    return env


def baseline_argv(workers: int, hypercorn: str = "patched") -> list[str]:
    return ["-m", "bench.baseline_app", "--workers", str(workers), "--hypercorn", hypercorn]
