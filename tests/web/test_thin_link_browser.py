"""A long link in real Chromium (issue #15): the district doctor's page reaches the server
through a TCP link with an island's round trip (700 ms, tests/link_emulator.py's
TcpLinkEmulator), the specialist's directly. The link goes out for 6 s: the page stays in its
consultation on the same socket (the server's presence defaults outlast the outage), says
"Kết nối yếu" while it lasts and not after, a chat sent during it arrives after it, and media
(which never passes through the server) goes on. Then the link drops its connections and is
gone 3 s: the banner again, then the page is back in its place with its media resumed on the
same peer connections. The relay's `video_quality` notices and the
video pause put the right words on the right tile, in either language; each page shows its own
link's quality; the publisher's Opus is asked for FEC and DTX by the relay's answer.

The server runs in this process, so the test emits the relay's notices through the app's own
path (the embedded relay's events, as the relay does)."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Locator, Page, expect

from config.settings import PresenceSettings
from telehealth.startup import SERVICES
from tests.link_emulator import Profile, TcpLinkEmulator
from tests.support import run_server, write_config
from tests.web.browser import (
    ENGLISH,
    MEDIA,
    decoded_from,
    open_page,
    page_url,
    request_and_accept,
    wait_decoding,
)

ISLAND = Profile(delay_ms=350, jitter_ms=15)
"""Trường Sa's round trip (700 ms) each way's half, without its rate limit: the page loads in
seconds, and the rate's effect is measured by bench/thin_link.py, not here."""
OUTAGE_S = 6.0
LINK = "((window.telehealthTest || {}).link || {})"
"""JS: the page's LinkWatch."""

OPUS_SENT = f"""async () => {{
  const pc = {MEDIA}.publishPc;
  if (!pc || !pc.remoteDescription) return null;
  const report = await pc.getStats();
  let fmtp = null;
  report.forEach((s) => {{
    if (s.type === 'outbound-rtp' && s.kind === 'audio' && s.codecId) {{
      const codec = report.get(s.codecId);
      if (codec) fmtp = codec.sdpFmtpLine || '';
    }}
  }});
  const answer = pc.remoteDescription.sdp.split('\\r\\n').filter((l) => l.startsWith('a=fmtp:'));
  return {{ statsFmtp: fmtp, answerFmtp: answer }};
}}"""
"""JS: the Opus format parameters the publish connection's outbound audio codec runs with (its
getStats() codec entry) and the fmtp lines of the relay's answer."""


async def socket_id(page: Page) -> str:
    return str(await page.evaluate(f"() => {LINK}.signaling.socket.id"))


def tile_quality(page: Page, participant: str) -> Locator:
    return page.locator(f'#tiles figure[data-participant="{participant}"] .tile-quality')


async def test_a_six_second_outage_on_a_long_link(tmp_path: Path, browser: Browser) -> None:
    defaults = PresenceSettings()
    config = write_config(tmp_path, presence={
        "ping_interval_s": defaults.ping_interval_s, "ping_timeout_s": defaults.ping_timeout_s,
        "reconnect_grace_s": defaults.reconnect_grace_s})
    async with run_server(config) as server:
        assert server.app is not None
        relay = server.app[SERVICES].embedded
        assert relay is not None
        port = int(server.url.rsplit(":", 1)[1])
        async with TcpLinkEmulator(("127.0.0.1", port), ISLAND, seed=15) as link:
            started = time.monotonic()
            district = await open_page(browser, page_url(link.url, server.token("ref1")))
            specialist = await open_page(browser, page_url(server.url, server.token("cardio1")),
                                         init_script=ENGLISH)
            try:
                await expect(specialist.locator("#queue")).to_be_visible(timeout=15_000)
                await expect(district.locator("#request-form")).to_be_visible(timeout=30_000)
                print(f"district page signed in over the long link in "
                      f"{time.monotonic() - started:.1f} s")
                await request_and_accept(district, specialist)
                await wait_decoding(district, "cardio1")
                await wait_decoding(specialist, "ref1")
                consultation = await district.get_attribute("#room", "data-consultation")
                assert consultation is not None

                # Audio first: the relay's answer asks Opus for FEC and DTX, and Chromium's
                # outbound audio codec runs with them.
                opus = await district.evaluate(OPUS_SENT)
                print(f"publisher's Opus: {opus}")
                assert any("useinbandfec=1" in line and "usedtx=1" in line
                           for line in opus["answerFmtp"]), opus
                if opus["statsFmtp"]:
                    assert "useinbandfec=1" in opus["statsFmtp"], opus
                    assert "usedtx=1" in opus["statsFmtp"], opus

                # A 700 ms round trip alone is not a weak link; each page shows its own link.
                await expect(district.locator("#weak-link")).to_be_empty()
                for page, word in ((district, "Đường truyền của bạn: (Tốt|Trung bình|Yếu)"),
                                   (specialist, "Your connection: (Good|Fair|Weak)")):
                    own = page.locator("#own-link")
                    await expect(own).to_have_attribute("data-level", re.compile("good|fair|weak"),
                                                        timeout=10_000)
                    await expect(own).to_have_text(re.compile(word))
                    print(f"own link: {await own.inner_text()} "
                          f"({await own.get_attribute('title')})")
                rtt = int(await district.locator("#own-link").get_attribute("data-rtt-ms") or 0)
                probe_rtt = await district.evaluate(f"() => {LINK}.rttMs")
                print(f"district: media round trip {rtt} ms (direct UDP), server probe "
                      f"{probe_rtt:.0f} ms (over the long link)")
                assert probe_rtt >= 600, "the probe goes over the emulated link"

                sid = await socket_id(district)
                built = await district.evaluate(f"() => {MEDIA}.pcsCreated")
                frames = await decoded_from(district, "cardio1")

                # The outage.
                loop = asyncio.get_running_loop()
                cut_at = loop.time()
                link.set_profile(ISLAND.model_copy(update={
                    "outage_every_s": 3600.0, "outage_s": OUTAGE_S,
                    "outage_first_at_s": cut_at - link.epoch}))
                await district.fill("#chat-input", "Gửi trong lúc mất kết nối")
                await district.click("#chat-send")
                await expect(district.locator("#weak-link")).to_contain_text(
                    "Kết nối yếu", timeout=OUTAGE_S * 1000)
                shown_after = loop.time() - cut_at
                shot = str(tmp_path / "weak-link.png")
                await district.screenshot(path=shot)
                print(f"the district's room during the outage: {shot}")
                assert shown_after < OUTAGE_S
                assert await district.get_attribute("#weak-link", "role") == "status"
                assert await district.get_attribute("#weak-link", "aria-live") == "polite"
                # Media does not pass through the server: the picture goes on meanwhile.
                await district.wait_for_function(
                    "([who, n]) => " + f"Object.values({MEDIA}.stats.inbound || {{}})"
                    ".some((s) => s.kind === 'video' && s.participant === who "
                    "&& s.framesDecoded > n + 30)",
                    arg=["cardio1", frames], timeout=int(OUTAGE_S * 1000), polling=250)
                await expect(district.locator("#weak-link")).to_be_empty(timeout=20_000)
                cleared_after = loop.time() - cut_at - OUTAGE_S
                print(f"'Kết nối yếu' shown {shown_after:.1f} s into the {OUTAGE_S:.0f} s "
                      f"outage, gone {cleared_after:.1f} s after it ended")

                # The chat sent during the outage went through after it, no error shown.
                await expect(specialist.locator("#chat")).to_contain_text(
                    "Gửi trong lúc mất kết nối", timeout=10_000)
                await expect(district.locator("#chat-input")).to_have_value("")  # acked
                await expect(district.locator("#flash.error")).to_be_hidden()
                # Same socket, same peer connections: nothing was rebuilt, nobody saw the
                # district "reconnecting".
                assert await socket_id(district) == sid
                assert await district.evaluate(f"() => {MEDIA}.pcsCreated") == built
                await expect(specialist.locator('#participants li[data-participant="ref1"]')) \
                    .not_to_have_class("participant reconnecting")
                await expect(district.locator("#room")).to_have_attribute(
                    "data-consultation", consultation)
                after = await decoded_from(district, "cardio1")
                await district.wait_for_timeout(2000)
                assert await decoded_from(district, "cardio1") > after + 20
                # Not after: the banner stays away while the link stays good.
                await district.wait_for_timeout(3000)
                await expect(district.locator("#weak-link")).to_be_empty()
                probes, late = await district.evaluate(f"() => [{LINK}.probes, {LINK}.late]")
                print(f"district: {probes} link probes, {late} late or failed")

                # The room's words: the relay says what each viewer receives of each tile.
                await quality_words(relay, consultation, district, specialist)

                # The socket away: the link closes every connection and is gone for 3 s (a
                # modem's restart). The banner says so; back, the page takes its place again
                # (within the reconnect grace) and resumes its media on the same connections.
                resumes = await district.evaluate(f"() => {MEDIA}.resumes")
                await link.close()
                dropped_at = loop.time()
                await expect(district.locator("#weak-link")).to_contain_text(
                    "Kết nối yếu", timeout=5_000)
                await expect(district.locator("#server-link")).to_be_visible()
                await district.wait_for_timeout(3000)
                async with TcpLinkEmulator(("127.0.0.1", port), ISLAND, port=link.port):
                    await expect(district.locator("#server-link")).to_be_hidden(timeout=20_000)
                    await district.wait_for_function(
                        f"(n) => {MEDIA}.resumes > n", arg=resumes, timeout=20_000)
                    await expect(district.locator("#weak-link")).to_be_empty(timeout=20_000)
                    print(f"socket away 3 s: back and resumed, banner gone "
                          f"{loop.time() - dropped_at - 3:.1f} s after the link returned")
                    assert await socket_id(district) != sid
                    assert await district.evaluate(f"() => {MEDIA}.pcsCreated") == built
                    await expect(specialist.locator(
                        '#participants li[data-participant="ref1"]')).to_have_class(
                        "participant present", timeout=10_000)
                    # Decoding on: over 20 frames in 3 s (a loaded machine's false congestion
                    # on loopback may leave fewer layers a while: 18 in 2 s was seen in CI).
                    after = await decoded_from(district, "cardio1")
                    await district.wait_for_timeout(3000)
                    decoded = await decoded_from(district, "cardio1") - after
                    assert decoded > 20, decoded
                for name, page in (("district", district), ("specialist", specialist)):
                    own = page.locator("#own-link")
                    print(f"{name} at the end: {await own.inner_text()} "
                          f"({await own.get_attribute('title')}, video held back by the "
                          f"bandwidth estimate: {await own.get_attribute('data-limited')})")
            finally:
                for page in (district, specialist):
                    await page.context.close()


async def quality_words(relay: Any, consultation: str, district: Page,
                        specialist: Page) -> None:
    """``video_quality`` notices from the relay's side, and the video pause, on the tiles."""
    cardio = tile_quality(district, "cardio1")
    ref = tile_quality(specialist, "ref1")
    await expect(cardio).to_have_text("Đầy đủ")
    await expect(ref).to_have_text("Full")
    publication = await district.get_attribute(
        '#tiles figure[data-participant="cardio1"] video', "data-publication")
    other = await specialist.get_attribute(
        '#tiles figure[data-participant="ref1"] video', "data-publication")
    assert publication and other

    async def notice(to: str, **fields: Any) -> None:
        await relay.events.notice(consultation, to, fields)

    await notice("ref1", code="video_quality", publication_id=publication,
                 participant_id="cardio1", quality="reduced", fps=7.5)
    await expect(cardio).to_have_text("Giảm khung hình (7,5 khung hình/giây)")
    await expect(cardio).to_have_attribute("data-quality", "reduced")
    shot = str(Path(tempfile.gettempdir()) / "thin-link-reduced-tile.png")
    await district.screenshot(path=shot)
    print(f"the district's room with a reduced tile: {shot}")
    await expect(ref).to_have_text("Full")  # the notice was the district's, for cardio1's tile
    await notice("cardio1", code="video_quality", publication_id=other,
                 participant_id="ref1", quality="reduced", fps=15)
    await expect(ref).to_have_text("Reduced frame rate (15 fps)")
    await notice("cardio1", code="video_quality", publication_id=other,
                 participant_id="ref1", quality="audio_only", fps=None)
    await expect(ref).to_have_text("Audio only")
    # The existing pause of all video toward a participant: every tile says audio only, and
    # after the resume each tile says again what the relay last said of it.
    await notice("ref1", code="video_paused", reason="bandwidth", estimate_bps=90_000)
    await expect(cardio).to_have_text("Chỉ âm thanh")
    await notice("ref1", code="video_resumed", reason="bandwidth")
    await expect(cardio).to_have_text("Giảm khung hình (7,5 khung hình/giây)")
    await notice("ref1", code="video_quality", publication_id=publication,
                 participant_id="cardio1", quality="full", fps=30)
    await expect(cardio).to_have_text("Đầy đủ")
