"""Thin-link benchmark (#15): one participant behind each link profile in turn, in a
consultation with well-connected ones, with the relay's adaptation on and, in the same run,
off (``relay.adaptation = false``, the baseline: no temporal layer dropped, as before #15).

    python bench/thin_link.py            # good, 4g, 3g, vsat, truong-sa; 30 s each way, ~6.5 min
    python bench/thin_link.py --quick    # vsat and truong-sa, 10 s each way, ~1.5 min
    python bench/thin_link.py --bandwidth-floor 0   # no video pause: the layers alone

What runs (all on 127.0.0.1, in this process but for Chromium; everything stopped at the end):

- A relay (relay/embedded.LocalRelay, as `telehealth serve` runs it) on its single UDP port
  behind tests/link_emulator.py's UdpLinkEmulator; the relay announces the emulator's port and
  reads no client candidate (``hide_client_addresses``), so every flow goes through it.
- Two good sites: Chromium (Debian's, headless) publishing its fake camera in VP8 L1T3 and its
  fake microphone, as the web client does (a bare RTCPeerConnection: the bench measures media,
  not the page). They publish only: on 2 cores, two more Chromium decoders would measure the
  machine. One aiortc participant on ``good`` decodes both (the good sites' fps).
- The measured participant (aiortc, tests/media.py MediaPeer) behind the profile: it decodes
  both Chromium cameras and their audio and publishes a 15 fps counter video and a tone (aiortc
  sends no temporal layers: forwarded whole). For each profile it joins, runs ``--warmup`` s,
  is measured ``--seconds`` s, and leaves. Every profile with adaptation on, then every
  profile with it off; the table lists them by profile.
- Adaptation off: a second relay (and emulator, seeded alike) with ``relay.adaptation =
  false`` (MediaConfig.adaptation): no layer policy and no thin rendition for any subscriber,
  every layer to everyone, only the video pause, as before #15. The setting is the relay's, so
  the cameras and the good viewer join that relay afresh (the good viewer without adaptation
  too: good_fps_min is taken from the runs with it on).
- ``truong-sa``: its outage (5 s each minute in the profile) is scaled: one 5 s outage starting
  ``OUTAGE_AT_S`` into the measurement; the recovery is the time from the outage's end to the
  first video frame decoded from every publisher and audio heard again.

Printed per profile and mode: video fps received (mean over the two cameras), freeze seconds
per minute (gaps between decoded frames longer than max(3 x the mean interval, the mean + 150
ms), Chromium's own freeze rule, summed), the audio's lost ratio (aiortc has no concealment
counter: the share of audio packets lost, what a decoder conceals; Opus FEC is not used by
aiortc's decoder), recovery after the outage, the kbps the weak participant receives (all
its media flows through the emulator, RTCP included), the weak one's layer at the end, and the
good viewer's fps of each camera (min). The last line:
``RESULT vsat_fps=.. vsat_freeze_s_per_min=.. truong_sa_fps=.. truong_sa_audio_concealed=..
good_fps_min=..`` (adaptation on; good_fps_min over every run with adaptation on).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ itself is on sys.path
    sys.path.insert(0, str(ROOT))

from playwright.async_api import Browser, Page  # noqa: E402

from tests.link_emulator import (  # noqa: E402
    PROFILES,
    Profile,
    UdpLinkEmulator,
    hide_client_addresses,
    peer_ufrags,
)
from tests.media import MediaPeer, Received, wait_for  # noqa: E402
from tests.relay.peers import RelayRoom, relay_room  # noqa: E402
from tests.relay.test_ports import free_udp_ports  # noqa: E402
from tests.web.browser import FLAGS, chromium  # noqa: E402

HOST = "127.0.0.1"
PUBLISHERS = ("hospital", "province")
OUTAGE_S = 5.0
OUTAGE_AT_S = 3.0
FIRST_FRAMES_S = 30.0
"""How long the measured participant may take to decode both cameras before the warmup
(measured anyway after it: a profile on which it never decodes is a result); 10 s with
--quick."""
PAGE_URL = "http://localhost/thin-link"

PUBLISH = """async () => {
  const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
  const pc = new RTCPeerConnection({ iceServers: [] });
  window.pc = pc;
  const audio = pc.addTransceiver(media.getAudioTracks()[0], { direction: 'sendonly' });
  const video = pc.addTransceiver(media.getVideoTracks()[0], {
    direction: 'sendonly', sendEncodings: [{ scalabilityMode: 'L1T3' }] });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === 'complete') done();
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') done();
    });
    setTimeout(done, 3000);
  });
  return { sdp: pc.localDescription.sdp, sources: { [audio.mid]: 'microphone',
                                                    [video.mid]: 'camera' },
           mode: video.sender.getParameters().encodings[0].scalabilityMode };
}"""
"""JS: the fake camera (VP8 L1T3, as web_client/src/media.js asks) and microphone, sent."""


@dataclass
class Run:
    profile: str
    adaptation: bool
    fps: float = 0.0
    freeze_s_per_min: float = 0.0
    audio_lost: float = 0.0
    recovery_s: float | None = None
    kbps: float = 0.0
    layer: Any = None
    first_frames_s: float = 0.0
    audio_recovery_s: float | None = None
    good_fps: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        recovery = "-" if self.recovery_s is None else (
            f"video {self.recovery_s:.1f}, audio {self.audio_recovery_s:.1f}")
        good = ", ".join(f"{v:.1f}" for v in self.good_fps.values())
        return (f"| {self.profile} | {'on' if self.adaptation else 'off'} | {self.fps:.1f} | "
                f"{self.freeze_s_per_min:.1f} | {self.audio_lost:.1%} | {recovery} | "
                f"{self.kbps:.0f} | {self.layer} | {self.first_frames_s:.1f} | {good} |")


HEADER = ("| profile | adaptation | video fps | freeze s/min | audio lost | recovery s | kbps in "
          "| layer at end | first frames s | good viewer fps |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def scaled(name: str, outage_at: float | None) -> tuple[Profile, Profile]:
    """The profile, its outages replaced by one of ``OUTAGE_S`` at ``outage_at`` (seconds
    after the emulator's start) or by none."""
    if outage_at is None:
        update: dict[str, Any] = {"outage_every_s": None, "outage_s": 0.0}
    else:
        update = {"outage_every_s": 3600.0, "outage_s": OUTAGE_S, "outage_first_at_s": outage_at}
    up, down = PROFILES[name]
    return up.model_copy(update=update), down.model_copy(update=update)


def frames_between(received: Received, start: float, end: float) -> list[float]:
    return [t for t in received.arrivals if start <= t < end]


def freeze_s(arrivals: list[float], start: float, end: float) -> float:
    """Chromium's freeze rule over the decoded frames' arrival times in ``start``-``end``: an
    interval longer than max(3 x the mean interval, the mean + 150 ms) is a freeze of that
    interval's length; the window's edges count as frames (no frame at all: the whole
    window is frozen)."""
    if len(arrivals) < 2:
        return end - start
    mean = statistics.fmean(b - a for a, b in itertools.pairwise(arrivals))
    bound = max(3 * mean, mean + 0.15)
    return sum(g for g in (b - a for a, b in itertools.pairwise([start, *arrivals, end]))
               if g > bound)


async def audio_counts(peer: MediaPeer) -> tuple[int, int]:
    """Audio packets received and lost so far on the peer's subscribe connection."""
    assert peer.subscribe_pc is not None
    report = await peer.subscribe_pc.getStats()
    received = lost = 0
    for stats in report.values():
        if stats.type == "inbound-rtp" and stats.kind == "audio":
            received += stats.packetsReceived
            lost += max(stats.packetsLost, 0)
    return received, lost


async def publish_chromium(browser: Browser, room: RelayRoom, name: str) -> Page:
    page = await browser.new_page()
    await page.route(PAGE_URL, lambda route: route.fulfill(
        body="<!doctype html><html><body></body></html>", content_type="text/html"))
    await page.goto(PAGE_URL)
    await room.relay.join(room.id, name)
    offer: dict[str, Any] = await page.evaluate(PUBLISH)
    if offer["mode"] != "L1T3":
        raise RuntimeError(f"Chromium refused L1T3: {offer['mode']}")
    answer = await room.relay.publish(room.id, name, offer["sdp"], offer["sources"])
    await page.evaluate("(sdp) => window.pc.setRemoteDescription({type: 'answer', sdp})",
                        answer["sdp"])
    return page


class RelayLog(logging.Handler):
    """The relay's decisions about the measured participant (layers, pauses, renditions),
    printed after its run with --verbose."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.started = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "weak-" in text or "Rendition" in text:
            self.lines.append(f"{time.monotonic() - self.started:6.1f} s {text}")

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


async def measure(room: RelayRoom, link: UdpLinkEmulator, good: MediaPeer, profile: str,
                  adaptation: bool, warmup: float, seconds: float, verbose: bool,
                  first_frames_s: float = FIRST_FRAMES_S) -> Run:
    name = f"weak-{profile}-{'on' if adaptation else 'off'}"
    loop = asyncio.get_running_loop()
    outage = profile == "truong-sa"
    await room.relay.join(room.id, name)
    participant = room.relay.rooms[room.id].participants[name]
    assert participant.config.adaptation is adaptation
    peer = room.peer(name)
    await peer.subscribe()
    for ufrag in peer_ufrags(peer):
        link.assign(ufrag, scaled(profile, None))
    await peer.publish(fps=15)
    for ufrag in peer_ufrags(peer):
        link.assign(ufrag, scaled(profile, None))
    run = Run(profile, adaptation)
    try:
        joined = time.monotonic()
        for _ in range(int(first_frames_s / 0.2)):
            if all(peer.frames(p) >= 1 for p in PUBLISHERS):
                break
            await asyncio.sleep(0.2)
        run.first_frames_s = time.monotonic() - joined
        await asyncio.sleep(warmup)
        await wait_for(lambda: all(peer.video_from(p) is not None for p in PUBLISHERS), 10,
                       f"{name} receiving both cameras")
        videos = {p: peer.video_from(p) for p in PUBLISHERS}
        good_videos = {p: good.video_from(p) for p in PUBLISHERS}
        audios = [r for r in peer.received.values() if r.kind == "audio"]
        flows = [f for u in peer_ufrags(peer) for f in link.flows_of(u)]
        bytes_before = sum(f.down.stats.bytes_out for f in flows)
        audio_before = await audio_counts(peer)
        start = time.monotonic()
        ended = None
        if outage:
            at = loop.time() + OUTAGE_AT_S
            for ufrag in peer_ufrags(peer):
                link.assign(ufrag, scaled(profile, at - link.epoch))
            ended = start + OUTAGE_AT_S + OUTAGE_S
        await asyncio.sleep(seconds)
        end = time.monotonic()
        elapsed = end - start
        fps, freezes = [], []
        for received in videos.values():
            assert received is not None
            arrivals = frames_between(received, start, end)
            fps.append(len(arrivals) / elapsed)
            freezes.append(freeze_s(arrivals, start, end) * 60 / elapsed)
        run.fps = statistics.fmean(fps)
        run.freeze_s_per_min = statistics.fmean(freezes)
        audio_after = await audio_counts(peer)
        got = audio_after[0] - audio_before[0]
        lost = audio_after[1] - audio_before[1]
        run.audio_lost = lost / (got + lost) if got + lost else 1.0
        run.kbps = (sum(f.down.stats.bytes_out for f in flows) - bytes_before) * 8 / elapsed / 1000
        run.layer = participant.subscriber.max_layer
        for publisher, received in good_videos.items():
            assert received is not None
            run.good_fps[publisher] = len(frames_between(received, start, end)) / elapsed
        if ended is not None:
            def first_after(received: Received | None) -> float:
                assert received is not None
                after = [t for t in received.arrivals if t >= ended]
                return after[0] - ended if after else float("inf")

            run.recovery_s = max(first_after(r) for r in videos.values())
            run.audio_recovery_s = max(first_after(r) for r in audios)
        if verbose:
            mine = (await room.relay.stats(room.id)).get(name, {})
            print(f"  relay, {name}: layer {mine.get('layer')}, thin {mine.get('thin')}, "
                  f"remb {mine.get('remb_bps')}, send {mine.get('send_bps')}; subscriptions "
                  f"{mine.get('subscriptions')}; emulator down "
                  f"{[f.down.stats.as_dict() for f in flows]}")
    finally:
        await peer.close()
        await room.relay.leave(room.id, name)
    return run


async def main_async(args: argparse.Namespace) -> list[Run]:
    logging.basicConfig(level=logging.WARNING)
    relay_log = RelayLog()
    relay_logger = logging.getLogger("relay")
    relay_logger.setLevel(logging.INFO)
    relay_logger.addHandler(relay_log)
    profiles = args.profiles or (["vsat", "truong-sa"] if args.quick else
                                 ["good", "4g", "3g", "vsat", "truong-sa"])
    runs: list[Run] = []
    began = time.monotonic()
    async with chromium(FLAGS) as browser:
        for adaptation in (True, False):
            runs += await run_mode(args, browser, profiles, adaptation, relay_log)
    print(f"\nrun took {time.monotonic() - began:.0f} s\n")
    order = {profile: n for n, profile in enumerate(profiles)}
    return sorted(runs, key=lambda run: (order[run.profile], not run.adaptation))


async def run_mode(args: argparse.Namespace, browser: Browser, profiles: list[str],
                   adaptation: bool, relay_log: RelayLog) -> list[Run]:
    """Every profile in turn on a relay of its own with ``relay.adaptation = adaptation``."""
    (relay_port, _) = free_udp_ports(1)
    runs: list[Run] = []
    began = time.monotonic()
    async with UdpLinkEmulator((HOST, relay_port), default="good", seed=args.seed) as link, \
            relay_room(udp_port=relay_port, announced_port=link.port,
                       bandwidth_floor_bps=args.bandwidth_floor,
                       adaptation=adaptation) as room:
        await room.relay.start()
        hide_client_addresses(room.relay)
        good = await room.join("good", publish=False)
        pages = [await publish_chromium(browser, room, name) for name in PUBLISHERS]
        try:
            await wait_for(lambda: all(good.frames(p) >= 30 for p in PUBLISHERS), 40,
                           "the good viewer decoding both cameras")
            print(f"relay.adaptation = {str(adaptation).lower()}: two Chromium cameras (L1T3) "
                  f"decoded by the good viewer after {time.monotonic() - began:.1f} s",
                  flush=True)
            for profile in profiles:
                try:
                    run = await measure(room, link, good, profile, adaptation,
                                        args.warmup, args.seconds, args.verbose,
                                        10.0 if args.quick else FIRST_FRAMES_S)
                except AssertionError as failure:  # it never decoded: say so, go on
                    print(f"{profile} {'on' if adaptation else 'off'}: {failure}")
                    run = Run(profile, adaptation, layer="no video")
                runs.append(run)
                print(run.line(), flush=True)
                if args.verbose:
                    print("  " + "\n  ".join(relay_log.take()), flush=True)
        finally:
            for page in pages:
                await page.close()
    return runs


def result_line(runs: list[Run]) -> str:
    on = {r.profile: r for r in runs if r.adaptation}
    good = [v for r in runs if r.adaptation for v in r.good_fps.values()]

    def value(profile: str, key: str, form: str) -> str:
        run = on.get(profile)
        return "na" if run is None else format(getattr(run, key), form)

    return (f"RESULT vsat_fps={value('vsat', 'fps', '.1f')} "
            f"vsat_freeze_s_per_min={value('vsat', 'freeze_s_per_min', '.1f')} "
            f"truong_sa_fps={value('truong-sa', 'fps', '.1f')} "
            f"truong_sa_audio_concealed={value('truong-sa', 'audio_lost', '.3f')} "
            f"good_fps_min={min(good) if good else float('nan'):.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="vsat and truong-sa only, 10 s measured each way")
    parser.add_argument("--profiles", nargs="*", choices=list(PROFILES))
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured per profile and mode (30; 10 with --quick)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="after the first frames, before measuring (6; 3 with --quick)")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--bandwidth-floor", type=int, default=150_000, metavar="BPS",
                        help="relay.bandwidth_floor_bps (the video pause's floor; the "
                             "default's, 150000; 0: never paused)")
    parser.add_argument("--verbose", action="store_true",
                        help="after each run, the relay's view of the measured participant")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 10.0 if args.quick else 30.0
    if args.warmup is None:
        args.warmup = 3.0 if args.quick else 6.0
    if args.seconds < OUTAGE_AT_S + OUTAGE_S + 1:
        parser.error(f"--seconds must be at least {OUTAGE_AT_S + OUTAGE_S + 1:.0f}")
    runs = asyncio.run(main_async(args))
    print(HEADER)
    for run in runs:
        print(run.line())
    print(result_line(runs))


if __name__ == "__main__":
    main()
