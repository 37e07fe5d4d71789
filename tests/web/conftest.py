"""Browser tests: Debian's Chromium driven by Playwright for Python, headless, with fake media
devices, against the real `telehealth serve` process on an ephemeral port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from config.settings import load_settings
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.support import SECRET, start_server_process, write_config
from tests.web.browser import CHROMIUM, CHROMIUM_PRESENT, FLAGS, Site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    config = write_config(tmp_path, presence={"reconnect_grace_s": 20.0})
    settings = load_settings(config)
    assert settings.directory.file is not None
    tokens = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    server = start_server_process(config)
    try:
        yield Site(server, tokens)
    finally:
        server.process.terminate()
        server.process.wait(timeout=15)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM_PRESENT:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                    args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()
