"""One SQLite file served off the event loop: a single worker thread owns the connection, so
every statement runs in order and the loop never waits on the disk. The records
(``signaling.store.SqliteRecordStore``) and the accounts (``signaling.accounts.Accounts``) are each
one of these, with their own schema and durability."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: BEGIN IMMEDIATE, COMMIT on success, ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def connect(path: Path, *, synchronous: Literal["FULL", "NORMAL"],
            mode: int | None = None, same_thread: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with WAL journaling;
    ``mode``: the file is created with these permissions (a file of secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is not None and not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, mode))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=same_thread,
                         timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


class SqliteFile:
    """The file at ``path`` behind one worker thread. ``await open()`` connects and runs
    ``_prepare`` (the schema); ``await close()`` is idempotent."""

    def __init__(self, path: Path, *, name: str, synchronous: Literal["FULL", "NORMAL"],
                 mode: int | None = None) -> None:
        self.path = path
        self._name = name
        self._synchronous: Literal["FULL", "NORMAL"] = synchronous
        self._mode = mode
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None
        self._closed = False

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Create or upgrade the schema (in the worker thread, before any other use)."""

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError(f"{self._name} store {self.path} is closed")
        return fn(self._db)

    def _open_sync(self) -> None:
        db = connect(self.path, synchronous=self._synchronous, mode=self._mode,
                     same_thread=False)
        self._prepare(db)
        self._db = db

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open_sync)
        logger.info("%s at %s", self._name, self.path)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)
