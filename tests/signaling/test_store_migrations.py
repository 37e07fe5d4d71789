"""The records' schema steps (``signaling.migrations``) on both backends: a database left at
step 1 with records in it is brought to the latest step at open and every record is still
read; a records.sqlite3 written before migrations existed is recognised as step 1; a step that
fails leaves nothing of itself; nodes opening an empty PostgreSQL database together apply each
step once and seed the directory once."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from signaling import store_pg
from signaling.directory import Directory
from signaling.migrations import (
    LATEST,
    STEPS,
    m0001_first_schema,
    migrate_postgresql,
    migrate_sqlite,
    postgresql_version,
)
from signaling.migrations.step import Step
from signaling.models import Minutes, Site
from signaling.store import RecordStore, SqliteRecordStore, open_directory
from signaling.store_pg import PostgresRecordStore

BAD_STEP = Step(LATEST + 1, "half good",
                sqlite="CREATE TABLE good_half (id TEXT);\nCREATE TABLE (broken;\n",
                postgresql="CREATE TABLE good_half (id TEXT);\nCREATE TABLE (broken;\n")

# Records as step 1 stored them, one of each kind: (table, columns, SQLite row, PostgreSQL row).
SITE = ("d1", "District One", "district", "11", 1, 1.5)
CLINICIAN = ("ref1", "Referring One", "d1", '["referring"]', "[]", 1, 2.5)
REQUEST = ("r1", "d1", "ref1", "cardiology", "urgent", "chest pain", "P-7", "accepted",
           1733200000.123456, None, "cardio1", 1733200001.5, "con1", None)
WAITING = ("r2", "d1", "ref1", "cardiology", "stat", "stroke", None, "waiting",
           1733200002.75, 1733200003.0, None, None, None, None)
CONSULTATION = ("con1", "r1", "cardio1", "relay-1", "live", 1733200001.5, 1733200002.0, None,
                '["d1", "c1"]', '["ref1", "cardio1"]', "[]", None, None, None)
CHAT = ("m1", "con1", "ref1", "d1", "ECG đã gửi", 1733200004.0)
ATTENDANCE = ("con1", "ref1", "d1", 1733200002.0, None)
ROWS: list[tuple[str, tuple[Any, ...]]] = [
    ("sites", SITE), ("clinicians", CLINICIAN), ("regions", ("11", "Điện Biên")),
    ("requests", REQUEST), ("requests", WAITING), ("consultations", CONSULTATION),
    ("chat", CHAT), ("attendance", ATTENDANCE)]


async def assert_records_intact(store: RecordStore) -> None:
    """What step 1's rows say, read through the latest schema."""
    directory = await store.read_directory()
    assert directory.all_sites["d1"] == Site("d1", "District One", "district", "11", True, 1.5)
    assert directory.all_clinicians["ref1"].roles == {"referring"}
    assert directory.regions == {"11": "Điện Biên"}
    accepted = await store.get_request("r1")
    assert accepted is not None and accepted.created_at == 1733200000.123456
    assert [r.id for r in await store.waiting_requests()] == ["r2"]
    assert [r.id for r in await store.requests_of("ref1")] == ["r2", "r1"]
    consultation = await store.get_consultation("con1")
    assert consultation is not None and consultation.clinician_ids == ["ref1", "cardio1"]
    assert [c.id for c in await store.consultations_for("cardio1", "c1",
                                                        everything=False)] == ["con1"]
    assert [m.text for m in await store.chat_of("con1")] == ["ECG đã gửi"]
    assert await store.attendees_of("con1") == {"ref1"}
    # And the store works on: the consultation ends, its request closes.
    await store.end_consultation(consultation, Minutes("stable", "cardio1", 1733200009.0))
    assert (await store.get_request("r1")).status == "closed"  # type: ignore[union-attr]


def sqlite_versions(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        db.close()


def sqlite_insert(db: sqlite3.Connection) -> None:
    for table, row in ROWS:
        db.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)
    db.commit()


async def test_a_sqlite_file_at_step_1_with_records_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate_sqlite(db, target=1) == [1]
    sqlite_insert(db)
    db.close()
    store = SqliteRecordStore(path)
    await store.open()
    try:
        await assert_records_intact(store)
    finally:
        await store.close()
    assert sqlite_versions(path) == list(range(1, LATEST + 1))
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate_sqlite(db) == []  # nothing left to apply
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        db.close()
    assert {"requests_requester", "consultations_state"} <= indexes


async def test_a_sqlite_file_from_before_migrations_is_recognised_as_step_1(
        tmp_path: Path) -> None:
    """records.sqlite3 as today's data directories hold it: step 1's tables, no
    ``schema_migrations``."""
    path = tmp_path / "records.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(m0001_first_schema.SQLITE)
    sqlite_insert(db)
    db.close()

    def seed() -> tuple[Directory, str]:
        raise AssertionError("a store with a directory is not seeded")

    # Start-up opens the directory first (it migrates), then the store.
    assert "d1" in open_directory(path, seed).all_sites
    store = SqliteRecordStore(path)
    await store.open()
    try:
        await assert_records_intact(store)
    finally:
        await store.close()
    assert sqlite_versions(path) == list(range(1, LATEST + 1))


async def test_a_failing_sqlite_step_leaves_nothing_of_itself(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "records.sqlite3", isolation_level=None)
    try:
        migrate_sqlite(db)
        with pytest.raises(sqlite3.Error):
            migrate_sqlite(db, steps=(*STEPS, BAD_STEP))
        assert not db.in_transaction
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "good_half" not in tables
        assert db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == LATEST
    finally:
        db.close()


async def test_a_postgresql_database_at_step_1_with_records_is_migrated(
        postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await migrate_postgresql(conn, target=1) == [1]
        for table, row in ROWS:
            if table in ("sites", "clinicians"):
                row = (*row[:-2], bool(row[-2]), row[-1])  # BOOLEAN active
            marks = ", ".join(f"${i + 1}" for i in range(len(row)))
            await conn.execute(f"INSERT INTO {table} VALUES ({marks})", *row)
        assert await postgresql_version(conn) == 1
    finally:
        await conn.close()
    store = PostgresRecordStore(postgres_dsn, pool_size=2)
    await store.open()
    try:
        await assert_records_intact(store)
    finally:
        await store.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert [r[0] for r in await conn.fetch(
            "SELECT version FROM schema_migrations ORDER BY 1")] == list(range(1, LATEST + 1))
        assert await migrate_postgresql(conn) == []
        indexes = {r[0] for r in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        assert {"requests_requester", "consultations_state", "consultations_clinicians",
                "consultations_invited"} <= indexes
    finally:
        await conn.close()


async def test_a_failing_postgresql_step_leaves_nothing_of_itself(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await migrate_postgresql(conn)
        with pytest.raises(asyncpg.PostgresError):
            await migrate_postgresql(conn, steps=(*STEPS, BAD_STEP))
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('good_half')") is None
        assert await postgresql_version(conn) == LATEST
    finally:
        await conn.close()


async def test_nodes_opening_one_empty_database_together_migrate_and_seed_it_once(
        postgres_dsn: str) -> None:
    """Four nodes start at once: the directory (opened synchronously at start-up, each on a
    thread of its own) and then the stores; each step applied once, the seed read once."""
    seeded: list[int] = []
    lock = threading.Lock()

    def seed() -> tuple[Directory, str]:
        with lock:
            seeded.append(1)
        return Directory([Site("d1", "District One", "district", "11")], []), "test seed"

    directories = await asyncio.gather(*(
        asyncio.to_thread(store_pg.open_directory, postgres_dsn, seed) for _ in range(4)))
    assert len(seeded) == 1
    assert all("d1" in d.all_sites for d in directories)
    stores = [PostgresRecordStore(postgres_dsn, pool_size=2) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert "d1" in (await stores[3].read_directory()).all_sites
    finally:
        for s in stores:
            await s.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert [r[0] for r in await conn.fetch(
            "SELECT version FROM schema_migrations ORDER BY 1")] == list(range(1, LATEST + 1))
    finally:
        await conn.close()


def test_the_dsn_password_never_reaches_a_log() -> None:
    assert store_pg.redacted("postgresql://telehealth:s3cret@db.example:5432/records") == \
        "postgresql://telehealth:***@db.example:5432/records"
    assert store_pg.redacted("postgresql://telehealth@db:5432/records") == \
        "postgresql://telehealth@db:5432/records"
