"""Accounts, devices and provisioning tokens on SQLite (synchronous, worker thread).

Each function is one storage call: it runs its statements on the connection
it is given, inside one transaction when it changes more than one row.
"""

from __future__ import annotations

import sqlite3

from pqmsg.errors import Conflict, Forbidden, NotFound
from pqmsg.storage.base import DeviceAuth, DeviceInfo, NewDevice, ProvisioningGrant
from pqmsg.storage.sqlite_connection import write

_INSERT_DEVICE = (
    "INSERT INTO devices (account, device, device_key, certificate, name, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def create_account(
    conn: sqlite3.Connection, account: str, identity_key: bytes, device: NewDevice, now: float
) -> None:
    with write(conn):
        try:
            conn.execute(
                "INSERT INTO accounts (id, identity_key, created_at, next_device)"
                " VALUES (?, ?, ?, 2)",
                (account, identity_key, now),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict("the account already exists", reason="account_exists") from exc
        conn.execute(
            _INSERT_DEVICE,
            (account, 1, device.device_key, device.certificate, device.name, now),
        )


def delete_account(conn: sqlite3.Connection, account: str) -> tuple[int, ...]:
    """Delete the account; its devices' rows cascade to their keys, queues,
    push targets and tokens. Messages it sent that others have not fetched
    yet stay queued: they belong to their recipients now."""
    with write(conn):
        rows = conn.execute(
            "SELECT device FROM devices WHERE account = ? ORDER BY device", (account,)
        ).fetchall()
        conn.execute("DELETE FROM pq_epochs WHERE sender_account = ?", (account,))
        conn.execute("DELETE FROM pq_epochs WHERE recipient_account = ?", (account,))
        conn.execute("DELETE FROM sends WHERE sender_account = ?", (account,))
        conn.execute("DELETE FROM accounts WHERE id = ?", (account,))
    return tuple(device for (device,) in rows)


def get_identity_key(conn: sqlite3.Connection, account: str) -> bytes | None:
    row = conn.execute("SELECT identity_key FROM accounts WHERE id = ?", (account,)).fetchone()
    return None if row is None else bytes(row[0])


def get_device_auth(conn: sqlite3.Connection, account: str, device: int) -> DeviceAuth | None:
    row = conn.execute(
        "SELECT device_key, revoked_at IS NOT NULL, last_seen_at FROM devices"
        " WHERE account = ? AND device = ?",
        (account, device),
    ).fetchone()
    if row is None:
        return None
    return DeviceAuth(device_key=bytes(row[0]), revoked=bool(row[1]), last_seen_at=row[2])


def touch_device(conn: sqlite3.Connection, account: str, device: int, now: float) -> None:
    # max(): a late, slower request must not move last_seen_at back.
    conn.execute(
        "UPDATE devices SET last_seen_at = max(coalesce(last_seen_at, :now), :now)"
        " WHERE account = :account AND device = :device AND revoked_at IS NULL",
        {"now": now, "account": account, "device": device},
    )


def list_devices(conn: sqlite3.Connection, account: str) -> tuple[DeviceInfo, ...]:
    rows = conn.execute(
        "SELECT device, name, created_at, last_seen_at FROM devices"
        " WHERE account = ? AND revoked_at IS NULL ORDER BY device",
        (account,),
    ).fetchall()
    return tuple(DeviceInfo(*row) for row in rows)


def active_device_ids(conn: sqlite3.Connection, account: str) -> tuple[int, ...]:
    rows = conn.execute(
        "SELECT device FROM devices WHERE account = ? AND revoked_at IS NULL ORDER BY device",
        (account,),
    ).fetchall()
    return tuple(device for (device,) in rows)


def revoke_device(conn: sqlite3.Connection, account: str, device: int, now: float) -> bool:
    """Mark the device revoked and delete what only it could use.

    Provisioning tokens do not record which device created them, so every
    outstanding token of the account is deleted: a revoked (perhaps stolen)
    device must not be able to link a replacement through a token it minted.
    """
    with write(conn):
        revoked = conn.execute(
            "UPDATE devices SET revoked_at = ?"
            " WHERE account = ? AND device = ? AND revoked_at IS NULL",
            (now, account, device),
        ).rowcount
        if not revoked:
            return False
        key = (account, device)
        conn.execute("DELETE FROM signed_prekeys WHERE account = ? AND device = ?", key)
        conn.execute("DELETE FROM one_time_prekeys WHERE account = ? AND device = ?", key)
        conn.execute(
            "DELETE FROM messages WHERE recipient_account = ? AND recipient_device = ?", key
        )
        conn.execute("DELETE FROM push_targets WHERE account = ? AND device = ?", key)
        conn.execute("DELETE FROM pq_epochs WHERE sender_account = ? AND sender_device = ?", key)
        conn.execute(
            "DELETE FROM pq_epochs WHERE recipient_account = ? AND recipient_device = ?", key
        )
        conn.execute("DELETE FROM provisioning_tokens WHERE account = ?", (account,))
    return True


def create_provisioning_token(
    conn: sqlite3.Connection, account: str, token_hash: bytes, expires_at: float
) -> None:
    inserted = conn.execute(
        "INSERT INTO provisioning_tokens (token_hash, account, expires_at)"
        " SELECT ?, id, ? FROM accounts WHERE id = ?",
        (token_hash, expires_at, account),
    ).rowcount
    if not inserted:
        raise NotFound("no such account")


def get_provisioning_grant(
    conn: sqlite3.Connection, token_hash: bytes, now: float
) -> ProvisioningGrant | None:
    row = conn.execute(
        "SELECT t.account, a.identity_key, t.expires_at"
        " FROM provisioning_tokens AS t JOIN accounts AS a ON a.id = t.account"
        " WHERE t.token_hash = ? AND t.used = 0 AND t.expires_at > ?",
        (token_hash, now),
    ).fetchone()
    if row is None:
        return None
    return ProvisioningGrant(account=row[0], identity_key=bytes(row[1]), expires_at=row[2])


def link_device(conn: sqlite3.Connection, token_hash: bytes, device: NewDevice, now: float) -> int:
    """Consume the token and add the account's next device, in one transaction."""
    with write(conn):
        consumed = conn.execute(
            "UPDATE provisioning_tokens SET used = 1"
            " WHERE token_hash = ? AND used = 0 AND expires_at > ? RETURNING account",
            (token_hash, now),
        ).fetchall()
        if not consumed:
            raise Forbidden(
                "the provisioning token is unknown, used or expired",
                reason="provisioning_token",
            )
        account = consumed[0][0]
        ((device_id,),) = conn.execute(
            "UPDATE accounts SET next_device = next_device + 1 WHERE id = ?"
            " RETURNING next_device - 1",
            (account,),
        ).fetchall()
        conn.execute(
            _INSERT_DEVICE,
            (account, device_id, device.device_key, device.certificate, device.name, now),
        )
        # Keeps the table small: the account's other spent tokens go now.
        conn.execute(
            "DELETE FROM provisioning_tokens"
            " WHERE account = ? AND token_hash != ? AND (used = 1 OR expires_at <= ?)",
            (account, token_hash, now),
        )
    return int(device_id)
