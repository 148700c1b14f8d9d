"""PostgreSQL queries for accounts, devices, provisioning tokens and push targets.

Functions of several statements run on a borrowed
:class:`~pqmsg.storage.pgbridge.PgConnection` and keep multi-row changes in
one transaction; those of one statement take any
:class:`~pqmsg.storage.pgbridge.PgQueries`, so the storage passes the pool
and the call costs one crossing of the bridge. Membership changes (linking,
revoking, deleting the account) lock the account row ``FOR UPDATE``; a send
locks it ``FOR SHARE`` (see :mod:`pqmsg.storage.postgres_messages`), so a
send's device-set check never races a change of that set.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from pqmsg.errors import Conflict, Forbidden, NotFound
from pqmsg.storage.base import (
    DeviceAuth,
    DeviceInfo,
    NewDevice,
    ProvisioningGrant,
    PushTarget,
)
from pqmsg.storage.pgbridge import PgConnection, PgQueries, rows_affected

_INSERT_DEVICE = """
INSERT INTO devices (account, device, device_key, certificate, name, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""


async def create_account(
    con: PgConnection, account: str, identity_key: bytes, device: NewDevice, *, now: float
) -> None:
    async with con.transaction():
        try:
            await con.execute(
                "INSERT INTO accounts (account, identity_key, created_at) VALUES ($1, $2, $3)",
                account,
                identity_key,
                now,
            )
        except asyncpg.UniqueViolationError as exc:
            raise Conflict("the account already exists", reason="account_exists") from exc
        await con.execute(
            _INSERT_DEVICE, account, 1, device.device_key, device.certificate, device.name, now
        )


async def delete_account(con: PgConnection, account: str) -> tuple[int, ...]:
    async with con.transaction():
        # The account row first, as every membership change takes it: taking
        # the sender-side rows below first could deadlock with a revocation.
        await con.execute("SELECT 1 FROM accounts WHERE account = $1 FOR UPDATE", account)
        rows = await con.fetch(
            "SELECT device FROM devices WHERE account = $1 ORDER BY device", account
        )
        # Rows keyed by the sender have no foreign key; the rest cascades.
        await con.execute("DELETE FROM pq_epochs WHERE sender_account = $1", account)
        await con.execute("DELETE FROM sent_messages WHERE sender_account = $1", account)
        await con.execute("DELETE FROM accounts WHERE account = $1", account)
    return tuple(row["device"] for row in rows)


async def get_identity_key(con: PgQueries, account: str) -> bytes | None:
    key: bytes | None = await con.fetchval(
        "SELECT identity_key FROM accounts WHERE account = $1", account
    )
    return key


async def get_device_auth(con: PgQueries, account: str, device: int) -> DeviceAuth | None:
    row = await con.fetchrow(
        "SELECT device_key, revoked_at, last_seen_at FROM devices"
        " WHERE account = $1 AND device = $2",
        account,
        device,
    )
    if row is None:
        return None
    return DeviceAuth(
        device_key=row["device_key"],
        revoked=row["revoked_at"] is not None,
        last_seen_at=row["last_seen_at"],
    )


# Several devices' lookups in one statement; a device that does not exist has no row.
DEVICE_AUTH_MANY_SQL = """
SELECT k.ord, d.device_key, d.revoked_at, d.last_seen_at
FROM unnest($1::uuid[], $2::integer[]) WITH ORDINALITY AS k(account, device, ord)
JOIN devices d ON d.account = k.account AND d.device = k.device
"""


async def get_device_auth_many(
    con: PgQueries, wanted: Sequence[tuple[str, int]]
) -> list[DeviceAuth | None]:
    """:func:`get_device_auth` for several devices at once, in the order asked."""
    rows = await con.fetch(
        DEVICE_AUTH_MANY_SQL, [account for account, _ in wanted], [device for _, device in wanted]
    )
    found: list[DeviceAuth | None] = [None] * len(wanted)
    for row in rows:
        found[row["ord"] - 1] = DeviceAuth(
            device_key=row["device_key"],
            revoked=row["revoked_at"] is not None,
            last_seen_at=row["last_seen_at"],
        )
    return found


async def touch_device(con: PgQueries, account: str, device: int, *, now: float) -> None:
    # GREATEST: a late, slower request must not move last_seen_at back.
    await con.execute(
        "UPDATE devices SET last_seen_at = GREATEST(coalesce(last_seen_at, $3), $3)"
        " WHERE account = $1 AND device = $2 AND revoked_at IS NULL",
        account,
        device,
        now,
    )


async def list_devices(con: PgQueries, account: str) -> tuple[DeviceInfo, ...]:
    rows = await con.fetch(
        "SELECT device, name, created_at, last_seen_at FROM devices"
        " WHERE account = $1 AND revoked_at IS NULL ORDER BY device",
        account,
    )
    return tuple(
        DeviceInfo(
            device=row["device"],
            name=row["name"],
            created_at=row["created_at"],
            last_seen_at=row["last_seen_at"],
        )
        for row in rows
    )


async def active_device_ids(con: PgQueries, account: str) -> tuple[int, ...]:
    rows = await con.fetch(
        "SELECT device FROM devices WHERE account = $1 AND revoked_at IS NULL ORDER BY device",
        account,
    )
    return tuple(row["device"] for row in rows)


# What a revoked device loses: keys, push token, queue and ratchet state.
_REVOKE_DELETES = (
    "DELETE FROM signed_prekeys WHERE account = $1 AND device = $2",
    "DELETE FROM one_time_prekeys WHERE account = $1 AND device = $2",
    "DELETE FROM push_targets WHERE account = $1 AND device = $2",
    "DELETE FROM messages WHERE recipient_account = $1 AND recipient_device = $2",
    "DELETE FROM pq_epochs WHERE recipient_account = $1 AND recipient_device = $2",
    "DELETE FROM pq_epochs WHERE sender_account = $1 AND sender_device = $2",
)


async def revoke_device(con: PgConnection, account: str, device: int, *, now: float) -> bool:
    async with con.transaction():
        await con.execute("SELECT 1 FROM accounts WHERE account = $1 FOR UPDATE", account)
        revoked = await con.fetchval(
            "UPDATE devices SET revoked_at = $3"
            " WHERE account = $1 AND device = $2 AND revoked_at IS NULL RETURNING device",
            account,
            device,
            now,
        )
        if revoked is None:
            return False
        for statement in _REVOKE_DELETES:
            await con.execute(statement, account, device)
        # Tokens do not record which device minted them, so all of the
        # account's go: a revoked (perhaps stolen) device must not link a
        # replacement through a token it minted.
        await con.execute("DELETE FROM provisioning_tokens WHERE account = $1", account)
    return True


async def create_provisioning_token(
    con: PgQueries, account: str, token_hash: bytes, *, expires_at: float
) -> None:
    status = await con.execute(
        "INSERT INTO provisioning_tokens (token_hash, account, expires_at)"
        " SELECT $1, account, $3 FROM accounts WHERE account = $2",
        token_hash,
        account,
        expires_at,
    )
    if rows_affected(status) == 0:
        raise NotFound("no such account")


async def get_provisioning_grant(
    con: PgQueries, token_hash: bytes, *, now: float
) -> ProvisioningGrant | None:
    row = await con.fetchrow(
        "SELECT t.account, a.identity_key, t.expires_at"
        " FROM provisioning_tokens t JOIN accounts a USING (account)"
        " WHERE t.token_hash = $1 AND NOT t.used AND t.expires_at > $2",
        token_hash,
        now,
    )
    if row is None:
        return None
    return ProvisioningGrant(
        account=str(row["account"]), identity_key=row["identity_key"], expires_at=row["expires_at"]
    )


async def link_device(
    con: PgConnection, token_hash: bytes, device: NewDevice, *, now: float
) -> int:
    async with con.transaction():
        # Locks in the order revocation takes them, account row first, then
        # the token: the opposite order deadlocks against revoke_device.
        account = await con.fetchval(
            "SELECT account FROM provisioning_tokens WHERE token_hash = $1", token_hash
        )
        new_id: int | None = None
        if account is not None:
            new_id = await con.fetchval(
                "UPDATE accounts SET next_device = next_device + 1"
                " WHERE account = $1 RETURNING next_device - 1",
                account,
            )
        # Checks and consumes at once: of two concurrent links with one
        # token, the second waits for the first, then finds it used. A
        # refusal rolls back, so it burns no device id.
        consumed = await con.fetchval(
            "UPDATE provisioning_tokens SET used = true"
            " WHERE token_hash = $1 AND NOT used AND expires_at > $2 RETURNING true",
            token_hash,
            now,
        )
        if new_id is None or not consumed:
            raise Forbidden(
                "the provisioning token is unknown, used or expired", reason="provisioning_token"
            )
        await con.execute(
            _INSERT_DEVICE, account, new_id, device.device_key, device.certificate, device.name, now
        )
        # Keeps the table small: the account's other spent tokens go now.
        await con.execute(
            "DELETE FROM provisioning_tokens"
            " WHERE account = $1 AND token_hash <> $2 AND (used OR expires_at <= $3)",
            account,
            token_hash,
            now,
        )
    return new_id


async def set_push_target(con: PgQueries, account: str, device: int, target: PushTarget) -> None:
    """Set the device's push target; a no-op for unknown or revoked devices."""
    await con.execute(
        "INSERT INTO push_targets (account, device, provider, token)"
        " SELECT account, device, $3, $4 FROM devices"
        " WHERE account = $1 AND device = $2 AND revoked_at IS NULL"
        " ON CONFLICT (account, device)"
        " DO UPDATE SET provider = EXCLUDED.provider, token = EXCLUDED.token",
        account,
        device,
        target.provider,
        target.token,
    )


async def delete_push_target(con: PgQueries, account: str, device: int) -> bool:
    status = await con.execute(
        "DELETE FROM push_targets WHERE account = $1 AND device = $2", account, device
    )
    return rows_affected(status) > 0


async def get_push_target(con: PgQueries, account: str, device: int) -> PushTarget | None:
    row = await con.fetchrow(
        "SELECT provider, token FROM push_targets WHERE account = $1 AND device = $2",
        account,
        device,
    )
    if row is None:
        return None
    return PushTarget(provider=row["provider"], token=row["token"])


async def drop_push_token(con: PgQueries, target: PushTarget) -> int:
    status = await con.execute(
        "DELETE FROM push_targets WHERE provider = $1 AND token = $2",
        target.provider,
        target.token,
    )
    return rows_affected(status)
