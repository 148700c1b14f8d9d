"""The embedded database's connection: settings, migrations, transactions, errors.

Everything here is synchronous and runs on a worker thread (see
:mod:`pqmsg.storage.sqlite`), one batch at a time.

The connection runs in autocommit mode (``isolation_level=None``) so that
transactions are explicit. The server's storage calls run in batches
(:func:`run_batch`): one ``BEGIN IMMEDIATE ... COMMIT`` around every call
queued at that moment, each call inside its own ``SAVEPOINT``, so a call
that fails is rolled back alone while the others commit. WAL with
``synchronous=FULL`` makes the COMMIT durable (its fsync) before any call of
the batch is answered; the batch shares that one fsync instead of paying one
per call.

Every change of more than one row goes through :func:`write`: on its own
(migrations, or any code run directly on a connection) it opens
``BEGIN IMMEDIATE`` (taking the write lock up front, so a transaction never
fails half-way on a lock upgrade) and commits or rolls back as a whole;
inside a batch it nests as a ``SAVEPOINT``, all of the block's changes or
none of them, committed with the batch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import outcome

from pqmsg.errors import StorageUnavailable
from pqmsg.storage.migrate import Migration, load_migrations, pending

# Primary result codes that mean "the database cannot serve now" rather than
# "the SQL is wrong": locks, memory, permissions, I/O, a full or missing disk.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)
CACHE_SIZE_KIB = 32 * 1024
STATEMENT_CACHE_SIZE = 256
# Savepoint names: a call of a batch, and a write() block nested in one.
_CALL = "pqmsg_call"
_WRITE = "pqmsg_write"


def unavailable(exc: sqlite3.Error) -> StorageUnavailable | None:
    """The StorageUnavailable an sqlite3 error stands for, or None if it is a bug."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return None
    if exc.sqlite_errorcode & 0xFF not in _UNAVAILABLE_CODES:
        return None
    return StorageUnavailable(f"the database is unavailable ({exc.sqlite_errorname})")


def connect(path: Path, *, busy_timeout_s: float, now: float) -> sqlite3.Connection:
    """Open the database (creating its folder), configure it and migrate it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_s,
        isolation_level=None,
        check_same_thread=False,  # one call at a time, from any worker thread
        cached_statements=STATEMENT_CACHE_SIZE,
    )
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA cache_size = -{CACHE_SIZE_KIB}")
        apply_migrations(conn, now=now)
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: all of the block's changes, or none of them.

    Inside a transaction already open (a batch of :func:`run_batch`) it is a
    ``SAVEPOINT`` that commits with that transaction; otherwise it is a
    transaction of its own, ``BEGIN IMMEDIATE ... COMMIT``.
    """
    nested = conn.in_transaction
    conn.execute(f"SAVEPOINT {_WRITE}" if nested else "BEGIN IMMEDIATE")
    try:
        yield
        conn.execute(f"RELEASE {_WRITE}" if nested else "COMMIT")
    except BaseException:
        if conn.in_transaction:  # else SQLite already rolled everything back
            try:
                if nested:
                    conn.execute(f"ROLLBACK TO {_WRITE}")
                    conn.execute(f"RELEASE {_WRITE}")
                else:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error says more; SQLite rolls back on close
        raise


def run_batch(
    conn: sqlite3.Connection, jobs: Sequence[Callable[[sqlite3.Connection], Any]]
) -> list[outcome.Outcome[Any]]:
    """Run ``jobs`` in order in one transaction, each in its own savepoint.

    Returns each job's outcome once the COMMIT returned (durable): its value,
    or the exception it raised (that job's changes alone rolled back). If the
    transaction cannot be opened or committed, or a job's error made SQLite
    roll the whole transaction back (``conn.in_transaction`` turned false),
    nothing of the batch is stored: every job that had not failed on its own
    (jobs not run yet included) gets a :class:`StorageUnavailable` instead.
    """
    done: list[outcome.Outcome[Any]] = []
    cause: BaseException | None = None
    try:
        if conn.in_transaction:  # left open by an earlier failure; start clean
            conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")
        for job in jobs:
            done.append(_in_savepoint(conn, job))
            if not conn.in_transaction:
                last = done[-1]
                cause = last.error if isinstance(last, outcome.Error) else None
                break
        else:
            conn.execute("COMMIT")
            return done
    except sqlite3.Error as exc:
        cause = exc
    except BaseException:
        _rollback(conn)
        raise
    _rollback(conn)
    kept: list[outcome.Outcome[Any]] = [
        result if isinstance(result, outcome.Error) else _lost(cause) for result in done
    ]
    return kept + [_lost(cause) for _ in jobs[len(done) :]]


def _in_savepoint(
    conn: sqlite3.Connection, job: Callable[[sqlite3.Connection], Any]
) -> outcome.Outcome[Any]:
    """Run one job of a batch; its error rolls back its own changes only."""
    conn.execute(f"SAVEPOINT {_CALL}")
    try:
        value = job(conn)
    except Exception as exc:
        if conn.in_transaction:
            conn.execute(f"ROLLBACK TO {_CALL}")
            conn.execute(f"RELEASE {_CALL}")
        return outcome.Error(exc)
    if conn.in_transaction:  # else the job ended the transaction: run_batch sees it
        conn.execute(f"RELEASE {_CALL}")
    return outcome.Value(value)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # nothing was committed either way; closing rolls back too


def _lost(cause: BaseException | None) -> outcome.Error:
    """The answer of a call whose changes the batch's rollback took away."""
    name = getattr(cause, "sqlite_errorname", None)
    lost = StorageUnavailable(
        f"the database is unavailable ({name})"
        if name
        else "the database is unavailable (the transaction was rolled back)"
    )
    lost.__cause__ = cause
    return outcome.Error(lost)


def apply_migrations(conn: sqlite3.Connection, *, now: float) -> int:
    """Apply the pending migrations, one transaction each; returns the version.

    The version is read again inside each transaction, so two processes that
    open the same file at once do not apply a migration twice.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    migrations = load_migrations("sqlite")
    for migration in pending(migrations, schema_version(conn)):
        with write(conn):
            if schema_version(conn) < migration.version:
                _apply(conn, migration, now)
    return schema_version(conn)


def schema_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(version)


def _apply(conn: sqlite3.Connection, migration: Migration, now: float) -> None:
    # executescript() would commit first, so run the statements one by one
    # inside the caller's transaction.
    for statement in split_statements(migration.sql):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
        (migration.version, migration.name, now),
    )


def split_statements(sql: str) -> list[str]:
    """The complete statements of a script (semicolons in strings, comments and
    trigger bodies do not split)."""
    statements: list[str] = []
    buffer = ""
    for piece in sql.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if _has_code(buffer):
                statements.append(buffer)
            buffer = ""
    if _has_code(buffer.removesuffix(";")):
        raise ValueError(f"incomplete SQL statement at the end: {buffer[:80]!r}")
    return statements


def _has_code(sql: str) -> bool:
    lines = (line.split("--", 1)[0].strip() for line in sql.splitlines())
    return any(line and line != ";" for line in lines)
