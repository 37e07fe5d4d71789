from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.relay.peers import RelayRoom, relay_room


@pytest.fixture
async def room() -> AsyncIterator[RelayRoom]:
    """An open room on a LocalRelay with the default media settings, driven through relay.api."""
    async with relay_room() as running:
        yield running
