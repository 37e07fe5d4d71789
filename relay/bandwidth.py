"""Congestion policy toward one subscriber, without I/O: when to pause its video for
bandwidth, and what the relay sends it. The caller passes the clock (``now``, monotonic
seconds) and carries out the decisions (pausing, notices, the retry timer)."""

from __future__ import annotations

import collections
from collections.abc import Iterable

LOSS_WINDOW_S = 3.0
"""Loss reports older than this no longer count."""
CONGESTION_LOSS = 0.05
"""Reported loss (fraction) at or above which a low bandwidth estimate counts as congestion."""
RATE_INTERVAL_S = 0.5
"""The send rate is measured over at least this long."""


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

    def estimate_reported(self, bitrate: int, now: float) -> bool:
        """Take a receiver estimate; True when video must pause now."""
        self.estimate_bps = bitrate
        if not self.floor_bps or self.paused:
            return False
        if bitrate >= self.floor_bps or self.recent_loss(now) < CONGESTION_LOSS:
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
