"""The records' schema as numbered steps, shared by both backends (``signaling.store``'s
SQLite file and ``signaling.store_pg``'s PostgreSQL database).

Each store applies, when it opens, every step its database has not had yet, in order, each in
one transaction together with its row in ``schema_migrations`` (version, name, applied_at): a
step is applied entirely or not at all, and a crash between two steps leaves a database that
the next start carries on from. Several processes may open the same database at once (a
fleet's nodes starting together): on PostgreSQL an advisory lock, on SQLite the write lock of
``BEGIN IMMEDIATE``, lets one of them apply a step while the others wait, and each re-reads the
version inside its transaction before applying anything.

A SQLite records file from before migrations has no ``schema_migrations``; its tables are step
1's (step 1 creates them only if they are missing), so it is recognised as step 1 and carries
on from there. An older file still, from when the directory was only a mirror there, lacks the
directory's ``active`` and ``updated_at`` columns: they are added first.

A new step is a new module ``mNNNN_<what>.py`` with its ``STEP``, added to ``STEPS``; never edit
a step that has shipped. A database at a version newer than ``LATEST`` (a newer node of a
fleet migrated it during a rolling upgrade) is used as it is, with a warning: steps only add.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from signaling.migrations import m0001_first_schema, m0002_lookup_indexes
from signaling.migrations.step import Step
from signaling.sqlite import transaction

logger = logging.getLogger(__name__)

STEPS: tuple[Step, ...] = (m0001_first_schema.STEP, m0002_lookup_indexes.STEP)
LATEST = STEPS[-1].version
assert [s.version for s in STEPS] == list(range(1, LATEST + 1)), "steps are numbered 1, 2, ..."

ADVISORY_LOCK = 0x7E1E_4EA1_0000_0014
"""PostgreSQL's advisory lock key held while a step is applied (any 64-bit number this
database's other users do not take)."""

_SQLITE_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"""


def _target(target: int | None, steps: tuple[Step, ...]) -> int:
    latest = steps[-1].version
    if target is None:
        return latest
    if not 0 <= target <= latest:
        raise ValueError(f"no schema step {target} (the steps are 1 to {latest})")
    return target


def _warn_if_newer(version: int, where: str) -> None:
    if version > LATEST:
        logger.warning("records %s are at schema step %d, newer than this program's %d (a "
                       "newer node migrated them?): used as they are", where, version, LATEST)


# -- SQLite ---------------------------------------------------------------------------------


def sqlite_statements(script: str) -> list[str]:
    """The statements of ``script`` (inside one transaction, unlike ``executescript``)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"an unfinished statement in a schema step: {buffer.strip()[:80]!r}")
    return statements


def _sqlite_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def _sqlite_tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _recognise_sqlite(db: sqlite3.Connection) -> None:
    """``schema_migrations`` created; in a file from before migrations, the directory
    columns that older files lack added (step 1 then finds every table it would create)."""
    with transaction(db):
        tables = _sqlite_tables(db)
        if "schema_migrations" in tables:
            return
        for table in ("sites", "clinicians"):
            if table not in tables:
                continue
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if "active" not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN active INTEGER NOT NULL DEFAULT 1")
            if "updated_at" not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN updated_at REAL NOT NULL DEFAULT 0")
        if tables & {"sites", "requests"}:
            logger.info("records file from before schema migrations: recognised as step 1")
        db.execute(_SQLITE_TABLE)


def migrate_sqlite(db: sqlite3.Connection, target: int | None = None,
                   steps: tuple[Step, ...] = STEPS) -> list[int]:
    """Bring the SQLite file to step ``target`` (default: the latest); the steps applied.
    ``steps``: the tests give a list with a step of their own."""
    target = _target(target, steps)
    _recognise_sqlite(db)
    applied: list[int] = []
    for step in steps[:target]:
        with transaction(db):
            if _sqlite_version(db) >= step.version:
                continue
            for statement in sqlite_statements(step.sqlite):
                db.execute(statement)
            db.execute("INSERT INTO schema_migrations (version, name, applied_at) "
                       "VALUES (?, ?, ?)", (step.version, step.name, time.time()))
        applied.append(step.version)
        logger.info("records: schema step %d (%s) applied", step.version, step.name)
    _warn_if_newer(_sqlite_version(db), "file")
    return applied


# -- PostgreSQL -----------------------------------------------------------------------------


async def postgresql_version(conn: Any, table: str = "schema_migrations") -> int:
    """The database's schema step (0: none yet) as ``table`` records it. ``conn``: an asyncpg
    connection."""
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return 0
    return int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}"))


async def apply_postgresql_steps(conn: Any, steps: Iterable[Step], *, table: str, lock: int,
                                 what: str) -> list[int]:
    """Apply the ``steps`` the database has not had, each in one transaction with its row in
    ``table``, under the advisory ``lock`` (nodes starting together: one applies, the others
    wait and find it done); the versions applied. The records' and the accounts' series each
    have their own table and lock."""
    applied: list[int] = []
    for step in steps:
        async with conn.transaction():
            # Held to the end of this transaction: one process applies a step at a time.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY "
                               "KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            if await postgresql_version(conn, table) >= step.version:
                continue
            await conn.execute(step.postgresql)
            await conn.execute(f"INSERT INTO {table} (version, name, applied_at) "
                               "VALUES ($1, $2, $3)", step.version, step.name, time.time())
        applied.append(step.version)
        logger.info("%s: schema step %d (%s) applied", what, step.version, step.name)
    return applied


async def migrate_postgresql(conn: Any, target: int | None = None,
                             steps: tuple[Step, ...] = STEPS) -> list[int]:
    """Bring the database behind the asyncpg connection ``conn`` to step ``target`` (default:
    the latest); the steps applied. ``steps``: as for ``migrate_sqlite``."""
    target = _target(target, steps)
    applied = await apply_postgresql_steps(conn, steps[:target], table="schema_migrations",
                                           lock=ADVISORY_LOCK, what="records")
    _warn_if_newer(await postgresql_version(conn), "database")
    return applied
