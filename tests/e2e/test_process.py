"""The server as operators run it: a real process, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from pqmsg.client import Client
from tests.support.process import free_port, server_process

pytestmark = pytest.mark.slow


async def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(60):
        async with server_process(data) as server, Client(server.url) as client:
            alice = await client.register()
            bob = await client.register()
            await alice.send(bob.account, {1: b"before shutdown"})
            messages, _ = await bob.receive()
            assert len(messages) == 1  # unacknowledged: must survive the restart

            result: dict[str, object] = {}
            registered = trio.Event()

            async def long_poll() -> None:
                async with Client(server.url) as other:
                    carol = await other.register()
                    registered.set()
                    result["messages"] = (await carol.receive(wait=20))[0]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                await registered.wait()
                await trio.sleep(0.2)  # the poll is now parked in the server
                started = trio.current_time()
                server.process.send_signal(signal.SIGTERM)
            # The parked poll was answered (empty) instead of being cut off.
            assert result["messages"] == []
            assert await server.process.wait() == 0
            assert trio.current_time() - started < 3  # idle connections close at once
            assert "received SIGTERM" in server.stderr()

        events = [json.loads(line) for f in sorted((data / "audit").glob("*.jsonl")) for line in f.read_text().splitlines()]
        assert sum(e["event"] == "account.registered" for e in events) == 3  # flushed before exit

        async with server_process(data) as server, Client(server.url) as client:
            bob.client = client
            again, _ = await bob.receive()
            assert [m.ciphertext for m in again] == [b"before shutdown"]


async def test_sigkill_right_after_200_loses_no_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    with trio.fail_after(60):
        async with server_process(data, port=port) as server, Client(server.url) as client:
            alice = await client.register()
            bob = await client.register()
            for i in range(20):
                await alice.send(bob.account, {1: f"durable {i}".encode()})
            server.process.kill()  # SIGKILL: no drain, no flush
            await server.process.wait()
        async with server_process(data, port=port) as server, Client(server.url) as client:
            bob.client = client
            messages, more = await bob.receive(limit=100)
    assert [m.ciphertext for m in messages] == [f"durable {i}".encode() for i in range(20)]
    assert not more


def test_a_service_that_cannot_start_stops_the_server_with_one_clear_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("in the way")
    proc = subprocess.run(
        [sys.executable, "-m", "pqmsg", "serve", "--bind", f"127.0.0.1:{free_port()}", "--data-dir", str(not_a_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    critical = [line for line in proc.stderr.splitlines() if " CRITICAL " in line]
    assert len(critical) == 1
    assert critical[0].split(" CRITICAL ", 1)[1].startswith("pqmsg: pqmsg-server stopped: ")


def test_configuration_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pqmsg", "serve", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30, env={"PQMSG_RATE_SEND": "fast", "PATH": ""},
    )
    assert proc.returncode == 2
    assert "PQMSG_RATE_SEND" in proc.stderr
