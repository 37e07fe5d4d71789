"""Browser test helpers: Debian's Chromium (headless, fake media devices), the pages' addresses
with the client's test hooks turned on, and what a test reads from a page through them
(`window.telehealthTest`, see web_client/src/testhooks.js)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from playwright.async_api import Browser, Page, expect

from signaling.tokens import TokenAuthority
from tests.support import ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_PRESENT = Path(CHROMIUM).exists()
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
]
STATS_TIMEOUT_MS = 20_000

MEDIA = "((window.telehealthTest || {}).media || {})"
"""JS: the page's latest MediaSession ({} before there is one)."""
STATS = f"({MEDIA}.stats || {{}})"
"""JS: its last collected media statistics."""
INBOUND = f"Object.values({STATS}.inbound || {{}})"
"""JS: its inbound streams' statistics."""


def page_url(server_url: str, token: str) -> str:
    """The web client signed in with ``token``, its test hooks on."""
    return f"{server_url}/?test-hooks#token={token}"


class Site:
    """A `telehealth serve` process and the tokens to sign in to it."""

    def __init__(self, server: ServerProcess, tokens: TokenAuthority) -> None:
        self.server = server
        self.url = server.url
        self.tokens = tokens

    def link(self, clinician: str, **kwargs: int) -> str:
        return page_url(self.url, self.tokens.issue(clinician, **kwargs))


LISTENER_LEDGER = """(() => {
  const live = [];
  const add = EventTarget.prototype.addEventListener;
  const remove = EventTarget.prototype.removeEventListener;
  const watched = (target) =>
    target instanceof RTCPeerConnection || target instanceof MediaStreamTrack;
  const find = (target, type, listener) =>
    live.findIndex((e) => e.target === target && e.type === type && e.listener === listener);
  EventTarget.prototype.addEventListener = function (type, listener, options) {
    if (watched(this) && find(this, type, listener) < 0) {
      live.push({ target: this, type, listener });
    }
    return add.call(this, type, listener, options);
  };
  EventTarget.prototype.removeEventListener = function (type, listener, options) {
    const index = find(this, type, listener);
    if (index >= 0) live.splice(index, 1);
    return remove.call(this, type, listener, options);
  };
  window.liveMediaListeners = () => live.map((e) => `${e.target.constructor.name} ${e.type}`);
})();"""
"""An init script: ``window.liveMediaListeners()`` lists the listeners added to peer connections
and media tracks and not removed since (as "RTCPeerConnection track", ...). It sees
``addEventListener``/``removeEventListener`` only (the client uses no ``signal`` or ``once``)."""


async def open_page(browser: Browser, url: str, *, init_script: str | None = None) -> Page:
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    if init_script is not None:
        await context.add_init_script(init_script)
    page = await context.new_page()
    page.on("console", lambda message: print(f"[{url[-6:]}] {message.type}: {message.text}")
            if message.type in ("error", "warning") else None)
    await page.goto(url, wait_until="commit")
    return page


async def decoded_from(page: Page, participant: str) -> int:
    return int(await page.evaluate(
        f"""(who) => {INBOUND}
             .filter((s) => s.kind === 'video' && s.participant === who)
             .reduce((n, s) => n + s.framesDecoded, 0)""", participant))


async def audio_bytes_from(page: Page, participant: str) -> int:
    return int(await page.evaluate(
        f"""(who) => {INBOUND}
             .filter((s) => s.kind === 'audio' && s.participant === who)
             .reduce((n, s) => n + s.bytesReceived, 0)""", participant))


async def outbound_audio_bytes(page: Page) -> int:
    return int(await page.evaluate(
        f"() => ({STATS}.outbound || {{}})['camera:audio']?.bytesSent || 0"))


async def wait_decoding(page: Page, participant: str, frames: int = 10) -> None:
    await page.wait_for_function(
        f"""([who, n]) => {INBOUND}
             .some((s) => s.kind === 'video' && s.participant === who && s.framesDecoded >= n)""",
        arg=[participant, frames], timeout=STATS_TIMEOUT_MS, polling=250)


async def request_consultation(district: Page) -> None:
    """The district doctor asks cardiology for an urgent consultation."""
    await district.select_option("#request-specialty", "cardiology")
    await district.select_option("#request-priority", "stat")
    await district.fill("#request-reason", "Chest pain, ST elevation")
    await district.click("#request-send")


async def request_and_accept(district: Page, specialist: Page) -> float:
    """The district doctor requests, the specialist accepts; both walk into the room at the
    same time, as two people would. Returns when the accept was clicked."""
    await request_consultation(district)
    accept = specialist.locator("#queue li.request .accept").first
    await expect(accept).to_be_visible(timeout=10_000)
    accepted_at = time.time()

    async def specialist_joins() -> None:
        await accept.click()
        await specialist.click("#precheck-join")

    async def district_joins() -> None:
        await district.locator("#my-requests .join").first.click(timeout=10_000)
        await district.click("#precheck-join")

    await asyncio.gather(specialist_joins(), district_joins())
    return accepted_at


def screenshot_is_not_blank(path: str) -> tuple[float, float]:
    """Mean and spread of the screenshot's luma, decoded with PyAV."""
    import av

    with av.open(path) as container:
        frame = next(container.decode(video=0))
    gray = frame.reformat(format="gray")
    plane = gray.planes[0]
    data = bytes(plane)
    values = [data[y * plane.line_size + x] for y in range(0, gray.height, 8)
              for x in range(0, gray.width, 8)]
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return mean, spread
