"""Browser test helpers: Debian's Chromium (headless, fake media devices), the pages' addresses
with the client's test hooks turned on, and what a test reads from a page through them
(`window.telehealthTest`, see web_client/src/testhooks.js)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from playwright.async_api import Browser, Page, async_playwright, expect

from config.settings import load_settings
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.support import SECRET, ServerProcess, start_server_process

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_PRESENT = Path(CHROMIUM).exists()
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
]
STATS_TIMEOUT_MS = 20_000

INSECURE_HOST = "telehealth.test"
"""A host name Chromium maps to 127.0.0.1 (``host_mapped``): over plain http:// it is not a
secure origin, as another machine's address is (http://localhost and 127.0.0.1 are)."""

RAW_ERROR_WORDS = ("Cannot read", "undefined", "getUserMedia", "TypeError", "NotAllowedError",
                   "NotFoundError", "Permission denied", "DOMException", "null")
"""Words of a browser's own error text: none may reach the page a doctor reads."""

ENGLISH = "localStorage.setItem('telehealth.lang', 'en');"
"""An init script: the page in English (the room's words are asserted in it)."""
GATHERED = """await new Promise((done) => {
    if (pc.iceGatheringState === 'complete') done();
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') done();
    });
    setTimeout(done, 3000);
  });"""
"""JS, inside a page script whose connection is ``pc``: wait for its ICE candidates (3 s at
most), so its local description carries them."""
MEDIA = "((window.telehealthTest || {}).media || {})"
"""JS: the page's latest MediaSession ({} before there is one)."""
STATS = f"({MEDIA}.stats || {{}})"
"""JS: its last collected media statistics."""
INBOUND = f"Object.values({STATS}.inbound || {{}})"
"""JS: its inbound streams' statistics."""


def page_url(server_url: str, token: str, *, query: str = "") -> str:
    """The web client signed in with ``token``, its test hooks on; ``query`` adds to the
    address's query (``ice=relay``: the client's relay-only setting)."""
    extra = f"&{query}" if query else ""
    return f"{server_url}/?test-hooks{extra}#token={token}"


def activation_url(server_url: str, code: str) -> str:
    """The web client's activation page for ``code``, its test hooks on (the link the server
    gives is ``<base>/#activate=<code>``: the same page without the hooks)."""
    return f"{server_url}/?test-hooks#activate={code}"


async def api_call(url: str, method: str, path: str, *, token: str | None = None,
                   body: object = None, data: bytes | None = None,
                   params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One HTTP call to the server (``token`` as ``Authorization: Bearer``, ``body`` as JSON
    or ``data`` raw): the status and the JSON answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, json=body, data=data, params=params,
                                   headers=headers) as response:
            answer: dict[str, Any] = await response.json()
            return response.status, answer


class Site:
    """A `telehealth serve` process and the tokens to sign in to it."""

    def __init__(self, server: ServerProcess, tokens: TokenAuthority) -> None:
        self.server = server
        self.url = server.url
        self.tokens = tokens

    def link(self, clinician: str, *, query: str = "", **kwargs: int) -> str:
        return page_url(self.url, self.tokens.issue(clinician, **kwargs), query=query)

    async def activation_code(self, clinician: str, *, by: str = "admin") -> str:
        """A fresh activation code for ``clinician``, issued through the server's API by
        ``by`` (a test token: an admin or the clinician's site admin)."""
        status, answer = await api_call(self.url, "POST", f"/api/accounts/{clinician}/activation",
                                        token=self.tokens.issue(by))
        assert status == 200, answer
        assert answer["link"].endswith(f"#activate={answer['code']}")
        code: str = answer["code"]
        return code


@contextmanager
def served_site(config: Path) -> Iterator[Site]:
    """`telehealth serve` on ``config`` in its own process, with tokens signed for the test
    directory; stopped at the end."""
    settings = load_settings(config)
    assert settings.directory.file is not None
    tokens = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    server = start_server_process(config)
    try:
        yield Site(server, tokens)
    finally:
        server.process.terminate()
        server.process.wait(timeout=15)


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


def chromium_flags(*, add: Iterable[str] = (), drop: Iterable[str] = ()) -> list[str]:
    """``FLAGS`` without ``drop`` and with ``add``."""
    dropped = set(drop)
    missing = dropped - set(FLAGS)
    assert not missing, f"not among FLAGS: {sorted(missing)}"
    return [flag for flag in FLAGS if flag not in dropped] + list(add)


def host_mapped(url: str, host: str = INSECURE_HOST) -> str:
    """``url`` (http://127.0.0.1:PORT/...) under ``host`` instead, same port and path."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}"))


@asynccontextmanager
async def chromium(flags: list[str]) -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, with exactly ``flags``; closed on exit."""
    if not CHROMIUM_PRESENT:
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                   args=flags)
        try:
            yield browser
        finally:
            await browser.close()


async def raw_errors_shown(page: Page) -> list[str]:
    """The ``RAW_ERROR_WORDS`` found in the page's visible text (it should be none)."""
    text = await page.locator("body").inner_text()
    return [word for word in RAW_ERROR_WORDS if word in text]


async def open_page(browser: Browser, url: str, *, init_script: str | None = None,
                    permissions: list[str] | None = None) -> Page:
    """A new context (``permissions`` granted to it, when given) with a page opened at
    ``url``; the page's console errors and warnings are printed."""
    context = await browser.new_context(viewport={"width": 1366, "height": 768},
                                        permissions=permissions)
    if init_script is not None:
        await context.add_init_script(init_script)
    page = await context.new_page()
    page.on("console", lambda message: print(f"[{url[-6:]}] {message.type}: {message.text}")
            if message.type in ("error", "warning") else None)
    await page.goto(url, wait_until="commit")
    return page


SELECTED_LOCAL_CANDIDATE = """async (pc) => {
  const report = await pc.getStats();
  let pair = null;
  report.forEach((s) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) {
      pair = report.get(s.selectedCandidatePairId);
    }
  });
  const local = pair && report.get(pair.localCandidateId);
  return local ? local.candidateType : null;
}"""
"""JS, given a peer connection: the local candidate type (host, srflx, prflx, relay) of the pair
its ICE selected, null before one is."""


async def media_candidate_types(page: Page) -> dict[str, str | None]:
    """The selected local candidate type of each of the page's media peer connections."""
    found: dict[str, str | None] = await page.evaluate(
        f"""async () => {{
          const selected = {SELECTED_LOCAL_CANDIDATE};
          const media = {MEDIA};
          const found = {{}};
          for (const name of ['publishPc', 'subscribePc', 'screenPc']) {{
            if (media[name]) found[name] = await selected(media[name]);
          }}
          return found;
        }}""")
    return found


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


async def open_consultation(browser: Browser, url: str, token: Any) -> tuple[Page, Page, str]:
    """A district page (ref1) asks, a specialist page (cardio1, in English) accepts, each
    decoding the other: the two pages and the consultation's id. ``url``, ``token``: the
    server's (``tests.support.Server``). Both pages are closed if the set-up fails."""
    district = await open_page(browser, page_url(url, token("ref1")))
    specialist = await open_page(browser, page_url(url, token("cardio1")), init_script=ENGLISH)
    try:
        await expect(specialist.locator("#queue")).to_be_visible(timeout=15_000)
        await request_and_accept(district, specialist)
        await wait_decoding(district, "cardio1")
        await wait_decoding(specialist, "ref1")
        consultation = await district.get_attribute("#room", "data-consultation")
        assert consultation is not None
    except BaseException:
        for page in (district, specialist):
            await page.context.close()
        raise
    return district, specialist, consultation


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
