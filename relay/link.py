"""What a subscriber's receiver reports say of its link, without I/O: the share of packets it
lost lately and the rate that reached it, over every leg of its one transport.

Why not each report's own "fraction lost": a browser puts a receiver report in every RTCP
packet it sends, and on a lossy link it sends one with each NACK, a few tens of milliseconds
apart. Each one's fraction covers the packets since the one before: a handful, of which one
lost reads as 20-75 % (a 3G link's 1 % random loss stepped its viewer down that way, and a
vsat link's reports came too close together for any rate to be measured, so nothing was paced:
bench/thin_link.py). Here each leg's reports are taken over intervals of at least
``INTERVAL_S``, from their cumulative counts (highest sequence number, packets lost), as
RFC 3550 (6.4.1, A.3) computes the fraction, and weighted by the packets each covers."""

from __future__ import annotations

from dataclasses import dataclass

INTERVAL_S = 0.5
"""A leg's loss and rate are measured over at least this long."""
REPORT_GAP_S = 3.0
"""A video leg is reported on about once a second: no report of any leg for this long is an
outage."""
AUDIO_GAP_S = 12.0
"""The same, when only audio legs are reported on (Chromium: every 5 s)."""
RECENT_S = 6.0
"""A leg's latest interval counts toward the link this long: Chromium reports an audio leg
every 5 s (a video leg every second), and at a thin rendition's rate the video legs alone
cover too few packets to judge by."""
MIN_PACKETS = 40
"""Fewer packets than this say nothing of the link's loss."""
SEQ_SPAN = 1 << 15
"""An interval claiming more packets than this is a restarted or rewound sequence: skipped."""


@dataclass
class _Mark:
    at: float
    highest: int
    lost: int
    upstream: tuple[str, int, int] | None
    """The publication the leg carried, its packets received and its highest sequence number
    then (the publisher's own loss over the interval is taken off)."""


@dataclass
class Interval:
    """One leg's interval between two counted reports."""

    at: float
    expected: int
    lost: float
    """The share of ``expected`` the subscriber's own link lost (the publisher's taken off)."""
    bps: float
    """The rate that reached the subscriber over it (received packets at the leg's mean
    size)."""


class LinkReports:
    """Per leg (any hashable key), its last counted report and its latest interval."""

    def __init__(self) -> None:
        self._marks: dict[object, _Mark] = {}
        self._intervals: dict[object, Interval] = {}
        self._seen: float | None = None
        """When the link's latest report (of any leg) came."""
        self._outage_end: float | None = None
        """When the last outage (no report for the gap, or reports of nothing new) ended:
        intervals begun before it are not measured."""
        self._idle_since: dict[object, float] = {}
        """Per leg: since when its reports say nothing new reached the client."""
        self.outages = 0
        """Reports that came after none for the gap."""

    def receipt(self, key: object, now: float, highest: int, lost: int, *, size: float,
                upstream: tuple[str, int, int] | None = None,
                gap_s: float = REPORT_GAP_S) -> Interval | None:
        """A receiver report of leg ``key``: its extended highest sequence number and
        cumulative packets lost; ``size``: the leg's mean packet size on the link (bytes);
        ``upstream``: (publication id, packets it received, its highest extended sequence
        number) now; ``gap_s``: no report of any leg for this long is an outage (longer where
        only audio is reported: Chromium's come 5 s apart). The interval it completes, or
        None (too soon after the last counted one, the first, begun before an outage ended,
        or a sequence that jumped)."""
        seen, self._seen = self._seen, now
        here = _Mark(now, highest, lost, upstream)
        mark = self._marks.get(key)
        if seen is not None and now - seen > gap_s:
            # No report of any leg for the gap: an outage both ways, ending now.
            self._outage_ended(now)
            self._intervals.clear()
        if mark is None:
            self._marks[key] = here
            return None
        if highest == mark.highest:
            # Nothing new reached the client on this leg (an outage of the downlink alone
            # lets the reports through).
            self._idle_since.setdefault(key, mark.at)
        elif now - self._idle_since.pop(key, now) > gap_s:
            self._outage_ended(now)
        if self._outage_end is not None and mark.at < self._outage_end:
            # The interval spans (part of) an outage: everything sent into it counts lost,
            # which is no news of the link's rate (an island's 5 s outage took the pacer to
            # its floor and its viewer to 5 fps after every one; an audio leg, reported
            # every 5 s, spans one whole). Every leg is measured afresh from after it.
            self._marks[key] = here
            self._intervals.pop(key, None)
            return None
        if now - mark.at < INTERVAL_S:
            return None
        self._marks[key] = here
        expected = highest - mark.highest
        if not 0 < expected < SEQ_SPAN:
            return None
        received = min(expected, max(0, expected - (lost - mark.lost)))
        fraction = 1.0 - received / expected
        if upstream is not None and mark.upstream is not None and upstream[0] == mark.upstream[0]:
            sent = upstream[2] - mark.upstream[2]
            if sent > 0:
                theirs = max(0.0, (sent - (upstream[1] - mark.upstream[1])) / sent)
                fraction = max(0.0, fraction - theirs)
        interval = Interval(now, expected, fraction, received * size * 8 / (now - mark.at))
        self._intervals[key] = interval
        return interval

    def _outage_ended(self, now: float) -> None:
        if self._outage_end != now:
            self.outages += 1
        self._outage_end = now
        self._idle_since.clear()

    def loss(self, now: float) -> float | None:
        """The share of the packets sent that the link lost lately: every leg's latest
        interval, weighted by its packets (a leg at a thin rate counts ten packets a second,
        where one lost reads as 10 %); None with fewer than ``MIN_PACKETS`` to judge by."""
        expected = lost = 0.0
        for interval in self._intervals.values():
            if now - interval.at <= RECENT_S:
                expected += interval.expected
                lost += interval.expected * interval.lost
        return lost / expected if expected >= MIN_PACKETS else None

    def measured(self, key: object, now: float) -> bool:
        """Whether leg ``key`` has an interval that counts toward the link now."""
        interval = self._intervals.get(key)
        return interval is not None and now - interval.at <= RECENT_S

    def delivered_bps(self, now: float) -> float | None:
        """The rate that reached the subscriber lately, over every leg; None before any
        interval."""
        rates = [i.bps for i in self._intervals.values() if now - i.at <= RECENT_S]
        return sum(rates) if rates else None
