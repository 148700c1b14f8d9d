"""Throwaway PostgreSQL databases on the running server, for the tests that need one.

Each test (or module) creates ``pqmsg_test_<random>`` on the server at
``PQMSG_TEST_POSTGRES_URL`` (default: the local trust-auth server) and drops it
at teardown, so runs never share state.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import trio
import trio_asyncio

from pqmsg.aioloop import open_aio_loop

ADMIN_URL = os.environ.get(
    "PQMSG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ADMIN_DEADLINE_S = 20  # bound of one administrative statement


def database_url(name: str) -> str:
    """ADMIN_URL with its database replaced by ``name``."""
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + name))


async def _admin(statement: str) -> None:
    async with open_aio_loop():
        with trio.fail_after(ADMIN_DEADLINE_S):
            con = await trio_asyncio.aio_as_trio(asyncpg.connect)(ADMIN_URL)
            try:
                await trio_asyncio.aio_as_trio(con.execute)(statement)
            finally:
                await trio_asyncio.aio_as_trio(con.close)()


def create_throwaway_database() -> str:
    """Create an empty database (from a blocking context); returns its URL."""
    name = f"pqmsg_test_{secrets.token_hex(6)}"
    trio.run(_admin, f"CREATE DATABASE {name} TEMPLATE template0")
    return database_url(name)


def drop_throwaway_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    assert name.startswith("pqmsg_test_"), name
    trio.run(_admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def migrated_throwaway_database() -> Iterator[str]:
    """A throwaway database with the relay's schema (from a blocking context); dropped after."""
    from pqmsg.settings import StorageSettings
    from pqmsg.storage.postgres import migrate_postgres

    url = create_throwaway_database()
    try:
        trio.run(migrate_postgres, StorageSettings(database_url=url))
        yield url
    finally:
        drop_throwaway_database(url)


@asynccontextmanager
async def raw_connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection outside any pool (inside a trio-asyncio loop)."""
    con = await trio_asyncio.aio_as_trio(asyncpg.connect)(url)
    try:
        yield con
    finally:
        with trio.move_on_after(5, shield=True):
            await trio_asyncio.aio_as_trio(con.close)()
