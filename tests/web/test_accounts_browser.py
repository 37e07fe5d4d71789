"""The web client's own sign-in in a real Chromium (issue #12): activation from the link,
password sign-in, a consultation that outlives several access tokens (the refresh cookie and
`auth:refresh`), sign-out that revokes; an admin's TOTP (codes computed with pyotp); lockout in
Vietnamese; and the directory administration tab, whose deactivation ends a clinician's open
page in words."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import aiohttp
import pyotp
import pytest
from playwright.async_api import Browser, Page, expect

from tests.support import write_config
from tests.web.browser import (
    Site,
    activation_url,
    api_call,
    decoded_from,
    open_page,
    raw_errors_shown,
    request_and_accept,
    served_site,
    wait_decoding,
)

ACCESS_TTL_S = 4
"""Short, so that a consultation of a few seconds outlives two access tokens."""
LOCKOUT_FAILURES = 3
PASSWORD = "ca trực đêm ở Cô Tô 2026"
REFRESH_COOKIE = "telehealth_refresh"


@pytest.fixture
def accounts_site(tmp_path: Path) -> Iterator[Site]:
    config = write_config(
        tmp_path, presence={"reconnect_grace_s": 20.0},
        # Cheap hashing: the test is about the page, not Argon2's cost.
        accounts={"access_ttl_s": ACCESS_TTL_S, "argon2_memory_kib": 1024,
                  "lockout_failures": LOCKOUT_FAILURES, "lockout_base_s": 30.0})
    with served_site(config) as site:
        yield site


async def sign_in(page: Page, clinician: str, password: str) -> None:
    await page.fill("#signin-id", clinician)
    await page.fill("#signin-password", password)
    await page.click("#signin-submit")


async def stored_anywhere(page: Page, token: str) -> bool:
    """Whether ``token`` is in the page's localStorage or sessionStorage."""
    return bool(await page.evaluate(
        "(token) => JSON.stringify({...localStorage}).includes(token)"
        " || JSON.stringify({...sessionStorage}).includes(token)", token))


async def test_a_clinician_activates_signs_in_consults_past_the_token_and_signs_out(
    accounts_site: Site, browser: Browser
) -> None:
    site = accounts_site
    code = await site.activation_code("cardio1")
    specialist = await open_page(browser, activation_url(site.url, code))
    await expect(specialist.locator("#password-policy")).to_contain_text("ít nhất 12 ký tự")
    # The server's refusal in words: a password containing the user id.
    await specialist.fill("#activate-password", "cardio1-is-my-password")
    await specialist.fill("#activate-confirm", "cardio1-is-my-password")
    await specialist.click("#activate-submit")
    await expect(specialist.locator("#activate-error")).to_contain_text("Mật khẩu chưa đạt yêu cầu")
    await specialist.fill("#activate-password", PASSWORD)
    await specialist.fill("#activate-confirm", PASSWORD)
    await specialist.click("#activate-submit")
    await expect(specialist.locator("#queue")).to_be_visible(timeout=10_000)
    token = await specialist.evaluate("() => window.telehealthTest.session.token")
    assert token and not await stored_anywhere(specialist, token)
    # The code is used up.
    status, answer = await api_call(site.url, "POST", "/api/auth/activate",
                                    body={"code": code, "password": PASSWORD + "!"})
    assert (status, answer["error"]["code"]) == (400, "activation_invalid")

    district = await open_page(browser, site.link("ref1"))  # a `#token=` link still works
    await expect(district.locator("#request-form")).to_be_visible()
    await request_and_accept(district, specialist)
    await wait_decoding(specialist, "ref1")
    await wait_decoding(district, "cardio1")
    joined_at = time.monotonic()
    # Past two access token lifetimes: still in the room, same connection, media both ways.
    frames = await decoded_from(district, "cardio1"), await decoded_from(specialist, "ref1")
    await specialist.wait_for_timeout(2.5 * ACCESS_TTL_S * 1000)
    refreshes = await specialist.evaluate("() => window.telehealthTest.session.refreshes")
    print(f"{time.monotonic() - joined_at:.1f} s in the room with {ACCESS_TTL_S} s access "
          f"tokens: {refreshes} refreshes")
    assert refreshes >= 2
    await expect(specialist.locator("#room")).to_be_visible()
    await expect(specialist.locator("#room-state")).to_have_attribute("data-state", "connected")
    assert await specialist.evaluate("() => window.telehealthTest.media.signaling.socket.connected")
    renewed = await specialist.evaluate("() => window.telehealthTest.session.token")
    assert renewed != token and not await stored_anywhere(specialist, renewed)
    assert await decoded_from(district, "cardio1") > frames[0] + 20
    assert await decoded_from(specialist, "ref1") > frames[1] + 20

    # Sign-out: the sign-in page, and the refresh cookie it held no longer works.
    cookies = await specialist.context.cookies()
    (held,) = [c["value"] for c in cookies if c["name"] == REFRESH_COOKIE]
    await specialist.click("#sign-out")
    await expect(specialist.locator("#sign-in-error")).to_have_text("Bạn đã đăng xuất.")
    await expect(specialist.locator("#room")).to_have_count(0)
    status, answer = await refresh_with(site.url, held)
    assert (status, answer["error"]) == (401, {"code": "session_ended", "message": ANY})
    assert await specialist.evaluate(
        "() => fetch('/api/auth/refresh', {method: 'POST'}).then((r) => r.status)") == 401
    await specialist.reload()
    await expect(specialist.locator("#signin-form")).to_be_visible()
    assert await raw_errors_shown(specialist) == []


async def refresh_with(url: str, cookie: str) -> tuple[int, dict[str, object]]:
    """``POST /api/auth/refresh`` with ``cookie`` as the refresh cookie."""
    async with aiohttp.ClientSession(cookies={REFRESH_COOKIE: cookie}) as session:
        async with session.post(url + "/api/auth/refresh") as response:
            answer: dict[str, object] = await response.json()
            return response.status, answer


async def test_an_admin_sets_up_totp_and_signs_in_with_a_code(
    accounts_site: Site, browser: Browser
) -> None:
    site = accounts_site
    page = await open_page(browser, activation_url(site.url, await site.activation_code("admin")))
    await page.fill("#activate-password", PASSWORD)
    await page.fill("#activate-confirm", PASSWORD)
    await page.click("#activate-submit")
    await expect(page.locator("#totp-setup")).to_contain_text("ứng dụng xác thực")
    secret = (await page.locator("#totp-secret").inner_text()).strip()
    uri = await page.locator("#totp-uri").inner_text()
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP) and totp.secret == secret
    await page.fill("#activate-totp", pyotp.TOTP(secret).now())
    await page.click("#activate-submit")
    await expect(page.locator("#sign-in-error")).to_contain_text("đã được kích hoạt")
    # A fresh sign-in page: the server asks for the code, the page shows the field.
    await page.goto(f"{site.url}/?test-hooks")
    await sign_in(page, "admin", PASSWORD)
    await expect(page.locator("#sign-in-error")).to_contain_text("mã 6 số")
    await expect(page.locator("#signin-totp")).to_be_visible()
    await page.fill("#signin-totp", "000000" if totp.now() != "000000" else "111111")
    await page.click("#signin-submit")
    await expect(page.locator("#sign-in-error")).to_contain_text("không đúng")
    # The activation used this window's code: the next one (clock drift is allowed).
    await page.fill("#signin-totp", totp.at(time.time() + 30))
    await page.click("#signin-submit")
    await expect(page.locator("#tab-admin")).to_be_visible(timeout=10_000)
    await expect(page.locator("#who-name")).to_have_text("Admin")
    # Reopened, the tab is not asked again: the refresh cookie brings the session back.
    await page.reload()
    await expect(page.locator("#tab-admin")).to_be_visible(timeout=10_000)
    await expect(page.locator("#signin-form")).to_have_count(0)
    # A second tab of the same browser too. Both renew with the one cookie, which each renewal
    # uses up: were they to present the same one, the server would revoke the session as
    # stolen (the page lets one tab renew at a time).
    second = await page.context.new_page()
    await second.goto(f"{site.url}/?test-hooks")
    await expect(second.locator("#tab-admin")).to_be_visible(timeout=10_000)
    # Both at the same moment, a few times over (their timers rarely meet by themselves).
    renew = "() => window.telehealthTest.session.refresh().then(() => 'ok', (e) => e.code)"
    for _ in range(5):
        both = await asyncio.gather(page.evaluate(renew), second.evaluate(renew))
        assert list(both) == ["ok", "ok"]
    await page.wait_for_timeout(2.5 * ACCESS_TTL_S * 1000)
    for tab in (page, second):
        assert await tab.evaluate("() => window.telehealthTest.session.refreshes") >= 2
        await expect(tab.locator("#tab-admin")).to_be_visible()
        await expect(tab.locator("#signin-form")).to_have_count(0)


async def test_repeated_failures_lock_the_account_and_say_how_long(
    accounts_site: Site, browser: Browser
) -> None:
    site = accounts_site
    status, answer = await api_call(site.url, "POST", "/api/auth/activate", body={
        "code": await site.activation_code("ref2"), "password": PASSWORD})
    assert status == 200, answer
    page = await open_page(browser, f"{site.url}/?test-hooks")
    error = page.locator("#sign-in-error")
    locked_at = None
    for attempt in range(1, LOCKOUT_FAILURES + 2):
        await sign_in(page, "ref2", f"wrong password {attempt}")
        await expect(error).to_have_attribute("data-code",
                                              re.compile("invalid_credentials|locked_out"))
        if await error.get_attribute("data-code") == "locked_out":
            locked_at = attempt
            break
        await expect(error).to_have_text("Sai mã đăng nhập hoặc mật khẩu.")
        await page.evaluate(
            "() => document.getElementById('sign-in-error').removeAttribute('data-code')")
    assert locked_at is not None and locked_at >= LOCKOUT_FAILURES
    # Even the right password is refused while locked; the wait is in words.
    await sign_in(page, "ref2", PASSWORD)
    await expect(error).to_have_text(re.compile(
        r"Đăng nhập sai quá nhiều lần nên tài khoản tạm bị khóa\. "
        r"Vui lòng thử lại sau (2\d|30) giây\."))
    await expect(page.locator("#request-form")).to_have_count(0)
    assert await raw_errors_shown(page) == []
    # In English on the switch (the page reloads in that language).
    await page.select_option("#language", "en")
    await expect(page.locator("#sign-in h2")).to_have_text("Sign in")
    await sign_in(page, "ref2", PASSWORD)
    await expect(error).to_have_text(re.compile(
        r"Too many failed sign-ins: the account is locked for now\. "
        r"Please try again in \d+ seconds\."))


def directory_csv(clinicians: int) -> bytes:
    rows = ["kind,id,name,site,tier,region,roles,specialties,active",
            "region,11,Điện Biên,,,,,,", "region,22,Quảng Ninh,,,,,,"]
    rows += [f"site,tyt-{i},Trạm Y tế xã {i},,commune,{'11' if i % 2 else '22'},,,true"
             for i in range(10)]
    rows += [f"clinician,bs-{i},Bác sĩ Trần Văn {i},tyt-{i % 10},,,referring,,true"
             for i in range(clinicians)]
    # A clinician of the test directory, renamed: the one the admin looks for.
    rows.append("clinician,ref3,Nguyễn Thị Hồng Nhung,d3,,,referring,,true")
    rows.append("clinician,sa-d3,Lê Văn Quản,d3,,,site_admin,,true")
    return ("\n".join(rows) + "\n").encode()


async def test_an_admin_finds_and_deactivates_a_clinician_whose_page_is_told_at_once(
    accounts_site: Site, browser: Browser
) -> None:
    site = accounts_site
    status, answer = await api_call(site.url, "POST", "/api/directory/import",
                                    token=site.tokens.issue("admin"), data=directory_csv(300))
    assert status == 200 and answer["import"]["clinicians_created"] == 301, answer
    clinician = await open_page(browser, site.link("ref3"))
    await expect(clinician.locator("#request-form")).to_be_visible()
    admin = await open_page(browser, site.link("admin"))
    refused: list[str] = []  # the server's CSP: no inline script or style on the tab either
    admin.on("console", lambda m: refused.append(m.text) if "Content Security" in m.text else None)
    await admin.click("#tab-admin")
    pager = admin.locator("#clinician-pager .page-info")
    await expect(pager).to_contain_text(re.compile(r"Trang 1/\d+ · 3\d\d kết quả"))
    await expect(admin.locator("#clinician-region option", has_text="Điện Biên")).to_have_count(1)
    await admin.click("#clinician-pager .next")
    await expect(pager).to_contain_text("Trang 2/")
    # Without diacritics, as a keyboard without Vietnamese input types it.
    await admin.fill("#clinician-q", "hong nhung")
    await admin.press("#clinician-q", "Enter")
    row = admin.locator("#clinician-rows tr[data-clinician='ref3']")
    await expect(admin.locator("#clinician-rows tr")).to_have_count(1)
    await expect(row).to_contain_text("Nguyễn Thị Hồng Nhung")
    await expect(row).to_have_class(re.compile(r"\bonline\b"))  # her page is open
    admin.on("dialog", lambda dialog: dialog.accept())
    clicked = time.monotonic()
    await row.locator(".deactivate").click()
    ended = clinician.locator("#sign-in-error")
    await expect(ended).to_contain_text("ngừng hoạt động", timeout=5_000)
    print(f"the deactivated clinician's page showed the sentence "
          f"{time.monotonic() - clicked:.2f} s after the click")
    await expect(row).to_have_class(re.compile(r"\binactive\b"))
    await expect(row.locator(".reactivate")).to_be_visible()
    assert await raw_errors_shown(clinician) == []
    # An activation link for another clinician, shown once with a copy button.
    await admin.fill("#clinician-q", "Trần Văn 42")
    await admin.press("#clinician-q", "Enter")
    other = admin.locator("#clinician-rows tr[data-clinician='bs-42']")
    await other.locator(".issue-code").click()
    link = await admin.locator("#activation-link").input_value()
    assert re.fullmatch(re.escape(site.url) + r"/#activate=\S+", link), link
    await expect(admin.locator("#activation-copy")).to_be_visible()
    assert refused == []

    # District Three's site admin (a password account) sees the tab with their site's
    # clinicians only, may grant referring and specialist only, and reactivates her.
    status, answer = await api_call(site.url, "POST", "/api/auth/activate", body={
        "code": await site.activation_code("sa-d3"), "password": PASSWORD})
    assert status == 200, answer
    local = await open_page(browser, f"{site.url}/?test-hooks")
    await sign_in(local, "sa-d3", PASSWORD)
    await local.click("#tab-admin")
    rows = local.locator("#clinician-rows tr")
    await expect(rows).to_have_count(2)
    assert {await r.get_attribute("data-clinician") for r in await rows.all()} == {"ref3", "sa-d3"}
    await expect(local.locator("#site-add")).to_have_count(0)
    await local.click("#clinician-add")
    await expect(local.locator("#clinician-form .cf-role")).to_have_count(2)
    local.on("dialog", lambda dialog: dialog.accept())
    await local.locator("#clinician-rows tr[data-clinician='ref3'] .reactivate").click()
    await expect(local.locator("#clinician-rows tr[data-clinician='ref3']")).to_have_class(
        re.compile(r"(^| )active\b"))


async def test_single_sign_on_from_the_sign_in_page(tmp_path: Path, browser: Browser) -> None:
    """The sign-in page's hospital-account button, through the OpenID Connect provider the
    signaling tests start (oidc-provider from npm, on another site: localhost), back to the
    page, which gets its access token from the refresh cookie the callback set."""
    from tests.signaling.test_oidc import HOSPITAL_LOGIN, setup

    async with setup(tmp_path, host="localhost") as server:
        page = await open_page(browser, f"{server.url}/?test-hooks")
        await page.click("#sso-link")  # shown because /api/auth/oidc/config says enabled
        await page.fill("input[name=login]", HOSPITAL_LOGIN)
        await page.fill("input[name=password]", "any")
        await page.click("button[type=submit]")
        await page.wait_for_url("http://localhost:*/interaction/**", timeout=10_000)
        await page.click("button[type=submit]")
        await expect(page.locator("#queue")).to_be_visible(timeout=10_000)
        await expect(page.locator("#who-name")).to_have_text("Cardiologist One")
        await page.click("#sign-out")
        await expect(page.locator("#sso-link")).to_be_visible()
        await page.context.close()  # before the server stops: no socket left open
