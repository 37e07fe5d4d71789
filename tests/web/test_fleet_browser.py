"""Chromium through a fleet's failures (issue #14): a real fleet (tests/fleet_processes.py:
redis-server, PostgreSQL, two `serve` nodes, two standalone relays, nginx in front) started
once for the module, and two Chromium pages signed in through nginx, a district doctor and a
specialist, in one consultation with video both ways.

- The relay carrying the consultation is killed -9, with a third site's aiortc participant in
  the room too: both pages and the aiortc peer decode each other again by themselves, on the
  other relay (new peer connections), the times from the kill printed.
- The signaling node holding both pages, and the registration of the relay carrying their
  room, is killed -9: the pages' WebSockets reconnect through nginx to the surviving node,
  they rejoin the consultation and resume their media on the same relay without rebuilding
  anything, and the video never stops meanwhile (it never went through signaling).

Which node holds a page and which relay carries the room come from the nodes' logs
(``Fleet.clinician_nodes``, ``Fleet.relay_home``) and the server's API; what a page decodes
from its subscribe connection's own getStats() (tests/web/test_failover_browser.py's helpers).
The relay test runs first: the node test then uses the one relay left, and is the last (the
module's fleet keeps one node after it)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from playwright.async_api import Browser, Page, expect

from tests.failover_client import Participant, describe
from tests.fleet_processes import Fleet, module_fleet
from tests.media import wait_for
from tests.web.browser import (
    MEDIA,
    api_call,
    open_page,
    page_url,
    request_and_accept,
    wait_decoding,
)
from tests.web.test_failover_browser import (
    decoded,
    longest_stall,
    mark_connections,
    same_connections,
    video_back,
)

FPS = 15
"""The aiortc participant's video."""
MEDIA_WAIT_S = 30.0
GUEST = "ref3"
GUEST_SITE = "d3"
"""The aiortc participant of the relay test, and its site (invited by the specialist)."""
BACK_WITHIN_S = 20.0
"""Video back on a page after its relay died. The issue's target is 5 s (printed); the bound
only says "by itself", on the shared 2-core machine."""
RESUMED_WITHIN_S = 5.0
"""A page of a killed node has reconnected through nginx, rejoined and resumed its media
within the issue's "within seconds" (the bound tests/signaling/test_fleet_nodes.py holds
aiortc participants to); measured 0.8-1.6 s, socket.io's first redial being 0.5-1.5 s after
the drop."""
NODE_WAIT_S = 30.0
"""How long the node test waits for a reconnect and a resume, to measure them (the bound
asserted is ``RESUMED_WITHIN_S``)."""
SMOOTH_STALL_S = 3.0
"""Media never passes through signaling: a node's death must not stop the video longer than
this (the bound of test_failover_browser's `serve` kill)."""
ROOM_RELAY = "relay-2"
"""The relay of the node test's room: ref2's site d2 is in region 79, the fleet's second
relay's (regions in turn: 11, 79); the first relay is dead by then anyway."""
SAME_NODE_TRIES = 6
"""Reloads of a page to bring its WebSocket to a chosen node (nginx hashes a direct WebSocket
on the address and port: each reload is a coin toss)."""


fleet = pytest.fixture(scope="module", name="fleet")(module_fleet)


@dataclass
class Pair:
    """The two pages of a consultation: who is signed in on each."""

    district: Page
    specialist: Page
    district_id: str
    specialist_id: str

    @property
    def watching(self) -> list[tuple[str, Page, str]]:
        """(the page's clinician, the page, whose video it shows)."""
        return [(self.district_id, self.district, self.specialist_id),
                (self.specialist_id, self.specialist, self.district_id)]

    @property
    def pages(self) -> list[Page]:
        return [self.district, self.specialist]


@asynccontextmanager
async def pages(browser: Browser, fleet: Fleet, district_id: str,
                specialist_id: str) -> AsyncIterator[Pair]:
    """Both clinicians' pages signed in through nginx, each once its node logged the
    connection; closed at the end (before the fleet goes)."""
    district = await open_page(browser, page_url(fleet.url, fleet.token(district_id)))
    specialist = await open_page(browser, page_url(fleet.url, fleet.token(specialist_id)))
    pair = Pair(district, specialist, district_id, specialist_id)
    try:
        await expect(district.locator("#request-form")).to_be_visible(timeout=15_000)
        await expect(specialist.locator("#queue")).to_be_visible(timeout=15_000)
        for clinician in (district_id, specialist_id):
            await on_one_node(fleet, clinician)
        yield pair
    finally:
        for page in pair.pages:
            await page.context.close()


async def on_one_node(fleet: Fleet, clinician: str, timeout: float = 10.0) -> str:
    """The node holding the clinician's one open connection, once exactly one does."""
    deadline = time.monotonic() + timeout
    while len(nodes := fleet.clinician_nodes(clinician)) != 1:
        assert time.monotonic() < deadline, f"{clinician}'s connections: {nodes}"
        await asyncio.sleep(0.1)
    return nodes[0]


async def in_consultation(pair: Pair) -> None:
    """The district doctor requests, the specialist accepts, both see each other's video."""
    started = time.monotonic()
    await request_and_accept(pair.district, pair.specialist)
    for _, page, other in pair.watching:
        await wait_decoding(page, other)
    print(f"both pages decoding each other {time.monotonic() - started:.2f} s after the "
          "request")


async def relay_of(fleet: Fleet, pair: Pair) -> str:
    """The relay the consultation is placed on, as the server's API says (through nginx)."""
    consultation_id = await pair.specialist.get_attribute("#room", "data-consultation")
    status, answer = await api_call(fleet.url, "GET", f"/api/consultations/{consultation_id}",
                                    token=fleet.token(pair.specialist_id))
    assert status == 200, answer
    relay: str = answer["consultation"]["relay_id"]
    return relay


async def test_the_relay_killed_the_pages_and_an_aiortc_participant_are_back_on_the_other(
        fleet: Fleet, browser: Browser) -> None:
    # The "a consultation of aiortc participants and of two Chromium pages": a third
    # site (ref3, an aiortc participant through nginx) invited into the pages' consultation,
    # so one relay kill moves Chromium and aiortc peers at once, each decoding the others.
    with fleet.logs_on_failure():
        async with pages(browser, fleet, "ref1", "cardio1") as pair:
            await in_consultation(pair)
            guest = Participant(fleet.url, fleet.token(GUEST), GUEST, fps=FPS, audio=False)
            try:
                await guest_joins(pair, guest)
                await media_back_on_the_other_relay(fleet, pair, guest)
            except BaseException:
                print(f"{GUEST}: joins {guest.joins}\n  connects {guest.connects}\n  "
                      f"failures {guest.failures}")
                raise
            finally:
                await guest.close()


async def guest_joins(pair: Pair, guest: Participant) -> None:
    """The specialist invites the guest's site; the guest joins, its media flows both ways
    with both pages."""
    consultation_id = await pair.specialist.get_attribute("#room", "data-consultation")
    assert consultation_id is not None
    await guest.connect()
    await pair.specialist.evaluate(
        f"(id) => window.telehealthTest.media.signaling.invite(id, '{GUEST_SITE}')",
        consultation_id)
    await guest.ok("consult:join", {"consultation_id": consultation_id})
    started = time.monotonic()
    await guest.start(consultation_id)
    await wait_for(lambda: all(guest.frames(name, started, time.monotonic()) >= FPS
                               for name, _, _ in pair.watching),
                   MEDIA_WAIT_S, f"{GUEST} decoding both pages")
    for _, page, _ in pair.watching:
        await wait_decoding(page, GUEST)
    print(f"{GUEST} (aiortc) and both pages decoding each other "
          f"{time.monotonic() - started:.2f} s after its media:join")


async def media_back_on_the_other_relay(fleet: Fleet, pair: Pair,
                                        guest: Participant) -> None:
    relay = await relay_of(fleet, pair)
    assert guest.relay_id() == relay
    spare = next(r for r in fleet.relay_names if r != relay)
    print(f"pages on {({c: fleet.clinician_nodes(c) for c, _, _ in pair.watching})}, "
          f"{GUEST} on {fleet.clinician_nodes(GUEST)}; the room on {relay} (registered with "
          f"{fleet.relay_home(relay)}), {spare} spare (registered with "
          f"{fleet.relay_home(spare)}); killing {relay}")
    for page in pair.pages:
        await mark_connections(page)
    watched = [(name, page, other) for name, page, first in pair.watching
               for other in (first, GUEST)]
    killed_at = time.monotonic()
    fleet.kill(relay, signal.SIGKILL)
    took = await asyncio.gather(*(video_back(page, other, killed_at, BACK_WITHIN_S)
                                  for _, page, other in watched))
    peers = [name for name, _, _ in pair.watching]
    await wait_for(lambda: guest.recovery(killed_at, peers).media_back_s is not None,
                   BACK_WITHIN_S, f"{GUEST}'s media back")
    for (name, _, other), seconds in zip(watched, took, strict=True):
        print(f"relay killed: {name}'s page decodes {other}'s video again after "
              f"{seconds:.2f} s (target <= 5 s)")
    print(f"relay killed: (aiortc) {describe([guest.recovery(killed_at, peers)])} "
          "(target <= 5 s)")
    for name, page, other in watched:
        frames = await decoded(page, other)
        await page.wait_for_timeout(1000)
        assert await decoded(page, other) > frames + 5, f"{name}: no video from {other}"
    for name, page, _ in pair.watching:
        await expect(page.locator("#room-state")).to_have_attribute(
            "data-state", "connected", timeout=10_000)
        # A new relay: media:join {resume: true} was answered resumed: false.
        assert await page.evaluate(f"() => {MEDIA}.resumes") == 0, name
    now = time.monotonic()
    for name in peers:
        assert guest.frames(name, now - 1.0, now) >= FPS / 2, (GUEST, name)
    assert guest.relay_id() == spare and guest.builds(after=killed_at) >= 1, guest.peer_sets
    assert await relay_of(fleet, pair) == spare


SOCKET_ID = f"() => {MEDIA}.signaling.socket.id"
"""JS: the page's socket.io session id (a reconnect opens a new one)."""


async def reconnected(page: Page, before: str, since: float, timeout: float) -> float:
    """Seconds from ``since`` until the page's signaling is connected again on a new
    session."""
    await page.wait_for_function(
        f"(before) => {{ const s = {MEDIA}.signaling.socket; "
        "return s.connected && s.id !== before; }", arg=before, timeout=timeout * 1000,
        polling=50)
    return time.monotonic() - since


async def resumed(page: Page, resumes: int, since: float, timeout: float) -> float:
    """Seconds from ``since`` until the page's media:join {resume} was answered resumed."""
    await page.wait_for_function(f"(n) => {MEDIA}.resumes > n", arg=resumes,
                                 timeout=timeout * 1000, polling=50)
    return time.monotonic() - since


async def test_the_pages_node_killed_they_reconnect_to_the_other_and_video_goes_on(
        fleet: Fleet, browser: Browser) -> None:
    with fleet.logs_on_failure():
        async with pages(browser, fleet, "ref2", "cardio2") as pair:
            # The hard case: the node that dies holds both pages and the registration of the
            # relay that carries their room (the relay redials through nginx meanwhile).
            target = fleet.relay_home(ROOM_RELAY)
            assert target is not None, f"{ROOM_RELAY} registered with no running node"
            for name, page, _ in pair.watching:
                await bring_to(fleet, pair, name, page, target)
            await in_consultation(pair)
            relay = await relay_of(fleet, pair)
            assert relay == ROOM_RELAY
            placed = {c: await on_one_node(fleet, c) for c, _, _ in pair.watching}
            if target not in placed.values():  # every reload hashed elsewhere: the district's
                target = placed[pair.district_id]
            survivor = next(n for n in fleet.node_names if n != target)
            home = fleet.relay_home(relay)
            print(f"pages on {placed}; the room on {relay} (registered with {home}); "
                  f"killing {target}")
            on_killed = [(name, page, other) for name, page, other in pair.watching
                         if placed[name] == target]
            before: dict[str, tuple[str, int, int]] = {}
            for name, page, _ in pair.watching:
                await mark_connections(page)
                before[name] = (await page.evaluate(SOCKET_ID),
                                await page.evaluate(f"() => {MEDIA}.resumes"),
                                await page.evaluate(f"() => {MEDIA}.pcsCreated"))
            stop = asyncio.Event()
            stalls = [asyncio.create_task(longest_stall(page, other, stop))
                      for _, page, other in pair.watching]
            killed_at, killed_wall = time.monotonic(), time.time()
            fleet.kill(target, signal.SIGKILL)
            try:
                back = await asyncio.gather(*(
                    reconnected(page, before[name][0], killed_at, NODE_WAIT_S)
                    for name, page, _ in on_killed))
                again = await asyncio.gather(*(
                    resumed(page, before[name][1], killed_at, NODE_WAIT_S)
                    for name, page, _ in on_killed))
            finally:
                await asyncio.sleep(1.0)  # video after the resume, in the stall too
                stop.set()
                longest = await asyncio.gather(*stalls)
            for (name, page, _), connected, resumed_s in zip(on_killed, back, again,
                                                              strict=True):
                steps = await page.evaluate(f"() => {MEDIA}.timeline.slice(-4)")
                print(f"node killed: {name}'s page reconnected through nginx after "
                      f"{connected:.2f} s, its media resumed after {resumed_s:.2f} s "
                      f"({', '.join(label for label, _ in steps)})")
            if home == target:
                await on_registered(fleet, relay, survivor)
                print(f"{relay} registered with {survivor} "
                      f"{max(fleet.registered_at(relay, survivor)) - killed_wall:.2f} s after "
                      "the kill")
            for (name, page, other), stall in zip(pair.watching, longest, strict=True):
                print(f"{name}'s page: {other}'s video stalled at most {stall:.2f} s from the "
                      "kill to a second after the resume")
                assert stall <= SMOOTH_STALL_S, f"{name}: video stopped {stall:.2f} s"
                assert await on_one_node(fleet, name) == survivor
                # The same connections, nothing rebuilt, video still growing.
                assert await same_connections(page), f"{name} rebuilt its peer connections"
                assert await page.evaluate(f"() => {MEDIA}.pcsCreated") == before[name][2]
                frames = await decoded(page, other)
                await page.wait_for_timeout(1000)
                assert await decoded(page, other) > frames + 5, f"{name}: no video after"
                await expect(page.locator("#room-state")).to_have_attribute(
                    "data-state", "connected", timeout=10_000)
                await expect(page.locator("#participants li.participant.present")
                             ).to_have_count(2, timeout=15_000)
                await expect(page.locator("#server-link")).to_be_hidden()
            assert await relay_of(fleet, pair) == relay
            # Signaling works for both pages on the surviving node: chat goes through.
            await pair.district.fill("#chat-input", "Vẫn thấy hình")
            await pair.district.click("#chat-send")
            await expect(pair.specialist.locator("#chat li", has_text="Vẫn thấy hình")
                         ).to_be_visible(timeout=10_000)
            # Last, so that a slow resume is reported with everything above checked.
            for (name, _, _), resumed_s in zip(on_killed, again, strict=True):
                assert resumed_s <= RESUMED_WITHIN_S, f"{name} resumed after {resumed_s:.2f} s"


async def bring_to(fleet: Fleet, pair: Pair, clinician: str, page: Page, node: str) -> str:
    """Reload ``page`` until its connection is on ``node`` (``SAME_NODE_TRIES`` at most);
    returns the node it is on."""
    ready = "#request-form" if page is pair.district else "#queue"
    for _ in range(SAME_NODE_TRIES):
        if (now := await on_one_node(fleet, clinician)) == node:
            return now
        await page.reload(wait_until="commit")
        await expect(page.locator(ready)).to_be_visible(timeout=15_000)
        await asyncio.sleep(0.3)  # the old connection's close reaches its node's log
    return await on_one_node(fleet, clinician)


async def on_registered(fleet: Fleet, relay: str, node: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while fleet.relay_home(relay) != node:
        assert time.monotonic() < deadline, f"{relay} not registered with {node}"
        await asyncio.sleep(0.1)
