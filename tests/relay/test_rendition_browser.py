"""The thin rendition toward a real browser: Chromium publishes its camera (640x480, L1T3), the
relay puts the specialist's view of it on the thin rendition (Participant.cap_layer(THIN), the
hand on the layer policy), and the specialist's Chromium decodes it at 240x180 and about
10 fps, its tile saying "Low resolution (10 fps)"; the district's view of the specialist is
untouched. Lifted: back to 640x480 at a keyframe, the rendition stopped. Then the layer
policy takes it there by itself on a rising round trip, and back after its quiet period. The
whole product's way: real server, embedded relay, signaling, pages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from playwright.async_api import Page, expect

from relay.bandwidth import QUIET_S, THIN
from telehealth.startup import SERVICES
from tests.support import run_server, write_config
from tests.web.browser import (
    FLAGS,
    MEDIA,
    chromium,
    decoded_from,
    open_consultation,
)


async def video_size(page: Page) -> list[list[int]]:
    """[width, height] of every inbound video the page decodes now (getStats)."""
    sizes: list[list[int]] = await page.evaluate(
        f"""async () => {{
          const pc = {MEDIA}.subscribePc;
          if (!pc) return [];
          const sizes = [];
          (await pc.getStats()).forEach((s) => {{
            if (s.type === 'inbound-rtp' && s.kind === 'video' && s.frameWidth)
              sizes.push([s.frameWidth, s.frameHeight]);
          }});
          return sizes;
        }}""")
    return sizes


async def wait_size(page: Page, size: list[int], timeout: float) -> float:
    """Seconds until the page decodes video of ``size``."""
    start = time.monotonic()
    while size not in await video_size(page):
        assert time.monotonic() - start < timeout, (size, await video_size(page))
        await asyncio.sleep(0.2)
    return time.monotonic() - start


async def test_chromium_decodes_the_thin_rendition_and_returns_to_the_original(
        tmp_path: Path) -> None:
    async with chromium(FLAGS) as browser, run_server(write_config(tmp_path)) as server:
        assert server.app is not None
        relay = server.app[SERVICES].embedded
        assert relay is not None
        district, specialist, consultation = await open_consultation(
            browser, server.url, server.token)
        try:
            members = relay.rooms[consultation].participants
            publication: Any = next(p for p in members["ref1"].publications.values()
                                    if p.source == "camera")
            await wait_size(specialist, [640, 480], 15)
            tile = specialist.locator('#tiles figure[data-participant="ref1"] .tile-quality')

            members["cardio1"].cap_layer(THIN)
            to_thin = await wait_size(specialist, [240, 180], 15)
            await expect(tile).to_have_attribute("data-quality", "thin", timeout=10_000)
            await expect(tile).to_have_text("Low resolution (10 fps)", timeout=10_000)
            frames = await decoded_from(specialist, "ref1")
            others = await decoded_from(district, "cardio1")
            await asyncio.sleep(4.0)
            fps = (await decoded_from(specialist, "ref1") - frames) / 4
            other_fps = (await decoded_from(district, "cardio1") - others) / 4
            rendition = publication.rendition
            assert rendition is not None and publication.renditions_started == 1
            print(f"specialist on the thin rendition after {to_thin:.1f} s: "
                  f"{await video_size(specialist)} at {fps:.1f} fps, tile "
                  f"{await tile.inner_text()!r}; district still {await video_size(district)} "
                  f"at {other_fps:.1f} fps; rendition {rendition.stats()}")
            assert 6.0 <= fps <= 12.0, fps
            assert [640, 480] in await video_size(district) and other_fps >= 10

            members["cardio1"].cap_layer(None)
            back = await wait_size(specialist, [640, 480], 15)
            await expect(tile).to_have_attribute("data-quality", "full", timeout=10_000)
            assert publication.rendition is None and not rendition.running
            frames = await decoded_from(specialist, "ref1")
            await asyncio.sleep(2.0)
            fps = (await decoded_from(specialist, "ref1") - frames) / 2
            print(f"lifted: the original again after {back:.1f} s, {fps:.1f} fps")
            assert fps >= 10

            # The policy's own way: Chromium's receiver reports drive it; its round trip,
            # the one input the test sets (Subscriber.rtt_s), rises by 500 ms (a queue on the
            # path): down a layer a second, 15 and 7.5 fps, then the thin rendition.
            subscriber = members["cardio1"].subscriber
            rtt = [0.01]
            subscriber.rtt_s = lambda: rtt[0]  # type: ignore[method-assign]
            await asyncio.sleep(2.0)  # reports with the low round trip first
            rtt[0] = 0.51
            down = await wait_size(specialist, [240, 180], 20)
            assert publication.renditions_started == 2
            rtt[0] = 0.01
            up = await wait_size(specialist, [640, 480], 20)  # the probe: layer 0
            assert publication.rendition is None
            print(f"policy: thin {down:.1f} s after the round trip rose, the original (layer 0)"
                  f" {up:.1f} s after it fell")
            assert up >= QUIET_S - 0.5  # the quiet period, not at once
        finally:
            for page in (district, specialist):
                await page.context.close()
