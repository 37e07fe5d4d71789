"""A participant that is a Chromium page driven straight against a LocalRelay (relay.api's
methods, no server, no socket.io), for bench/thin_link.py: it subscribes to the room on one
connection the relay renegotiates (each offer answered from the page, as web_client/src/media.js
does on media:offer) and publishes the fake camera in VP8 L1T3 and the fake microphone on
another. Its measurement is Chromium's own ``getStats()``: frames decoded, freezes, audio
concealment, bytes, per remote track.

Why a page and not aiortc for the measured participant: aiortc's video jitter buffer waits on a
hole its NACKs gave up on until 512 packets later (tens of seconds at a thin link's rate) and
only then asks for a keyframe, so on a lossy link it decodes nothing where a browser asks for a
keyframe and goes on. The bench measures the relay, not aiortc's receiver."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from playwright.async_api import Browser, Page

from tests.link_emulator import sdp_ufrags
from tests.relay.peers import RelayRoom
from tests.web.browser import GATHERED

logger = logging.getLogger(__name__)

PAGE_URL = "http://localhost/thin-link"
"""A page of nothing at a secure origin (camera access), fulfilled by the bench itself."""
EVALUATE_S = 15.0
"""The bound on any one script the bench runs in a page (an offer's gathering waits 3 s)."""

PUBLISH = """async () => {
  const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
  const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: 'max-bundle' });
  window.pc = pc;
  window.media = media;
  const audio = pc.addTransceiver(media.getAudioTracks()[0], { direction: 'sendonly' });
  const video = pc.addTransceiver(media.getVideoTracks()[0], {
    direction: 'sendonly', sendEncodings: [{ scalabilityMode: 'L1T3' }] });
  await pc.setLocalDescription(await pc.createOffer());
  """ + GATHERED + """
  return { sdp: pc.localDescription.sdp, sources: { [audio.mid]: 'microphone',
                                                    [video.mid]: 'camera' },
           mode: video.sender.getParameters().encodings[0].scalabilityMode };
}"""
"""JS: the fake camera (VP8 L1T3, as web_client/src/media.js asks) and microphone, offered."""

SUBSCRIBE = """() => {
  const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: 'max-bundle' });
  window.sub = pc;
  pc.addEventListener('track', (event) => {
    // Remote audio is decoded (and so counted: totalSamplesReceived, concealedSamples) only
    // while something plays it out, as the web client's tiles do; muted, it still runs.
    if (event.track.kind !== 'audio') return;
    const element = document.createElement('audio');
    element.muted = true;
    element.autoplay = true;
    element.srcObject = new MediaStream([event.track]);
    document.body.appendChild(element);
    element.play().catch(() => {});
  });
}"""
"""JS: the subscribe connection, max-bundle as the web client's."""

ANSWER = """async (sdp) => {
  const pc = window.sub;
  await pc.setRemoteDescription({ type: 'offer', sdp });
  await pc.setLocalDescription(await pc.createAnswer());
  return pc.localDescription.sdp;
}"""
"""JS: the relay's (re)negotiation offer answered. The relay reads no client candidate behind
the emulator (``hide_client_addresses``), so the answer goes without waiting for gathering."""

STATS = """async () => {
  const out = { at: performance.now() / 1000, inbound: {} };
  if (!window.sub) return out;
  (await window.sub.getStats()).forEach((s) => {
    if (s.type !== 'inbound-rtp' || !s.mid) return;
    out.inbound[s.mid] = {
      kind: s.kind, framesDecoded: s.framesDecoded || 0, freezeCount: s.freezeCount || 0,
      totalFreezesDuration: s.totalFreezesDuration || 0, bytesReceived: s.bytesReceived || 0,
      concealedSamples: s.concealedSamples || 0, totalSamplesReceived: s.totalSamplesReceived || 0,
      packetsReceived: s.packetsReceived || 0, packetsLost: s.packetsLost || 0,
      nackCount: s.nackCount || 0, pliCount: s.pliCount || 0,
      keyFramesDecoded: s.keyFramesDecoded || 0,
      frameWidth: s.frameWidth || 0, frameHeight: s.frameHeight || 0,
    };
  });
  return out;
}"""
"""JS: the subscribe connection's inbound streams by mid, straight from getStats()."""


@dataclass
class Sample:
    """One reading of the page's stats: ``at`` (the loop's monotonic clock, seconds) and per
    remote track (``participant_id/source``) what getStats() said."""

    at: float
    tracks: dict[str, dict[str, Any]]

    def value(self, track: str, key: str) -> float:
        return float(self.tracks.get(track, {}).get(key, 0))


class ChromiumPeer:
    """One participant as a Chromium page on ``room`` (a RelayRoom: its RecordedEvents hand
    this peer the relay's renegotiation offers, as they do a MediaPeer). ``on_ufrags`` is given
    the ICE ufrags of each description the page sets, before the relay sees it (the bench puts
    them behind the link emulator's profile)."""

    def __init__(self, page: Page, room: RelayRoom, name: str,
                 on_ufrags: Callable[[set[str]], None]) -> None:
        self.page = page
        self.room = room
        self.name = name
        self.on_ufrags = on_ufrags
        self.ufrags: set[str] = set()
        self.tracks: dict[str, dict[str, Any]] = {}
        self.offers = 0
        self._negotiating = asyncio.Lock()

    @classmethod
    async def open(cls, browser: Browser, room: RelayRoom, name: str,
                   on_ufrags: Callable[[set[str]], None]) -> ChromiumPeer:
        page = await browser.new_page()
        try:
            await page.route(PAGE_URL, lambda route: route.fulfill(
                body="<!doctype html><html><body></body></html>", content_type="text/html"))
            await page.goto(PAGE_URL, timeout=EVALUATE_S * 1000)
        except BaseException:
            await page.close()
            raise
        return cls(page, room, name, on_ufrags)

    async def _evaluate(self, script: str, arg: Any = None) -> Any:
        return await asyncio.wait_for(self.page.evaluate(script, arg), EVALUATE_S)

    def _set(self, sdp: str) -> None:
        ufrags = sdp_ufrags(sdp)
        self.ufrags |= ufrags
        self.on_ufrags(ufrags)

    async def subscribe(self) -> None:
        """The subscribe connection; later offers come through the room's events."""
        await self._evaluate(SUBSCRIBE)
        # RecordedEvents answers through any peer with ``answer_offer`` (duck-typed).
        peers: dict[tuple[str, str], Any] = self.room.events.peers
        peers[(self.room.id, self.name)] = self
        offer = await asyncio.wait_for(self.room.relay.subscribe(self.room.id, self.name),
                                       EVALUATE_S)
        await self.answer_offer(offer)

    async def answer_offer(self, offer: dict[str, Any]) -> None:
        async with self._negotiating:
            self.offers += 1
            self.tracks = dict(offer["tracks"])
            sdp: str = await self._evaluate(ANSWER, offer["sdp"])
            self._set(sdp)
            await asyncio.wait_for(self.room.relay.answer(self.room.id, self.name,
                                                          offer["transport_id"], sdp),
                                   EVALUATE_S)

    async def publish(self) -> None:
        offer: dict[str, Any] = await self._evaluate(PUBLISH)
        if offer["mode"] != "L1T3":
            raise RuntimeError(f"Chromium refused L1T3: {offer['mode']}")
        self._set(offer["sdp"])
        answer = await asyncio.wait_for(
            self.room.relay.publish(self.room.id, self.name, offer["sdp"], offer["sources"]),
            EVALUATE_S)
        await self._evaluate("(sdp) => window.pc.setRemoteDescription({type: 'answer', sdp})",
                             answer["sdp"])

    def track_name(self, mid: str) -> str | None:
        info = self.tracks.get(mid)
        if info is None:
            return None
        return f"{info.get('participant_id')}/{info.get('source')}"

    async def sample(self) -> Sample:
        """The page's stats now, by remote track (tracks the relay no longer offers left out)."""
        found: dict[str, Any] = await self._evaluate(STATS)
        loop = asyncio.get_running_loop()
        tracks = {}
        for mid, stats in found["inbound"].items():
            name = self.track_name(mid)
            if name is not None:
                tracks[name] = stats
        return Sample(loop.time(), tracks)

    async def close(self) -> None:
        """Both connections and the camera stopped, the page closed; bounded, never raises."""
        peers: dict[tuple[str, str], Any] = self.room.events.peers
        if peers.get((self.room.id, self.name)) is self:
            del peers[(self.room.id, self.name)]
        try:
            await asyncio.wait_for(self.page.evaluate(
                "() => { for (const pc of [window.pc, window.sub]) if (pc) pc.close();"
                " if (window.media) window.media.getTracks().forEach((t) => t.stop()); }"),
                EVALUATE_S)
        except Exception as failure:  # the page may be gone already: close it anyway
            logger.warning("closing %s's connections: %r", self.name, failure)
        try:
            await asyncio.wait_for(self.page.close(), EVALUATE_S)
        except Exception as failure:
            logger.warning("closing %s's page: %r", self.name, failure)
