"""PostgreSQL queries for prekeys: upload, status and the one-time hand-out.

Hand-out is exactly-once under concurrency: one ``DELETE ... RETURNING``
whose victims are picked ``FOR UPDATE SKIP LOCKED``, so two concurrent
fetches lock (and so receive) different keys, and a key is gone the moment
it is returned.
"""

from __future__ import annotations

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
from pqmsg.storage.pgbridge import PgConnection, PgQueries, Row

# Kinds as stored: signed X25519 prekey and ML-KEM last-resort key; one-time
# X25519 and ML-KEM keys.
SIGNED_EC = "spk"
PQ_LAST_RESORT = "pqlr"
ONE_TIME_EC = "ec"
ONE_TIME_PQ = "pq"

_INSERT_ONE_TIME = """
INSERT INTO one_time_prekeys (account, device, kind, key_id, public_key, signature)
SELECT $1, $2, $3, k.key_id, k.public_key, k.signature
FROM unnest($4::bigint[], $5::bytea[], $6::bytea[]) WITH ORDINALITY
     AS k(key_id, public_key, signature, ord)
ORDER BY k.ord
"""

_UPSERT_SIGNED = """
INSERT INTO signed_prekeys (account, device, kind, key_id, public_key, signature, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (account, device, kind) DO UPDATE
SET key_id = EXCLUDED.key_id, public_key = EXCLUDED.public_key,
    signature = EXCLUDED.signature, created_at = EXCLUDED.created_at
"""

_COUNTS = """
SELECT count(*) FILTER (WHERE kind = 'ec') AS ec, count(*) FILTER (WHERE kind = 'pq') AS pq
FROM one_time_prekeys WHERE account = $1 AND device = $2
"""

# For each requested device and kind, the oldest key nobody else holds.
_TAKE_ONE_TIME = """
DELETE FROM one_time_prekeys o
USING (
    SELECT pick.device, pick.kind, pick.key_id
    FROM unnest($2::integer[]) AS d(device)
    CROSS JOIN (VALUES ('ec'), ('pq')) AS kinds(kind)
    CROSS JOIN LATERAL (
        SELECT device, kind, key_id FROM one_time_prekeys
        WHERE account = $1 AND device = d.device AND kind = kinds.kind
        ORDER BY seq LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) AS pick
) AS taken
WHERE o.account = $1 AND o.device = taken.device AND o.kind = taken.kind
  AND o.key_id = taken.key_id
RETURNING o.device, o.kind, o.key_id, o.public_key, o.signature
"""


async def put_keys(
    con: PgConnection,
    account: str,
    device: int,
    upload: KeyUpload,
    *,
    max_per_kind: int,
    now: float,
) -> KeyCounts:
    pools = ((ONE_TIME_EC, upload.one_time_prekeys), (ONE_TIME_PQ, upload.pq_one_time_prekeys))
    for _kind, keys in pools:
        if len({k.key_id for k in keys}) != len(keys):
            raise Conflict("a one-time prekey id appears twice", reason="duplicate_prekey")
    async with con.transaction():
        # Serialise uploads per device so the limit check holds (NO KEY
        # UPDATE leaves foreign-key checks of concurrent sends unblocked).
        locked = await con.fetchval(
            "SELECT 1 FROM devices WHERE account = $1 AND device = $2 AND revoked_at IS NULL"
            " FOR NO KEY UPDATE",
            account,
            device,
        )
        if locked is None:
            raise NotFound("no such device")
        for kind, keys in pools:
            await _check_one_time(con, account, device, kind, keys, max_per_kind=max_per_kind)
        for kind, keys in pools:
            if keys:
                await con.execute(
                    _INSERT_ONE_TIME,
                    account,
                    device,
                    kind,
                    [k.key_id for k in keys],
                    [k.public_key for k in keys],
                    [k.signature for k in keys],
                )
        for kind, signed in (
            (SIGNED_EC, upload.signed_prekey),
            (PQ_LAST_RESORT, upload.pq_last_resort),
        ):
            if signed is not None:
                await con.execute(
                    _UPSERT_SIGNED,
                    account,
                    device,
                    kind,
                    signed.key_id,
                    signed.public_key,
                    signed.signature,
                    now,
                )
        return await _counts(con, account, device)


async def _check_one_time(
    con: PgConnection,
    account: str,
    device: int,
    kind: str,
    keys: Sequence[OneTimeKey],
    *,
    max_per_kind: int,
) -> None:
    if not keys:
        return
    ids = [k.key_id for k in keys]
    row = await con.fetchrow(
        "SELECT count(*) AS stored, count(*) FILTER (WHERE key_id = ANY($4::bigint[])) AS clashes"
        " FROM one_time_prekeys WHERE account = $1 AND device = $2 AND kind = $3",
        account,
        device,
        kind,
        ids,
    )
    assert row is not None  # an aggregate always returns one row
    if row["stored"] + len(keys) > max_per_kind:
        raise Conflict(
            f"at most {max_per_kind} one-time prekeys of a kind may be stored",
            reason="prekey_limit",
        )
    if row["clashes"]:
        raise Conflict("a one-time prekey id is already stored", reason="duplicate_prekey")


async def _counts(con: PgConnection, account: str, device: int) -> KeyCounts:
    row = await con.fetchrow(_COUNTS, account, device)
    assert row is not None  # an aggregate always returns one row
    return KeyCounts(one_time_prekeys=row["ec"], pq_one_time_prekeys=row["pq"])


async def key_status(con: PgConnection, account: str, device: int) -> KeyStatus:
    counts = await _counts(con, account, device)
    rows = await con.fetch(
        "SELECT kind, created_at FROM signed_prekeys WHERE account = $1 AND device = $2",
        account,
        device,
    )
    created = {row["kind"]: row["created_at"] for row in rows}
    return KeyStatus(
        counts=counts,
        signed_prekey_created_at=created.get(SIGNED_EC),
        has_pq_last_resort=PQ_LAST_RESORT in created,
    )


async def take_bundle(con: PgConnection, account: str, device: int | None) -> Bundle | None:
    identity_key = await con.fetchval(
        "SELECT identity_key FROM accounts WHERE account = $1", account
    )
    if identity_key is None:
        return None
    rows = await con.fetch(
        "SELECT device FROM devices WHERE account = $1 AND revoked_at IS NULL"
        " AND ($2::integer IS NULL OR device = $2) ORDER BY device",
        account,
        device,
    )
    devices = [row["device"] for row in rows]
    if device is not None and not devices:
        return None
    signed = await con.fetch(
        "SELECT device, kind, key_id, public_key, signature FROM signed_prekeys"
        " WHERE account = $1 AND device = ANY($2::integer[])",
        account,
        devices,
    )
    taken = await con.fetch(_TAKE_ONE_TIME, account, devices) if devices else []
    return Bundle(
        identity_key=identity_key,
        devices=tuple(_device_bundle(d, signed, taken) for d in devices),
    )


def _device_bundle(device: int, signed: list[Row], taken: list[Row]) -> DeviceBundle:
    signed_keys = {
        row["kind"]: SignedKey(row["key_id"], row["public_key"], row["signature"])
        for row in signed
        if row["device"] == device
    }
    one_time = {
        row["kind"]: OneTimeKey(row["key_id"], row["public_key"], row["signature"])
        for row in taken
        if row["device"] == device
    }
    pq_prekey = one_time.get(ONE_TIME_PQ)
    last_resort = signed_keys.get(PQ_LAST_RESORT)
    served_last_resort = pq_prekey is None and last_resort is not None
    if served_last_resort:
        assert last_resort is not None
        pq_prekey = OneTimeKey(last_resort.key_id, last_resort.public_key, last_resort.signature)
    return DeviceBundle(
        device=device,
        signed_prekey=signed_keys.get(SIGNED_EC),
        one_time_prekey=one_time.get(ONE_TIME_EC),
        pq_prekey=pq_prekey,
        pq_last_resort=served_last_resort,
    )


async def count_stale_signed_prekeys(con: PgQueries, *, older_than: float) -> int:
    count: int = await con.fetchval(
        "SELECT count(*) FROM signed_prekeys s JOIN devices d USING (account, device)"
        " WHERE s.kind = 'spk' AND s.created_at < $1 AND d.revoked_at IS NULL",
        older_than,
    )
    return count
