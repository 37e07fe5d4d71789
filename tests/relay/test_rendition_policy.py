"""The thin rendition's parts without media: the layer policy's step below layer 0 (a table on
a clock the test drives), a leg's change of source (sequence numbers, timestamps and picture
ids as the subscriber sees them, on a recording leg), and the transcoder on its own (the size,
the rate, keyframes on demand, the frame counter still readable)."""

from __future__ import annotations

import fractions
import itertools
import time
from typing import Any

import av
import numpy as np
import pytest
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket

from codec.rtp import TS_MOD, Vp8Descriptor, ts_delta, vp8_descriptor
from relay.bandwidth import QUIET_S, THIN, LayerPolicy
from relay.rendition import LADDER, Rendition, Transcoder, fit, packetize
from relay.subscription import Leg, Subscription
from tests.media import counter_frame, read_counter

CALM: dict[str, Any] = {"loss": 0.0, "rtt_s": 0.6}


# -- the policy ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "report", "lowest", "wait"), [
    ("a send backlog", {"backlog_bytes": 200_000, "rtt_s": 0.6}, THIN, 0),
    ("a queue on the path", {"rtt_s": 0.95}, THIN, 2),
    ("a low estimate with loss", {"loss": 0.03, "rtt_s": 0.6, "estimate_bps": 50_000,
                                  "send_bps": 300_000}, THIN, 2),
    ("loss alone (a lossy but wide link)", {"loss": 0.15, "rtt_s": 0.6}, 0, 2),
])
def test_below_layer_0_the_thin_rendition_only_for_a_lack_of_rate(
        name: str, report: dict[str, Any], lowest: int, wait: int) -> None:
    """``wait``: reports a second apart before the first step (a rise or loss alone needs a
    second report 1.5 s after the first, relay.bandwidth.CONFIRM_APART_S)."""
    policy = LayerPolicy(bottom=THIN)
    policy.update(0.0, **CALM)
    layers = [policy.update(1.0 + t, **report) for t in range(6 + wait)]
    assert layers == [2] * wait + [1, 0, lowest, lowest, lowest, lowest], name


def test_the_default_bottom_stays_layer_0_and_thin_probes_back_up_after_the_quiet_period() -> None:
    default = LayerPolicy()
    assert [default.update(t, rtt_s=0.3 if t == 0 else 0.95) for t in range(6)] == \
        [2, 2, 2, 1, 0, 0]
    policy = LayerPolicy(bottom=THIN)
    for t in range(5):
        policy.update(float(t), backlog_bytes=200_000)
    assert policy.layer == THIN
    assert policy.update(5.0, **CALM) == THIN
    assert policy.update(5.0 + QUIET_S - 0.1, **CALM) == THIN
    assert policy.update(5.0 + QUIET_S, **CALM) == 0  # the same probe as between layers


# -- a leg changing source ----------------------------------------------------------------
class Recorder:
    """A leg's sender that keeps what it sends (and the retransmission history, as
    hooks.SenderLeg does)."""

    ssrc = 1234

    def __init__(self) -> None:
        self.sent: list[RtpPacket] = []
        self._history: dict[int, RtpPacket] = {}

    async def send(self, packet: RtpPacket, ntp: int) -> None:
        self._history[packet.sequence_number % RTP_HISTORY_SIZE] = packet
        self.sent.append(packet)


class Source:
    """A publication or rendition as a subscription sees it."""

    mime_type = "video/VP8"
    kind = "video"

    def __init__(self) -> None:
        self.forwarders: set[Any] = set()
        self.keyframes_asked = 0

    def attach(self, forwarder: Any) -> None:
        self.forwarders.add(forwarder)

    def detach(self, forwarder: Any) -> None:
        self.forwarders.discard(forwarder)

    def request_keyframe(self) -> None:
        self.keyframes_asked += 1

    def is_thin(self, subscription: Any) -> bool:
        return False

    def drop_thin(self, subscription: Any) -> None:
        pass

    async def frame(self, seq: int, ts: int, picture_id: int, key: bool = False) -> None:
        payload = packetize(b"\x00" * 10, picture_id)[0]
        packet = RtpPacket(payload_type=96, marker=1, sequence_number=seq, timestamp=ts,
                           payload=payload)
        descriptor = vp8_descriptor(payload)
        for forwarder in tuple(self.forwarders):
            await forwarder.forward(packet, key, 0, descriptor)


def recording_subscription(publication: Source) -> tuple[Subscription, Recorder]:
    leg = Leg.__new__(Leg)
    recorder = Recorder()
    leg.sender = recorder  # type: ignore[assignment]
    leg.next_seq, leg.payload_type, leg.mid, leg.subscription = 40000, 100, "1", None
    leg.fec, leg.last_out = None, None
    subscription = Subscription(publication, "viewer", leg,  # type: ignore[arg-type]
                                max_backlog_bytes=0)
    subscription.ready = True
    publication.attach(subscription)
    return subscription, recorder


def seen(recorder: Recorder) -> list[tuple[int, int, int]]:
    """(sequence number, timestamp, picture id) of what the subscriber got."""
    out = []
    for packet in recorder.sent:
        descriptor = vp8_descriptor(packet.payload)
        assert isinstance(descriptor, Vp8Descriptor)
        out.append((packet.sequence_number, packet.timestamp, descriptor.picture_id))
    return out


async def test_a_leg_changes_source_at_a_keyframe_with_no_gap_and_time_never_going_back() -> None:
    original, thin = Source(), Source()
    subscription, recorder = recording_subscription(original)
    await original.frame(100, 90_000, 10, key=True)
    await original.frame(101, 93_000, 11)
    done: list[str] = []
    subscription.move_to(thin, lambda: done.append("thin"))
    assert thin.keyframes_asked == 1
    await original.frame(102, 96_000, 12)  # still the original until the rendition's keyframe
    await thin.frame(7, 87_000, 500)  # not a keyframe: nothing changes
    await thin.frame(8, 93_000, 501, key=True)  # made from an older frame than the last sent
    await original.frame(103, 99_000, 13)  # no longer forwarded
    await thin.frame(9, 96_000, 502)
    assert done == ["thin"] and subscription.source is thin
    assert subscription not in original.forwarders and subscription in thin.forwarders
    subscription.move_to(original, lambda: done.append("original"))
    await thin.frame(10, 99_000, 503)  # the rendition until the publisher's keyframe
    await original.frame(104, 102_000, 14)
    await original.frame(105, 105_000, 15, key=True)
    await thin.frame(11, 102_000, 504)  # no longer forwarded
    await original.frame(106, 108_000, 16)
    assert done == ["thin", "original"] and subscription.source is original

    got = seen(recorder)
    seqs = [s for s, _, _ in got]
    assert seqs == list(range(40000, 40000 + len(got)))  # the sequence numbers run on
    assert [p for _, _, p in got] == list(range(10, 10 + len(got)))  # so do picture ids
    times = [t for _, t, _ in got]
    assert all(ts_delta(b, a) > 0 for a, b in itertools.pairwise(times)), times
    base = times[0] - 90_000
    in_original_time = [(t - base) % TS_MOD for t in times]
    # Before and after the rendition, the publisher's own timeline (lip sync kept); on the
    # rendition 1 ms after the last frame sent (its frames come after the original's), then
    # its own pace.
    assert in_original_time == [90_000, 93_000, 96_000, 96_090, 99_090, 102_090, 105_000,
                                108_000]


def test_a_subscription_alone_on_a_leg_has_no_handover() -> None:
    subscription, _ = recording_subscription(Source())
    assert subscription.handover is None and subscription._continue is None


# -- the transcoder -----------------------------------------------------------------------
@pytest.mark.parametrize(("size", "fitted"), [
    ((640, 480), (240, 180)), ((1280, 720), (320, 180)), ((320, 240), (240, 180)),
    ((160, 120), (160, 120)), ((480, 640), (134, 180)),
])
def test_the_rendition_fits_the_box_keeping_the_aspect_ratio(
        size: tuple[int, int], fitted: tuple[int, int]) -> None:
    assert fit(*size) == fitted


def test_the_transcoder_keeps_a_frame_in_three_of_30_fps_readable_and_keyframes_on_demand(
        ) -> None:
    encoder = Vp8Encoder()
    transcoder = Transcoder()
    out: list[tuple[int, bool, int]] = []
    decoder = Transcoder()  # its decoder reads the rendition back
    for n in range(60):
        frame = counter_frame(n)
        frame.pts, frame.time_base = n * 3000, fractions.Fraction(1, 90000)
        payloads, ts = encoder.encode(frame, force_keyframe=n == 0)
        data = b"".join(vp8_depayload(p) for p in payloads)
        for encoded, key in transcoder.frame(data, ts, want_key=n in (0, 31)):
            (picture,) = decoder.decoder.decode(_packet(encoded, ts))
            assert (picture.width, picture.height) == (240, 180)
            out.append((n, key, read_counter(picture)))
    assert [n for n, _, _ in out] == list(range(0, 31, 3)) + list(range(31, 60, 3))
    assert [n for n, key, _ in out if key] == [0, 31]  # the first, and the one asked for
    assert all(n == counter for n, _, counter in out)
    transcoder.close()
    assert transcoder.encoder is None and transcoder.decoder is None


def _packet(data: bytes, ts: int) -> Any:
    packet = av.Packet(data)
    packet.pts = ts
    return packet


def test_the_transcoder_on_a_640x480_camera_prints_its_cpu() -> None:
    """The cost the relay takes on per thin rendition, on what the web client's camera sends
    (640x480 30 fps, ~1 Mbps; a moving picture with noise so the decoder has work): printed as
    CPU milliseconds per second of video, for docs/benchmarks.md."""
    width, height, seconds = 640, 480, 5
    encoder = Vp8Encoder()
    encoder.target_bitrate = 1_000_000
    noise = np.random.default_rng(1)
    ramp = np.fromfunction(lambda y, x: (x + y) % 256, (height, width)).astype(np.uint8)
    frames = []
    for n in range(30 * seconds):
        luma = np.roll(ramp, 4 * n, axis=1) ^ noise.integers(0, 24, (height, width),
                                                             dtype=np.uint8)
        picture = av.VideoFrame.from_ndarray(
            np.concatenate([luma, np.full((height // 2, width), 128, np.uint8)]),
            format="yuv420p")
        picture.pts, picture.time_base = n * 3000, fractions.Fraction(1, 90000)
        payloads, ts = encoder.encode(picture, force_keyframe=n == 0)
        frames.append((b"".join(vp8_depayload(p) for p in payloads), ts))
    transcoder = Transcoder()
    start = time.thread_time()
    out = sum(len(transcoder.frame(data, ts, n == 0)) for n, (data, ts) in enumerate(frames))
    cpu_ms = (time.thread_time() - start) * 1000 / seconds
    kbps = sum(len(data) for data, _ in frames) * 8 / seconds / 1000
    print(f"\nrendition of {width}x{height} 30 fps ({kbps:.0f} kbps) -> {transcoder.size} "
          f"10 fps: {cpu_ms:.0f} ms CPU per second of video (decode + scale + encode)")
    assert out == 10 * seconds and transcoder.size == (240, 180)


# -- the rendition's frame assembly -------------------------------------------------------
class Publisher:
    """What a Rendition asks of its publication."""

    id = "pubn_test"

    def __init__(self) -> None:
        self.keyframes_asked = 0

    def request_keyframe(self) -> None:
        self.keyframes_asked += 1


async def test_a_frame_lost_whole_stops_decoding_until_the_publishers_keyframe() -> None:
    encoder = Vp8Encoder()
    packets: list[tuple[RtpPacket, bool]] = []
    seq = 65530  # across the wrap
    for n in range(12):
        frame = counter_frame(n)
        frame.pts, frame.time_base = n * 3000, fractions.Fraction(1, 90000)
        payloads, ts = encoder.encode(frame, force_keyframe=n in (0, 8))
        for i, payload in enumerate(payloads):
            packets.append((RtpPacket(payload_type=96, marker=int(i == len(payloads) - 1),
                                      sequence_number=seq % 65536, timestamp=ts,
                                      payload=payload), n in (0, 8) and i == 0))
            seq += 1
    publisher = Publisher()
    rendition = Rendition(publisher)  # type: ignore[arg-type]
    try:
        asked = publisher.keyframes_asked
        lost_frame = packets[3][0].timestamp
        for packet, key in packets:
            if packet.timestamp == lost_frame:
                continue  # the whole of frame 3
            await rendition.forward(packet, key, 0, vp8_descriptor(packet.payload))
            if packet.timestamp == packets[1][0].timestamp:  # a late copy: nothing changes
                await rendition.forward(packet, False, 0, vp8_descriptor(packet.payload))
        # Frames 0-2 decoded; 4-7 not (their reference is gone); from the keyframe 8 on, yes.
        assert rendition.frames_in == 3 + 4 and rendition.frames_dropped == 1
        assert publisher.keyframes_asked == asked + 1
    finally:
        await rendition.close()
    assert not rendition.running


async def test_a_still_picture_takes_the_rung_it_fills() -> None:
    """A budget is compared with the rungs as the picture fills them: a still picture that
    fills half of the 10 fps rung's 100 kbps lets a 110 kbps budget take the 15 fps rung
    (it would come out near 75 kbps); a picture that fills them whole keeps the nominal
    ladder; a rung not measured for 2 s yet counts as full."""
    budgets = [110_000.0]
    publisher = Publisher()
    rendition = Rendition(publisher, budgets=lambda: budgets)  # type: ignore[arg-type]
    try:
        assert rendition.rung == LADDER[1]
        start = rendition._rung_mark[0]
        assert rendition.check_rung(start + 1.0) is None  # not measured yet: nominal
        rendition.bytes_out = 50_000 * 4 // 8  # 50 kbps over 4 s
        assert rendition.check_rung(start + 4.0) == LADDER[0]
        assert rendition.fill == pytest.approx(0.5)
        rendition.bytes_out += 150_000 * 4 // 8  # the 15 fps rung filled whole
        assert rendition.check_rung(start + 8.0) == LADDER[1]  # 110 kbps: back to 10 fps
        assert rendition.fill == pytest.approx(1.0)
    finally:
        await rendition.close()
