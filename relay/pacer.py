"""Pacer: what leaves the relay toward one subscriber, and when. One per subscriber: its legs
share one transport, so they share one link.

Why: the relay forwards a publisher's packets as they come, and a keyframe comes as a burst
(a 640x480 one is 30-50 KB, sent by the camera in a few milliseconds). A thin link's modem
holds a fraction of a second of its rate (a 256 kbps satellite link: ~16 KB) and drops the rest,
so on an island the keyframe never arrives whole, the viewer asks for another, and video never
starts. And the viewer asks (NACK) for every packet it missed, again and again: on a full link
each retransmission displaces another packet, and the relay ended up sending three packets for
each one it forwarded (bench/thin_link.py, vsat, at the start of #15's second slice).

What it does:
- **Video** goes out at the link's estimated rate (``LinkEstimate``), queued in the relay
  meanwhile. Until the estimate exists (a link that never lost much), nothing is queued:
  every packet goes out at once, as before, at the cost of one comparison.
- **Audio first**: audio never waits. It goes out at once and is counted against the rate, so
  video waits for it.
- **Retransmissions** go ahead of video, each sequence number at most ``RTX_MAX`` times and
  not again within a round trip, and none while the video queue is past ``RTX_QUEUE_S``: on
  a full link a retransmission only takes the place of newer video. A packet asked for once
  more after that is answered with an empty packet in its place and its subscription
  restarted at a keyframe: the hole closed, the receiver does not wait on it (aiortc's jitter
  buffer waits 512 packets; Chromium gives up after its retries and asks for a keyframe).
- The **video queue is bounded** in time (``queue_limit_s`` of the rate): past it the queued
  video is given up, each leg's sequence numbers rewound to the first packet given up (the
  viewer sees no gap: nothing it never got was numbered), and its subscriptions start again
  at a keyframe. The layer policy reads the queue's delay (``queue_delay_s``) and steps the
  layers down long before that.

``LinkEstimate`` is loss-based AIMD, as the loss-based half of Google Congestion Control
(draft-ietf-rmcat-gcc, 6) is: a report with over ``HIGH_LOSS`` lost while the round trip
rose (or over ``RANDOM_LOSS`` whatever it did) sets the estimate to what went through (what
the receiver counted, or the rate sent less what was lost); one under ``HIGH_LOSS`` raises it by
``GROWTH`` a second, not past ``APP_LIMITED`` times what was really sent (a link never filled
tells nothing of its top), and not while the round trip is risen (a queue is building on the
path). Why not the receiver's estimate (REMB): aiortc's starts near nothing and climbs ~1 kbps
a report (relay/bandwidth.py), and a viewer's delay-based estimate on a link whose delay the
relay's own load moves was found to step good viewers down; what was sent and what arrived is
the one measure every receiver reports the same way. Written here rather than taken from a
library: no maintained Python congestion controller exists (aiortc's estimator is the
receiver's side), and this one is twenty lines on numbers the relay already has."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from aiortc.rtp import RtpPacket

if TYPE_CHECKING:
    from relay.hooks import SenderLeg

logger = logging.getLogger(__name__)

PACKET_OVERHEAD = 50
"""Bytes each packet takes on the link beyond its payload: RTP header with extensions, SRTP
tag, UDP and IPv4 headers."""
HIGH_LOSS = 0.10
"""A report with more loss than this, while the round trip has risen (a queue filled on the
path before it dropped), brings the estimate down to what went through."""
RANDOM_LOSS = 0.25
"""Without a risen round trip, loss is taken for the link's own (radio, satellite weather:
fewer bits do not help it, and the layer policy keeps layer 0 for it) up to this much; past
it, the estimate comes down all the same (a policer drops without queueing)."""
QUEUE_RISE_S = 0.1
"""A round trip this much over its lowest: a queue is building on the path (a satellite
link's own jitter moves it by tens of milliseconds)."""
# Growth: GCC grows its estimate only under 2 % loss. Here it grows under HIGH_LOSS while the
# round trip does not rise: an island's link loses 3 % in bursts whatever is sent, and an
# estimate that waited for 2 % would never leave where a bad moment put it.
GROWTH = 1.08
"""The estimate's growth per second of reports without loss."""
APP_LIMITED = 2.0
"""The estimate never grows past this many times the rate really sent (room enough for the
thin rendition to find its next rung, relay/rendition.py)."""
DECREASE_HOLD_S = 0.5
"""After a decrease, loss reports do not decrease again for this long, or for the round trip
and a report interval if longer (the legs' reports of one moment come together, and those of
the next round trip tell of the rate before the decrease: three decreases in one second took
an island's estimate from 210 to 82 kbps, below its audio)."""
DECREASE_MAX = 0.6
"""A decrease takes the estimate to no less than this share of what it was."""
RTT_RISE_S = 0.1
"""A round trip this much over its lowest holds the estimate where it is."""
DELAY_RISE_S = 0.25
"""A round trip this much over its lowest: the link's queue is full (a satellite link's own
jitter is tens of milliseconds; an island's full 0.5 s modem queue reads +0.45 s). Then any
loss over ``QUEUE_LOSS`` is the queue's, and the estimate comes down to what went through: an
island's link was paced at 614 kbps for its 256 while its queue stayed full and its loss
(3-6 %: the modem drops a few packets of each burst) stayed under ``HIGH_LOSS``."""
QUEUE_LOSS = 0.02
SPARE_QUEUE_S = 0.1
"""A FEC packet is sent only while the video queued ahead of it leaves within this: FEC takes
the room the link has over the video, never the video's (taking it from the video's budget
kept vsat on the thin rendition, where it froze more: bench/thin_link.py --fec)."""
PATH_RTT_FALL_S = 0.1
"""A round trip this much, and half, below the lowest of the link the estimate measured:
another path, and the estimate is forgotten (as the layer policy forgets its ceiling,
relay/bandwidth.py ``CEILING_RTT_FALL_S``)."""
SATURATED = 0.7
"""What reached the receiver, over the last ``SATURATED_REPORTS`` reports' median, under this
share of what was sent, with loss over ``QUEUE_LOSS``: the link is full. The estimate comes
down to ``SATURATED_DECREASE`` of what got through, no more than ``DECREASE_MAX`` of what was
sent at once (a random 15 % loss on a wide link reads 0.85, and is left alone; the readings
of what got through vary by a third around the link's rate)."""
SATURATED_REPORTS = 5
SATURATED_DECREASE = 0.95
MIN_BPS = 48_000
"""The estimate never goes below this: audio (~40 kbps with FEC) and a trickle of video."""
QUEUE_LIMIT_S = 1.5
"""Video waiting longer than this at the paced rate is given up (a 640x480 keyframe is about a
second of a 256 kbps link: the limit lets one pass)."""
RTX_QUEUE_S = 1.0
"""No retransmission while the video queue holds more than this. Only then: a packet the
receiver never gets stalls its decoder until the next keyframe (aiortc's jitter buffer waits
128 packets, seconds at a thin link's rate), so a retransmission is worth more than the newer
video it delays; bounded per packet (``RTX_MAX``), it no longer floods the link."""
RTX_MAX = 2
"""A sequence number is retransmitted at most this many times."""
RTX_MIN_INTERVAL_S = 0.1
"""Nor twice within this, or within the round trip if longer (up to ``RTX_MAX_INTERVAL_S``)."""
RTX_MAX_INTERVAL_S = 0.5
"""The wait between two retransmissions of a packet is never longer than this, whatever the
round trip reads: a receiver may not ask again (aiortc's asks again only when a new gap
opens), and a smoothed round trip lags a link that got shorter."""
PAD_MAX = 3
"""An empty packet in a hole's place is sent at most this many times (it may be lost too)."""
BURST_S = 0.01
"""Tokens kept at most: this long of the rate, and at least two packets' worth."""
SLEEP_MIN_S = 0.004
"""The queue's task sleeps at least this long (then sends what the tokens allow)."""
RATE_WINDOW_S = 0.5
"""The rates sent are measured over at least this long."""


class Restartable(Protocol):
    """What the pacer needs of a subscription whose queued video it gives up."""

    def restart_after_drop(self, first_seq: int | None) -> None:
        """Its packets from ``first_seq`` on were never sent (None: unknown): take the leg's
        sequence numbers back there and start again at a keyframe."""


class LinkEstimate:
    """The subscriber's link rate, from its receiver reports (see the module doc). Pure: the
    caller gives the clock."""

    def __init__(self) -> None:
        self.bps: float | None = None
        """None: the link never lost enough to be measured; nothing is paced."""
        self.reason = ""
        """Why it last moved, for the logs: ``loss``, ``growth``."""
        self._grown_at: float | None = None
        self._held_until = 0.0
        self._rtts: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self._ratios: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=SATURATED_REPORTS)
        """(delivered / sent, delivered) of the last reports."""
        self._path_rtt: float | None = None
        """The lowest round trip when the estimate last came down: the path it measured."""

    def seed(self, bps: float) -> None:
        """Start at ``bps`` (``Pacer.seed``), on the path the round trips measured lately."""
        self.bps = bps
        self.reason = "thin"
        self._path_rtt = min((r for _, r in self._rtts), default=None)

    def report(self, now: float, loss: float, sent_bps: float | None,
               rtt_s: float | None = None, delivered_bps: float | None = None) -> float | None:
        """One receiver report's loss (fraction), the rate sent over the last interval, the
        round trip and the rate that reached the receiver lately (its reports' packet counts:
        on a full link, the link's rate): the estimate from now (bits per second, or None)."""
        rise = 0.0
        path = self._path_rtt
        if (rtt_s is not None and path is not None and self.bps is not None
                and rtt_s < min(path - PATH_RTT_FALL_S, path / 2)):
            # Another path (a satellite site back on its fibre, a 3G phone on Wi-Fi): what
            # was measured of the old one says nothing of it. Unpaced until it loses (kept,
            # the old estimate held a link back to good at the satellite's rate, the video it
            # queued read as a backlog, and the layer policy stepped down again on it).
            self.bps = None
            self.reason = "path"
            self._path_rtt = None
            self._rtts.clear()
            self._ratios.clear()
            self._held_until = 0.0
            self._grown_at = None
        if rtt_s is not None:
            while self._rtts and now - self._rtts[0][0] > 30.0:
                self._rtts.popleft()
            self._rtts.append((now, rtt_s))
            rise = rtt_s - min(r for _, r in self._rtts)
        if sent_bps is None or sent_bps <= 0:
            return self.bps
        if now < self._held_until:
            self._grown_at = now
            return self.bps
        if (loss > RANDOM_LOSS or (loss > HIGH_LOSS and rise >= QUEUE_RISE_S)
                or (loss > QUEUE_LOSS and rise >= DELAY_RISE_S)):
            # What went through: of the rate sent, or of the paced rate (the rate sent may be
            # low for a moment, the video waiting for a keyframe, and says nothing of the
            # link then).
            # What went through, as the receiver counted it; a report without counts yet
            # (the first): the rate sent, less what was lost. Never more than a third off the
            # paced rate at once (a report speaks of ~1 s: a burst of loss in it on a wide
            # link is not the link's rate).
            base = sent_bps if self.bps is None else max(self.bps, sent_bps)
            through = delivered_bps if delivered_bps else base * (1.0 - loss)
            if self.bps is not None:
                through = max(through, self.bps * DECREASE_MAX)
            self.bps = max(MIN_BPS, min(base, through))
            self.reason = "loss"
            self._path_rtt = min((r for _, r in self._rtts), default=None)
            self._ratios.clear()
            # The reports of the next round trip still tell of the rate before this one.
            self._held_until = now + max(DECREASE_HOLD_S, (rtt_s or 0.0) + 0.5)
            self._grown_at = now
            return self.bps
        if delivered_bps and sent_bps:
            self._ratios.append((delivered_bps / sent_bps, delivered_bps))
        if self.bps is None:
            return None
        if len(self._ratios) >= SATURATED_REPORTS and loss > QUEUE_LOSS:
            ratios = sorted(self._ratios)
            ratio, through = ratios[len(ratios) // 2]
            if ratio < SATURATED:
                # The link carries persistently less than is sent, and loses: it is full,
                # whatever the round trip says (read with its queue already full from the
                # first report, it never rises: an island's estimate grew to 1.2 Mbps for
                # its 256 kbps so).
                # Never more than 40 % off what is sent at once: one median of readings
                # summed over legs reported at different times is no exact rate.
                base = min(self.bps, sent_bps)
                self.bps = max(MIN_BPS, min(base, max(through * SATURATED_DECREASE,
                                                      base * DECREASE_MAX)))
                self.reason = "saturated"
                self._path_rtt = min((r for _, r in self._rtts), default=None)
                self._ratios.clear()
                self._held_until = now + max(DECREASE_HOLD_S, (rtt_s or 0.0) + 0.5)
                self._grown_at = now
                return self.bps
        if self._grown_at is None:
            self._grown_at = now
        if loss < HIGH_LOSS and rise < RTT_RISE_S:
            elapsed = min(now - self._grown_at, 2.0)
            top = max(self.bps, sent_bps * APP_LIMITED)
            self.bps = min(top, self.bps * GROWTH ** elapsed)
            self.reason = "growth"
        self._grown_at = now
        return self.bps


class _Rate:
    """Bytes a second over windows of at least ``RATE_WINDOW_S``."""

    __slots__ = ("_mark", "bps", "total")

    def __init__(self) -> None:
        self.total = 0
        self.bps: float | None = None
        self._mark: tuple[float, int] | None = None

    def sample(self, now: float) -> float | None:
        mark = self._mark
        if mark is None:
            self._mark = (now, self.total)
        elif now - mark[0] >= RATE_WINDOW_S:
            self.bps = (self.total - mark[1]) * 8 / (now - mark[0])
            self._mark = (now, self.total)
        return self.bps


class _Queued:
    __slots__ = ("leg", "ntp", "packet", "size", "subscription")

    def __init__(self, leg: SenderLeg, packet: RtpPacket, ntp: int, size: int,
                 subscription: Restartable) -> None:
        self.leg = leg
        self.packet = packet
        self.ntp = ntp
        self.size = size
        self.subscription = subscription


Retransmit = Callable[[int], Awaitable[None]]


class Pacer:
    def __init__(self, label: str, *, queue_limit_s: float = QUEUE_LIMIT_S,
                 rtt: Callable[[], float | None] = lambda: None,
                 on_hole: Callable[[int], None] = lambda ssrc: None) -> None:
        """``rtt``: the round trip to the subscriber now (None: unknown); ``on_hole(ssrc)``:
        a packet of that leg will never reach the subscriber (``retransmit``)."""
        self.estimate = LinkEstimate()
        self.queue_limit_s = queue_limit_s
        self.dropped_packets = 0
        """Video packets given up from the queue."""
        self.drops = 0
        """Times the queue was given up."""
        self.retransmitted = 0
        self.retransmissions_refused = 0
        self.holes_padded = 0
        """Packets never to be sent again, padded in their place."""
        self.spare_dropped = 0
        """FEC packets not sent: video was waiting."""
        self.queue_max_bytes = 0
        self._on_hole = on_hole
        self._label = label
        self._rtt = rtt
        self._video: collections.deque[_Queued] = collections.deque()
        self._video_bytes = 0
        self._rtx: collections.deque[tuple[Retransmit, int, int]] = collections.deque()
        self._rtx_seen: dict[tuple[int, int], tuple[float, int]] = {}
        """(SSRC, sequence number) -> (when it was last retransmitted, how many times)."""
        self._tokens = 0.0
        self._filled_at = time.monotonic()
        self._sent = _Rate()
        self._audio = _Rate()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._seeded = False
        """The estimate is ``seed``'s, no loss having brought it down since."""

    # -- what the rest of the relay reads --------------------------------------------------
    @property
    def rate_bps(self) -> float | None:
        """The rate video is paced at; None: not paced."""
        return self.estimate.bps

    @property
    def sent_bps(self) -> float | None:
        """The rate sent lately, audio and video (None before it is measured)."""
        return self._sent.bps

    def queue_delay_s(self) -> float:
        """How long the video queued now takes to leave at the paced rate."""
        rate = self.estimate.bps
        return self._video_bytes * 8 / rate if rate else 0.0

    @property
    def queued_bytes(self) -> int:
        return self._video_bytes

    def audio_bps(self, now: float | None = None) -> float | None:
        """The rate of audio sent lately (None before it is measured); ``now``: measure it
        now if its window has passed (the receiver reports do, from the first on)."""
        return self._audio.bps if now is None else self._audio.sample(now)

    def stats(self) -> dict[str, object]:
        return {"rate_bps": None if self.estimate.bps is None else int(self.estimate.bps),
                "sent_bps": None if self._sent.bps is None else int(self._sent.bps),
                "queued_bytes": self._video_bytes, "queue_max_bytes": self.queue_max_bytes,
                "drops": self.drops, "dropped_packets": self.dropped_packets,
                "retransmitted": self.retransmitted,
                "retransmissions_refused": self.retransmissions_refused,
                "holes_padded": self.holes_padded, "spare_dropped": self.spare_dropped}

    # -- reports -----------------------------------------------------------------------------
    def report(self, loss: float, rtt_s: float | None, delivered_bps: float | None = None,
               now: float | None = None) -> None:
        """A receiver report's loss (fraction, the subscriber's own link's), the round trip and
        the rate that reached the subscriber lately: the estimate follows."""
        now = time.monotonic() if now is None else now
        before = self.estimate.bps
        after = self.estimate.report(now, loss, self._sent.sample(now), rtt_s, delivered_bps)
        if after is not None and after != before and self.estimate.reason == "loss":
            self._seeded = False
        self._audio.sample(now)
        if after is not None and (before is None or abs(after - before) > 0.25 * before):
            logger.info("%s paced at %d kbps (%s)", self._label, after / 1000,
                        self.estimate.reason)
        elif after is None and before is not None:
            self._seeded = False
            logger.info("%s no longer paced: another path (round trip %.2f s)", self._label,
                        rtt_s or 0.0)

    def seed(self, bps: float) -> bool:
        """Start pacing at ``bps`` (what reaches the subscriber now) if nothing is paced yet;
        whether it started. The thin rendition's subscribers are paced from their step down
        (relay/subscriber.py ``set_max_layer``)."""
        if self.estimate.bps is not None:
            return False
        bps = max(MIN_BPS, bps)
        self.estimate.seed(bps)
        self._seeded = True
        logger.info("%s paced at %d kbps (thin)", self._label, bps / 1000)
        return True

    def unseed(self) -> bool:
        """Stop pacing if the estimate is still the one ``seed`` gave (no loss has
        brought it down since): the subscriber leaves the thin rendition on a probe, and a seed
        taken from the rendition's rate must not hold back the layer it probes (it grows only to
        twice what is sent). Whether it stopped."""
        if not self._seeded:
            return False
        self._seeded = False
        self.estimate.bps = None
        logger.info("%s no longer paced (left the thin rendition)", self._label)
        return True

    # -- sending -------------------------------------------------------------------------------
    async def send(self, leg: SenderLeg, packet: RtpPacket, ntp: int, *, audio: bool,
                   subscription: Restartable, spare: bool = False) -> None:
        """Send ``packet`` on ``leg`` now, or queue it (video, paced). ConnectionError (not yet
        or no longer connected) is raised only for a packet sent at once; a queued one meets it
        later and restarts its subscription. ``spare`` (a FEC packet, relay/fec.py): only on
        a link with room, never in place of video: paced, it is dropped when video already
        waits over ``SPARE_QUEUE_S`` (its sequence number stays a hole, which a receiver
        takes for a lost FEC packet: frames are told apart by their own headers)."""
        size = len(packet.payload) + PACKET_OVERHEAD
        if spare and self.estimate.bps is not None and self.queue_delay_s() > SPARE_QUEUE_S:
            self.spare_dropped += 1
            return
        if self.estimate.bps is None:
            await leg.send(packet, ntp)
            self._sent.total += size
            if audio:
                self._audio.total += size
            return
        if audio:
            # Audio first: never queued; video waits for the tokens it took.
            self._take(size)
            await leg.send(packet, ntp)
            self._sent.total += size
            self._audio.total += size
            return
        if not self._video and not self._rtx and self._refill() >= size:
            self._take(size)
            await leg.send(packet, ntp)
            self._sent.total += size
            return
        self._video.append(_Queued(leg, packet, ntp, size, subscription))
        self._video_bytes += size
        self.queue_max_bytes = max(self.queue_max_bytes, self._video_bytes)
        if self.queue_delay_s() > self.queue_limit_s:
            self._give_up()
        self._wake()

    async def retransmit(self, resend: Retransmit, pad: Retransmit, ssrc: int, seq: int,
                         size: int) -> None:
        """The subscriber asked again for packet ``seq`` of the leg ``ssrc`` (NACK);
        ``resend`` sends it from the leg's history (aiortc's own retransmission), ``pad`` an
        empty packet in its place. A packet that will not be sent again (its retransmissions
        spent a round trip ago, or the queue too full for it) is padded, once, and the leg's
        subscription starts again at a keyframe (``on_hole``): the frame it belonged to is
        lost, and the receiver is not left waiting for it."""
        now = time.monotonic()
        key = (ssrc, seq)
        seen = self._rtx_seen.get(key)
        rtt = self._rtt() or 0.0
        wait = min(RTX_MAX_INTERVAL_S, max(RTX_MIN_INTERVAL_S, rtt))
        if seen is not None and (now - seen[0] < wait or seen[1] >= RTX_MAX + PAD_MAX):
            self.retransmissions_refused += 1
            return
        if ((seen is not None and seen[1] >= RTX_MAX)
                or (self.estimate.bps is not None and self.queue_delay_s() > RTX_QUEUE_S)):
            self.retransmissions_refused += 1
            self._rtx_seen[key] = (now, max(RTX_MAX, seen[1] if seen else 0) + 1)
            self.holes_padded += 1
            try:
                await pad(seq)
            except ConnectionError:
                return
            self._sent.total += PACKET_OVERHEAD
            self._on_hole(ssrc)
            return
        self._rtx_seen[key] = (now, 1 if seen is None else seen[1] + 1)
        if len(self._rtx_seen) > 4096:
            for old in list(self._rtx_seen)[:1024]:
                del self._rtx_seen[old]
        self.retransmitted += 1
        size += PACKET_OVERHEAD
        if self.estimate.bps is None:
            await resend(seq)
            self._sent.total += size
            return
        self._rtx.append((resend, seq, size))
        self._wake()

    # -- the queue ---------------------------------------------------------------------------
    def _refill(self) -> float:
        rate = self.estimate.bps
        now = time.monotonic()
        if rate is not None:
            cap = max(2 * 1250, rate / 8 * BURST_S)
            self._tokens = min(cap, self._tokens + (now - self._filled_at) * rate / 8)
        self._filled_at = now
        return self._tokens

    def _take(self, size: int) -> None:
        self._refill()
        self._tokens -= size

    def _wake(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while (self._video or self._rtx) and not self._closed:
                rate = self.estimate.bps
                if rate is None:  # the estimate was dropped: everything at once
                    await self._send_next()
                    continue
                tokens = self._refill()
                size = self._rtx[0][2] if self._rtx else self._video[0].size
                if tokens < size:
                    await asyncio.sleep(max(SLEEP_MIN_S, (size - tokens) * 8 / rate))
                    continue
                self._take(size)
                await self._send_next()
        except Exception:
            logger.exception("%s: the send queue failed; its video is given up", self._label)
            self._give_up()
        finally:
            self._task = None

    async def _send_next(self) -> None:
        if self._rtx:
            resend, seq, size = self._rtx.popleft()
            try:
                await resend(seq)
            except ConnectionError:
                return
            self._sent.total += size
            return
        item = self._video.popleft()
        self._video_bytes -= item.size
        try:
            await item.leg.send(item.packet, item.ntp)
        except ConnectionError:
            self._give_up()
            item.subscription.restart_after_drop(None)
            return
        self._sent.total += item.size

    def _give_up(self) -> None:
        """Give up the queued video: each leg's sequence numbers go back to its first packet
        given up, and its subscriptions start again at a keyframe."""
        if not self._video:
            return
        first: dict[int, tuple[Restartable, int]] = {}
        for item in self._video:
            if id(item.subscription) not in first:
                first[id(item.subscription)] = (item.subscription, item.packet.sequence_number)
        self.dropped_packets += len(self._video)
        self.drops += 1
        logger.info("%s: %d video packets (%d bytes) queued past %.1f s given up",
                    self._label, len(self._video), self._video_bytes, self.queue_limit_s)
        self._video.clear()
        self._video_bytes = 0
        for subscription, seq in first.values():
            subscription.restart_after_drop(seq)

    def close(self) -> None:
        self._closed = True
        self._video.clear()
        self._video_bytes = 0
        self._rtx.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

