"""Browser tests: Debian's Chromium driven by Playwright for Python, headless, with fake media
devices, against the real `telehealth serve` process on an ephemeral port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser

from tests.support import write_config
from tests.web.browser import CHROMIUM, CHROMIUM_PRESENT, FLAGS, Site, chromium, served_site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    config = write_config(tmp_path, presence={"reconnect_grace_s": 20.0})
    with served_site(config) as site:
        yield site


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM_PRESENT:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    async with chromium(FLAGS) as launched:
        yield launched
