"""Which store holds the durable records, from ``storage.backend``: the SQLite file
``records.sqlite3`` in ``storage.data_dir`` (one `serve` process), or the PostgreSQL database
at ``storage.postgresql_dsn`` (several, a fleet). Start-up (``telehealth.startup``) and the
CLI (``telehealth directory import|export``, ``telehealth token``) reach the records only
through these two functions, so both backends serve every one of them."""

from __future__ import annotations

from collections.abc import Callable

from config.settings import StorageSettings
from signaling import store, store_pg
from signaling.directory import Directory
from signaling.store import RecordStore

RECORDS_FILE = "records.sqlite3"


def record_store(storage: StorageSettings) -> RecordStore:
    """The records' store, not opened yet (``await store.open()`` applies the schema steps)."""
    if storage.backend == "postgresql":
        return store_pg.PostgresRecordStore(storage.postgresql_dsn,
                                            storage.postgresql_pool_size)
    return store.SqliteRecordStore(storage.data_dir / RECORDS_FILE)


def open_directory(storage: StorageSettings,
                   seed: Callable[[], tuple[Directory, str]]) -> Directory:
    """The directory in the records (their source of truth); an empty store is seeded first
    with ``seed()``. Synchronous: see ``signaling.store.open_directory``."""
    if storage.backend == "postgresql":
        return store_pg.open_directory(storage.postgresql_dsn, seed)
    return store.open_directory(storage.data_dir / RECORDS_FILE, seed)
