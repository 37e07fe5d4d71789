from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.postgres_server import (
    PostgresServer,
    create_database,
    drop_database,
    start_postgres,
    stop_postgres,
)
from tests.redis_server import RedisServer, start_redis, stop_redis
from tests.support import Server, run_server, write_config


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
async def server(config_path: Path) -> AsyncIterator[Server]:
    async with run_server(config_path) as running:
        yield running


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (tests/redis_server.py) for the tests of one module."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        stop_redis(server)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL (tests/postgres_server.py) for the whole session: one cluster, a
    fresh database per test (``postgres_dsn``); stopped and removed at the end, even after a
    failure."""
    server = start_postgres()
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """The DSN of a new, empty database for this test alone (CREATE DATABASE from template0,
    ~0.1 s), dropped afterwards (its connections closed by force)."""
    name = postgres_server.next_name()
    dsn = create_database(postgres_server, name)
    try:
        yield dsn
    finally:
        drop_database(postgres_server, name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs two pytest-xdist workers (``--dist loadgroup``). Every module that
    drives Chromium goes to one worker, whole: two browsers encoding and decoding video at
    once on a 2-core machine starve each other (a decode wait of 20 s timed out), and such a
    module's expensive module-scoped set-up (a whole fleet) runs once. Everything else is
    spread over both workers."""
    modules: dict[Path, bool] = {}
    for item in items:
        path = item.path
        if path not in modules:
            modules[path] = path.parent.name == "web" or "chromium(" in path.read_text(
                encoding="utf-8")
        if modules[path]:
            item.add_marker(pytest.mark.xdist_group("chromium"))
