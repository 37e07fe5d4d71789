"""The thin rendition's ladder (relay/rendition.py): which rung a set of subscribers' budgets
calls for (a table, with the hysteresis that keeps a budget near a rung's bitrate from making
it flap), the chooser's hold between changes on a clock the test drives, the transcoder keeping
each rung's frame rate from a 20 and a 30 fps publisher and changing rung at a keyframe, and
what libvpx gives on each rung of a 640x480 camera: bitrate, keyframe size and CPU, printed
for docs/benchmarks.md ("#15 thin rendition")."""

from __future__ import annotations

import fractions
import time
from typing import Any

import av
import numpy as np
import pytest
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload

from relay.publication import Publication
from relay.rendition import (
    DEFAULT_RUNG,
    LADDER,
    RUNG_HOLD_S,
    UP_BLOCK_S,
    UP_FAILED_S,
    Rung,
    RungChooser,
    Transcoder,
    choose_rung,
)
from tests.media import counter_frame, read_counter

CLOCK = 90_000
K = 1000


# -- the choice -----------------------------------------------------------------------------
def test_the_ladder_is_best_first_and_starts_where_the_rendition_was_before_it() -> None:
    assert [r.bitrate for r in LADDER] == sorted((r.bitrate for r in LADDER), reverse=True)
    assert [r.fps for r in LADDER] == sorted((r.fps for r in LADDER), reverse=True)
    assert LADDER[DEFAULT_RUNG] == Rung(10, 100_000)
    assert LADDER[0].fps >= 15 and any(7 <= r.fps < 10 for r in LADDER)  # vsat, truong-sa


@pytest.mark.parametrize(("budgets", "current", "rung"), [
    # Starting: the best rung the weakest carries with the down margin (x 1.1).
    ([], None, 1),  # no subscriber: the default rung
    ([None], None, 1),  # unknown: the default rung
    ([250 * K], None, 0),
    ([165 * K], None, 0),
    ([164 * K], None, 1),
    ([110 * K], None, 1),
    ([80 * K], None, 2),
    ([44 * K], None, 3),
    ([10 * K], None, 3),  # under every rung: the lowest (the pause is the policy's, below)
    ([400 * K, 80 * K], None, 2),  # the weakest decides
    ([400 * K, None], None, 1),  # an unknown budget holds the default rung
    ([None, 50 * K], None, 3),
    # Down at once, to the best rung that fits.
    ([105 * K], 1, 2),
    ([160 * K], 0, 1),
    ([100 * K], 0, 2),
    ([30 * K], 0, 3),
    ([None], 0, 1),
    # Up only past the higher rung's bitrate x 1.3, as far as that goes.
    ([129 * K], 2, 2),
    ([130 * K], 2, 1),
    ([194 * K], 1, 1),
    ([195 * K], 1, 0),
    ([200 * K], 3, 0),
    ([90 * K], 3, 2),
    ([None], 3, 1),  # unknown: up to the default rung, not past it
    ([None], 1, 1),
    ([], 3, 3),  # nobody left to size it for: stays
])
def test_the_rung_is_the_best_the_weakest_budget_carries_with_hysteresis(
        budgets: list[float | None], current: int | None, rung: int) -> None:
    assert choose_rung(budgets, current) == rung


def test_a_budget_wavering_near_a_rungs_bitrate_moves_it_once() -> None:
    """An estimate going 105, 118, 105, 118 kbps (loss-based AIMD on a 256 kbps link): down
    from 100 to 64 kbps once, and not back up until the budget passes 130 kbps."""
    current = 1
    path = []
    for budget in [105 * K, 118 * K] * 5 + [131 * K]:
        current = choose_rung([budget], current)
        path.append(current)
    assert path == [2] * 10 + [1]


def test_the_chooser_changes_rung_at_most_once_per_hold() -> None:
    chooser = RungChooser([None], now=0.0)
    assert chooser.rung == LADDER[DEFAULT_RUNG] and chooser.changes == 0
    assert chooser.update(1.0, [50 * K]) is None  # within the hold since it started
    assert chooser.update(RUNG_HOLD_S, [50 * K]) == LADDER[3]
    assert chooser.update(RUNG_HOLD_S + 1.0, [300 * K]) is None
    assert chooser.update(RUNG_HOLD_S + 2.9, [300 * K]) is None
    assert chooser.update(2 * RUNG_HOLD_S, [300 * K]) == LADDER[0]
    assert chooser.update(10 * RUNG_HOLD_S, [300 * K]) is None  # nothing to change
    assert chooser.update(10 * RUNG_HOLD_S + 0.1, [60 * K]) == LADDER[3]  # down at once
    assert chooser.changes == 3


def test_a_rung_whose_step_up_failed_waits_before_it_is_tried_again() -> None:
    """An estimate that climbs past the link (it grows while nothing is lost) takes the rung
    up, the loss that follows takes it down: that rung (and those above it) waits
    ``UP_BLOCK_S`` before it is tried again, twice as long after the next failure; the
    rungs below it are not held back, and a step up that holds resets the wait."""
    chooser = RungChooser([90 * K], now=0.0)
    assert chooser.rung == LADDER[2]  # 8 fps
    assert chooser.update(RUNG_HOLD_S, [140 * K]) == LADDER[1]  # up to 10 fps
    assert chooser.update(2 * RUNG_HOLD_S, [80 * K]) == LADDER[2]  # down 3 s later: failed
    assert chooser.blocked == (1, 2 * RUNG_HOLD_S + UP_BLOCK_S)
    at = 3 * RUNG_HOLD_S
    assert chooser.update(at, [300 * K]) is None  # 10 and 15 fps wait
    assert chooser.update(2 * RUNG_HOLD_S + UP_BLOCK_S, [300 * K]) == LADDER[0]
    assert chooser.update(2 * RUNG_HOLD_S + UP_BLOCK_S + 4, [80 * K]) == LADDER[2]
    assert chooser.blocked is not None and chooser.blocked[0] == 0
    assert chooser.block_s == 4 * UP_BLOCK_S  # the third failure would wait 48 s
    at = 2 * RUNG_HOLD_S + UP_BLOCK_S + 8
    assert chooser.update(at, [140 * K]) == LADDER[1]  # 10 fps is not held back
    assert chooser.update(at + UP_FAILED_S + 1, [140 * K]) is None  # it held
    assert chooser.block_s == UP_BLOCK_S


# -- the transcoder on each rung ------------------------------------------------------------
def counter_stream(fps: int, seconds: float, keys: tuple[int, ...] = (0,)
                   ) -> list[tuple[bytes, int]]:
    """A 320x240 counter camera at ``fps``, VP8 (what an aiortc test peer sends)."""
    encoder = Vp8Encoder()
    out = []
    step = CLOCK // fps
    for n in range(int(fps * seconds)):
        frame = counter_frame(n)
        frame.pts, frame.time_base = n * step, fractions.Fraction(1, CLOCK)
        payloads, _ = encoder.encode(frame, force_keyframe=n in keys)
        out.append((b"".join(vp8_depayload(p) for p in payloads), n * step))
    return out


@pytest.mark.parametrize("source_fps", [20, 30])
def test_each_rung_keeps_its_frame_rate_from_the_publishers(source_fps: int) -> None:
    """15 of 20 fps is three frames in four, 8 of 30 one in 3.75: kept on average, not rounded
    down to a divisor of the publisher's rate (15 of 20 would come out at 10)."""
    stream = counter_stream(source_fps, 4.0)
    for rung in LADDER:
        transcoder = Transcoder(rung)
        out = [len(transcoder.frame(data, ts, n == 0)) for n, (data, ts) in enumerate(stream)]
        kept = sum(out)
        assert abs(kept - rung.fps * 4) <= 1, (source_fps, rung, kept)
        transcoder.close()


def test_a_new_rung_starts_at_a_keyframe_at_its_own_rate_and_stays_readable() -> None:
    stream = counter_stream(30, 4.0)
    transcoder = Transcoder(LADDER[1])
    reader = Transcoder()  # its decoder reads the rendition back
    got: list[tuple[int, bool, int, int]] = []  # (input frame, keyframe, counter, rung fps)
    for n, (data, ts) in enumerate(stream):
        if n == 60:
            transcoder.set_rung(LADDER[0])
        for encoded, key in transcoder.frame(data, ts, want_key=n == 0):
            packet = av.Packet(encoded)
            packet.pts = ts
            (picture,) = reader.decoder.decode(packet)
            assert (picture.width, picture.height) == (240, 180)
            got.append((n, key, read_counter(picture), transcoder.fps))
    assert [n for n, key, _, _ in got if key] == [0, 60]  # the first, and the new rung's
    assert all(n == counter for n, _, counter, _ in got)
    before = [n for n, _, _, fps in got if fps == 10]
    after = [n for n, _, _, fps in got if fps == 15]
    assert before == list(range(0, 60, 3))
    assert after == list(range(60, 120, 2))
    transcoder.set_rung(LADDER[0])  # the same rung: nothing reopened
    assert transcoder.encoder is not None
    transcoder.close()


def camera_stream(fps: int, seconds: float, width: int = 640, height: int = 480
                  ) -> list[tuple[bytes, int]]:
    """A moving picture with noise at ~1 Mbps (the web client's camera, and work for the
    decoder), VP8."""
    encoder = Vp8Encoder()
    encoder.target_bitrate = 1_000_000
    noise = np.random.default_rng(1)
    ramp = np.fromfunction(lambda y, x: (x + y) % 256, (height, width)).astype(np.uint8)
    step = CLOCK // fps
    out = []
    for n in range(int(fps * seconds)):
        luma = np.roll(ramp, 4 * n, axis=1) ^ noise.integers(0, 24, (height, width),
                                                             dtype=np.uint8)
        picture = av.VideoFrame.from_ndarray(
            np.concatenate([luma, np.full((height // 2, width), 128, np.uint8)]),
            format="yuv420p")
        picture.pts, picture.time_base = n * step, fractions.Fraction(1, CLOCK)
        payloads, _ = encoder.encode(picture, force_keyframe=n == 0)
        out.append((b"".join(vp8_depayload(p) for p in payloads), n * step))
    return out


def test_what_libvpx_gives_on_each_rung_of_a_640x480_camera() -> None:
    """Per rung, from a 640x480 20 fps camera (Chromium's fake camera's rate; ~1 Mbps of a
    noisy moving picture, the worst case for the bits): the bitrate that comes out (a keyframe
    asked for each 2 s, as a new or lossy subscriber does), the keyframes' size against
    truong-sa's 16 KB queue, and the CPU (decode + scale + encode) per second of video."""
    seconds = 6
    stream = camera_stream(20, seconds)
    kbps_in = sum(len(data) for data, _ in stream) * 8 / seconds / K
    decoder = av.CodecContext.create("vp8", "r")
    start = time.thread_time()
    for data, ts in stream:
        packet = av.Packet(data)
        packet.pts = ts
        decoder.decode(packet)
    decode_ms = (time.thread_time() - start) * 1000 / seconds
    print(f"\n640x480 20 fps in, {kbps_in:.0f} kbps; decoding it alone {decode_ms:.0f} ms CPU "
          "per second of video")
    results: dict[Rung, dict[str, Any]] = {}
    for rung in LADDER:
        transcoder = Transcoder(rung)
        start = time.thread_time()
        out = []
        for n, (data, ts) in enumerate(stream):
            out += transcoder.frame(data, ts, want_key=n % 40 == 0)
        cpu_ms = (time.thread_time() - start) * 1000 / seconds
        keys = [len(frame) for frame, key in out if key]
        kbps = sum(len(frame) for frame, _ in out) * 8 / seconds / K
        results[rung] = {"fps": len(out) / seconds, "kbps": kbps, "key": max(keys),
                         "cpu": cpu_ms}
        print(f"rung {rung}: {transcoder.size} {len(out) / seconds:.1f} fps out, "
              f"{kbps:.0f} kbps with {len(keys)} keyframes of {min(keys)}-{max(keys)} B, "
              f"{cpu_ms:.0f} ms CPU per second of video")
        transcoder.close()
    for rung, got in results.items():
        assert abs(got["fps"] - rung.fps) <= 0.5, (rung, got)
        assert got["kbps"] <= rung.bitrate / K * 1.15, (rung, got)  # keyframes included
        assert got["key"] < 16_000, (rung, got)  # passes truong-sa's queue whole
    # The lower rungs are what the weakest links carry: fewer bits, and not more CPU.
    bitrates = [results[rung]["kbps"] for rung in LADDER]
    assert bitrates == sorted(bitrates, reverse=True), bitrates


class Thin:
    """A subscription as the publication sees it for the rendition's budgets."""

    def __init__(self, budget_bps: float | None, paused: bool = False) -> None:
        self.budget_bps = budget_bps
        self.paused = paused


def test_the_publication_sizes_its_rendition_by_the_thin_subscriptions_not_paused() -> None:
    publication = Publication.__new__(Publication)  # no receiver: only its thin set is read
    publication._thin = {Thin(300 * K), Thin(None), Thin(20 * K, paused=True)}
    assert sorted(publication.thin_budgets(), key=str) == [300 * K, None]
    assert choose_rung(publication.thin_budgets(), None) == DEFAULT_RUNG
    publication._thin = {Thin(20 * K, paused=True)}
    assert publication.thin_budgets() == []
