"""The room's words from a real relay (issue #15): Chromium publishes its camera in L1T3, the
relay caps what one viewer receives at the base layer (Participant.cap_layer, the operator's
and the tests' hand on the layer policy), and that viewer's tile says "Giảm khung hình" with
the frame rate the relay measured, while the other viewer's says "Full"; lifted, "Đầy đủ"
again. The notice goes the product's whole way: the relay's Participant, the embedded relay's
events, signaling's MediaEvents, the page."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.async_api import Browser, expect

from telehealth.startup import SERVICES
from tests.support import run_server, write_config
from tests.web.browser import (
    decoded_from,
    open_consultation,
)


async def test_a_capped_viewer_reads_reduced_frame_rate_on_the_tile(
        tmp_path: Path, browser: Browser) -> None:
    async with run_server(write_config(tmp_path)) as server:
        assert server.app is not None
        relay = server.app[SERVICES].embedded
        assert relay is not None
        district, specialist, consultation = await open_consultation(
            browser, server.url, server.token)
        try:
            cardio = district.locator('#tiles figure[data-participant="cardio1"] .tile-quality')
            ref = specialist.locator('#tiles figure[data-participant="ref1"] .tile-quality')
            await expect(cardio).to_have_text("Đầy đủ")
            participant = relay.rooms[consultation].participants["ref1"]
            participant.cap_layer(0)
            await expect(cardio).to_have_attribute("data-quality", "reduced", timeout=10_000)
            await expect(cardio).to_have_text(
                re.compile(r"^Giảm khung hình( \([\d,]+ khung hình/giây\))?$"))
            frames = await decoded_from(district, "cardio1")
            await district.wait_for_timeout(4000)
            fps = (await decoded_from(district, "cardio1") - frames) / 4
            print(f"capped at layer 0: the tile says {await cardio.inner_text()!r}, "
                  f"decoded {fps:.1f} fps")
            await expect(cardio).to_have_text(re.compile(r"khung hình/giây"), timeout=10_000)
            await expect(ref).to_have_text("Full")
            participant.cap_layer(None)
            await expect(cardio).to_have_text("Đầy đủ", timeout=15_000)
        finally:
            for page in (district, specialist):
                await page.context.close()
