"""Thin-link benchmark (#15): one participant behind each link profile in turn, in a
consultation with well-connected ones, with the relay's adaptation on and, in the same run,
off (``relay.adaptation = false``, the baseline: no temporal layer dropped, as before #15).

    python bench/thin_link.py            # good, 4g, 3g, vsat, truong-sa; 30 s each way, ~8 min
    python bench/thin_link.py --quick    # vsat and truong-sa, 10 s each way, ~2 min
    python bench/thin_link.py --bandwidth-floor 0   # no video pause: the layers alone

What runs (all on 127.0.0.1, in this process but for Chromium; everything stopped at the end):

- A relay (relay/embedded.LocalRelay, as `telehealth serve` runs it) on its single UDP port
  behind tests/link_emulator.py's UdpLinkEmulator; the relay announces the emulator's port and
  reads no client candidate (``hide_client_addresses``), so every flow goes through it.
- Two good sites: Chromium pages (Debian's, headless) publishing the fake camera in VP8 L1T3
  and the fake microphone, as the web client does (bare RTCPeerConnections driven against the
  relay's methods, bench/_chromium_peer.py: the bench measures media, not the page). They
  publish only: on 2 cores, two more Chromium decoders would measure the machine. One aiortc
  participant on ``good`` decodes both (the good sites' fps) and the weak one's camera.
- The measured (weak) participant: a third Chromium page behind the profile (the ufrags of
  both its connections assigned to it), subscribed to the room (the relay's renegotiation
  offers answered from the page) and publishing its own fake camera (L1T3) and microphone.
  Measured from its own getStats(): a browser's receiver asks for a keyframe and goes on where
  aiortc's waits 512 packets on a hole its NACKs gave up on (0 fps on any lossy link). For
  each profile it joins, runs ``--warmup`` s, is measured ``--seconds`` s (getStats() every
  ``SAMPLE_S``), and leaves. Every profile with adaptation on, then every profile with it
  off; the table lists them by profile.
- Adaptation off: a second relay (and emulator, seeded alike) with ``relay.adaptation =
  false`` (MediaConfig.adaptation) and ``relay.fec = "off"``: no layer policy, no thin
  rendition and no video FEC for any subscriber,
  every layer to everyone, only the video pause, as before #15. The setting is the relay's, so
  the cameras and the good viewer join that relay afresh (the good viewer without adaptation
  too: good_fps_min is taken from the runs with it on).
- ``truong-sa``: its outage (5 s each minute in the profile) is scaled: the window is
  measured without one (the profile's rate, delay and bursty loss), then one 5 s outage
  follows and the recovery is the time from its end until framesDecoded moves again on both
  cameras and both audios' concealment stops growing (an interval between samples with at
  most ``AUDIO_BACK_CONCEALED`` of its samples concealed); "never" past ``RECOVERY_WAIT_S``;
  resolution ``SAMPLE_S``. With --verbose, the rates of the ``AFTER_S`` s once media is back.

Printed per profile and mode, from the weak page's getStats(): video fps (framesDecoded over
the window, mean over the two cameras), freeze seconds per minute (totalFreezesDuration, plus
the freeze still going at the window's end, which Chromium counts only once a frame comes; or
the stretches of ``STILL_S`` without a frame if more; mean over the cameras), the audio
concealment ratio (concealedSamples / totalSamplesReceived over both microphones), recovery
after the outage, kbps received (bytesReceived of every inbound stream), the weak one's layer
at the end (the relay's), the seconds to its first frames, the good viewer's fps of each camera
and of the weak one's camera. The last line: ``RESULT vsat_fps=.. vsat_freeze_s_per_min=..
truong_sa_fps=.. truong_sa_audio_concealed=.. good_fps_min=..`` (adaptation on; good_fps_min
over every run with adaptation on).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ itself is on sys.path
    sys.path.insert(0, str(ROOT))

from playwright.async_api import Browser  # noqa: E402

from bench._chromium_peer import ChromiumPeer, Sample  # noqa: E402
from tests.link_emulator import (  # noqa: E402
    PROFILES,
    Profile,
    UdpLinkEmulator,
    hide_client_addresses,
)
from tests.media import MediaPeer, Received, wait_for  # noqa: E402
from tests.relay.peers import RelayRoom, relay_room  # noqa: E402
from tests.relay.test_ports import free_udp_ports  # noqa: E402
from tests.web.browser import FLAGS, chromium  # noqa: E402

HOST = "127.0.0.1"
PUBLISHERS = ("hospital", "province")
OUTAGE_S = 5.0
FIRST_FRAMES_S = 30.0
"""How long the measured participant may take to decode both cameras before the warmup
(measured anyway after it: a profile on which it never decodes is a result); 10 s with
--quick."""
SAMPLE_S = 0.25
"""How often the weak page's getStats() is read during the window."""
RECOVERY_WAIT_S = 20.0
"""How long after the outage's end the recovery is waited for."""
AFTER_S = 4.0
"""Sampled on this long once media is back after the outage (printed with --verbose)."""
AUDIO_BACK_CONCEALED = 0.1
"""Audio is back when an interval between samples has at most this share concealed."""
STILL_S = 1.0
"""A stretch this long without a decoded frame is frozen, whatever the mean rate."""
"""Audio is back when an interval between samples has at most this share concealed."""


@dataclass
class Run:
    profile: str
    adaptation: bool
    fps: float = 0.0
    freeze_s_per_min: float = 0.0
    audio_concealed: float = 0.0
    outage: bool = False
    recovery_s: float | None = None
    audio_recovery_s: float | None = None
    kbps: float = 0.0
    layer: Any = None
    first_frames_s: float = 0.0
    good_fps: dict[str, float] = field(default_factory=dict)
    weak_seen_fps: float = 0.0

    def line(self) -> str:
        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f}"

        recovery = "-" if not self.outage else (
            f"video {seconds(self.recovery_s)}, audio {seconds(self.audio_recovery_s)}")
        good = ", ".join(f"{v:.1f}" for v in self.good_fps.values())
        return (f"| {self.profile} | {'on' if self.adaptation else 'off'} | {self.fps:.1f} | "
                f"{self.freeze_s_per_min:.1f} | {self.audio_concealed:.1%} | {recovery} | "
                f"{self.kbps:.0f} | {self.layer} | {self.first_frames_s:.1f} | {good} | "
                f"{self.weak_seen_fps:.1f} |")


HEADER = ("| profile | adaptation | video fps | freeze s/min | audio concealed | recovery s "
          "| kbps in | layer at end | first frames s | good viewer fps | weak one seen by good "
          "fps |\n|---|---|---|---|---|---|---|---|---|---|---|")


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


def at_or_after(samples: list[Sample], t: float) -> Sample:
    """The first sample taken at ``t`` or after (the last one if none)."""
    return next((s for s in samples if s.at >= t), samples[-1])


@dataclass
class Window:
    """What the page's samples say over a stretch of time (its first to its last sample)."""

    samples: list[Sample]

    @property
    def seconds(self) -> float:
        return self.samples[-1].at - self.samples[0].at

    def delta(self, track: str, key: str) -> float:
        return self.samples[-1].value(track, key) - self.samples[0].value(track, key)

    def fps(self, track: str) -> float:
        return self.delta(track, "framesDecoded") / self.seconds

    def freeze_s(self, track: str) -> float:
        """Freeze seconds over the window: Chromium's (``totalFreezesDuration``: a frame
        interval over max(3 x the mean, the mean + 150 ms), counted when the freeze ends)
        plus the one still going at the window's end, which Chromium counts only once a frame
        comes; or, if more, the stretches of ``STILL_S`` or longer between samples in which
        no frame was decoded (Chromium's rule is relative to the mean: at 0.1 fps nothing
        is a freeze). The whole window when no frame came."""
        moved = [b.at for a, b in itertools.pairwise(self.samples)
                 if b.value(track, "framesDecoded") > a.value(track, "framesDecoded")]
        fps = self.fps(track)
        if not moved or fps <= 0:
            return self.seconds
        mean = 1 / fps
        frozen = self.delta(track, "totalFreezesDuration")
        going = self.samples[-1].at - moved[-1]
        if going > max(3 * mean, mean + 0.15):
            frozen += going
        edges = [self.samples[0].at, *moved, self.samples[-1].at]
        still = sum(g for g in (b - a for a, b in itertools.pairwise(edges)) if g >= STILL_S)
        return min(max(frozen, still), self.seconds)

    def concealed(self, tracks: list[str]) -> float:
        """Chromium's audio concealment ratio (concealedSamples / totalSamplesReceived) over
        ``tracks``; 1.0 when no sample was played out at all."""
        samples = sum(self.delta(t, "totalSamplesReceived") for t in tracks)
        concealed = sum(self.delta(t, "concealedSamples") for t in tracks)
        return concealed / samples if samples > 0 else 1.0

    def kbps(self) -> float:
        tracks = set(self.samples[0].tracks) | set(self.samples[-1].tracks)
        return sum(self.delta(t, "bytesReceived") for t in tracks) * 8 / self.seconds / 1000


def latest(times: list[float | None]) -> float | None:
    """The latest of ``times``; None if any is None (that one never came)."""
    known = [t for t in times if t is not None]
    return max(known) if known and len(known) == len(times) else None


def video_back(samples: list[Sample], ended: float, track: str) -> float | None:
    """Seconds from the outage's end until the track's framesDecoded moves again."""
    base = at_or_after(samples, ended).value(track, "framesDecoded")
    return next((s.at - ended for s in samples
                 if s.at > ended and s.value(track, "framesDecoded") > base), None)


def audio_back(samples: list[Sample], ended: float, track: str) -> float | None:
    """Seconds from the outage's end until the track's concealment stops growing: the end of
    the first interval between samples after it in which at most ``AUDIO_BACK_CONCEALED`` of
    the samples played out were concealed."""
    for a, b in itertools.pairwise(samples):
        if a.at < ended:
            continue
        played = b.value(track, "totalSamplesReceived") - a.value(track, "totalSamplesReceived")
        concealed = b.value(track, "concealedSamples") - a.value(track, "concealedSamples")
        if played > 0 and concealed <= AUDIO_BACK_CONCEALED * played:
            return b.at - ended
    return None


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


async def sample_until(peer: ChromiumPeer, samples: list[Sample], until: float,
                       done: Callable[[], bool] = lambda: False) -> None:
    """Sample the page every ``SAMPLE_S`` until the loop's clock reaches ``until`` (or
    ``done()``); bounded by its count too."""
    loop = asyncio.get_running_loop()
    for _ in range(int((until - loop.time()) / SAMPLE_S) + 10):
        samples.append(await peer.sample())
        if samples[-1].at >= until or done():
            return
        await asyncio.sleep(max(0.0, min(SAMPLE_S, until - loop.time())))


async def measure(room: RelayRoom, link: UdpLinkEmulator, good: MediaPeer, browser: Browser,
                  profile: str, adaptation: bool, warmup: float, seconds: float, verbose: bool,
                  first_frames_s: float = FIRST_FRAMES_S) -> Run:
    name = f"weak-{profile}-{'on' if adaptation else 'off'}"
    loop = asyncio.get_running_loop()
    videos = [f"{p}/camera" for p in PUBLISHERS]
    audios = [f"{p}/microphone" for p in PUBLISHERS]
    await room.relay.join(room.id, name)
    participant = room.relay.rooms[room.id].participants[name]
    assert participant.config.adaptation is adaptation

    def behind(ufrags: set[str]) -> None:
        for ufrag in ufrags:
            link.assign(ufrag, scaled(profile, None))

    run = Run(profile, adaptation, outage=profile == "truong-sa")
    peer: ChromiumPeer | None = None
    try:
        peer = await ChromiumPeer.open(browser, room, name, behind)
        joined = loop.time()
        await peer.subscribe()
        await peer.publish()
        for _ in range(int(first_frames_s / 0.2) + 1):
            first = await peer.sample()
            if all(first.value(v, "framesDecoded") >= 1 for v in videos) \
                    or loop.time() - joined > first_frames_s:
                break
            await asyncio.sleep(0.2)
        run.first_frames_s = loop.time() - joined
        await asyncio.sleep(warmup)
        good_videos = {p: good.video_from(p) for p in PUBLISHERS}
        flows = [f for u in peer.ufrags for f in link.flows_of(u)]
        bytes_before = sum(f.down.stats.bytes_out for f in flows)
        samples: list[Sample] = []
        start = loop.time()
        await sample_until(peer, samples, start + seconds)
        end = samples[-1].at
        emulated_kbps = ((sum(f.down.stats.bytes_out for f in flows) - bytes_before) * 8
                         / (end - start) / 1000)
        window = Window(samples)
        run.fps = statistics.fmean(window.fps(v) for v in videos)
        run.freeze_s_per_min = statistics.fmean(window.freeze_s(v) * 60 / window.seconds
                                                for v in videos)
        run.audio_concealed = window.concealed(audios)
        run.kbps = window.kbps()
        run.layer = participant.subscriber.max_layer
        for publisher, received in good_videos.items():
            assert received is not None
            run.good_fps[publisher] = len(frames_between(received, start, end)) / (end - start)
        seen = good.video_from(name)
        if seen is not None:
            run.weak_seen_fps = len(frames_between(seen, start, end)) / (end - start)
        after: Window | None = None
        if run.outage:
            # Then one outage, and the time until media is back after it (sampled on until
            # then and AFTER_S more, or RECOVERY_WAIT_S after its end).
            cut_at = loop.time() + 0.1
            behind_cut = scaled(profile, cut_at - link.epoch)
            for ufrag in peer.ufrags:
                link.assign(ufrag, behind_cut)
            ended = cut_at + OUTAGE_S
            outage: list[Sample] = []

            def back() -> tuple[list[float | None], list[float | None]]:
                return ([video_back(outage, ended, v) for v in videos],
                        [audio_back(outage, ended, a) for a in audios])

            def settled() -> bool:
                all_back = latest([*back()[0], *back()[1]])
                return all_back is not None and outage[-1].at - ended >= all_back + AFTER_S

            await sample_until(peer, outage, ended + RECOVERY_WAIT_S, settled)
            video_s, audio_s = back()
            run.recovery_s = latest(video_s)
            run.audio_recovery_s = latest(audio_s)
            if run.recovery_s is not None and run.audio_recovery_s is not None:
                after = Window([s for s in outage
                                if s.at >= ended + max(run.recovery_s, run.audio_recovery_s)])
        if verbose:
            mine = (await room.relay.stats(room.id)).get(name, {})
            last = window.samples[-1]
            print(f"  {name}: fps {[round(window.fps(v), 1) for v in videos]}; emulator down "
                  f"{emulated_kbps:.0f} kbps (all of its flows, RTCP and its own "
                  "publication's included)")
            if after is not None and len(after.samples) > 1:
                print(f"  after the outage, once back, {after.seconds:.1f} s: fps "
                      f"{[round(after.fps(v), 1) for v in videos]}, audio concealed "
                      f"{after.concealed(audios):.1%}")
            for track in videos + audios:
                stats = last.tracks.get(track, {})
                keys = ("framesDecoded", "freezeCount", "keyFramesDecoded", "frameWidth",
                        "packetsLost", "nackCount", "pliCount") if track in videos else (
                        "concealedSamples", "totalSamplesReceived", "packetsLost")
                print(f"    {track}: " + ", ".join(f"{k} {stats.get(k)}" for k in keys))
            print(f"  relay, {name}: layer {mine.get('layer')}, thin {mine.get('thin')}, "
                  f"remb {mine.get('remb_bps')}, send {mine.get('send_bps')}; subscriptions "
                  f"{mine.get('subscriptions')}; emulator down "
                  f"{[f.down.stats.as_dict() for f in flows]}")
    finally:
        if peer is not None:
            await peer.close()
        await room.relay.leave(room.id, name)
    return run


async def main_async(args: argparse.Namespace) -> list[Run]:
    logging.basicConfig(level=logging.WARNING)
    relay_log = RelayLog()
    relay_logger = logging.getLogger("relay")
    relay_logger.setLevel(logging.INFO)
    relay_logger.addHandler(relay_log)
    if args.trace:
        relay_log.setLevel(logging.DEBUG)
        logging.getLogger("relay.subscriber").setLevel(logging.DEBUG)
    profiles = args.profiles or (["vsat", "truong-sa"] if args.quick else
                                 ["good", "4g", "3g", "vsat", "truong-sa"])
    runs: list[Run] = []
    began = time.monotonic()
    async with chromium(FLAGS) as browser:
        for adaptation in (True,) if args.on_only else (True, False):
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
                       adaptation=adaptation,
                       fec=args.fec if adaptation else "off") as room:
        await room.relay.start()
        hide_client_addresses(room.relay)
        good = await room.join("good", publish=False)
        cameras: list[ChromiumPeer] = []
        try:
            for name in PUBLISHERS:
                await room.relay.join(room.id, name)
                cameras.append(await ChromiumPeer.open(browser, room, name, lambda _: None))
                await cameras[-1].publish()
            await wait_for(lambda: all(good.frames(p) >= 30 for p in PUBLISHERS), 40,
                           "the good viewer decoding both cameras")
            print(f"relay.adaptation = {str(adaptation).lower()}, relay.fec = "
                  f"{args.fec if adaptation else 'off'}: two Chromium cameras (L1T3) "
                  f"decoded by the good viewer after {time.monotonic() - began:.1f} s",
                  flush=True)
            for profile in profiles:
                try:
                    run = await measure(room, link, good, browser, profile, adaptation,
                                        args.warmup, args.seconds, args.verbose,
                                        10.0 if args.quick else FIRST_FRAMES_S)
                except Exception as failure:  # a run that broke is a result: say so, go on
                    print(f"{profile} {'on' if adaptation else 'off'} failed: {failure!r}")
                    run = Run(profile, adaptation, layer="failed")
                runs.append(run)
                print(run.line(), flush=True)
                if args.verbose:
                    print("  " + "\n  ".join(relay_log.take()), flush=True)
        finally:
            for camera in cameras:
                await camera.close()
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
            f"truong_sa_audio_concealed={value('truong-sa', 'audio_concealed', '.3f')} "
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
    parser.add_argument("--trace", action="store_true",
                        help="with --verbose: the relay's view of the weak one's link each "
                             "second (loss, round trip, delivered, paced and sent rates)")
    parser.add_argument("--fec", choices=("auto", "on", "off"), default="auto",
                        help="relay.fec with adaptation on (default auto; the baseline, "
                             "adaptation off, has none, as before #15)")
    parser.add_argument("--on-only", action="store_true",
                        help="adaptation on only, no baseline (for tuning; a published figure "
                             "comes with its baseline)")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 10.0 if args.quick else 30.0
    if args.warmup is None:
        args.warmup = 3.0 if args.quick else 6.0
    if args.seconds < 2:
        parser.error("--seconds must be at least 2")
    runs = asyncio.run(main_async(args))
    print(HEADER)
    for run in runs:
        print(run.line())
    print(result_line(runs))


if __name__ == "__main__":
    main()
