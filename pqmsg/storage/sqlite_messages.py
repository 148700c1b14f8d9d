"""The message queue, send idempotency, PQ epochs and push targets on SQLite
(synchronous, worker thread)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence

from pqmsg.errors import BadRequest, DeviceMismatch, NotFound
from pqmsg.storage.base import (
    OutgoingCopy,
    PushTarget,
    QueuedMessage,
    Sender,
    StoreResult,
    device_refusal,
)
from pqmsg.storage.sqlite_accounts import get_device_auth
from pqmsg.storage.sqlite_connection import write

_INSERT_MESSAGE = (
    "INSERT INTO messages (id, recipient_account, recipient_device, sender_account,"
    " sender_device, ciphertext, pq_epoch, server_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# Keeps the highest epoch; changes a row (rowcount 1) only when the epoch grew,
# counting a pair's first epoch as growth.
_UPSERT_EPOCH = (
    "INSERT INTO pq_epochs (sender_account, sender_device, recipient_account,"
    " recipient_device, epoch) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT DO UPDATE SET epoch = excluded.epoch WHERE excluded.epoch > pq_epochs.epoch"
)


def check_device(
    conn: sqlite3.Connection, account: str, device: int, device_key: bytes | None
) -> None:
    """Raise the device's refusal unless it is active with ``device_key`` (None: no check)."""
    if device_key is not None:
        refusal = device_refusal(get_device_auth(conn, account, device), device_key)
        if refusal is not None:
            raise refusal


def store_messages(
    conn: sqlite3.Connection,
    sender: Sender,
    message_id: str,
    recipient: str,
    copies: Sequence[OutgoingCopy],
    now: float,
    idempotency_window_s: float,
    sender_key: bytes | None = None,
) -> StoreResult:
    """Queue the copies in one transaction (see ``Storage.store_messages``).

    A retry within the window gets the first send's result back, marked
    ``duplicate``; a device addressed twice is a BadRequest.
    """
    addressed = [copy.device for copy in copies]
    if len(set(addressed)) != len(addressed):
        raise BadRequest("a device is addressed twice")
    with write(conn):
        check_device(conn, sender.account, sender.device, sender_key)
        previous = conn.execute(
            "SELECT stored, ratchet_advances, devices FROM sends"
            " WHERE sender_account = ? AND id = ? AND created_at > ?",
            (sender.account, message_id, now - idempotency_window_s),
        ).fetchone()
        if previous is not None:
            stored, advances, devices_text = previous
            devices = tuple(int(d) for d in devices_text.split(",") if d)
            return StoreResult(
                stored=stored, duplicate=True, ratchet_advances=advances, devices=devices
            )
        _check_devices(conn, recipient, set(addressed))
        conn.executemany(
            _INSERT_MESSAGE,
            [
                (
                    str(uuid.uuid4()),
                    recipient,
                    copy.device,
                    sender.account,
                    sender.device,
                    copy.ciphertext,
                    copy.pq_epoch,
                    now,
                )
                for copy in copies
            ],
        )
        advances = conn.executemany(
            _UPSERT_EPOCH,
            [
                (sender.account, sender.device, recipient, copy.device, copy.pq_epoch)
                for copy in copies
                if copy.pq_epoch is not None
            ],
        ).rowcount
        result = StoreResult(
            stored=len(copies),
            duplicate=False,
            ratchet_advances=max(advances, 0),
            devices=tuple(addressed),
        )
        # REPLACE: an expired record of the same id may linger until purged.
        conn.execute(
            "INSERT OR REPLACE INTO sends"
            " (sender_account, id, created_at, stored, ratchet_advances, devices)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                sender.account,
                message_id,
                now,
                result.stored,
                result.ratchet_advances,
                ",".join(map(str, result.devices)),
            ),
        )
    return result


def _check_devices(conn: sqlite3.Connection, recipient: str, addressed: set[int]) -> None:
    if conn.execute("SELECT 1 FROM accounts WHERE id = ?", (recipient,)).fetchone() is None:
        raise NotFound("no such account")
    active = {
        device
        for (device,) in conn.execute(
            "SELECT device FROM devices WHERE account = ? AND revoked_at IS NULL", (recipient,)
        )
    }
    if addressed != active:
        raise DeviceMismatch(missing=sorted(active - addressed), extra=sorted(addressed - active))


def fetch_messages(
    conn: sqlite3.Connection, account: str, device: int, limit: int,
    device_key: bytes | None = None,
) -> tuple[tuple[QueuedMessage, ...], bool]:
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    check_device(conn, account, device, device_key)
    rows = conn.execute(
        "SELECT id, sender_account, sender_device, ciphertext, pq_epoch, server_ts"
        " FROM messages WHERE recipient_account = ? AND recipient_device = ?"
        " ORDER BY seq LIMIT ?",
        (account, device, limit + 1),
    ).fetchall()
    messages = tuple(
        QueuedMessage(
            id=message_id,
            sender=Sender(sender_account, sender_device),
            ciphertext=bytes(ciphertext),
            pq_epoch=pq_epoch,
            server_ts=server_ts,
        )
        for message_id, sender_account, sender_device, ciphertext, pq_epoch, server_ts in rows[
            :limit
        ]
    )
    return messages, len(rows) > limit


def ack_messages(
    conn: sqlite3.Connection, account: str, device: int, ids: Sequence[str],
    device_key: bytes | None = None,
) -> int:
    check_device(conn, account, device, device_key)
    unique = dict.fromkeys(ids)
    if not unique:
        return 0
    with write(conn):
        deleted: int = conn.executemany(
            "DELETE FROM messages WHERE id = ? AND recipient_account = ? AND recipient_device = ?",
            [(message_id, account, device) for message_id in unique],
        ).rowcount
    return deleted


def purge_sends(conn: sqlite3.Connection, older_than: float, batch: int) -> int:
    """Forget up to ``batch`` send ids recorded before ``older_than``."""
    deleted: int = conn.execute(
        "DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends WHERE created_at < ? LIMIT ?)",
        (older_than, batch),
    ).rowcount
    return deleted


def set_push_target(
    conn: sqlite3.Connection, account: str, device: int, target: PushTarget
) -> None:
    """Set the device's push target; a no-op for unknown or revoked devices."""
    conn.execute(
        "INSERT INTO push_targets (account, device, provider, token)"
        " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM devices"
        "  WHERE account = ? AND device = ? AND revoked_at IS NULL)"
        " ON CONFLICT (account, device) DO UPDATE SET"
        " provider = excluded.provider, token = excluded.token",
        (account, device, target.provider, target.token, account, device),
    )


def delete_push_target(conn: sqlite3.Connection, account: str, device: int) -> bool:
    deleted = conn.execute(
        "DELETE FROM push_targets WHERE account = ? AND device = ?", (account, device)
    ).rowcount
    return deleted > 0


def get_push_target(conn: sqlite3.Connection, account: str, device: int) -> PushTarget | None:
    row = conn.execute(
        "SELECT provider, token FROM push_targets WHERE account = ? AND device = ?",
        (account, device),
    ).fetchone()
    return None if row is None else PushTarget(provider=row[0], token=row[1])


def drop_push_token(conn: sqlite3.Connection, target: PushTarget) -> int:
    dropped: int = conn.execute(
        "DELETE FROM push_targets WHERE provider = ? AND token = ?",
        (target.provider, target.token),
    ).rowcount
    return dropped


def ping(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
