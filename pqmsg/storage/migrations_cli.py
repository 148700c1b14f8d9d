"""``pqmsg migrate``: bring the configured database's schema up to date."""

from __future__ import annotations

import trio

from pqmsg.settings import Settings


async def migrate(settings: Settings) -> int:
    """Apply pending migrations to the configured backend; returns the schema version."""
    if settings.uses_postgres:
        from pqmsg.storage.postgres import migrate_postgres

        return await migrate_postgres(settings.storage)
    from pqmsg.storage.sqlite import migrate_sqlite

    path = settings.sqlite_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return await trio.to_thread.run_sync(migrate_sqlite, path)
