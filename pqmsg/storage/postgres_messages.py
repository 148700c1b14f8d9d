"""PostgreSQL queries for the message queue: send, fetch, ack, idempotency.

A send is one transaction, durable on return (``synchronous_commit`` on):

1. claim ``(sender, id)`` in ``sent_messages`` with ``INSERT ... ON CONFLICT
   DO NOTHING``; a concurrent duplicate waits on the unique index for the
   first one's outcome and then reads its result;
2. lock the recipient's account row ``FOR SHARE`` (membership changes take
   it ``FOR UPDATE``) and compare the copies with the active devices;
3. insert the copies and raise the PQ epochs, counting the advances;
4. record the result on the claim.

Fetch walks the ``(recipient, seq)`` index and ack deletes by primary key,
so neither slows down as the table grows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from pqmsg.errors import BadRequest, DeviceMismatch, NotFound
from pqmsg.storage.base import OutgoingCopy, QueuedMessage, Sender, StoreResult
from pqmsg.storage.pgbridge import PgConnection, rows_affected

_CLAIM = """
INSERT INTO sent_messages (sender_account, message_id, created_at) VALUES ($1, $2, $3)
ON CONFLICT (sender_account, message_id) DO NOTHING
RETURNING true
"""

INSERT_COPIES_SQL = """
INSERT INTO messages (id, recipient_account, recipient_device, sender_account, sender_device,
                      ciphertext, pq_epoch, server_ts)
SELECT c.id, $1, c.device, $2, $3, c.ciphertext, c.pq_epoch, $4
FROM unnest($5::uuid[], $6::integer[], $7::bytea[], $8::bigint[]) WITH ORDINALITY
     AS c(id, device, ciphertext, pq_epoch, ord)
ORDER BY c.ord
"""

# Counts the pairs whose stored epoch grew, including pairs seen the first time.
_RAISE_EPOCHS = """
WITH incoming AS (
    SELECT e.device, max(e.epoch) AS epoch
    FROM unnest($4::integer[], $5::bigint[]) AS e(device, epoch)
    WHERE e.epoch IS NOT NULL
    GROUP BY e.device
), raised AS (
    INSERT INTO pq_epochs (recipient_account, recipient_device, sender_account, sender_device, epoch)
    SELECT $1, device, $2, $3, epoch FROM incoming
    ON CONFLICT (recipient_account, recipient_device, sender_account, sender_device)
    DO UPDATE SET epoch = EXCLUDED.epoch WHERE pq_epochs.epoch < EXCLUDED.epoch
    RETURNING 1
)
SELECT count(*) FROM raised
"""

# The oldest queued copies of one device: a walk along messages_queue.
FETCH_SQL = """
SELECT id, sender_account, sender_device, ciphertext, pq_epoch, server_ts
FROM messages WHERE recipient_account = $1 AND recipient_device = $2
ORDER BY seq LIMIT $3
"""

# Acked copies, found by primary key; another device's ids match nothing.
ACK_SQL = """
DELETE FROM messages
WHERE id = ANY($3::uuid[]) AND recipient_account = $1 AND recipient_device = $2
"""

_RECORD = """
UPDATE sent_messages SET stored = $3, ratchet_advances = $4, devices = $5
WHERE sender_account = $1 AND message_id = $2
"""


async def store_messages(
    con: PgConnection,
    sender: Sender,
    message_id: str,
    recipient: str,
    copies: Sequence[OutgoingCopy],
    *,
    now: float,
    idempotency_window_s: float,
) -> StoreResult:
    addressed = [c.device for c in copies]
    if len(set(addressed)) != len(addressed):
        raise BadRequest("a device is addressed twice")
    async with con.transaction():
        first = await _claim(con, sender, message_id, now=now, window_s=idempotency_window_s)
        if first is not None:
            return first
        await _check_devices(con, recipient, copies)
        devices = [c.device for c in copies]
        epochs = [c.pq_epoch for c in copies]
        await con.execute(
            INSERT_COPIES_SQL,
            recipient,
            sender.account,
            sender.device,
            now,
            [str(uuid.uuid4()) for _ in copies],
            devices,
            [c.ciphertext for c in copies],
            epochs,
        )
        advances: int = await con.fetchval(
            _RAISE_EPOCHS, recipient, sender.account, sender.device, devices, epochs
        )
        await con.execute(_RECORD, sender.account, message_id, len(copies), advances, devices)
    return StoreResult(
        stored=len(copies), duplicate=False, ratchet_advances=advances, devices=tuple(devices)
    )


async def _claim(
    con: PgConnection, sender: Sender, message_id: str, *, now: float, window_s: float
) -> StoreResult | None:
    """Claim the send id; returns the first result if it was already sent."""
    # A record older than the window no longer counts (purge may lag).
    await con.execute(
        "DELETE FROM sent_messages WHERE sender_account = $1 AND message_id = $2"
        " AND created_at < $3",
        sender.account,
        message_id,
        now - window_s,
    )
    if await con.fetchval(_CLAIM, sender.account, message_id, now):
        return None
    row = await con.fetchrow(
        "SELECT stored, ratchet_advances, devices FROM sent_messages"
        " WHERE sender_account = $1 AND message_id = $2",
        sender.account,
        message_id,
    )
    assert row is not None  # the conflicting claim is committed, so visible
    return StoreResult(
        stored=row["stored"],
        duplicate=True,
        ratchet_advances=row["ratchet_advances"],
        devices=tuple(row["devices"]),
    )


async def _check_devices(con: PgConnection, recipient: str, copies: Sequence[OutgoingCopy]) -> None:
    exists = await con.fetchval("SELECT true FROM accounts WHERE account = $1 FOR SHARE", recipient)
    if exists is None:
        raise NotFound("no such recipient")
    rows = await con.fetch(
        "SELECT device FROM devices WHERE account = $1 AND revoked_at IS NULL", recipient
    )
    active = {row["device"] for row in rows}
    addressed = {c.device for c in copies}
    if addressed != active:
        raise DeviceMismatch(missing=sorted(active - addressed), extra=sorted(addressed - active))


async def fetch_messages(
    con: PgConnection, account: str, device: int, *, limit: int
) -> tuple[tuple[QueuedMessage, ...], bool]:
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    rows = await con.fetch(
        FETCH_SQL,
        account,
        device,
        limit + 1,
    )
    messages = tuple(
        QueuedMessage(
            id=str(row["id"]),
            sender=Sender(account=str(row["sender_account"]), device=row["sender_device"]),
            ciphertext=row["ciphertext"],
            pq_epoch=row["pq_epoch"],
            server_ts=row["server_ts"],
        )
        for row in rows[:limit]
    )
    return messages, len(rows) > limit


async def ack_messages(con: PgConnection, account: str, device: int, ids: Sequence[str]) -> int:
    wanted = [parsed for parsed in map(_uuid_or_none, ids) if parsed is not None]
    if not wanted:
        return 0
    return rows_affected(await con.execute(ACK_SQL, account, device, wanted))


def _uuid_or_none(text: str) -> str | None:
    """The canonical form of a message id; None for what cannot be one."""
    try:
        return str(uuid.UUID(text))
    except (ValueError, TypeError):
        return None


async def purge_idempotency(con: PgConnection, *, older_than: float) -> int:
    status = await con.execute("DELETE FROM sent_messages WHERE created_at < $1", older_than)
    return rows_affected(status)
