"""Durability: a send that returned survives the process being SIGKILLed.

A child process stores messages through the SQLite backend and prints each
send's number only after ``store_messages`` returned, as the server answers
a send only after the commit. The test kills it mid-stream, reopens the
database and finds every acknowledged send, each complete (message and
idempotency record together), none half-written.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

from pqmsg.storage.sqlite import open_sqlite_storage

DEADLINE_S = 60.0
ACKNOWLEDGED_BEFORE_KILL = 150
REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, uuid
from pathlib import Path

import trio

from pqmsg.storage.base import NewDevice, OutgoingCopy, Sender
from pqmsg.storage.sqlite import open_sqlite_storage


async def main(path):
    async with open_sqlite_storage(Path(path)) as db:
        account = str(uuid.uuid4())
        await db.create_account(account, b"identity", NewDevice(b"k", b"c", None), now=1.0)
        print(account, flush=True)
        for n in range(1_000_000):
            await db.store_messages(
                Sender(account, 1), f"send-{n}", account, [OutgoingCopy(1, b"%d" % n)],
                now=2.0, idempotency_window_s=3600.0,
            )
            print(n, flush=True)


trio.run(main, sys.argv[1])
"""


async def test_acknowledged_sends_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "pqmsg.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with trio.fail_after(DEADLINE_S):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env
        )
        assert process.stdout is not None
        output = b""
        try:
            while output.count(b"\n") <= ACKNOWLEDGED_BEFORE_KILL:
                chunk = await process.stdout.receive_some()
                assert chunk, "the child exited early"
                output += chunk
        finally:
            process.kill()
            await process.wait()
        # Lines already in the pipe were acknowledged before the kill, too.
        while chunk := await process.stdout.receive_some():
            output += chunk
        assert process.returncode == -signal.SIGKILL

        account, *acknowledged = output.decode().splitlines()
        async with open_sqlite_storage(path) as db:
            messages, _ = await db.fetch_messages(account, 1, limit=500)
    stored = [int(m.ciphertext) for m in messages]
    count = len(acknowledged)
    assert count >= ACKNOWLEDGED_BEFORE_KILL
    assert [int(n) for n in acknowledged] == list(range(count))
    # Everything acknowledged is there; at most the one send in flight at the
    # kill committed without being acknowledged.
    assert stored in (list(range(count)), list(range(count + 1)))
    with sqlite3.connect(path) as raw:
        (sends,) = raw.execute("SELECT count(*) FROM sends").fetchone()
    raw.close()
    assert sends == len(stored)
