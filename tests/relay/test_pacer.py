"""The pacer toward one subscriber (relay/pacer.py): its link estimate, pure; and its queue,
on the event loop with a leg that records what leaves and when (the wire itself is exercised
end to end by tests/relay/test_thin_three_peers.py and bench/thin_link.py)."""

from __future__ import annotations

import time

import pytest
from aiortc.rtp import RtpPacket

from relay.pacer import (
    APP_LIMITED,
    HIGH_LOSS,
    MIN_BPS,
    PACKET_OVERHEAD,
    PAD_MAX,
    RANDOM_LOSS,
    RTX_MAX,
    SPARE_QUEUE_S,
    LinkEstimate,
    Pacer,
)
from tests.media import wait_for


class RecordingLeg:
    """A leg's sending side that records each packet's sequence number and when it left."""

    def __init__(self, ssrc: int = 1) -> None:
        self.ssrc = ssrc
        self.sent: list[tuple[float, int]] = []
        self.refuse = False

    async def send(self, packet: RtpPacket, ntp: int) -> None:
        if self.refuse:
            raise ConnectionError("not connected")
        self.sent.append((time.monotonic(), packet.sequence_number))


class Sub:
    def __init__(self) -> None:
        self.restarts: list[int | None] = []

    def restart_after_drop(self, first_seq: int | None) -> None:
        self.restarts.append(first_seq)


def packet(seq: int, size: int = 1150) -> RtpPacket:
    return RtpPacket(payload_type=96, sequence_number=seq, timestamp=0, payload=b"x" * size)


def paced(rate_bps: float, *, limit_s: float = 1.5) -> Pacer:
    pacer = Pacer("test", queue_limit_s=limit_s)
    pacer.estimate.bps = rate_bps
    return pacer


# -- the estimate ------------------------------------------------------------------------------

def test_no_estimate_until_a_report_loses_over_the_threshold() -> None:
    estimate = LinkEstimate()
    for t in range(5):
        assert estimate.report(float(t), 0.05, 2_000_000, 0.05) is None
    assert estimate.report(5.0, HIGH_LOSS + 0.2, 2_000_000, 0.05, 500_000) == 500_000


def test_loss_without_a_queue_on_the_path_is_the_links_own() -> None:
    """15 % random loss (radio, weather) with a flat round trip: no estimate, nothing paced
    (fewer bits would not help, and the layer policy keeps layer 0 for loss alone); the same
    loss while the round trip rises is a queue overflowing: paced; past RANDOM_LOSS paced
    whatever the round trip (a policer drops without queueing)."""
    flat = LinkEstimate()
    for t in range(10):
        assert flat.report(float(t), 0.15, 1_000_000, 0.6, 850_000) is None
    assert flat.report(10.0, RANDOM_LOSS + 0.05, 1_000_000, 0.6, 700_000) == 700_000
    rising = LinkEstimate()
    rising.report(0.0, 0.0, 1_000_000, 0.6)
    assert rising.report(1.0, 0.15, 1_000_000, 0.9, 850_000) == 850_000


def test_a_decrease_follows_what_arrived_held_for_the_legs_of_one_moment() -> None:
    estimate = LinkEstimate()
    estimate.report(0.0, 0.8, 3_000_000, 0.6, 510_000)
    assert estimate.bps == 510_000
    # The other legs' reports of the same moment, and those of the next round trip (0.6 s)
    # and report interval (0.5 s), which tell of the rate before the decrease, change nothing.
    estimate.report(0.2, 0.9, 3_000_000, 0.6, 100_000)
    estimate.report(1.0, 0.9, 3_000_000, 0.6, 100_000)
    assert estimate.bps == 510_000
    # Later: never more than 40 % off at once, whatever one report counted.
    estimate.report(1.2, 0.5, 500_000, 0.6, 50_000)
    assert estimate.bps == pytest.approx(510_000 * 0.6)
    for t in range(2, 40):
        estimate.report(float(t), 0.9, 100_000, 0.6, 1_000)
    assert estimate.bps == MIN_BPS


def test_a_round_trip_far_below_the_measured_links_is_another_path_and_unpaced() -> None:
    """A satellite link (0.6 s) measured at 250 kbps; then its round trip falls to 0.05 s
    (the site is back on its fibre): the estimate is forgotten, nothing paced until the new
    path loses. A satellite's own jitter (0.55 s) is the same path."""
    estimate = LinkEstimate()
    estimate.report(0.0, 0.0, 1_000_000, 0.6)
    assert estimate.report(1.0, 0.5, 1_000_000, 0.9, 250_000) == 250_000
    for t in range(2, 6):
        assert estimate.report(float(t), 0.0, 250_000, 0.55) is not None
    assert estimate.report(6.0, 0.0, 250_000, 0.05) is None
    assert estimate.reason == "path"
    assert estimate.report(7.0, 0.0, 2_000_000, 0.05) is None
    # The new path measured afresh: its own losses pace it, its own round trip is its path.
    assert estimate.report(8.0, 0.5, 2_000_000, 0.3, 900_000) == 900_000
    assert estimate.report(20.0, 0.0, 900_000, 0.05) is not None


async def test_a_seeded_estimate_is_forgotten_on_another_path_too() -> None:
    pacer = Pacer("test")
    pacer.report(0.0, 0.6, now=0.0)
    assert pacer.seed(200_000) and pacer.rate_bps == 200_000
    pacer.report(0.0, 0.02, now=1.0)
    assert pacer.rate_bps is None


def test_growth_without_loss_bounded_by_what_is_sent_and_held_by_a_rising_round_trip() -> None:
    estimate = LinkEstimate()
    estimate.report(0.0, 0.5, 800_000, 0.5, 400_000)  # held for the round trip and 0.5 s
    estimate.report(1.0, 0.0, 380_000, 0.5)
    assert estimate.bps == pytest.approx(400_000 * 1.08, rel=0.01)
    estimate.report(2.0, 0.0, 380_000, 0.8)  # a queue building on the path: held
    assert estimate.bps == pytest.approx(400_000 * 1.08, rel=0.01)
    for t in range(3, 60):
        estimate.report(float(t), 0.0, 150_000, 0.5)
    # App-limited: 150 kbps sent says nothing of a top beyond twice that (it stops growing).
    assert estimate.bps == pytest.approx(400_000 * 1.08, rel=0.01)
    assert 400_000 * 1.08 > 150_000 * APP_LIMITED


# -- the queue ---------------------------------------------------------------------------------

async def test_unpaced_everything_leaves_at_once() -> None:
    pacer, leg, sub = Pacer("test"), RecordingLeg(), Sub()
    for seq in range(40):
        await pacer.send(leg, packet(seq), 0, audio=False, subscription=sub)  # type: ignore[arg-type]
    assert [s for _, s in leg.sent] == list(range(40))
    assert pacer.queued_bytes == 0


async def test_fec_goes_only_into_room_the_video_leaves() -> None:
    """A FEC packet (``spare``) goes out, or is queued, while the video ahead of it leaves
    within SPARE_QUEUE_S; behind a keyframe's burst it is not sent at all (nor is it on a
    link never paced: there, room is not known to lack)."""
    pacer, leg, sub = paced(256_000), RecordingLeg(), Sub()
    await pacer.send(leg, packet(0, 200), 0, audio=False, subscription=sub,  # type: ignore[arg-type]
                     spare=True)
    await wait_for(lambda: [s for _, s in leg.sent] == [0], timeout=2.0)  # queued, sent
    for seq in range(1, 30):
        await pacer.send(leg, packet(seq), 0, audio=False, subscription=sub)  # type: ignore[arg-type]
    assert pacer.queue_delay_s() > SPARE_QUEUE_S
    await pacer.send(leg, packet(30, 1000), 0, audio=False, subscription=sub,  # type: ignore[arg-type]
                     spare=True)
    assert pacer.spare_dropped == 1
    await wait_for(lambda: len(leg.sent) >= 30, timeout=5.0)
    assert 30 not in [s for _, s in leg.sent]
    unpaced, open_leg = Pacer("test"), RecordingLeg()
    await unpaced.send(open_leg, packet(5), 0, audio=False, subscription=sub,  # type: ignore[arg-type]
                       spare=True)
    assert [s for _, s in open_leg.sent] == [5] and unpaced.spare_dropped == 0


async def test_a_keyframe_burst_leaves_at_the_link_rate_with_audio_first() -> None:
    rate = 256_000
    pacer, video, audio, sub = paced(rate), RecordingLeg(1), RecordingLeg(2), Sub()
    start = time.monotonic()
    for seq in range(30):  # a ~36 KB keyframe, as a camera sends it: at once
        await pacer.send(video, packet(seq), 0, audio=False, subscription=sub)  # type: ignore[arg-type]
    await pacer.send(audio, packet(0, 100), 0, audio=True, subscription=sub)  # type: ignore[arg-type]
    assert len(audio.sent) == 1 and audio.sent[0][0] - start < 0.05  # never waits
    assert pacer.queue_delay_s() > 0.9
    await wait_for(lambda: len(video.sent) >= 30, timeout=5.0)
    assert [s for _, s in video.sent] == list(range(30))
    took = video.sent[-1][0] - start
    expected = 30 * (1150 + PACKET_OVERHEAD) * 8 / rate
    print(f"36 KB at 256 kbps left over {took:.2f} s (the link's rate: {expected:.2f} s)")
    assert expected * 0.8 < took < expected * 1.6
    assert not sub.restarts


async def test_video_queued_past_the_limit_is_given_up_with_no_gap() -> None:
    pacer, leg, sub = paced(100_000, limit_s=1.0), RecordingLeg(), Sub()
    seq = 100
    while not sub.restarts and seq < 140:  # ~12 KB is 1 s at 100 kbps
        await pacer.send(leg, packet(seq), 0, audio=False, subscription=sub)  # type: ignore[arg-type]
        seq += 1
    sent = [s for _, s in leg.sent]
    assert pacer.drops == 1 and pacer.queued_bytes == 0
    # The subscription is told where its sequence numbers go back to: the first packet given
    # up follows the last one that left, so the subscriber sees no gap.
    assert sub.restarts == [sent[-1] + 1 if sent else 100]
    assert pacer.dropped_packets == seq - 100 - len(sent)
    print(f"given up after {seq - 100} packets: {len(sent)} left, "
          f"{pacer.dropped_packets} given up")
    pacer.close()


async def test_a_queued_packet_that_meets_a_closed_transport_restarts_its_subscription() -> None:
    pacer, leg, sub = paced(200_000), RecordingLeg(), Sub()
    for seq in range(10):
        await pacer.send(leg, packet(seq), 0, audio=False, subscription=sub)  # type: ignore[arg-type]
    leg.refuse = True
    await wait_for(lambda: bool(sub.restarts), timeout=3.0)
    assert sub.restarts and pacer.queued_bytes == 0


async def test_retransmissions_bounded_then_the_hole_padded() -> None:
    holes: list[int] = []
    pacer = Pacer("test", rtt=lambda: 0.2, on_hole=holes.append)
    resent: list[int] = []
    padded: list[int] = []

    async def resend(seq: int) -> None:
        resent.append(seq)

    async def pad(seq: int) -> None:
        padded.append(seq)

    await pacer.retransmit(resend, pad, 1, 7, 1000)
    await pacer.retransmit(resend, pad, 1, 7, 1000)  # again within the round trip: refused
    assert resent == [7] and not padded
    # Asked again and again, a round trip apart: RTX_MAX times, then an empty packet in its
    # place, once, and the leg's subscription told (it restarts at a keyframe).
    for _ in range(RTX_MAX + 3):
        await pacer.retransmit(resend, pad, 1, 8, 1000)
        key = (1, 8)
        when, count = pacer._rtx_seen[key]
        pacer._rtx_seen[key] = (when - 1.0, count)  # as if a round trip had passed
    assert resent.count(8) == RTX_MAX and padded == [8] * 3 and holes == [1] * 3
    # The empty packet may be lost too: padded again, at most PAD_MAX times in all.
    for _ in range(3):
        await pacer.retransmit(resend, pad, 1, 8, 1000)
        when, count = pacer._rtx_seen[key]
        pacer._rtx_seen[key] = (when - 1.0, count)
    assert padded.count(8) == PAD_MAX
    # A full video queue: no retransmission takes newer video's place; the hole is padded.
    full, leg, sub = paced(100_000), RecordingLeg(), Sub()
    full._on_hole = holes.append
    for seq in range(13):
        await full.send(leg, packet(seq), 0, audio=False, subscription=sub)  # type: ignore[arg-type]
    await full.retransmit(resend, pad, 2, 9, 1000)
    assert 9 not in resent and padded[-1] == 9 and holes[-1] == 2
    full.close()
    assert pacer.retransmitted == len(resent)


def test_an_islands_bursty_loss_does_not_hold_the_estimate_down() -> None:
    """3 % lost in bursts whatever is sent, the round trip flat: the estimate grows from where
    a bad moment put it (GCC's 2 % would have held it there)."""
    estimate = LinkEstimate()
    estimate.report(0.0, 0.5, 400_000, 0.7, 100_000)
    for t in range(1, 10):  # the first within the decrease's hold (1.2 s)
        estimate.report(float(t), 0.03, 190_000, 0.7)
    assert estimate.bps is not None and estimate.bps > 100_000 * 1.08 ** 7


async def test_a_thin_subscriber_is_paced_from_what_reaches_it() -> None:
    pacer = Pacer("test")
    assert pacer.seed(300_000) and pacer.rate_bps == 300_000
    assert not pacer.seed(900_000) and pacer.rate_bps == 300_000  # an estimate stays
    low = Pacer("test")
    low.seed(1_000)
    assert low.rate_bps == MIN_BPS


async def test_leaving_the_thin_rendition_stops_the_pacing_its_step_started() -> None:
    seeded = Pacer("test")
    seeded.seed(120_000)
    assert seeded.unseed() and seeded.rate_bps is None
    assert not seeded.unseed()
    # A link that lost since keeps its estimate: its rate was measured.
    measured = Pacer("test")
    measured.seed(400_000)
    measured.report(0.0, 0.6, None, now=10.0)
    measured._sent.total += 100_000  # 800 kbps sent over the next second
    measured.report(0.5, 0.6, 150_000, now=11.0)
    assert measured.estimate.reason == "loss" and measured.rate_bps == 0.6 * 400_000
    assert not measured.unseed() and measured.rate_bps is not None


def test_a_link_that_carries_less_than_is_sent_is_full_whatever_the_round_trip() -> None:
    """Read with its queue already full from the first report, the round trip never rises:
    the estimate grew to 1.2 Mbps on a 256 kbps island so. Five reports whose median says
    under 70 % of what is sent got through, with some loss, bring it down to 95 % of that,
    or 60 % of what is sent if more; a wide link's random 15 % (85 % through) is left
    alone."""
    full = LinkEstimate()
    full.report(0.0, 0.5, 1_400_000, 1.2, 300_000)
    for t in range(1, 20):  # the same round trip throughout: no rise
        full.report(float(t), 0.04, 450_000, 1.2, 250_000 + (t % 3) * 10_000)
    assert full.reason == "saturated" and full.bps is not None
    # Down to the link (95 % of ~260 kbps), no more than 40 % off at once.
    assert 240_000 <= full.bps <= 450_000 * 0.6
    lossy = LinkEstimate()
    lossy.report(0.0, 0.5, 1_000_000, 0.1, 600_000)
    for t in range(1, 20):
        lossy.report(float(t), 0.15, 600_000, 0.1, 510_000)
    assert lossy.reason == "loss" and lossy.bps == 600_000  # held, not brought down
