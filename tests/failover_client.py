"""A Python participant that follows the client rules of docs/protocol.md ("When things
fail"), for the failover tests and bench/failover.py:

1. every (re)connect of its signaling socket: ``consult:join``, then ``media:join {resume:
   true}``; ``resumed: true`` keeps its peer connections, ``resumed: false`` builds new ones
   (subscribe, publish) and closes the old ones once the new ones are connected;
2. ``relay_waiting`` (or ``media:moved {relay: null}``): waits for ``media:moved`` with a relay,
   and tries ``media:join {resume: true}`` itself every ``retry_s`` meanwhile;
3. ``media:moved`` with a relay: ``media:join {resume: true}``, then as in 1;
4. a peer connection of its own that fails (or stays ``disconnected`` ``pc_failed_s``):
   ``media:join {resume: false}`` and new peer connections;
5. the socket: python-socketio reconnects a lost transport by itself; a disconnect the server
   started (its stop closes every session) is one python-socketio does not retry, so the
   participant redials itself with the same back-off.

What happened is recorded on the participant's monotonic clock (``time.monotonic``, the
machine's CLOCK_MONOTONIC, comparable across processes): each ``media:moved``, each
``media:join`` and how it was answered, each set of peer connections with the moment both were
connected, and every frame received (tests/media.py's ``MediaPeer``). ``recovery(t0)`` reads
from these how long after ``t0`` the participant learned of a move, had new connections, and
received the first frame from every other participant. Every wait is bounded."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import socketio

from tests.media import MediaPeer
from tests.support import Client

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0
JOIN_ATTEMPTS = 20
"""``consult:join`` after a reconnect, tried this often (0.25 s apart) while the server is not
ready for it yet (a restarted server still restoring)."""
REDIAL_ATTEMPTS = 240
RECONNECT_DELAY_S = 0.25
RECONNECT_DELAY_MAX_S = 1.0
MONITOR_S = 0.05
CLOSE_OLD_AFTER_S = 10.0
"""Old peer connections are closed once the new ones are connected, or after this long."""


CLOSE_STEP_S = 5.0
"""How long each step of a participant's close may take."""

class MediaRefused(Exception):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('code')}: {error.get('message')}")
        self.code = str(error.get("code"))


@dataclass
class Join:
    """One ``media:join`` and its outcome: ``resumed``, ``fresh`` or an error code."""

    at: float
    resume: bool
    outcome: str
    relay_id: str | None = None
    why: str = ""


@dataclass
class Peers:
    """One set of peer connections (publish and subscribe) of the participant."""

    peer: MediaPeer
    relay_id: str
    built_at: float
    connected_at: float | None = None
    failed_at: float | None = None
    error: str | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once both are connected, or they failed."""


@dataclass
class Recovery:
    """Seconds after ``t0`` (a relay lost): the ``media:moved`` with a relay, the new peer
    connections both connected, and the first frame from each other participant through them
    (None: not seen)."""

    participant: str
    learned_s: float | None
    connected_s: float | None
    first_frame_s: dict[str, float | None]

    @property
    def media_back_s(self) -> float | None:
        """When frames from every other participant were back; None if one never was."""
        values = list(self.first_frame_s.values())
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)


class Participant(Client):
    """A clinician's client in one consultation, following the client rules (module doc)."""

    def __init__(self, url: str, token: str, name: str, *, fps: int = 15,
                 audio: bool = True, retry_s: float = 5.0, pc_failed_s: float = 3.0) -> None:
        super().__init__(url, token)
        self.name = name
        self.fps = fps
        self.audio = audio
        self.retry_s = retry_s
        self.pc_failed_s = pc_failed_s
        self.consultation_id: str | None = None
        self.joins: list[Join] = []
        self.moves: list[tuple[float, dict[str, Any] | None]] = []
        """Each ``media:moved`` of the consultation: when, and the relay (None: waiting)."""
        self.connects: list[float] = []
        self.disconnects: list[tuple[float, str]] = []
        self.peer_sets: list[Peers] = []
        """Every set of peer connections built, oldest first; the last one is in use."""
        self.failures: list[str] = []
        self.waiting = False
        """No relay for the consultation now (rule 2)."""
        self._closing = False
        self._actions: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._redial: asyncio.Task[None] | None = None
        self._offers: set[asyncio.Task[None]] = set()
        self.sio = socketio.AsyncClient(reconnection=True,
                                        reconnection_attempts=REDIAL_ATTEMPTS,
                                        reconnection_delay=RECONNECT_DELAY_S,
                                        reconnection_delay_max=RECONNECT_DELAY_MAX_S,
                                        randomization_factor=0.1)
        self.sio.on("*", self._record)
        self.sio.on("connect", self._connected)
        self.sio.on("disconnect", self._disconnected)
        self.sio.on("media:moved", self._moved)
        self.sio.on("media:offer", self._offer)

    # -- the socket -----------------------------------------------------------------------
    async def _connected(self) -> None:
        self.connects.append(time.monotonic())
        if self.consultation_id is not None and len(self.connects) > 1:
            self._actions.put_nowait(("reconnected", None))

    async def _disconnected(self, reason: Any = None) -> None:
        self.disconnects.append((time.monotonic(), str(reason)))
        if self._closing or reason != self.sio.reason.SERVER_DISCONNECT:
            return  # a lost transport: python-socketio reconnects by itself
        if self._redial is None or self._redial.done():
            self._redial = asyncio.get_running_loop().create_task(self._dial_again())

    async def _dial_again(self) -> None:
        """The server closed the session (it is stopping): dial it again with back-off."""
        delay = RECONNECT_DELAY_S
        for _ in range(REDIAL_ATTEMPTS):
            await asyncio.sleep(delay)
            if self._closing or self.sio.connected:
                return
            try:
                await self.connect()
                return
            except Exception as exc:  # refused while the server is down: the next try
                self.failures.append(f"redial: {type(exc).__name__}: {exc}")
            delay = min(delay * 2, RECONNECT_DELAY_MAX_S)

    async def call(self, event: str, payload: Any = None,
                   timeout: float = CALL_TIMEOUT_S) -> Any:
        return await super().call(event, payload, timeout)

    # -- events ---------------------------------------------------------------------------
    async def _moved(self, data: Any = None) -> None:
        await self._record("media:moved", data)
        if not isinstance(data, dict) or data.get("consultation_id") != self.consultation_id:
            return
        relay = data.get("relay")
        self.moves.append((time.monotonic(), relay if isinstance(relay, dict) else None))
        self._actions.put_nowait(("moved", relay))

    async def _offer(self, data: Any = None) -> None:
        await self._record("media:offer", data)
        if not isinstance(data, dict) or data.get("consultation_id") != self.consultation_id:
            return
        peers = next((p for p in reversed(self.peer_sets)
                      if p.peer.subscribe_id == data.get("transport_id")), None)
        if peers is None and self.peer_sets:
            peers = self.peer_sets[-1]
        if peers is None or peers.peer.subscribe_pc is None:
            self.failures.append(f"an offer for no subscribe connection: "
                                 f"{data.get('transport_id')}")
            return
        try:
            await peers.peer.answer_offer(data)
        except Exception as exc:  # the relay may be gone meanwhile: keep it for the report
            self.failures.append(f"answering an offer: {type(exc).__name__}: {exc}")

    # -- media ----------------------------------------------------------------------------
    async def start(self, consultation_id: str, timeout: float = 30.0) -> None:
        """After ``consult:join``: media (rule 1), then the rules run until ``close``;
        returns once the first peer connections are connected."""
        self.consultation_id = consultation_id
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._drive(), name=f"{self.name}-rules"),
                       loop.create_task(self._watch(), name=f"{self.name}-peers")]
        self._actions.put_nowait(("join", True))
        deadline = time.monotonic() + timeout
        while not (self.peer_sets and self.peer_sets[-1].connected_at is not None):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: media not connected within {timeout} s "
                                     f"(joins {self.joins}, failures {self.failures})")
            await asyncio.sleep(MONITOR_S)

    @property
    def peer(self) -> MediaPeer | None:
        return self.peer_sets[-1].peer if self.peer_sets else None

    async def _media_call(self, command: str, payload: dict[str, Any]) -> dict[str, Any]:
        answer = await self.call(f"media:{command}",
                                 {"consultation_id": self.consultation_id, **payload})
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise MediaRefused(command, error if isinstance(error, dict) else
                               {"code": "bad_answer", "message": repr(answer)})
        return answer

    async def _drive(self) -> None:
        """The rules, one action at a time: the socket came back, the relay moved, a peer
        connection failed; while waiting for a relay, ``media:join`` every ``retry_s``."""
        while not self._closing:
            try:
                if self.waiting:
                    try:
                        action = await asyncio.wait_for(self._actions.get(), self.retry_s)
                    except TimeoutError:
                        action = ("join", True)
                else:
                    action = await self._actions.get()
                what, value = action
                if what == "reconnected":
                    await self._rejoin()
                elif what == "moved":
                    if value is None:
                        self.waiting = True
                    else:
                        await self._join(True)
                elif what == "join":
                    await self._join(bool(value))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # One failed step (a call that timed out while the server restarts): the
                # next event or the waiting retry tries again.
                self.failures.append(f"{type(exc).__name__}: {exc}")
                self.waiting = True
                logger.info("%s: %s failed: %r", self.name, action, exc)

    async def _rejoin(self) -> None:
        """Rule 1 after a reconnect: ``consult:join`` (a restarted server has no live state),
        then ``media:join {resume: true}``."""
        # Not ``sio.connected``: python-socketio sets it only when ``connect()`` returns,
        # after this connect handler's action may already run.
        for _ in range(JOIN_ATTEMPTS):
            try:
                answer = await self.call("consult:join",
                                         {"consultation_id": self.consultation_id})
            except Exception as exc:  # the socket dropped again: its next connect rejoins
                answer = f"{type(exc).__name__}: {exc}"
            if isinstance(answer, dict) and answer.get("ok") is True:
                break
            self.failures.append(f"consult:join after a reconnect: {answer}")
            await asyncio.sleep(0.25)
        await self._join(True)

    async def _join(self, resume: bool) -> None:
        now = time.monotonic()
        try:
            answer = await self._media_call("join", {"resume": resume})
        except MediaRefused as exc:
            self.joins.append(Join(now, resume, exc.code, why=str(exc)))
            self.waiting = True
            if exc.code != "relay_waiting":
                self.failures.append(str(exc))
            return
        self.waiting = False
        relay_id = str((answer.get("relay") or {}).get("id"))
        if answer.get("resumed") is True and self.peer_sets:
            self.joins.append(Join(now, resume, "resumed", relay_id))
            return
        self.joins.append(Join(now, resume, "fresh", relay_id))
        await self._build(relay_id)

    async def _build(self, relay_id: str) -> None:
        """New peer connections (subscribe, publish); the old ones go once these connect."""
        old = self.peer_sets[-1] if self.peer_sets else None
        peers = Peers(MediaPeer(self.name, self._media_call), relay_id, time.monotonic())
        self.peer_sets.append(peers)
        try:
            await peers.peer.subscribe()
            await peers.peer.publish(audio=self.audio, fps=self.fps)
        except Exception as exc:
            peers.error = f"{type(exc).__name__}: {exc}"
            peers.failed_at = time.monotonic()
            peers.settled.set()
            raise
        finally:
            if old is not None:
                task = asyncio.get_running_loop().create_task(self._retire(old, peers))
                self._offers.add(task)
                task.add_done_callback(self._offers.discard)

    async def _retire(self, old: Peers, new: Peers) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(new.settled.wait(), CLOSE_OLD_AFTER_S)
        await old.peer.close()

    async def _watch(self) -> None:
        """Notes when the newest peer connections are both connected; rule 4 when one of
        them fails or stays disconnected."""
        while not self._closing:
            await asyncio.sleep(MONITOR_S)
            if not self.peer_sets:
                continue
            peers = self.peer_sets[-1]
            pcs = [peers.peer.publish_pc, peers.peer.subscribe_pc]
            if any(pc is None for pc in pcs):
                continue
            states = [pc.connectionState for pc in pcs if pc is not None]
            now = time.monotonic()
            if peers.connected_at is None and all(s == "connected" for s in states):
                peers.connected_at = now
                peers.settled.set()
            broken = "failed" in states or "disconnected" in states
            if not broken:
                peers.failed_at = None
                continue
            if peers.failed_at is None:
                peers.failed_at = now
            if ("failed" in states or now - peers.failed_at >= self.pc_failed_s) \
                    and peers.error is None and not self.waiting:
                peers.error = f"peer connections {states}"
                peers.settled.set()
                self._actions.put_nowait(("join", False))

    # -- what happened --------------------------------------------------------------------
    def arrivals(self, other: str, source: str = "camera",
                 built_after: float | None = None) -> list[float]:
        """Arrival times of ``other``'s frames over every set of peer connections (or only
        those built after ``built_after``), in order."""
        times: list[float] = []
        for peers in self.peer_sets:
            if built_after is not None and peers.built_at <= built_after:
                continue
            for received in peers.peer.received.values():
                info = received.info
                if info.get("participant_id") == other and info.get("source") == source:
                    times.extend(received.arrivals)
        return sorted(times)

    def first_frame(self, other: str, after: float, *, rebuilt: bool = False) -> float | None:
        """The first frame from ``other`` after ``after``; with ``rebuilt``, only through peer
        connections built since (a frame still in flight from a lost relay, or in a jitter
        buffer, is not media back)."""
        times = self.arrivals(other, built_after=after if rebuilt else None)
        index = bisect.bisect_right(times, after)
        return times[index] if index < len(times) else None

    def frames(self, other: str, start: float, end: float) -> int:
        times = self.arrivals(other)
        return bisect.bisect_right(times, end) - bisect.bisect_right(times, start)

    def longest_gap(self, other: str, start: float, end: float) -> tuple[float, float]:
        """The longest time without a frame from ``other`` between ``start`` and ``end``,
        and when it began."""
        times = [t for t in self.arrivals(other) if start <= t <= end]
        edges = [start, *times, end]
        return max((b - a, a) for a, b in pairwise(edges))

    def recovery(self, t0: float, others: list[str]) -> Recovery:
        """After the consultation's relay was lost at ``t0``: media is back from another
        participant at its first frame through peer connections built after ``t0``."""
        learned = next((t for t, relay in self.moves if t > t0 and relay is not None), None)
        connected = next((p.connected_at for p in self.peer_sets
                          if p.built_at > t0 and p.connected_at is not None), None)
        firsts: dict[str, float | None] = {}
        for other in others:
            first = self.first_frame(other, t0, rebuilt=True)
            firsts[other] = None if first is None else first - t0
        return Recovery(self.name, None if learned is None else learned - t0,
                        None if connected is None else connected - t0, firsts)

    def resumed(self, after: float = 0.0) -> int:
        return sum(1 for j in self.joins if j.at > after and j.outcome == "resumed")

    def builds(self, after: float = 0.0) -> int:
        return sum(1 for p in self.peer_sets if p.built_at > after)

    def relay_id(self) -> str | None:
        """The relay of the newest peer connections."""
        return self.peer_sets[-1].relay_id if self.peer_sets else None

    async def close(self) -> None:
        self._closing = True
        for task in [*self._tasks, *self._offers,
                     *([self._redial] if self._redial is not None else [])]:
            task.cancel()
        # Every step bounded: a teardown stuck on one peer (aiortc's close waits for its
        # transports) must not hold the test until pytest's timeout (CI saw one such hang
        # after the test's assertions had all passed).
        pending = [*self._tasks, *self._offers]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_STEP_S)
        for peers in self.peer_sets:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peers.peer.close(), CLOSE_STEP_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sio.disconnect(), CLOSE_STEP_S)


async def participants(url: str, tokens: dict[str, str], **options: Any) -> dict[str,
                                                                                 Participant]:
    """Connected participants by name (not yet in a consultation)."""
    made: dict[str, Participant] = {}
    for name, token in tokens.items():
        made[name] = Participant(url, token, name, **options)
        await made[name].connect()
    return made


def describe(recoveries: list[Recovery]) -> str:
    """One line per participant: learned, connected, first frame from each other."""
    lines = []
    for r in recoveries:
        firsts = ", ".join(f"{o} {_s(v)}" for o, v in r.first_frame_s.items())
        lines.append(f"{r.participant}: learned {_s(r.learned_s)}, connected "
                     f"{_s(r.connected_s)}, first frame from {firsts}; media back "
                     f"{_s(r.media_back_s)}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
