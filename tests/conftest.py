from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import Server, run_server, write_config


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
async def server(config_path: Path) -> AsyncIterator[Server]:
    async with run_server(config_path) as running:
        yield running
