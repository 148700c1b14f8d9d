"""Versioned schema migrations shipped inside the package.

Each backend has a folder ``pqmsg/storage/migrations/<dialect>/`` of files
named ``NNNN_description.sql``. A backend applies, in one transaction each,
every migration whose version is above the highest one recorded in its
``schema_migrations`` table. Migrations are never edited once released; a
change is a new file.
"""

from __future__ import annotations

import re
from importlib import resources

import attrs

_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """The dialect's migrations in version order ("sqlite" or "postgres")."""
    folder = resources.files("pqmsg.storage") / "migrations" / dialect
    found = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations are not numbered 1..n: {versions}")
    return tuple(found)


def pending(migrations: tuple[Migration, ...], applied_version: int) -> tuple[Migration, ...]:
    """The migrations above ``applied_version``."""
    return tuple(m for m in migrations if m.version > applied_version)
