"""Queue many messages at once, straight into the database, for the backlog figures.

Going through the API would take an hour for a million messages; this
writes rows of the server's own schema (``pqmsg/storage/migrations``)
directly: SQLite with one bulk ``executemany`` per batch on its own
connection (the server's connection waits on the write lock meanwhile),
PostgreSQL with ``COPY``. The messages are spread round robin over the
bench accounts' devices, each sent by the previous account, with untagged
ciphertexts (no delivery timing). Runs after the accounts exist and before
the measured window.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator

import trio

from bench.signer import Credentials

BATCH = 50_000
BUSY_TIMEOUT_MS = 120_000


def _rows(creds: list[Credentials], count: int, message_bytes: int) -> Iterator[tuple[object, ...]]:
    ciphertext = bytes(max(8, message_bytes))  # tag 0: untimed
    now = time.time()
    n = len(creds)
    for i in range(count):
        to, frm = creds[i % n], creds[(i - 1) % n]
        yield (uuid.uuid4(), to.account, to.device, frm.account, frm.device, ciphertext, None, now)


def fill_sqlite(path: str, creds: list[Credentials], count: int, message_bytes: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        rows = _rows(creds, count, message_bytes)
        while True:
            batch = [(str(r[0]), *r[1:]) for _, r in zip(range(BATCH), rows, strict=False)]
            if not batch:
                break
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO messages (id, recipient_account, recipient_device, sender_account,"
                " sender_device, ciphertext, pq_epoch, server_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
            conn.execute("COMMIT")
        conn.execute("ANALYZE messages")
    finally:
        conn.close()


async def _copy_postgres(dsn: str, creds: list[Credentials], count: int, message_bytes: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        columns = [
            "id", "recipient_account", "recipient_device", "sender_account", "sender_device",
            "ciphertext", "pq_epoch", "server_ts",
        ]
        rows = _rows(creds, count, message_bytes)
        while True:
            batch = [
                (r[0], uuid.UUID(str(r[1])), r[2], uuid.UUID(str(r[3])), *r[4:])
                for _, r in zip(range(BATCH), rows, strict=False)
            ]
            if not batch:
                break
            await conn.copy_records_to_table("messages", records=batch, columns=columns)
        await conn.execute("ANALYZE messages")
    finally:
        await conn.close()


async def fill(database_url: str, creds: list[Credentials], count: int, message_bytes: int) -> None:
    """Queue ``count`` messages in the database named like ``PQMSG_DATABASE_URL``."""
    started = time.monotonic()
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        await trio.to_thread.run_sync(fill_sqlite, path, creds, count, message_bytes)
    else:
        await trio.to_thread.run_sync(
            lambda: asyncio.run(_copy_postgres(database_url, creds, count, message_bytes))
        )
    print(f"prefill: {count} messages queued in {time.monotonic() - started:.1f} s")
