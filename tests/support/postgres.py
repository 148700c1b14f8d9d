"""Throwaway PostgreSQL databases on the running server, for the tests that need one.

Each test (or module) creates ``pqmsg_test_<random>`` on the server at
``PQMSG_TEST_POSTGRES_URL`` (default: the local trust-auth server) and drops it
at teardown, so runs never share state.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


@asynccontextmanager
async def raw_connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection outside any pool (inside a trio-asyncio loop)."""
    con = await trio_asyncio.aio_as_trio(asyncpg.connect)(url)
    try:
        yield con
    finally:
        with trio.move_on_after(5, shield=True):
            await trio_asyncio.aio_as_trio(con.close)()
