"""How much and how long a connection may do: a token bucket per connection for its events,
one per clinician for chat, a count of refusals that closes a connection which keeps going,
and a timer per connection that closes it when its access token expires.

Pure bookkeeping with an injectable clock (``signaling.socket_server`` and
``signaling.handlers`` act on the verdicts); no socket.io here.

The per-clinician limits (chat, open connections) are asked through ``ClinicianLimits``:
``LocalClinicianLimits`` counts in this process (one `serve`, the embedded default);
``signaling.limits_redis.RedisClinicianLimits`` counts over every process of a fleet
(``live.backend = "redis"``), since a clinician's tabs may be on several nodes. A
connection's own event bucket stays here in any case: a connection lives on one process."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from config.settings import LimitsSettings
from signaling.errors import SignalingError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; each admitted action takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take a token if there is one; False when the bucket is empty."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self, now: float) -> bool:
        return self.tokens + max(0.0, now - self.stamp) * self.rate >= self.burst


class Verdict(enum.Enum):
    ADMIT = "admit"
    REFUSE = "refuse"
    """Answer ``rate_limited``."""
    DISCONNECT = "disconnect"
    """Answer ``rate_limited`` and close the connection: it kept going."""


class _Window:
    """Refusals of one connection counted in a fixed window."""

    __slots__ = ("count", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0


class ConnectionLimits:
    """Per connection (socket.io sid): its event bucket and its recent refusals."""

    def __init__(self, settings: LimitsSettings, clock: Clock = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._refusals: dict[str, _Window] = {}

    def admit_event(self, sid: str) -> Verdict:
        """One event from ``sid``: admitted, refused, or refused once too often."""
        now = self._clock()
        bucket = self._buckets.get(sid)
        if bucket is None:
            bucket = self._buckets[sid] = TokenBucket(
                self._settings.events_per_s, self._settings.events_burst, now)
        if bucket.take(now):
            return Verdict.ADMIT
        return self.refused(sid)

    def refused(self, sid: str) -> Verdict:
        """Count a ``rate_limited`` refusal of ``sid`` (any limit); DISCONNECT once there were
        ``refusals_before_disconnect`` within ``refusal_window_s``. A connection without a
        bucket is gone (forgotten; a handler still running refused its last event): nothing
        is kept for it."""
        if sid not in self._buckets:
            return Verdict.REFUSE
        now = self._clock()
        window = self._refusals.get(sid)
        if window is None or now - window.start > self._settings.refusal_window_s:
            window = self._refusals[sid] = _Window(now)
        window.count += 1
        if window.count >= self._settings.refusals_before_disconnect:
            return Verdict.DISCONNECT
        return Verdict.REFUSE

    def first_refusal(self, sid: str) -> bool:
        """Whether the last refusal was the first of its window (log once per window)."""
        window = self._refusals.get(sid)
        return window is not None and window.count == 1

    def forget(self, sid: str) -> None:
        self._buckets.pop(sid, None)
        self._refusals.pop(sid, None)

    def __len__(self) -> int:
        """Connections with anything kept (a bucket or refusals)."""
        return len(self._buckets.keys() | self._refusals.keys())


class ChatLimits:
    """Chat messages per participant (a clinician over all their connections) per minute."""

    def __init__(self, settings: LimitsSettings, clock: Clock = time.monotonic) -> None:
        self._per_minute = settings.chat_per_minute
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, clinician_id: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(clinician_id)
        if bucket is None:
            if len(self._buckets) > 1024:
                self._prune(now)
            bucket = self._buckets[clinician_id] = TokenBucket(
                self._per_minute / 60.0, self._per_minute, now)
        return bucket.take(now)

    def _prune(self, now: float) -> None:
        """Drop the buckets that refilled (those clinicians are back to a full allowance)."""
        for clinician_id in [c for c, b in self._buckets.items() if b.full(now)]:
            del self._buckets[clinician_id]


class LimitsUnavailable(SignalingError):
    """The shared counts of a fleet (Redis) do not answer: a clinician's chat message or new
    connection is refused rather than let through uncounted (as a sign-in is refused
    ``accounts_unavailable``); the client retries."""

    code = "limits_unavailable"
    http_status = 503


class ClinicianLimits(Protocol):
    """The limits of one clinician over all their connections (``limits.chat_per_minute``,
    ``limits.connections_per_clinician``). Each may raise ``LimitsUnavailable``."""

    async def admit_chat(self, clinician_id: str) -> bool:
        """One chat message; False when the clinician is over their allowance."""

    async def admit_connection(self, clinician_id: str, sid: str,
                               open_here: int) -> tuple[bool, int]:
        """Count connection ``sid`` among the clinician's open ones if there is room:
        (admitted, how many are open with it, or were open when refused). ``open_here``:
        theirs already open on this process."""

    async def release_connection(self, clinician_id: str, sid: str) -> None:
        """``sid`` (admitted) is closed: it no longer counts."""

    async def close(self) -> None: ...


class LocalClinicianLimits:
    """Counted in this process: chat in ``ChatLimits``, connections from the caller's own
    count of them. Nothing here awaits, so a check and the add that follows it are not split
    by another connection's."""

    def __init__(self, settings: LimitsSettings, clock: Clock = time.monotonic) -> None:
        self._chat = ChatLimits(settings, clock)
        self._per_clinician = settings.connections_per_clinician

    async def admit_chat(self, clinician_id: str) -> bool:
        return self._chat.admit(clinician_id)

    async def admit_connection(self, clinician_id: str, sid: str,
                               open_here: int) -> tuple[bool, int]:
        if open_here >= self._per_clinician:
            return False, open_here
        return True, open_here + 1

    async def release_connection(self, clinician_id: str, sid: str) -> None:
        pass

    async def close(self) -> None:
        pass


OnExpired = Callable[[str], Awaitable[None]]


class ExpiryTimers:
    """One timer per connection, due when its access token expires (wall clock, Unix
    seconds); ``on_expired(sid)`` runs then. ``extend`` moves a timer (a refreshed token)."""

    def __init__(self, on_expired: OnExpired) -> None:
        self._on_expired = on_expired
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._expires: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, sid: str, expires_at: float) -> None:
        self.cancel(sid)
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires_at - time.time())
        self._timers[sid] = loop.call_later(delay, self._fire, sid)
        self._expires[sid] = expires_at

    def extend(self, sid: str, expires_at: float) -> bool:
        """Move the connection's expiry to ``expires_at``; False if ``sid`` has no timer (it
        is gone, or it already expired)."""
        if sid not in self._timers:
            return False
        self.start(sid, expires_at)
        return True

    def expires_at(self, sid: str) -> float | None:
        return self._expires.get(sid)

    def cancel(self, sid: str) -> None:
        timer = self._timers.pop(sid, None)
        self._expires.pop(sid, None)
        if timer is not None:
            timer.cancel()

    def _fire(self, sid: str) -> None:
        self._timers.pop(sid, None)
        self._expires.pop(sid, None)
        task = asyncio.get_running_loop().create_task(self._run(sid), name=f"expire-{sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, sid: str) -> None:
        try:
            await self._on_expired(sid)
        except Exception:
            logger.exception("connection %s: closing at token expiry failed", sid)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._expires.clear()
        for task in self._tasks:
            task.cancel()

    def __len__(self) -> int:
        return len(self._timers)
