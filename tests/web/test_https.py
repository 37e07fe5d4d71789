"""The web client over https, as a doctor on another machine gets it: `telehealth serve` with a
certificate from the test's CA for "telehealth.test", Chromium mapping that name to 127.0.0.1
and trusting the certificate through its SPKI hash; two pages run a consultation and decode each
other's video under the server's Content-Security-Policy, without one violation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, expect

from config.settings import load_settings
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.support import SECRET, ServerProcess, start_server_process, write_config
from tests.tls_support import HOST_NAME, CertificateFiles, TestCA
from tests.web.browser import (
    CHROMIUM,
    CHROMIUM_PRESENT,
    FLAGS,
    chromium,
    open_page,
    page_url,
    request_and_accept,
    wait_decoding,
)

CSP_WATCH = """(() => {
  window.cspViolations = [];
  document.addEventListener("securitypolicyviolation", (e) => {
    window.cspViolations.push(
      `${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`);
  });
})();"""
"""An init script: every ``securitypolicyviolation`` event of the page, in
``window.cspViolations``."""


class HttpsSite:
    def __init__(self, server: ServerProcess, tokens: TokenAuthority, port: int,
                 certificate: CertificateFiles) -> None:
        self.server = server
        self.tokens = tokens
        self.url = f"https://{HOST_NAME}:{port}"
        self.certificate = certificate

    def link(self, clinician: str) -> str:
        return page_url(self.url, self.tokens.issue(clinician))


@pytest.fixture
def https_site(tmp_path: Path) -> Iterator[HttpsSite]:
    ca = TestCA(tmp_path)
    certificate = ca.issue()
    config = write_config(tmp_path, tls={"cert_file": str(certificate.cert_file),
                                         "key_file": str(certificate.key_file)})
    settings = load_settings(config)
    assert settings.directory.file is not None
    tokens = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    server = start_server_process(config)
    try:
        assert server.url.startswith("https://127.0.0.1:"), server.url
        yield HttpsSite(server, tokens, int(server.url.rsplit(":", 1)[1]), certificate)
    finally:
        server.process.terminate()
        server.process.wait(timeout=15)


@pytest.fixture
async def https_browser(https_site: HttpsSite) -> AsyncIterator[Browser]:
    """Chromium as a doctor's browser would be with a hospital CA installed: the server's name
    resolves to it, and its certificate is trusted (by its key, not by ignoring errors)."""
    if not CHROMIUM_PRESENT:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    flags = [*FLAGS, f"--host-resolver-rules=MAP {HOST_NAME} 127.0.0.1",
             f"--ignore-certificate-errors-spki-list={https_site.certificate.spki_hash()}"]
    async with chromium(flags) as browser:
        yield browser


async def watched_page(browser: Browser, url: str, console: list[str]) -> Page:
    page = await open_page(browser, url, init_script=CSP_WATCH)

    def note(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            console.append(message.text)

    page.on("console", note)
    return page


async def test_two_doctors_consult_over_https_under_the_csp(
    https_site: HttpsSite, https_browser: Browser
) -> None:
    console: list[str] = []
    district = await watched_page(https_browser, https_site.link("ref1"), console)
    specialist = await watched_page(https_browser, https_site.link("cardio1"), console)
    for page in (district, specialist):
        assert page.url.startswith(f"https://{HOST_NAME}:")
        assert await page.evaluate("() => window.isSecureContext") is True
    await expect(district.locator("#request-form")).to_be_visible()
    await expect(specialist.locator("#queue")).to_be_visible()
    await request_and_accept(district, specialist)
    await wait_decoding(specialist, "ref1")
    await wait_decoding(district, "cardio1")
    await expect(district.locator("#room-state")).to_have_attribute("data-state", "connected")
    for page in (district, specialist):
        violations = await page.evaluate("() => window.cspViolations")
        assert violations == [], violations
    assert console == [], console
    # The control: the policy is in force and the watch sees a violation (an inline script).
    await district.evaluate("""() => document.body.appendChild(
        Object.assign(document.createElement("script"), {textContent: "window.ran = 1"}))""")
    await district.wait_for_function("() => window.cspViolations.length > 0", timeout=5000)
    assert await district.evaluate("() => window.ran") is None
    assert (await district.evaluate("() => window.cspViolations"))[0].startswith("script-src")
