"""The web client's camera goes out in VP8 temporal layers (L1T3) in a real consultation, and the
other side decodes it at the full rate: what lets the relay give a thin link a lower frame rate
(tests/web/test_layers_browser.py) without the sender doing anything else."""

from __future__ import annotations

from playwright.async_api import Browser, expect

from tests.web.browser import (
    MEDIA,
    Site,
    decoded_from,
    open_page,
    request_and_accept,
    wait_decoding,
)

CAMERA_SENDER = f"""async () => {{
  const pc = {MEDIA}.publishPc;
  const sender = pc.getSenders().find((s) => s.track && s.track.kind === 'video');
  const report = await sender.getStats();
  let outbound = null;
  report.forEach((s) => {{ if (s.type === 'outbound-rtp' && s.kind === 'video') outbound = s; }});
  const codec = outbound && report.get(outbound.codecId);
  return {{
    asked: sender.getParameters().encodings.map((e) => e.scalabilityMode || null),
    encoding: outbound && outbound.scalabilityMode,
    codec: codec && codec.mimeType,
    frames: outbound && outbound.framesEncoded,
  }};
}}"""
"""JS: what the page's camera sender was asked for and what its encoder does."""


async def test_the_web_client_sends_its_camera_in_l1t3_and_the_other_side_decodes_it_all(
        site: Site, browser: Browser) -> None:
    district = await open_page(browser, site.link("ref1"))
    specialist = await open_page(browser, site.link("cardio1"))
    await expect(district.locator("#request-form")).to_be_visible()
    await request_and_accept(district, specialist)
    await wait_decoding(specialist, "ref1")
    await wait_decoding(district, "cardio1")
    for name, page in (("district", district), ("specialist", specialist)):
        sender = await page.evaluate(CAMERA_SENDER)
        print(f"{name}'s camera sender: {sender}")
        assert sender["asked"] == ["L1T3"], sender
        assert sender["codec"] == "video/VP8", sender
        assert sender["encoding"] == "L1T3", sender
    # The full rate over 3 s, at most three tries: the relay's layer policy may take a loaded
    # machine's own delay on loopback for congestion and send fewer layers for a while (the
    # tile then says so: data-quality "reduced"); a window it spent so does not count.
    quality = specialist.locator('#tiles figure[data-participant="ref1"] .tile-quality')
    rates = []
    for _ in range(3):
        before = await quality.get_attribute("data-quality")
        frames = await decoded_from(specialist, "ref1")
        await specialist.wait_for_timeout(3000)
        rate = (await decoded_from(specialist, "ref1") - frames) / 3
        after = await quality.get_attribute("data-quality")
        rates.append((rate, before, after))
        if before in (None, "full") and after in (None, "full"):
            break
    print(f"specialist decodes the district doctor's camera at {rates} (fps, the tile's "
          "quality before and after; Chromium's fake camera: 20 fps)")
    assert rate >= 12, rates
