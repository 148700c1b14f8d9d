"""PostgreSQL queries for the message queue: send, fetch, ack, idempotency.

A send is one round trip: the ``store_messages`` database function
(migration ``0002``) runs, atomically and durable on return
(``synchronous_commit`` on):

0. given the sender's key (migration ``0004``), refuse the send unless the
   sending device is active with that key (fetch and ack, given the
   device's key, make the same check in their own statement);
1. lock the recipient's account row ``FOR SHARE`` (membership changes take
   it ``FOR UPDATE``) and read the active devices;
2. return the first result of an earlier send with this id, if any;
3. refuse an unknown recipient or copies that do not address exactly the
   active devices, having written nothing;
4. claim ``(sender, id)`` in ``sent_messages`` with ``INSERT ... ON
   CONFLICT DO NOTHING``; a concurrent duplicate waits on the unique index
   for the first one's outcome and then reads its result;
5. insert the copies and raise the PQ epochs, counting the advances;
6. record the result on the claim.

The refusals come back as an outcome with their details rather than as
database errors, and are raised here as the contract's errors. Several
statements inside one ``BEGIN ... COMMIT`` cost a round trip (and a
crossing of the trio-asyncio bridge) each; the function costs one. Every
function here is one statement, so the storage runs them on the pool's
one-shot methods: acquire, statement and release in one crossing.

Concurrent sends go further: :func:`store_messages_batch` runs several in
one statement (``store_messages_batch``, migration ``0003``), in lock order
(:meth:`StoreCall.lock_order`), each answered with its own outcome.

Fetch walks the ``(recipient, seq)`` index and ack deletes by primary key,
so neither slows down as the table grows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import attrs
import outcome

from pqmsg.errors import BadRequest, DeviceMismatch, NotFound, device_reject
from pqmsg.storage.base import OutgoingCopy, QueuedMessage, Sender, StoreResult
from pqmsg.storage.pgbridge import PgQueries, Row, rows_affected

# One send, atomically; see the module docstring. Copy ids (uuid4) are made here.
# The last argument is the sender's key to re-check, or NULL (migration 0004).
STORE_SQL = """
SELECT outcome, stored_count, advances, stored_devices, missing, extra
FROM store_messages($1, $2, $3, $4, $5, $6, $7::uuid[], $8::integer[], $9::bytea[], $10::bigint[],
                    $11::bytea)
"""

# device_refusal()'s answers (migration 0004), as §3's reject reasons.
DEVICE_REFUSALS = {
    "device_unknown": "unknown_device",
    "device_revoked": "revoked",
    "device_key": "signature",
}

# Several sends in one statement (migration 0003); one row per send, by position.
STORE_BATCH_SQL = """
SELECT item, outcome, stored_count, advances, stored_devices, missing, extra
FROM store_messages_batch($1::uuid[], $2::integer[], $3::text[], $4::uuid[],
                          $5::double precision[], $6::double precision[], $7::integer[],
                          $8::uuid[], $9::integer[], $10::bytea[], $11::bigint[],
                          $12::bytea[])
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

# FETCH_SQL for a device that must still sign with the key $4: one row
# with the refusal and no message, or the messages (or one empty row).
FETCH_CHECKED_SQL = """
WITH checked AS (SELECT device_refusal($1, $2, $4) AS refusal)
SELECT c.refusal, m.id, m.sender_account, m.sender_device, m.ciphertext, m.pq_epoch, m.server_ts
FROM checked c
LEFT JOIN LATERAL (
    SELECT id, sender_account, sender_device, ciphertext, pq_epoch, server_ts, seq
    FROM messages
    WHERE recipient_account = $1 AND recipient_device = $2 AND c.refusal IS NULL
    ORDER BY seq LIMIT $3
) m ON true
ORDER BY m.seq
"""

# ACK_SQL for a device that must still sign with the key $4; a refusal deletes nothing.
ACK_CHECKED_SQL = """
WITH checked AS (SELECT device_refusal($1, $2, $4) AS refusal),
gone AS (
    DELETE FROM messages
    WHERE id = ANY($3::uuid[]) AND recipient_account = $1 AND recipient_device = $2
      AND (SELECT refusal FROM checked) IS NULL
    RETURNING 1
)
SELECT (SELECT refusal FROM checked) AS refusal, (SELECT count(*) FROM gone) AS acked
"""


@attrs.frozen
class StoreCall:
    """One send's arguments; the storage checks them with :func:`check_copies` before queueing."""

    sender: Sender
    message_id: str
    recipient: str
    copies: Sequence[OutgoingCopy]
    now: float
    idempotency_window_s: float
    #: The key the sender's signature verified with, re-checked at the store; or None.
    sender_key: bytes | None = None

    def lock_order(self) -> tuple[str, str, int, str]:
        """Batches run their sends in this order, so they take shared rows in one order."""
        return (self.recipient, self.sender.account, self.sender.device, self.message_id)


def check_copies(copies: Sequence[OutgoingCopy]) -> None:
    """Refuse what the database function cannot be asked: a device addressed twice."""
    addressed = [c.device for c in copies]
    if len(set(addressed)) != len(addressed):
        raise BadRequest("a device is addressed twice")


async def store_messages_batch(
    con: PgQueries, calls: Sequence[StoreCall]
) -> list[outcome.Outcome[StoreResult]]:
    """Several sends in one statement; each send's result or its own refusal.

    The sends run in :meth:`StoreCall.lock_order`; the outcomes come back in
    the order of ``calls``. Raises (and has stored nothing) if the statement
    fails: the caller runs the sends again one by one.
    """
    order = sorted(range(len(calls)), key=lambda index: calls[index].lock_order())
    bounds = [0]
    ids: list[str] = []
    devices: list[int] = []
    ciphertexts: list[bytes] = []
    epochs: list[int | None] = []
    for index in order:
        for copy in calls[index].copies:
            ids.append(str(uuid.uuid4()))
            devices.append(copy.device)
            ciphertexts.append(copy.ciphertext)
            epochs.append(copy.pq_epoch)
        bounds.append(len(ids))
    ordered = [calls[index] for index in order]
    rows = await con.fetch(
        STORE_BATCH_SQL,
        [c.sender.account for c in ordered],
        [c.sender.device for c in ordered],
        [c.message_id for c in ordered],
        [c.recipient for c in ordered],
        [c.now for c in ordered],
        [c.now - c.idempotency_window_s for c in ordered],
        bounds,
        ids,
        devices,
        ciphertexts,
        epochs,
        [c.sender_key for c in ordered],
    )
    if len(rows) != len(calls):
        raise RuntimeError(f"store_messages_batch answered {len(rows)} rows for {len(calls)} sends")
    results: list[outcome.Outcome[StoreResult]] = [outcome.Error(RuntimeError("unanswered"))] * len(
        calls
    )
    for row in rows:
        results[order[row["item"] - 1]] = outcome.capture(_store_result, row)
    return results


async def store_messages(con: PgQueries, call: StoreCall) -> StoreResult:
    """One send in one statement; its result, or its refusal as the contract's error."""
    row = await con.fetchrow(
        STORE_SQL,
        call.sender.account,
        call.sender.device,
        call.message_id,
        call.recipient,
        call.now,
        call.now - call.idempotency_window_s,
        [str(uuid.uuid4()) for _ in call.copies],
        [c.device for c in call.copies],
        [c.ciphertext for c in call.copies],
        [c.pq_epoch for c in call.copies],
        call.sender_key,
    )
    assert row is not None  # the function always returns its one row
    return _store_result(row)


def _store_result(row: Row) -> StoreResult:
    """The function's answer as a result, or as the contract's error for a refusal."""
    outcome = row["outcome"]
    if outcome in DEVICE_REFUSALS:
        raise device_reject(DEVICE_REFUSALS[outcome])
    if outcome == "no_recipient":
        raise NotFound("no such recipient")
    if outcome == "device_mismatch":
        raise DeviceMismatch(missing=list(row["missing"]), extra=list(row["extra"]))
    if outcome not in ("stored", "duplicate"):
        raise RuntimeError(f"store_messages answered an unknown outcome {outcome!r}")
    return StoreResult(
        stored=row["stored_count"],
        duplicate=outcome == "duplicate",
        ratchet_advances=row["advances"],
        devices=tuple(row["stored_devices"]),
    )


async def fetch_messages(
    con: PgQueries, account: str, device: int, *, limit: int, device_key: bytes | None = None
) -> tuple[tuple[QueuedMessage, ...], bool]:
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if device_key is None:
        rows = await con.fetch(FETCH_SQL, account, device, limit + 1)
    else:
        rows = await con.fetch(FETCH_CHECKED_SQL, account, device, limit + 1, device_key)
        _raise_refusal(rows[0]["refusal"])
        rows = [row for row in rows if row["id"] is not None]
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


async def ack_messages(
    con: PgQueries, account: str, device: int, ids: Sequence[str], *,
    device_key: bytes | None = None,
) -> int:
    wanted = [parsed for parsed in map(_uuid_or_none, ids) if parsed is not None]
    if device_key is not None:
        row = await con.fetchrow(ACK_CHECKED_SQL, account, device, wanted, device_key)
        assert row is not None  # the statement always answers one row
        _raise_refusal(row["refusal"])
        return int(row["acked"])
    if not wanted:
        return 0
    return rows_affected(await con.execute(ACK_SQL, account, device, wanted))


def _raise_refusal(refusal: str | None) -> None:
    """device_refusal()'s answer as the contract's 401, if it refused."""
    if refusal is not None:
        raise device_reject(DEVICE_REFUSALS[refusal])


def _uuid_or_none(text: str) -> str | None:
    """The canonical form of a message id; None for what cannot be one."""
    try:
        return str(uuid.UUID(text))
    except (ValueError, TypeError):
        return None


async def purge_idempotency(con: PgQueries, *, older_than: float) -> int:
    status = await con.execute("DELETE FROM sent_messages WHERE created_at < $1", older_than)
    return rows_affected(status)
