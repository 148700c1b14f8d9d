"""Prekeys on SQLite (synchronous, worker thread).

Signed keys live in ``signed_prekeys`` (kind ``spk`` or ``pqlr``, the PQ
last-resort key), one row per device and kind. One-time keys live in
``one_time_prekeys`` (kind ``ec`` or ``pq``) and are handed out oldest
first, each deleted in the transaction that hands it out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from pqmsg.errors import Conflict, NotFound
from pqmsg.storage.base import (
    Bundle,
    DeviceBundle,
    KeyCounts,
    KeyStatus,
    KeyUpload,
    OneTimeKey,
    SignedKey,
)
from pqmsg.storage.sqlite_connection import write

_COUNTS = (
    "SELECT"
    " (SELECT count(*) FROM one_time_prekeys WHERE account = :a AND device = :d AND kind = 'ec'),"
    " (SELECT count(*) FROM one_time_prekeys WHERE account = :a AND device = :d AND kind = 'pq')"
)
_TAKE_ONE_TIME = (
    "DELETE FROM one_time_prekeys WHERE rowid = ("
    " SELECT rowid FROM one_time_prekeys WHERE account = ? AND device = ? AND kind = ?"
    " ORDER BY rowid LIMIT 1)"
    " RETURNING key_id, public_key, signature"
)


def put_keys(
    conn: sqlite3.Connection,
    account: str,
    device: int,
    upload: KeyUpload,
    max_per_kind: int,
    now: float,
) -> KeyCounts:
    pools = (("ec", upload.one_time_prekeys), ("pq", upload.pq_one_time_prekeys))
    for _kind, keys in pools:
        if len({key.key_id for key in keys}) != len(keys):
            raise Conflict("a one-time prekey id appears twice", reason="duplicate_prekey")
    with write(conn):
        if not _is_active(conn, account, device):
            raise NotFound("no such device")
        for kind, keys in pools:
            _append_one_time(conn, account, device, kind, keys, max_per_kind)
        for kind, signed in (("spk", upload.signed_prekey), ("pqlr", upload.pq_last_resort)):
            if signed is not None:
                conn.execute(
                    "INSERT INTO signed_prekeys"
                    " (account, device, kind, key_id, public_key, signature, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (account, device, kind) DO UPDATE SET"
                    " key_id = excluded.key_id, public_key = excluded.public_key,"
                    " signature = excluded.signature, created_at = excluded.created_at",
                    (
                        account,
                        device,
                        kind,
                        signed.key_id,
                        signed.public_key,
                        signed.signature,
                        now,
                    ),
                )
        return _counts(conn, account, device)


def _append_one_time(
    conn: sqlite3.Connection,
    account: str,
    device: int,
    kind: str,
    keys: Sequence[OneTimeKey],
    max_per_kind: int,
) -> None:
    if not keys:
        return
    (stored,) = conn.execute(
        "SELECT count(*) FROM one_time_prekeys WHERE account = ? AND device = ? AND kind = ?",
        (account, device, kind),
    ).fetchone()
    if stored + len(keys) > max_per_kind:
        raise Conflict(
            f"at most {max_per_kind} one-time prekeys of a kind may be stored",
            reason="prekey_limit",
        )
    try:
        conn.executemany(
            "INSERT INTO one_time_prekeys (account, device, kind, key_id, public_key, signature)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(account, device, kind, k.key_id, k.public_key, k.signature) for k in keys],
        )
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorname != "SQLITE_CONSTRAINT_UNIQUE":
            raise
        raise Conflict("a one-time prekey id is already stored", reason="duplicate_prekey") from exc


def key_status(conn: sqlite3.Connection, account: str, device: int) -> KeyStatus:
    # One statement, so the numbers come from one snapshot.
    ec, pq, created_at, has_last_resort = conn.execute(
        _COUNTS + ","
        " (SELECT created_at FROM signed_prekeys WHERE account = :a AND device = :d"
        "  AND kind = 'spk'),"
        " EXISTS (SELECT 1 FROM signed_prekeys WHERE account = :a AND device = :d"
        "  AND kind = 'pqlr')",
        {"a": account, "d": device},
    ).fetchone()
    return KeyStatus(
        counts=KeyCounts(one_time_prekeys=ec, pq_one_time_prekeys=pq),
        signed_prekey_created_at=created_at,
        has_pq_last_resort=bool(has_last_resort),
    )


def take_bundle(conn: sqlite3.Connection, account: str, device: int | None) -> Bundle | None:
    with write(conn):
        row = conn.execute("SELECT identity_key FROM accounts WHERE id = ?", (account,)).fetchone()
        if row is None:
            return None
        if device is None:
            devices = [
                d
                for (d,) in conn.execute(
                    "SELECT device FROM devices WHERE account = ? AND revoked_at IS NULL"
                    " ORDER BY device",
                    (account,),
                )
            ]
        elif _is_active(conn, account, device):
            devices = [device]
        else:
            return None
        bundles = tuple(_take_device_bundle(conn, account, d) for d in devices)
    return Bundle(identity_key=bytes(row[0]), devices=bundles)


def _take_device_bundle(conn: sqlite3.Connection, account: str, device: int) -> DeviceBundle:
    signed = {
        kind: SignedKey(key_id, bytes(public_key), bytes(signature))
        for kind, key_id, public_key, signature in conn.execute(
            "SELECT kind, key_id, public_key, signature FROM signed_prekeys"
            " WHERE account = ? AND device = ?",
            (account, device),
        )
    }
    one_time = _take_one_time(conn, account, device, "ec")
    pq = _take_one_time(conn, account, device, "pq")
    last_resort = pq is None and "pqlr" in signed
    if last_resort:
        key = signed["pqlr"]
        pq = OneTimeKey(key.key_id, key.public_key, key.signature)
    return DeviceBundle(
        device=device,
        signed_prekey=signed.get("spk"),
        one_time_prekey=one_time,
        pq_prekey=pq,
        pq_last_resort=last_resort,
    )


def _take_one_time(
    conn: sqlite3.Connection, account: str, device: int, kind: str
) -> OneTimeKey | None:
    rows = conn.execute(_TAKE_ONE_TIME, (account, device, kind)).fetchall()
    if not rows:
        return None
    key_id, public_key, signature = rows[0]
    return OneTimeKey(key_id, bytes(public_key), None if signature is None else bytes(signature))


def count_stale_signed_prekeys(conn: sqlite3.Connection, older_than: float) -> int:
    (count,) = conn.execute(
        "SELECT count(*) FROM signed_prekeys AS k"
        " JOIN devices AS d ON d.account = k.account AND d.device = k.device"
        " WHERE k.kind = 'spk' AND k.created_at < ? AND d.revoked_at IS NULL",
        (older_than,),
    ).fetchone()
    return int(count)


def _counts(conn: sqlite3.Connection, account: str, device: int) -> KeyCounts:
    ec, pq = conn.execute(_COUNTS, {"a": account, "d": device}).fetchone()
    return KeyCounts(one_time_prekeys=ec, pq_one_time_prekeys=pq)


def _is_active(conn: sqlite3.Connection, account: str, device: int) -> bool:
    row = conn.execute(
        "SELECT 1 FROM devices WHERE account = ? AND device = ? AND revoked_at IS NULL",
        (account, device),
    ).fetchone()
    return row is not None
