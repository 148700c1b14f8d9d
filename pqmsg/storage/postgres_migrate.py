"""PostgreSQL schema migrations: applied at start-up or by ``pqmsg migrate``.

Several replicas may start at once, so each migration is applied in its own
transaction that first takes a transaction-scoped advisory lock and then
re-reads the recorded version: the replicas queue on the lock, the first one
applies, the others find nothing left to do. The lock is released with the
transaction, so a cancelled or crashed migrator never leaves it held.
"""

from __future__ import annotations

import logging

import trio_asyncio

from pqmsg.aioloop import open_aio_loop
from pqmsg.settings import StorageSettings
from pqmsg.storage.migrate import Migration, load_migrations, pending
from pqmsg.storage.pgbridge import PgConnection, PgPool, open_pg_pool

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key: "pqmsg" as a number, shared by every replica.
MIGRATION_LOCK_KEY = 0x7071_6D73_67

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def applied_version(con: PgConnection) -> int:
    """The highest migration recorded (0 on an empty database)."""
    exists = await con.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def _apply_next(con: PgConnection, migrations: tuple[Migration, ...]) -> bool:
    """Apply the next pending migration under the lock; False if none was left."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await con.execute(_CREATE_TABLE)
        todo = pending(migrations, await applied_version(con))
        if not todo:
            return False
        migration = todo[0]
        await con.execute(migration.sql)
        await con.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )
    logger.info("applied migration %04d_%s", migration.version, migration.name)
    return True


async def apply_migrations(pool: PgPool) -> int:
    """Apply every pending PostgreSQL migration; returns how many this call applied."""
    migrations = load_migrations("postgres")
    applied = 0
    async with pool.acquire() as con:
        while await _apply_next(con, migrations):
            applied += 1
    return applied


async def migrate_postgres(settings: StorageSettings) -> int:
    """Bring the database at ``settings.database_url`` up to date (``pqmsg migrate``).

    Opens its own trio-asyncio loop when called outside one. Returns the
    number of migrations applied.
    """
    if settings.database_url is None:
        raise ValueError("migrate_postgres needs a postgresql:// database URL")
    if trio_asyncio.current_loop.get() is None:
        async with open_aio_loop():
            return await migrate_postgres(settings)
    async with open_pg_pool(
        settings.database_url,
        min_size=1,
        max_size=1,
        acquire_timeout_s=settings.query_timeout_s,
    ) as pool:
        return await apply_migrations(pool)
