"""A hospital whose firewall lets nothing through but TURN: Chromium told to use TURN only, by
the client's own setting (``?ice=relay``) or by the server (``turn.relay_only_sites``), reaches
the relay through Debian's coturn with the credentials the server hands out and decodes the
other site's video; the pre-call check says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.support import write_config
from tests.turn_server import TURN_PRESENT, TurnServer
from tests.web.browser import (
    MEDIA,
    Site,
    media_candidate_types,
    open_page,
    request_consultation,
    served_site,
    wait_decoding,
)

pytestmark = pytest.mark.skipif(not TURN_PRESENT, reason="coturn is not installed")


@pytest.fixture
def turn(tmp_path: Path) -> Iterator[TurnServer]:
    with TurnServer.start(tmp_path) as server:
        yield server


RELAY_ONLY_BY = ["client-setting", "server"]
"""Who makes the district doctor's browser use TURN only: its ``?ice=relay`` setting, or the
server's ``turn.relay_only_sites`` (the district's site, d1)."""


@pytest.fixture(params=RELAY_ONLY_BY)
def relay_only_by(request: pytest.FixtureRequest) -> str:
    by: str = request.param
    return by


@pytest.fixture
def turn_site(tmp_path: Path, turn: TurnServer, relay_only_by: str) -> Iterator[Site]:
    """`telehealth serve` whose [turn] settings point at the test's coturn."""
    sites = ["d1"] if relay_only_by == "server" else []
    config = write_config(tmp_path, presence={"reconnect_grace_s": 20.0},
                          turn={"secret": turn.secret, "urls": turn.urls,
                                "relay_only_sites": sites})
    with served_site(config) as site:
        yield site


async def test_a_relay_only_browser_reaches_the_relay_through_turn_and_decodes_video(
    turn_site: Site, turn: TurnServer, browser: Browser, relay_only_by: str
) -> None:
    by_setting = relay_only_by == "client-setting"
    district = await open_page(
        browser, turn_site.link("ref1", query="ice=relay" if by_setting else ""))
    specialist = await open_page(browser, turn_site.link("cardio1", query="ice=all"))
    await expect(district.locator("#request-form")).to_be_visible()
    await request_consultation(district)
    await specialist.locator("#queue li.request .accept").first.click(timeout=10_000)
    await specialist.click("#precheck-join")

    await district.locator("#my-requests .join").first.click(timeout=10_000)
    # The setting is visible where the doctor checks the network: on when it is the reason.
    setting = district.locator("#ice-relay")
    await (expect(setting).to_be_checked() if by_setting else expect(setting).not_to_be_checked())
    network = district.locator("#check-network")
    await expect(network).to_have_attribute("data-path", "relay", timeout=15_000)
    await expect(network).to_contain_text("TURN")
    print(f"network line 'through TURN' after {await network.get_attribute('data-ms')} ms")
    await expect(district.locator("#network-problem")).to_contain_text("TURN")
    await district.click("#precheck-join")

    await wait_decoding(district, "cardio1")
    await wait_decoding(specialist, "ref1")
    policies = await district.evaluate(
        f"""() => ['publishPc', 'subscribePc'].map(
              (name) => {MEDIA}[name].getConfiguration().iceTransportPolicy)""")
    assert policies == ["relay", "relay"]
    assert set((await media_candidate_types(district)).values()) == {"relay"}
    assert "relay" not in (await media_candidate_types(specialist)).values()
    # The room's quality line says so too (for the IT team on the phone with the doctor).
    await expect(district.locator("#quality")).to_have_attribute("data-path", "relay")
    await expect(district.locator("#quality")).to_contain_text("TURN")
    await expect(specialist.locator("#quality")).to_have_attribute("data-path", "direct")
    # coturn granted the allocation to the credentials media:join handed out.
    usernames = await district.evaluate(
        f"() => {MEDIA}.iceServers.filter((s) => s.username).map((s) => s.username)")
    assert len(usernames) == 1 and usernames[0].endswith(":ref1"), usernames
    assert turn.allocated(usernames[0])
    for page in (district, specialist):
        await page.context.close()
