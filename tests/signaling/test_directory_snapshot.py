"""Two nodes starting on one fresh PostgreSQL: one seeds the directory while the other reads
it. The reader's statements straddle the seeder's commit (forced here: the seeder commits
between the reader's query of the sites and its query of the clinicians); it still reads the
directory whole or not at all (one snapshot), never clinicians without their sites."""

from __future__ import annotations

from typing import Any

import asyncpg

from signaling.migrations import migrate_postgresql
from signaling.models import Clinician, Site
from signaling.store_pg import SERVER_SETTINGS, read_directory, write_directory

SITES = [Site("c1", "Bệnh viện Bạch Mai", "central", "01", True, 1.5)]
CLINICIANS = [Clinician("admin", "Quản trị", "c1", frozenset({"admin"}), frozenset(), True, 2.0)]


class CommitsBetween:
    """The reader's connection: after its first query, the seeder's transaction commits."""

    def __init__(self, conn: Any, commit: Any) -> None:
        self._conn, self._commit, self.queries = conn, commit, 0

    def is_in_transaction(self) -> bool:
        return bool(self._conn.is_in_transaction())

    def transaction(self, **kwargs: Any) -> Any:
        return self._conn.transaction(**kwargs)

    async def fetch(self, query: str) -> Any:
        rows = await self._conn.fetch(query)
        self.queries += 1
        if self.queries == 1:
            await self._commit()
        return rows


async def test_a_directory_read_while_another_node_seeds_it_is_one_snapshot(
        postgres_dsn: str) -> None:
    seeder = await asyncpg.connect(postgres_dsn, server_settings=SERVER_SETTINGS)
    reader = await asyncpg.connect(postgres_dsn, server_settings=SERVER_SETTINGS)
    try:
        await migrate_postgresql(seeder)
        seeding = seeder.transaction()
        await seeding.start()
        await write_directory(seeder, SITES, CLINICIANS, {"01": "Hà Nội"})
        between = CommitsBetween(reader, seeding.commit)
        directory = await read_directory(between)  # statement by statement: DirectoryError
        assert between.queries == 3
        assert not directory.all_sites and not directory.all_clinicians  # before the commit
        again = await read_directory(reader)
        assert list(again.all_sites) == ["c1"] and list(again.all_clinicians) == ["admin"]
    finally:
        await seeder.close()
        await reader.close()
