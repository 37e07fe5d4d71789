"""What stops media, as a doctor meets it in a real Chromium: a page opened over plain http://
on another machine's address (not a secure origin: no camera, no microphone), camera and
microphone blocked by the browser, and the pre-call check's network line."""

from __future__ import annotations

from playwright.async_api import Browser, Page, expect

from tests.support import http_get
from tests.web.browser import (
    INSECURE_HOST,
    Site,
    chromium,
    chromium_flags,
    host_mapped,
    open_page,
    raw_errors_shown,
    request_consultation,
    wait_decoding,
)


async def specialist_in_room(specialist: Page) -> str:
    """The specialist accepts the waiting request and enters the room; its consultation id."""
    await specialist.locator("#queue li.request .accept").first.click(timeout=10_000)
    await specialist.click("#precheck-join")
    await expect(specialist.locator("#room")).to_be_visible()
    consultation = await specialist.get_attribute("#room", "data-consultation")
    assert consultation is not None
    return consultation


async def attendees(site: Site, consultation: str) -> set[str]:
    """Who the server counts in the consultation (present or once joined)."""
    status, body = await http_get(f"{site.url}/api/consultations/{consultation}",
                                  site.tokens.issue("cardio1"))
    assert status == 200, body
    present = {p["clinician_id"] for p in body["participants"]}
    joined = {a["clinician_id"] for a in body["attendance"]}
    return present | joined


async def test_over_plain_http_the_check_explains_https_and_the_doctor_does_not_half_join(
    site: Site, browser: Browser
) -> None:
    flags = chromium_flags(add=[f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1"])
    assert not any(f.startswith("--unsafely-treat-insecure-origin-as-secure") for f in flags)
    async with chromium(flags) as mapped:
        # The district doctor opened the address IT gave out, over plain http://.
        district = await open_page(mapped, host_mapped(site.link("ref1")))
        assert district.url.startswith(f"http://{INSECURE_HOST}:")
        secure = "() => [window.isSecureContext, typeof navigator.mediaDevices]"
        assert await district.evaluate(secure) == [False, "undefined"]
        specialist = await open_page(browser, site.link("cardio1"))
        await expect(district.locator("#request-form")).to_be_visible()
        await request_consultation(district)
        consultation = await specialist_in_room(specialist)

        await district.locator("#my-requests .join").first.click(timeout=10_000)
        problem = district.locator("#precheck-problem")
        await expect(problem).to_be_visible()
        await expect(problem).to_have_attribute("data-problem", "insecure")
        await expect(problem).to_contain_text("https://")
        await expect(problem).to_contain_text("phòng CNTT")
        join = district.locator("#precheck-join")
        await expect(district.locator("#check-server")).to_have_attribute("data-state", "ok")
        await expect(join).to_be_disabled()
        await expect(district.locator("#precheck-join-reason")).to_contain_text("https://")
        await expect(district.locator("#check-camera")).to_have_attribute("data-state", "bad")
        await expect(district.locator("#precheck video")).to_be_hidden()  # no black box
        assert await raw_errors_shown(district) == []
        # A disabled button does nothing, even clicked: the doctor never joined.
        await join.click(force=True)
        await district.wait_for_timeout(1500)
        assert await attendees(site, consultation) == {"cardio1"}
        await expect(specialist.locator("#participants li")).to_have_count(1)
        await expect(district.locator("#room")).to_have_count(0)

        # The same explanation in English on the switch (the page reloads to the dashboard).
        await district.select_option("#language", "en")
        await district.locator("#my-requests .join").first.click(timeout=10_000)
        await expect(district.locator("#precheck-problem")).to_contain_text("hospital IT team")
        await expect(district.locator("#precheck-join")).to_have_text("Join")
        await expect(district.locator("#precheck-join")).to_be_disabled()
        assert await raw_errors_shown(district) == []
        assert await attendees(site, consultation) == {"cardio1"}
        await district.context.close()


async def test_blocked_camera_and_microphone_are_explained_and_the_doctor_can_still_watch(
    site: Site, browser: Browser
) -> None:
    # No fake permission prompt and nothing granted: Chromium itself refuses getUserMedia.
    flags = chromium_flags(drop=["--use-fake-ui-for-media-stream"])
    async with chromium(flags) as strict:
        district = await open_page(strict, site.link("ref1"), permissions=[])
        specialist = await open_page(browser, site.link("cardio1"))
        await expect(district.locator("#request-form")).to_be_visible()
        await request_consultation(district)
        await specialist_in_room(specialist)

        await district.locator("#my-requests .join").first.click(timeout=10_000)
        problem = district.locator("#precheck-problem")
        await expect(problem).to_have_attribute("data-problem", "permission", timeout=15_000)
        await expect(problem).to_contain_text("Cho phép")
        await expect(district.locator("#check-microphone")).to_have_attribute("data-state", "bad")
        network = district.locator("#check-network")
        await expect(network).to_have_attribute("data-path", "direct", timeout=15_000)
        await expect(network).to_contain_text("Kết nối trực tiếp")
        print(f"network line 'direct' after {await network.get_attribute('data-ms')} ms")
        join = district.locator("#precheck-join")
        await expect(join).to_be_enabled()
        await expect(join).to_have_text("Vào phòng (chỉ xem và trò chuyện)")
        assert await raw_errors_shown(district) == []

        # Watch-only: in the room, the specialist's video decodes; mute and camera say why
        # they are disabled.
        await join.click()
        await wait_decoding(district, "cardio1")
        await expect(district.locator("#mute")).to_be_disabled()
        await expect(district.locator("#camera")).to_have_attribute(
            "title", "Không có camera hoặc micrô")
        await expect(district.locator("#controls-note")).to_be_visible()
        await expect(specialist.locator("#participants li")).to_have_count(2)
        await district.context.close()


async def test_no_path_to_the_relay_is_explained_before_and_in_the_room(
    site: Site, browser: Browser
) -> None:
    # Relay-only on a server with no TURN server: ICE has no candidate that can reach the relay,
    # as behind a firewall that also blocks TURN.
    district = await open_page(browser, site.link("ref1", query="ice=relay"))
    specialist = await open_page(browser, site.link("cardio1"))
    await expect(district.locator("#request-form")).to_be_visible()
    await request_consultation(district)
    await specialist_in_room(specialist)

    await district.locator("#my-requests .join").first.click(timeout=10_000)
    network = district.locator("#check-network")
    await expect(network).to_have_attribute("data-path", "none", timeout=15_000)
    print(f"network line 'none' after {await network.get_attribute('data-ms')} ms")
    await expect(district.locator("#network-problem")).to_contain_text("phòng CNTT")
    await expect(district.locator("#precheck-join")).to_have_text("Vào phòng")
    assert await raw_errors_shown(district) == []
    # Unchecking the setting checks again: directly reachable on loopback.
    await district.locator("#ice-relay").uncheck()
    await expect(network).to_have_attribute("data-path", "direct", timeout=15_000)
    await expect(district.locator("#network-problem")).to_be_hidden()
    await district.locator("#ice-relay").check()
    await expect(network).to_have_attribute("data-path", "none", timeout=15_000)

    # In the room the media cannot connect either: said in words, chat still works.
    await district.click("#precheck-join")
    problem = district.locator("#media-problem")
    await expect(problem).to_be_visible(timeout=30_000)
    await expect(problem).to_contain_text("TURN")
    await district.fill("#chat-input", "Không có hình, chỉ trò chuyện")
    await district.click("#chat-send")
    await expect(specialist.locator("#chat li", has_text="chỉ trò chuyện")).to_be_visible()
    assert await raw_errors_shown(district) == []
    for page in (district, specialist):
        await page.context.close()


async def test_a_pc_without_camera_or_microphone_is_told_so_and_may_still_join(
    site: Site,
) -> None:
    # Chromium without its fake devices: this machine has none, getUserMedia finds nothing.
    flags = chromium_flags(drop=["--use-fake-device-for-media-stream"])
    async with chromium(flags) as bare:
        district = await open_page(bare, site.link("ref1"))
        await expect(district.locator("#request-form")).to_be_visible()
        await request_consultation(district)
        # The specialist accepts on a PC with no camera and no microphone.
        specialist = await open_page(bare, site.link("cardio1"))
        await specialist.locator("#queue li.request .accept").first.click(timeout=10_000)
        await expect(specialist.locator("#precheck-problem")).to_have_attribute(
            "data-problem", "nodevice", timeout=15_000)
        await expect(specialist.locator("#precheck-problem")).to_contain_text(
            "Không tìm thấy camera hoặc micrô")
        await expect(specialist.locator("#precheck-join")).to_have_text(
            "Vào phòng (chỉ xem và trò chuyện)")
        await expect(specialist.locator("#precheck-join")).to_be_enabled()
        assert await raw_errors_shown(specialist) == []
        await specialist.click("#precheck-join")
        await expect(specialist.locator("#room")).to_be_visible()
        await expect(specialist.locator("#device-picker")).to_be_disabled()
        await district.context.close()
        await specialist.context.close()
