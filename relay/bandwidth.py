"""Congestion policy toward one subscriber, without I/O: which temporal layers of its video it
gets (``LayerPolicy``), when to pause its video for bandwidth below that (``BandwidthPolicy``),
and what the relay sends it. The caller passes the clock (``now``, monotonic seconds) and
carries out the decisions (the layer, pausing, notices, the retry timer)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

LOSS_WINDOW_S = 3.0
"""Loss reports older than this no longer count."""
CONGESTION_LOSS = 0.05
"""Reported loss (fraction) at or above which a low bandwidth estimate counts as congestion."""
RATE_INTERVAL_S = 0.5
"""The send rate is measured over at least this long."""

TOP_LAYER = 2
"""The highest temporal layer the layer policy chooses: L1T3's, the web client's camera (30 fps;
layer 1 15 fps, layer 0 7.5 fps)."""
LAYER_LOSS = 0.05
"""A receiver report with this much loss (fraction) or more steps the layer down (default of
``relay.layer_loss``)."""
LAYER_LOSS_WITH_LOW_ESTIMATE = 0.02
"""Loss that counts when the estimate is low too."""
BACKLOG_HIGH_BYTES = 64 * 1024
"""Bytes waiting in the relay's send buffer toward the subscriber that step the layer down (the
skip to a keyframe comes at ``max_backlog_bytes``, far above; default of
``relay.layer_backlog_bytes``)."""
RTT_RISE_S = 0.3
"""Round trip over the lowest one of the last ``RTT_WINDOW_S`` by this much: a queue is
building on the path; the layer steps down (default of ``relay.layer_rtt_rise_s``)."""
RTT_RISE_WITH_LOW_ESTIMATE_S = 0.1
"""A rise that counts when the estimate is low too."""
RTT_WINDOW_S = 30.0
"""The lowest round trip is taken over this long (a new route may be longer for good)."""
ESTIMATE_SHORTFALL = 0.5
"""A receiver estimate (REMB) under this share of what the relay sends is low. Only a witness:
aiortc's estimator starts near nothing and climbs ~1 kbps a report, so a low estimate alone
says nothing; with loss or a rising round trip it is congestion."""
STEP_DOWN_EVERY_S = 1.0
"""At most one step down per this long: a step must have time to show (reports come ~1 s
apart), and two bad reports take 30 fps to 7.5 fps in about a second."""
QUIET_S = 4.0
"""Without congestion for this long, the layer is probed up one step (default of
``relay.layer_quiet_s``)."""
MAX_QUIET_S = 48.0
"""The quiet period doubles after each probe that failed, up to this (default of
``relay.layer_max_quiet_s``)."""
PROBE_FAILED_WITHIN_S = 4.0
CLIMB_S = 2.0
"""A probe that held this long without congestion is followed by the next one after as long,
not after a whole quiet period: a link back to good climbs from the thin rendition to every
layer in the quiet period and two of these (the issue's 10 s), while a link that is still thin
fails its first probe and backs off as before."""
"""Congestion this soon after a probe up means the probe failed."""
QUEUE_DELAY_S = 0.5
"""Seconds of video waiting in the relay's own pacer toward the subscriber (at the rate it
paces them) that step the layer down, as a send backlog does: the link lacks the rate (default
of ``relay.layer_queue_delay_s``)."""
CONFIRM_APART_S = 1.5
"""From the top layer, a step down on loss or a round-trip rise alone needs a second congested
report at least this long after the first: one burst of loss (a loaded machine's own UDP
drops) or one slow round trip (a loaded relay's own delay) shows in every leg's next report,
and receivers report each leg every 0.5-1.5 s (aiortc: 0.5 + random(); Chromium's video
RTCP interval: 1 s x [0.5, 1.5]), so reports less than 1.5 s apart may tell of one moment."""
CONFIRM_WITHIN_S = 3.0
"""... and at most this long after it (two report intervals of a leg: a congestion that lasts
is seen again within it); later, the first report is forgotten and the next one starts over."""
CONFIRMED_REASONS = frozenset({"loss", "rtt", "estimate"})
"""The witnesses that need that second report: loss, a rise, and a low estimate (which counts
only with some loss or some rise, and aiortc's estimate is low on any link: the good viewer
of the #15 bench was stepped down for it). A send backlog and video queued in the relay's
pacer are the relay's own measure of a lack of rate: they step down at once."""
THIN = -1
THIN_SHORTFALL = 0.8
"""On the thin rendition, video pauses (with loss, for ``window_s``) only when the receiver's
estimate is under this fraction of what the relay sends it: the rendition's own rate is below
any sensible fixed floor."""
"""The step below layer 0: the publication's thin rendition (relay/rendition.py), one
re-encoding at about 320x180, 10 fps, 100 kbps shared by every subscriber at this step."""
THIN_REASONS = frozenset({"backlog", "rtt", "estimate"})
"""What takes a subscriber from layer 0 to the thin rendition: a witness that the link lacks
the rate (a send backlog, a queue on the path, a low estimate with loss or a rise). Loss alone
does not: a lossy but wide link is not helped by fewer bits, and it keeps layer 0."""

THIN_OVER_BASE = True
"""Whether a subscriber whose link cannot carry layer 1 of a camera's temporal layers takes
the thin rendition rather than layer 0 (the relay's choice: ``Participant``). The rendition's
top rung (15 fps at 150 kbps, relay/rendition.py) carries twice the motion of an L1T3
camera's base layer (7.5 fps; 5 fps of a 20 fps camera) at a fraction of its rate (a 640x480
camera's base layer is ~200 kbps), and a doctor reads movement (gait, breathing, a tremor)
more than pixels at that size: bench/thin_link.py's vsat viewer got 5 fps at layer 0 where the
rendition gave it 15. Loss alone still steps to layer 0 (a lossy but wide link keeps the
original's pixels), and layer 0 stays the step between for a thin rendition that is off."""

CEILING_S = 30.0
"""The link's rate seen when it was last full (``LayerPolicy``) holds back probes to a layer
that needs more for this long; then a probe tries again (a satellite link's weather passes)."""
CEILING_SPELL_S = 5.0
"""Steps down this close together are one congested spell: the ceiling is the highest rate
delivered in it."""
CEILING_RTT_FALL_S = 0.1
"""A round trip this much, and half, below the lowest seen when the ceiling was taken: another
path (the link changed), and the ceiling is forgotten. Half: the lowest may have been read
with the link's queue already full (a satellite link full from the first report reads 0.9 s
for its 0.6 s)."""


@dataclass(frozen=True)
class LayerSettings:
    """What an operator may tune of the layer policy (``[relay]`` ``layer_*`` settings,
    config/settings.py, validated there); the module constants are the defaults."""

    quiet_s: float = QUIET_S
    """Without congestion this long, one layer up (a probe)."""
    max_quiet_s: float = MAX_QUIET_S
    """The quiet period doubles after each failed probe, up to this."""
    loss: float = LAYER_LOSS
    """A receiver report with this much loss (fraction) or more is congestion."""
    rtt_rise_s: float = RTT_RISE_S
    """A round trip this much over its recent lowest is congestion."""
    backlog_bytes: int = BACKLOG_HIGH_BYTES
    """Bytes waiting in the relay's UDP send buffer toward the subscriber that are congestion."""
    queue_delay_s: float = QUEUE_DELAY_S
    """Seconds of video waiting in the relay's pacer toward the subscriber that are
    congestion."""


class BandwidthPolicy:
    """Video is paused when the subscriber's receiver estimate (REMB) stays under the floor
    for ``window_s`` while it reports loss: a low estimate alone is no proof (aiortc's
    estimator reports about half of what it receives, and a still screen is simply sent
    little). After a pause the caller tries video again and calls ``resumed()``."""

    def __init__(self, floor_bps: int, window_s: float) -> None:
        self.floor_bps = floor_bps
        """0: never pause."""
        self.window_s = window_s
        self.estimate_bps: int | None = None
        """The last estimate the subscriber reported."""
        self.paused = False
        self._low_since: float | None = None
        self._losses: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)

    def loss_reported(self, fraction: float, now: float) -> None:
        self._losses.append((now, fraction))

    def recent_loss(self, now: float) -> float:
        """The highest loss reported in the last ``LOSS_WINDOW_S``."""
        while self._losses and now - self._losses[0][0] > LOSS_WINDOW_S:
            self._losses.popleft()
        return max((f for _, f in self._losses), default=0.0)

    def estimate_reported(self, bitrate: int, now: float, *,
                          floor_bps: int | None = None) -> bool:
        """Take a receiver estimate; True when video must pause now. ``floor_bps``: a lower
        floor for this estimate (the thin rendition needs less than ``floor_bps``)."""
        self.estimate_bps = bitrate
        floor = self.floor_bps if floor_bps is None else min(self.floor_bps, floor_bps)
        if not floor or self.paused:
            return False
        if bitrate >= floor or self.recent_loss(now) < CONGESTION_LOSS:
            self._low_since = None
            return False
        if self._low_since is None:
            self._low_since = now
            return False
        if now - self._low_since < self.window_s:
            return False
        self.paused = True
        self._low_since = None
        return True

    def estimate_held(self, bitrate: int) -> None:
        """Take an estimate while the pause is not an option (the layers step down first):
        the window starts afresh once it is."""
        self.estimate_bps = bitrate
        self._low_since = None

    def resumed(self) -> None:
        """Video is being tried again."""
        self.paused = False


class SendRate:
    """Bits per second the relay sent on each group of legs a receiver estimate covers,
    measured between reports at least ``RATE_INTERVAL_S`` apart."""

    def __init__(self) -> None:
        self._marks: dict[tuple[int, ...], tuple[float, int]] = {}
        self._rates: dict[tuple[int, ...], float] = {}

    def sample(self, ssrcs: Iterable[int], sent_bytes: int, now: float) -> float | None:
        """``sent_bytes``: the bytes sent so far on the legs ``ssrcs``. The rate since the
        previous sample of the same legs; None before there is one."""
        key = tuple(sorted(ssrcs))
        previous = self._marks.get(key)
        if previous is not None and now - previous[0] < RATE_INTERVAL_S:
            return self._rates.get(key)
        self._marks[key] = (now, sent_bytes)
        if previous is None:
            return None
        rate = self._rates[key] = (sent_bytes - previous[1]) * 8 / (now - previous[0])
        return rate

    @property
    def total_bps(self) -> float | None:
        return sum(self._rates.values()) if self._rates else None


class LayerPolicy:
    """The highest temporal layer one subscriber takes of every video publication sent in
    layers (per subscriber: the link is the subscriber's, whoever sends). Down one layer at
    once on congestion (a receiver report with ``settings.loss``, a send backlog over
    ``settings.backlog_bytes``, video queued in the relay's pacer for ``settings.queue_delay_s``,
    a round trip ``settings.rtt_rise_s`` over its recent lowest, or a low estimate with some
    loss or some rise), at most one step per ``STEP_DOWN_EVERY_S``; up one layer after
    ``quiet_s`` without congestion; a probe that brings congestion back within
    ``PROBE_FAILED_WITHIN_S`` doubles the quiet period (up to ``settings.max_quiet_s``), one
    that holds for a whole quiet period resets it. Never below ``bottom``: layer 0 by default,
    or ``THIN`` (the thin rendition, taken from layer 0 only for one of ``THIN_REASONS``); the
    video pause (``BandwidthPolicy``) is the step below the bottom, taken only there, and
    probing up from the thin rendition goes back to layer 0 the same way."""

    def __init__(self, settings: LayerSettings | None = None, *, top: int = TOP_LAYER,
                 bottom: int = 0, thin_over_base: bool = False) -> None:
        """``thin_over_base`` (with ``bottom=THIN``): a lack of rate below layer 1 goes to
        the thin rendition straight, and a probe up from it to layer 1 (``THIN_OVER_BASE``)."""
        self.settings = settings or LayerSettings()
        self.top = top
        self.bottom = bottom
        self.thin_over_base = thin_over_base and bottom == THIN and top >= 1
        self.layer = top
        self.quiet_s = self.settings.quiet_s
        """The quiet period now (doubled by failed probes)."""
        self.reason = ""
        """Why the layer last changed (``loss``, ``backlog``, ``rtt``, ``estimate``,
        ``probe``), for the logs."""
        self._last_down: float | None = None
        self._calm_since: float | None = None
        """Since when no congestion was seen and the layer did not change."""
        self._probed_at: float | None = None
        self._climbing = False
        """The last probe held ``CLIMB_S``: the next comes as soon."""
        self._suspected_at: float | None = None
        """When a first report of loss or a rise was seen at the top layer, unconfirmed."""
        self._rtts: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self.ceiling: tuple[float, float, float | None] | None = None
        """(when, rate, the lowest round trip then) the link delivered when a lack of rate
        last stepped the layer down: a probe to a layer that needs more waits ``CEILING_S``."""
        self.probes_spared = 0
        """Probes not made: the layer needs more than the link's ceiling."""

    def _ceiling_holds(self, now: float, rtt_s: float | None, need_bps: float | None) -> bool:
        """Whether the link's ceiling says the layer that needs ``need_bps`` will not fit."""
        ceiling = self.ceiling
        if ceiling is None or need_bps is None:
            return False
        at, rate, lowest = ceiling
        if (now - at > CEILING_S
                or (rtt_s is not None and lowest is not None
                    and rtt_s < min(lowest - CEILING_RTT_FALL_S, lowest / 2))):
            self.ceiling = None
            return False
        return need_bps > rate

    def congestion(self, now: float, *, loss: float, rtt_s: float | None, backlog_bytes: int,
                   estimate_bps: int | None, send_bps: float | None,
                   queue_delay_s: float = 0.0) -> str | None:
        """What says the path toward the subscriber is congested now, or None.
        ``queue_delay_s``: seconds of video waiting in the relay's pacer toward it."""
        settings = self.settings
        rise = 0.0
        if rtt_s is not None:
            while self._rtts and now - self._rtts[0][0] > RTT_WINDOW_S:
                self._rtts.popleft()
            self._rtts.append((now, rtt_s))
            rise = rtt_s - min(r for _, r in self._rtts)
        if backlog_bytes >= settings.backlog_bytes or queue_delay_s >= settings.queue_delay_s:
            return "backlog"
        if loss >= settings.loss:
            return "loss"
        if rise >= settings.rtt_rise_s:
            return "rtt"
        low = (estimate_bps is not None and send_bps is not None
               and estimate_bps < send_bps * ESTIMATE_SHORTFALL)
        if low and (loss >= LAYER_LOSS_WITH_LOW_ESTIMATE or rise >= RTT_RISE_WITH_LOW_ESTIMATE_S):
            return "estimate"
        return None

    def update(self, now: float, *, loss: float = 0.0, rtt_s: float | None = None,
               backlog_bytes: int = 0, estimate_bps: int | None = None,
               send_bps: float | None = None, queue_delay_s: float = 0.0,
               delivered_bps: float | None = None,
               need_bps: Callable[[int], float | None] | None = None) -> int:
        """Take one receiver report's worth of observations (``loss``: the report's fraction
        lost; ``queue_delay_s``: the relay's own pacer queue toward the subscriber, in
        seconds of video; ``delivered_bps``: the rate that reached the subscriber lately;
        ``need_bps(layer)``: what the subscriber would receive at that layer, None if
        unknown); the layer to use from now.

        A step down for a lack of rate notes the rate delivered then as the link's
        ceiling; a probe to a layer that needs more than the ceiling is not made (it would
        only fill the link's queue and freeze the picture for seconds) until the ceiling is
        ``CEILING_S`` old or the round trip fell (another link). Not when the link delivers
        more than the ceiling: the rate delivered is read from reports of legs at different
        times, and one reading low at the step down would forget the ceiling at the next."""
        reason = self.congestion(now, loss=loss, rtt_s=rtt_s, backlog_bytes=backlog_bytes,
                                 estimate_bps=estimate_bps, send_bps=send_bps,
                                 queue_delay_s=queue_delay_s)
        if reason is not None:
            self._calm_since = None
            self._climbing = False
            seen = now
            if self.layer == self.top and reason in CONFIRMED_REASONS:
                first = self._suspected_at
                if first is None or now - first > CONFIRM_WITHIN_S:
                    self._suspected_at = now
                    return self.layer
                if now - first < CONFIRM_APART_S:
                    return self.layer  # the same moment, seen in another leg's report
                seen = first
            self._suspected_at = None
            if self._probed_at is not None and seen - self._probed_at <= PROBE_FAILED_WITHIN_S:
                self.quiet_s = min(self.quiet_s * 2, self.settings.max_quiet_s)
                self._probed_at = None
            lowest = 0 if reason not in THIN_REASONS else self.bottom
            if self.layer > lowest and (self._last_down is None
                                        or now - self._last_down >= STEP_DOWN_EVERY_S):
                self.layer -= 1
                if self.layer == 0 and lowest == THIN and self.thin_over_base:
                    self.layer = THIN
                self._last_down = now
                self.reason = reason
                if reason in THIN_REASONS and delivered_bps:
                    # The highest of one congested spell's readings: the queue dropped at the
                    # link and the pacer gave its own up, so some read low.
                    rate = delivered_bps
                    if self.ceiling is not None and now - self.ceiling[0] <= CEILING_SPELL_S:
                        rate = max(rate, self.ceiling[1])
                    lowest_rtt = min((r for _, r in self._rtts), default=None)
                    self.ceiling = (now, rate, lowest_rtt)
            return self.layer
        if self._calm_since is None:
            self._calm_since = now
        if self._probed_at is not None and now - self._probed_at >= self.quiet_s:
            self.quiet_s = self.settings.quiet_s  # the last probe held a whole quiet period
            self._probed_at = None
        if self._probed_at is not None and now - self._probed_at >= CLIMB_S:
            self._climbing = True
        wait = CLIMB_S if self._climbing else self.quiet_s
        if self.layer < self.top and now - self._calm_since >= wait:
            target = 1 if self.layer == THIN and self.thin_over_base else self.layer + 1
            if self._ceiling_holds(now, rtt_s,
                                   need_bps(target) if need_bps is not None else None):
                self.probes_spared += 1
                self._calm_since = now
                return self.layer
            self.layer = target
            self._probed_at = now
            self._calm_since = now
            self.reason = "probe"
        return self.layer
