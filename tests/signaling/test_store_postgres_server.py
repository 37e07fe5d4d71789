"""The PostgreSQL the store tests start (tests/postgres_server.py): a fresh database per test,
the server unprivileged when the tests run as root, its socket inside its own directory."""

from __future__ import annotations

import os
import pwd

import asyncpg

from tests.postgres_server import PostgresServer


async def test_each_test_gets_a_fresh_empty_database(postgres_server: PostgresServer,
                                                     postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        name = await conn.fetchval("SELECT current_database()")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        await conn.execute("CREATE TABLE scratch (id int)")
    finally:
        await conn.close()
    assert postgres_dsn.endswith(f"/{name}") and name != "postgres"
    assert tables == 0
    assert (postgres_server.directory / "sock" / f".s.PGSQL.{postgres_server.port}").exists()
    owner = os.stat(f"/proc/{postgres_server.process.pid}").st_uid
    if os.geteuid() == 0:
        assert owner == pwd.getpwnam("nobody").pw_uid
    else:
        assert owner == os.geteuid()


async def test_a_second_test_does_not_see_the_first_ones_tables(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('scratch') IS NULL")
    finally:
        await conn.close()
