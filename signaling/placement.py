"""Relays as signaling sees them: the registry of relays, the placement of each consultation's
Room on one of them, and the standalone relay nodes that dial in.

Placement: a relay of the requesting site's region with capacity to spare, least loaded first;
otherwise the least loaded relay anywhere (the embedded relay serves every region). A placement
is reserved while the accept that asked for it is written, then opened on the relay
(``open_room``, bounded by ``relay.open_room_timeout_s``: a relay that does not answer is
skipped for the next), and released when the consultation ends.

A consultation with no relay *waits* (docs/failover.md): it lost its relay and no other could
take it, or a restarted signaling waits ``relay.adopt_wait_s`` for the node that carried it to
dial in again. A waiting consultation is placed as soon as a relay registers or frees capacity
(and on a timer), and its participants are told (``media:moved``); meanwhile ``media:join``
answers ``relay_waiting``.

Standalone relay nodes dial in on the ``relay.api.NODE_NAMESPACE`` socket.io namespace with a
node token, register region and capacity, say which rooms they still hold (``relay:hello``),
heartbeat, and ask to be drained before they stop (``relay:drain``). The workers of one relay
machine (relay/workers.py) are nodes of their own, ``<machine>.w<k>``, from the machine's one
token; one worker's drain drains the whole machine (its supervisor stops them all at once), so
that a stopping machine's consultations move once, elsewhere. A node that closes its
connection or goes silent is taken out and its consultations move; while signaling itself
stops, nothing moves (the nodes keep media flowing and dial the next process). The start-up
module hands in the factory that builds a ``Relay`` for each node (``relay.remote.RemoteRelay``),
so this module knows nodes only through ``relay.api``.

With ``live.backend = "redis"`` the directory is signaling/relay_registry.py's
``FleetRelayDirectory``: the relays and placements of every ``serve`` process in Redis, each
change of placement a compare-and-set (the hooks ``record``, ``claim``, ``claim_waiting``,
``set_waiting``... which here, in one process, are plain memory). ``RelayNodes`` stays the
lifecycle of the nodes connected to this process; it moves every consultation placed on one
it lost, whichever process placed it, and those of orphans (relays whose process died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import socketio
from pydantic import ValidationError

from config.settings import RelaySettings
from relay.api import NODE_NAMESPACE, Relay, RelayEvents, RelayInfo, worker_relay_id
from relay.errors import RelayError
from signaling.errors import SignalingError, Unauthenticated
from signaling.fleet import raise_if_cancelled
from signaling.schemas import NodeHello
from signaling.tokens import TokenAuthority

logger = logging.getLogger(__name__)

MoveReason = Literal["relay_lost", "relay_drained", "signaling_restart"]
"""Why a consultation changed relay (the recording's gap says the same)."""

WAITING_RETRY_S = 1.0
"""Waiting consultations are tried again at least this often (besides every registration and
every freed placement)."""
CLOSE_ROOM_TIMEOUT_S = 5.0
"""Closing an ended consultation's Room: a relay that does not answer keeps it until the node
says hello again (the answer lists it under ``close``) or its grace ends."""
CLOSE_SOCKET_TIMEOUT_S = 5.0
"""Closing the engine.io session of a node taken out: what is queued for it may not go out."""
MOVES_AT_ONCE = 32
"""Consultations of a lost relay moved at the same time: each move waits on the new relay's
``open_room`` (a round trip to a node, tens of ms over a WAN) and on the record and the
participants; one after another, the last of a full relay (``relay.capacity`` 200) would be
told seconds after the first."""
DRAIN_POLL_S = 0.25
"""How often a drain looks whether the moved participants are connected to their new relay."""


class NoRelayAvailable(SignalingError):
    code = "no_relay"
    http_status = 503


LATE_CLOSE_TIMEOUT_S = 5.0
"""How long the close of a Room a relay opened too late may take."""


class Superseded(Exception):
    """Another process changed the consultation's placement first (a fleet's registry,
    signaling/relay_registry.py): what this one was doing for it is dropped, the other's
    stands."""


class RelayUnanswered(RelayError):
    """A relay did not answer ``open_room`` within ``relay.open_room_timeout_s``."""

    code = "relay_unreachable"


@dataclass
class Waiting:
    """A consultation with no relay at the moment."""

    region: str
    since: float
    """When it lost its relay (Unix time): the start of the gap in its media."""
    reason: MoveReason
    relay_id: str | None = None
    """The node it waits for first (a restarted signaling: its media may still flow there)."""
    until: float = 0.0
    """Until when (Unix time) it waits for ``relay_id``; then any relay takes it."""
    version: int = -1
    """A fleet's registry: the version of the shared record this was read from (the
    compare-and-set of its next change). Unused in one process."""
    claim: str | None = None
    """A fleet's registry: the process placing it now, until ``claim_until``."""
    claim_until: float = 0.0

    def waits_for(self, relay_id: str, now: float) -> bool:
        """True while it waits for that node only."""
        return self.relay_id is not None and self.relay_id != relay_id and now < self.until


class RelayDirectory:
    """The relays signaling knows and where each consultation's Room is placed (or that it
    waits for one)."""

    def __init__(self, *, open_room_timeout_s: float = 1.0, adopt_wait_s: float = 15.0) -> None:
        self._open_timeout_s = open_room_timeout_s
        self._adopt_wait_s = adopt_wait_s
        self._relays: dict[str, Relay] = {}
        self._placements: dict[str, str] = {}
        """Consultation (its Room's id) -> the relay it is placed on."""
        self._regions: dict[str, str] = {}
        self._reserved: dict[str, int] = {}
        """Placements promised to a relay by ``reserve`` and not opened yet."""
        self._late: set[asyncio.Task[None]] = set()
        """Rooms to close on relays that answered ``open_room`` too late (``_close_late``)."""
        self._waiting: dict[str, Waiting] = {}
        self._draining: set[str] = set()
        self.changed = asyncio.Event()
        """Set when waiting consultations may find a place: a relay registered, a placement
        was released. ``RelayNodes.run`` waits on it."""

    def _all(self) -> Iterable[Relay]:
        """Every relay a placement may go to."""
        return self._relays.values()

    def register(self, relay: Relay) -> None:
        self._relays[relay.info.id] = relay
        self._draining.discard(relay.info.id)
        logger.info("relay %s registered (region %r, capacity %d)",
                    relay.info.id, relay.info.region, relay.info.capacity)
        self.changed.set()

    def unregister(self, relay_id: str) -> None:
        self._relays.pop(relay_id, None)
        self._draining.discard(relay_id)

    def get(self, relay_id: str) -> Relay | None:
        return self._relays.get(relay_id)

    def for_room(self, room_id: str) -> Relay | None:
        """The relay the Room is placed on (None: waiting, or its relay is gone)."""
        relay_id = self._placements.get(room_id)
        return self._relays.get(relay_id) if relay_id else None

    async def locate(self, room_id: str) -> Relay | None:
        """``for_room`` where the answer may live elsewhere: with a fleet's registry
        (signaling/relay_registry.py) the Room may have been placed by another process, on a
        relay connected to any of them. Here: ``for_room``."""
        return self.for_room(room_id)

    def relays(self) -> list[Relay]:
        return list(self._relays.values())

    def drain(self, relay_id: str) -> None:
        """Place nothing more on this relay (it is about to stop)."""
        self._draining.add(relay_id)

    def _placed_on(self, relay_id: str) -> int:
        return sum(1 for where in self._placements.values() if where == relay_id)

    def _load(self, relay: Relay) -> int:
        """Rooms on the relay: a node's heartbeat reports its load every ``heartbeat_s``;
        placements made since count at once, so that a burst of moves cannot overfill it."""
        return max(relay.info.load, self._placed_on(relay.info.id)) \
            + self._reserved.get(relay.info.id, 0)

    def _free(self, relay: Relay) -> bool:
        return relay.info.id not in self._draining and self._load(relay) < relay.info.capacity

    def candidates(self, region: str, exclude: Collection[str] = ()) -> list[Relay]:
        """Relays with capacity to spare, best first: the region's, then the least loaded
        (by share of capacity, then id)."""

        def rank(relay: Relay) -> tuple[int, float, str]:
            local = 0 if relay.info.region == region else 1
            return (local, self._load(relay) / relay.info.capacity, relay.info.id)

        return sorted((r for r in self._all()
                       if r.info.id not in exclude and self._free(r)), key=rank)

    def choose(self, region: str, exclude: Collection[str] = ()) -> Relay:
        candidates = self.candidates(region, exclude)
        if not candidates:
            raise NoRelayAvailable("no relay has capacity for another consultation")
        return candidates[0]

    def reserve(self, region: str) -> Relay:
        """Choose a relay and hold a placement on it until ``open`` (or ``unreserve``), so
        that accepts running at the same time cannot overfill it."""
        relay = self.choose(region)
        self._reserved[relay.info.id] = self._reserved.get(relay.info.id, 0) + 1
        return relay

    def unreserve(self, relay: Relay) -> None:
        left = self._reserved.get(relay.info.id, 0) - 1
        if left > 0:
            self._reserved[relay.info.id] = left
        else:
            self._reserved.pop(relay.info.id, None)

    async def open(self, room_id: str, relay: Relay, region: str = "", *,
                   reserved: bool = False) -> Relay:
        """Open the Room on ``relay`` (from ``choose``) and remember where it is. A relay
        that fails or does not answer within ``open_room_timeout_s`` raises (RelayError,
        ``RelayUnanswered``).

        ``reserved=True`` (``relay`` from ``reserve``: an accept whose consultation is
        already written) never raises a relay's failure: the next candidate takes the Room,
        and with none the consultation waits for a relay like one that lost its own
        (``for_room`` is None, ``media:join`` answers ``relay_waiting``); the relay returned
        is then the one reserved."""
        if reserved:
            self.unreserve(relay)
            try:
                return await self.open(room_id, relay, region)
            except RelayError as exc:
                logger.warning("relay %s could not open the room of new consultation %s (%s)",
                               relay.info.id, room_id, exc.code)
            try:
                return await self.place(room_id, region, {relay.info.id})
            except NoRelayAvailable:
                await self.set_waiting(room_id, region, reason="relay_lost", since=time.time())
                logger.warning("new consultation %s waits for a relay", room_id)
                return relay
        # Held while the relay answers, so that moves placing other Rooms at the same time
        # count this one (``_load``) and cannot overfill the relay.
        self._reserved[relay.info.id] = self._reserved.get(relay.info.id, 0) + 1
        try:
            async with asyncio.timeout(self._open_timeout_s):
                await relay.open_room(room_id)
        except TimeoutError:
            self._close_late(relay, room_id)
            raise RelayUnanswered(f"relay {relay.info.id!r} did not answer open_room within "
                                  f"{self._open_timeout_s:g} s") from None
        finally:
            self.unreserve(relay)
        await self.record(room_id, relay, region)
        return relay

    def _close_late(self, relay: Relay, room_id: str) -> None:
        """``open_room`` timed out, and a slow relay may still open the Room: close it there a
        moment later unless the Room has been placed on that relay meanwhile. A Room nobody
        placed would otherwise count against the relay's capacity until it stops (seen under
        load: hundreds left open, every accept then refused ``no_relay``)."""

        async def run() -> None:
            await asyncio.sleep(self._open_timeout_s)
            try:
                placed, _ = await self.placement(room_id)
                if placed == relay.info.id:
                    return
                async with asyncio.timeout(LATE_CLOSE_TIMEOUT_S):
                    await relay.close_room(room_id)
                logger.info("room of %s closed on relay %s, which opened it too late",
                            room_id, relay.info.id)
            except (RelayError, TimeoutError) as exc:
                logger.info("room of %s on relay %s (opened too late) not closed: %s", room_id,
                            relay.info.id, getattr(exc, "code", "timeout"))
            except Exception:
                logger.exception("room of %s on relay %s (opened too late) not closed",
                                 room_id, relay.info.id)

        task = asyncio.get_running_loop().create_task(run(), name=f"close-late-{room_id}")
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    def _settle(self, room_id: str, relay: Relay, region: str) -> None:
        self._placements[room_id] = relay.info.id
        self._regions[room_id] = region
        self._waiting.pop(room_id, None)

    async def place(self, room_id: str, region: str,
                    failed: set[str] | None = None) -> Relay:
        """Open the Room on the best candidate that answers. A relay that fails or does not
        answer is added to ``failed`` (the caller's batch skips it from then on) and the next
        candidate is tried; NoRelayAvailable when none is left."""
        failed = set() if failed is None else failed
        for relay in self.candidates(region, failed):
            if relay.info.id in failed or not self._free(relay):
                continue  # failed or filled by another move while this one waited
            try:
                return await self.open(room_id, relay, region)
            except RelayError as exc:
                failed.add(relay.info.id)
                logger.warning("relay %s could not open the room of consultation %s (%s); "
                               "trying the next one", relay.info.id, room_id, exc.code)
        raise NoRelayAvailable("no relay has capacity for another consultation"
                               + (f" (not answering: {', '.join(sorted(failed))})"
                                  if failed else ""))

    def adopt(self, room_id: str, relay: Relay, region: str) -> None:
        """The relay reported the Room (``relay:hello``): it is placed there as it is."""
        self._settle(room_id, relay, region)

    def placements_on(self, relay_id: str) -> list[tuple[str, str]]:
        """(Room, region) of every consultation placed on the relay."""
        return [(room, self._regions.get(room, "")) for room, where in self._placements.items()
                if where == relay_id]

    # -- what a fleet's registry shares (signaling/relay_registry.py); one process: memory --
    async def record(self, room_id: str, relay: Relay, region: str) -> None:
        """The Room is open on ``relay``: remember it (a fleet: share it, or raise Superseded
        when another process placed it meanwhile)."""
        self._settle(room_id, relay, region)

    async def placements_of(self, relay_id: str) -> list[tuple[str, str]]:
        """``placements_on``, by every process of a fleet."""
        return self.placements_on(relay_id)

    async def claim(self, room_id: str, relay_id: str, *, reason: MoveReason,
                    since: float) -> bool:
        """Take the Room off lost relay ``relay_id`` to move it; False when it is no longer
        there (moved meanwhile by another process). One process: its lock serialises moves."""
        return True

    async def claim_waiting(self, room_id: str, waiting: Waiting) -> bool:
        """Take the waiting Room to place it; False when it was placed (or is being placed)
        meanwhile."""
        return self._waiting.get(room_id) is waiting

    async def set_waiting(self, room_id: str, region: str, *, reason: MoveReason, since: float,
                          relay_id: str | None = None, until: float = 0.0) -> Waiting:
        """``wait``, shared with a fleet."""
        return self.wait(room_id, region, reason=reason, since=since, relay_id=relay_id,
                         until=until)

    async def update_waiting(self, room_id: str, waiting: Waiting) -> None:
        """A waiting Room's ``relay_id``/``until`` changed (it waits for any relay now)."""

    async def placement(self, room_id: str) -> tuple[str | None, Waiting | None]:
        """Where the Room is placed (its relay's id, registered or not) or how it waits."""
        return self._placements.get(room_id), self._waiting.get(room_id)

    async def announce(self, relay: Relay) -> None:
        """A node connected here (or its drain began): a fleet's other processes may place
        on it."""

    async def withdraw(self, relay_id: str) -> bool:
        """A node connected here is gone: False when it is connected to another process of
        the fleet now (its consultations stay where they are)."""
        return True

    async def refresh(self) -> None:
        """A fleet: share this process's nodes (load, liveness) and read the others'."""

    async def orphans(self) -> list[tuple[str, float]]:
        """A fleet: relays whose process died and which no process took back within
        ``adopt_wait_s``, with when they were last seen; their consultations move."""
        return []

    async def forget_orphan(self, relay_id: str, seen_at: float) -> None:
        """The orphan's consultations are moved: its entry goes."""

    def region_of(self, room_id: str) -> str:
        return self._regions.get(room_id, "")

    # -- waiting ---------------------------------------------------------------------------
    def wait(self, room_id: str, region: str, *, reason: MoveReason, since: float,
             relay_id: str | None = None, until: float = 0.0) -> Waiting:
        """The consultation has no relay now (``relay_id``: it waits for that node first,
        until ``until``)."""
        self._placements.pop(room_id, None)
        self._regions[room_id] = region
        waiting = self._waiting[room_id] = Waiting(region, since, reason, relay_id, until)
        return waiting

    def waiting(self, room_id: str) -> Waiting | None:
        return self._waiting.get(room_id)

    def waiting_rooms(self) -> dict[str, Waiting]:
        return dict(self._waiting)

    def is_known(self, room_id: str) -> bool:
        """Placed or waiting: a consultation that has not ended."""
        return room_id in self._placements or room_id in self._waiting

    async def restore(self, room_id: str, relay_id: str, region: str) -> Relay | None:
        """After a start, a consultation that had not ended: reopened on its relay if that
        one is registered (the embedded relay: the process's media died with it, clients
        rebuild), else it waits ``adopt_wait_s`` for that node's hello. A relay that fails
        hands it to the next; none: it waits for any. Never raises a relay's error."""
        now = time.time()
        relay = self.get(relay_id)
        if relay is None:
            await self.set_waiting(room_id, region, reason="signaling_restart", since=now,
                                   relay_id=relay_id, until=now + self._adopt_wait_s)
            return None
        failed: set[str] = set()
        try:
            return await self.open(room_id, relay, region)
        except RelayError as exc:
            failed.add(relay_id)
            logger.warning("consultation %s: relay %s could not reopen its room (%s)",
                           room_id, relay_id, exc.code)
        try:
            return await self.place(room_id, region, failed)
        except NoRelayAvailable:
            await self.set_waiting(room_id, region, reason="signaling_restart", since=now)
            return None

    async def release(self, room_id: str) -> None:
        """The consultation ended: its Room is closed and its placement freed."""
        relay_id = self._placements.pop(room_id, None)
        self._regions.pop(room_id, None)
        self._waiting.pop(room_id, None)
        self.changed.set()
        relay = self.get(relay_id) if relay_id else None
        if relay is None:
            return
        try:
            async with asyncio.timeout(CLOSE_ROOM_TIMEOUT_S):
                await relay.close_room(room_id)
        except (RelayError, TimeoutError) as exc:
            logger.warning("relay %s did not close the room of ended consultation %s (%s); "
                           "it goes at the node's next hello", relay.info.id, room_id,
                           getattr(exc, "code", "timeout"))


# -- standalone relay nodes ---------------------------------------------------------------------


class NodeRelay(Relay, Protocol):
    """A ``Relay`` over a node's connection: it also takes the node's ``relay:media``
    messages (the recorded Room's packets) for the sink attached to the Room."""

    def deliver(self, data: dict[str, Any]) -> None: ...

    def abandon(self) -> None:
        """The connection is gone: commands waiting for an answer fail now."""


NodeRelayFactory = Callable[[RelayInfo, str], NodeRelay]
"""Builds the ``Relay`` of a node that dialled in, from its info and its connection (sid)."""


class Moved(Protocol):
    """Told that a consultation's Room changed relay (None: it waits for one), why, and when
    its old relay was lost."""

    def __call__(self, consultation_id: str, relay: Relay | None, *, reason: MoveReason,
                 lost_at: float) -> Awaitable[None]: ...


Adopted = Callable[[str, list[str]], Awaitable[None]]
"""Told that a node's Room was adopted, with the participants the node still holds."""


class RelayNodes:
    """The ``relay.api.NODE_NAMESPACE`` socket.io namespace: nodes register, say hello,
    heartbeat, report and drain; each becomes a relay in the ``RelayDirectory`` while
    connected. Also the one place that moves consultations between relays, one change at a
    time (``_lock``)."""

    def __init__(self, sio: socketio.AsyncServer, *, tokens: TokenAuthority,
                 relays: RelayDirectory, events: RelayEvents, on_moved: Moved,
                 node_relay: NodeRelayFactory, settings: RelaySettings,
                 on_adopted: Adopted | None = None) -> None:
        self._sio = sio
        self._tokens = tokens
        self._relays = relays
        self._events = events
        self._on_moved = on_moved
        self._on_adopted = on_adopted
        self._node_relay = node_relay
        self._settings = settings
        self._nodes: dict[str, NodeRelay] = {}
        self._lock = asyncio.Lock()
        """Held while consultations change relay (moves, hello, waiting ones placed), so
        that each decision sees the previous one and clients hear them in order."""
        self._stopping = False
        self._replaced: dict[str, float] = {}
        """Relay id -> the last heartbeat of a connection that a new one of the same node
        replaced before it was noticed gone: what that node reported in between is lost."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._machines: dict[str, str] = {}
        """Relay id of a machine's worker (relay/workers.py) -> the machine's relay id."""
        sio.on("connect", self._connect, namespace=NODE_NAMESPACE)
        sio.on("disconnect", self._disconnect, namespace=NODE_NAMESPACE)
        sio.on("relay:hello", self._hello, namespace=NODE_NAMESPACE)
        sio.on("relay:drain", self._drain, namespace=NODE_NAMESPACE)
        sio.on("relay:heartbeat", self._heartbeat, namespace=NODE_NAMESPACE)
        sio.on("relay:offer", self._offer, namespace=NODE_NAMESPACE)
        sio.on("relay:publication", self._publication, namespace=NODE_NAMESPACE)
        sio.on("relay:notice", self._notice, namespace=NODE_NAMESPACE)
        sio.on("relay:media", self._media, namespace=NODE_NAMESPACE)

    @property
    def silence_s(self) -> float:
        """A node silent this long is taken out."""
        return self._settings.heartbeat_s * self._settings.heartbeat_misses

    def stop(self) -> None:
        """Signaling is stopping: nodes that disconnect from now on keep their rooms (they
        redial the next process and say hello) and nothing moves."""
        self._stopping = True

    # -- connection ------------------------------------------------------------------------
    async def _connect(self, sid: str, _environ: dict[str, Any], auth: Any = None) -> None:
        auth = auth if isinstance(auth, dict) else {}
        try:
            # A worker of a machine (relay/workers.py): its own id, from the machine's token.
            worker = auth.get("worker")
            relay_id = self._tokens.verify_node(auth.get("token"), worker)
            if worker is not None:
                self._machines[relay_id] = relay_id.removesuffix(worker_relay_id("", worker))
            capacity = int(auth.get("capacity") or 0)
            if capacity <= 0:
                raise Unauthenticated(f"capacity must be > 0, got {auth.get('capacity')!r}",
                                      code="invalid_registration")
        except (Unauthenticated, ValueError, TypeError) as exc:
            code = getattr(exc, "code", "invalid_registration")
            logger.info("relay node connection %s refused: %s", sid, code)
            raise socketio.exceptions.ConnectionRefusedError(
                str(exc), {"code": code, "message": str(exc)}) from None
        stale = next((s for s, n in self._nodes.items() if n.info.id == relay_id), None)
        if stale is not None:
            # The node redialled before its old connection was noticed gone (a network cut
            # shorter than the heartbeat check): the new connection takes over, and what the
            # old one carried stays placed here; its hello says what is still there.
            old = self._nodes.pop(stale)
            old.abandon()
            self._replaced[relay_id] = old.info.heartbeat_at
            logger.warning("relay node %s connected again (%s); its old connection %s is "
                           "closed", relay_id, sid, stale)
            self._spawn(self._close_socket(stale), f"close-{stale}")
        info = RelayInfo(id=relay_id, region=str(auth.get("region") or ""),
                         public_address=str(auth.get("public_address") or ""),
                         capacity=capacity, heartbeat_at=time.time())
        node = self._node_relay(info, sid)
        self._nodes[sid] = node
        self._relays.register(node)
        try:
            await self._relays.announce(node)
        except Exception:
            # The next refresh shares it (every heartbeat_s / 2).
            logger.exception("relay node %s: sharing it with the fleet failed", relay_id)
        logger.info("relay node %s connected (region %r, capacity %d)", relay_id, info.region,
                    capacity)

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        node = self._nodes.pop(sid, None)
        if node is not None:
            await self._lost(node, f"disconnected ({reason})")

    async def _close_socket(self, sid: str) -> None:
        """Leave the namespace and close the engine.io session under it: a node behind a cut
        link would otherwise keep answering engine.io's pings once the link heals, connected
        in its own eyes and unknown to signaling."""
        with contextlib.suppress(Exception):
            eio_sid = self._sio.manager.eio_sid_from_sid(sid, NODE_NAMESPACE)
            await self._sio.disconnect(sid, namespace=NODE_NAMESPACE)
            if eio_sid is not None:
                async with asyncio.timeout(CLOSE_SOCKET_TIMEOUT_S):
                    await self._sio.eio.disconnect(eio_sid)

    def _spawn(self, step: Awaitable[None], name: str) -> None:
        async def run() -> None:
            await step

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lost(self, node: NodeRelay, why: str) -> None:
        """The node is gone: its consultations move (never raises)."""
        lost_at = time.time()
        node.abandon()
        self._relays.unregister(node.info.id)
        if self._stopping:
            # A fleet's registry keeps its entry: the node dials another process (or this
            # one again) and says hello there; one that does not becomes an orphan.
            logger.info("relay node %s %s while signaling stops; its %d consultations stay "
                        "there", node.info.id, why, len(self._relays.placements_on(
                            node.info.id)))
            return
        try:
            ours = await self._relays.withdraw(node.info.id)
        except Exception:
            logger.exception("relay node %s: withdrawing it from the fleet failed; its "
                             "consultations move from here", node.info.id)
            ours = True
        if not ours:
            logger.info("relay node %s %s here, and is connected to another signaling process "
                        "now: its consultations stay there", node.info.id, why)
            return
        placements = await self._relays.placements_of(node.info.id)
        logger.warning("relay node %s %s; moving %d consultations", node.info.id, why,
                       len(placements))
        try:
            async with self._lock:
                await self._move(node.info.id, "relay_lost", lost_at)
        except Exception:
            logger.exception("relay node %s: moving its consultations failed", node.info.id)

    async def _move(self, relay_id: str, reason: MoveReason,
                    lost_at: float) -> list[tuple[str, Relay | None]]:
        """Every consultation on the relay to the best other one that answers, else to the
        waiting state; the participants told either way. The caller holds ``_lock``. In a
        fleet every process's placements on the relay move, each claimed first (once across
        the processes); those another process moved or placed meanwhile are left out of the
        list returned."""
        failed = {relay_id}
        slots = asyncio.Semaphore(MOVES_AT_ONCE)

        async def move(room_id: str, region: str) -> tuple[str, Relay | None] | None:
            relay: Relay | None
            async with slots:
                if not await self._relays.claim(room_id, relay_id, reason=reason,
                                                since=lost_at):
                    return None
                try:
                    try:
                        relay = await self._relays.place(room_id, region, failed)
                    except NoRelayAvailable as exc:
                        relay = None
                        await self._relays.set_waiting(room_id, region, reason=reason,
                                                       since=lost_at)
                        logger.warning("consultation %s waits for a relay: %s", room_id,
                                       exc.message)
                    except Superseded:
                        raise
                    except Exception:
                        relay = None
                        await self._relays.set_waiting(room_id, region, reason=reason,
                                                       since=lost_at)
                        logger.exception("consultation %s: placing it failed; it waits",
                                         room_id)
                except Superseded:
                    logger.info("consultation %s was placed by another signaling process "
                                "meanwhile", room_id)
                    return None
                await self._tell(room_id, relay, reason, lost_at)
            return room_id, relay

        moves = await asyncio.gather(
            *(move(room_id, region)
              for room_id, region in await self._relays.placements_of(relay_id)))
        return [m for m in moves if m is not None]

    async def _tell(self, room_id: str, relay: Relay | None, reason: MoveReason,
                    lost_at: float) -> None:
        try:
            await self._on_moved(room_id, relay, reason=reason, lost_at=lost_at)
        except Exception:
            logger.exception("consultation %s: telling its participants of the move failed",
                             room_id)

    # -- waiting consultations -------------------------------------------------------------
    async def place_waiting(self) -> int:
        """Place the waiting consultations that a relay can take now; how many were placed.
        Those waiting for a node of their own (start-up) wait for it until their time is
        up. Never raises."""
        placed = 0
        if self._stopping:
            return placed
        try:
            async with self._lock:
                now = time.time()
                failed: set[str] = set()
                for room_id, waiting in self._relays.waiting_rooms().items():
                    if waiting.relay_id is not None and now < waiting.until:
                        continue
                    if not await self._relays.claim_waiting(room_id, waiting):
                        continue  # placed meanwhile (here or by another process)
                    try:
                        relay = await self._relays.place(room_id, waiting.region, failed)
                    except Superseded:
                        continue
                    except NoRelayAvailable:
                        if waiting.relay_id is not None:
                            logger.info("consultation %s: relay %s did not come back within "
                                        "%.0f s; it waits for any relay", room_id,
                                        waiting.relay_id, self._settings.adopt_wait_s)
                            waiting.relay_id = None
                            await self._relays.update_waiting(room_id, waiting)
                            await self._tell(room_id, None, waiting.reason, waiting.since)
                        continue
                    placed += 1
                    logger.info("consultation %s waited %.1f s and is placed on relay %s",
                                room_id, now - waiting.since, relay.info.id)
                    await self._tell(room_id, relay, waiting.reason, waiting.since)
        except Exception:
            logger.exception("placing waiting consultations failed; trying again")
        return placed

    async def run(self) -> None:
        """The node timers, apart from the queue's tick: silent nodes are looked for every
        ``heartbeat_s / 2``, waiting consultations tried on every change (a relay registered,
        a placement freed) and every ``WAITING_RETRY_S``."""
        every = self._settings.heartbeat_s / 2
        last_try = 0.0
        while True:
            before = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._relays.changed.wait()
            late = time.monotonic() - before - every
            changed = self._relays.changed.is_set()
            self._relays.changed.clear()
            await self._relays.refresh()
            if late > self._settings.heartbeat_s:
                # This process stalled (CPU starved, a long collection), not the nodes: the
                # heartbeats that arrived meanwhile are read before the next look.
                logger.info("relay node timers ran %.2f s late; silent nodes looked for at "
                            "the next turn", late)
            else:
                await self.sweep()
                await self.move_orphans()
            now = time.monotonic()
            if changed or now - last_try >= WAITING_RETRY_S:
                last_try = now
                if self._relays.waiting_rooms():
                    await self.place_waiting()
            raise_if_cancelled()

    async def move_orphans(self) -> None:
        """A fleet: the consultations of relays whose signaling process died and which
        dialled no other within ``adopt_wait_s`` move (each claimed once across the
        processes). Never raises."""
        if self._stopping:
            return
        try:
            for relay_id, seen_at in await self._relays.orphans():
                logger.warning("relay node %s: its signaling process is gone and it did not "
                               "dial another within %.0f s; its consultations move", relay_id,
                               self._settings.adopt_wait_s)
                async with self._lock:
                    await self._move(relay_id, "relay_lost", seen_at)
                await self._relays.forget_orphan(relay_id, seen_at)
        except Exception:
            logger.exception("moving the consultations of orphaned relays failed; trying "
                             "again")

    async def sweep(self) -> None:
        """Take out nodes silent for ``heartbeat_s * heartbeat_misses``: their consultations
        move first, then the socket is closed. Never raises."""
        if self._stopping:
            return
        deadline = time.time() - self.silence_s
        for sid, node in list(self._nodes.items()):
            if node.info.heartbeat_at < deadline and self._nodes.get(sid) is node:
                del self._nodes[sid]
                await self._lost(node, f"silent for {time.time() - node.info.heartbeat_at:.1f} s")
                self._spawn(self._close_socket(sid), f"close-{sid}")

    # -- what nodes say --------------------------------------------------------------------
    async def _heartbeat(self, sid: str, data: Any = None) -> None:
        node = self._nodes.get(sid)
        if node is None:
            return
        node.info.heartbeat_at = time.time()
        if isinstance(data, dict) and isinstance(data.get("load"), int):
            node.info.load = data["load"]

    async def _hello(self, sid: str, data: Any = None) -> dict[str, Any]:
        """``relay:hello {rooms}``: adopt the rooms of consultations placed on this node or
        waiting (for it, or for any relay); list the others for the node to close."""
        node = self._nodes.get(sid)
        if node is None:
            return _refusal("unknown_node", "this connection is not a registered relay node")
        try:
            hello = NodeHello.model_validate(data if data is not None else {})
        except ValidationError as exc:
            return _refusal("invalid_payload", f"relay:hello: {exc.error_count()} invalid "
                                               "fields")
        relay_id = node.info.id
        adopted: list[str] = []
        close: list[str] = []
        told: list[tuple[str, Waiting]] = []
        replaced_at = self._replaced.pop(relay_id, None)
        async with self._lock:
            now = time.time()
            reported = set()
            for room in hello.rooms:
                reported.add(room.room_id)
                placed_on, waiting = await self._relays.placement(room.room_id)
                if placed_on == relay_id:
                    # Placed here already (by any process): settled here as it is.
                    await self._relays.record(room.room_id, node,
                                              self._relays.region_of(room.room_id))
                    adopted.append(room.room_id)
                    if replaced_at is not None:
                        # Back on a new connection: the participants resume (an offer sent
                        # while the link was down comes again), the recording takes the
                        # new connection's media.
                        told.append((room.room_id, Waiting(
                            self._relays.region_of(room.room_id), replaced_at, "relay_lost")))
                elif waiting is not None and not waiting.waits_for(relay_id, now) \
                        and await self._relays.claim_waiting(room.room_id, waiting):
                    try:
                        await self._relays.record(room.room_id, node, waiting.region)
                    except Superseded:
                        close.append(room.room_id)
                        continue
                    adopted.append(room.room_id)
                    told.append((room.room_id, waiting))
                else:
                    close.append(room.room_id)
            for room_id, waiting in self._relays.waiting_rooms().items():
                if waiting.relay_id == relay_id and room_id not in reported:
                    # The node came back without it (restarted): no reason to wait longer.
                    waiting.relay_id = None
                    waiting.until = 0.0
                    with contextlib.suppress(Superseded):
                        await self._relays.update_waiting(room_id, waiting)
            if adopted and self._on_adopted is not None:
                participants = {r.room_id: list(r.participants) for r in hello.rooms}
                for room_id in adopted:
                    try:
                        await self._on_adopted(room_id, participants[room_id])
                    except Exception:
                        logger.exception("consultation %s: taking back its participants "
                                         "failed", room_id)
            for room_id, waiting in told:
                await self._tell(room_id, node, waiting.reason, waiting.since)
        self._relays.changed.set()
        logger.info("relay node %s says hello: %d rooms adopted, %d to close", relay_id,
                    len(adopted), len(close))
        return {"ok": True, "result": {"adopted": adopted, "close": close}}

    async def _drain(self, sid: str, data: Any = None) -> dict[str, Any]:
        """``relay:drain {}``: place nothing more on the node, move its consultations, and
        answer once the participants who were in its rooms are connected to their new
        relay, or after ``relay.drain_s``."""
        node = self._nodes.get(sid)
        if node is None:
            return _refusal("unknown_node", "this connection is not a registered relay node")
        started = time.monotonic()
        relay_id = node.info.id
        self._relays.drain(relay_id)
        with contextlib.suppress(Exception):
            await self._relays.announce(node)  # the fleet's other processes stop placing
        machine = self._machines.get(relay_id)
        if machine is not None:
            # A worker drains when its machine stops (its supervisor signals every worker at
            # once): its consultations go to another machine, not to a sibling that is about
            # to drain too and move them a second time.
            for relay in self._relays.relays():
                if self._machines.get(relay.info.id) == machine:
                    self._relays.drain(relay.info.id)
        async with self._lock:
            who = {room_id: await _participants(node, room_id, self._settings.open_room_timeout_s)
                   for room_id, _ in await self._relays.placements_of(relay_id)}
            moves = await self._move(relay_id, "relay_drained", time.time())
        moved = [(room_id, relay) for room_id, relay in moves if relay is not None]
        expected = sum(len(who.get(room_id, ())) for room_id, _ in moved)
        connected = 0
        deadline = started + self._settings.drain_s
        while True:
            connected = 0
            for room_id, relay in moved:
                connected += await _connected(relay, room_id, who.get(room_id, []),
                                              self._settings.open_room_timeout_s)
            if connected >= expected or time.monotonic() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        waited = round(time.monotonic() - started, 2)
        logger.info("relay node %s drained: %d consultations moved (%d waiting), %d of %d "
                    "participants connected elsewhere after %.2f s", relay_id, len(moved),
                    len(moves) - len(moved), connected, expected, waited)
        return {"ok": True, "result": {"moved": len(moved), "connected": connected,
                                       "waited_s": waited}}

    async def _owns(self, sid: str, data: Any) -> bool:
        """A node speaks only for the Rooms placed on it (by any process of a fleet)."""
        node = self._nodes.get(sid)
        if node is None or not isinstance(data, dict):
            return False
        room_id = str(data.get("room_id"))
        try:
            placed = await self._relays.locate(room_id)
        except Exception as exc:
            # A fleet's Redis away: this process's own view decides meanwhile.
            logger.warning("relay node %s: where room %s is placed could not be read (%s); "
                           "this process's view decides", node.info.id, room_id,
                           type(exc).__name__)
            placed = self._relays.for_room(room_id)
        return placed is node

    async def _offer(self, sid: str, data: Any = None) -> None:
        if await self._owns(sid, data):
            await self._events.offer(str(data.get("room_id")), str(data.get("participant_id")),
                                     dict(data.get("offer") or {}))

    async def _publication(self, sid: str, data: Any = None) -> None:
        if await self._owns(sid, data):
            await self._events.publication(str(data.get("room_id")), str(data.get("event")),
                                           dict(data.get("publication") or {}))

    async def _notice(self, sid: str, data: Any = None) -> None:
        if await self._owns(sid, data):
            await self._events.notice(str(data.get("room_id")),
                                      str(data.get("participant_id")),
                                      dict(data.get("notice") or {}))

    async def _media(self, sid: str, data: Any = None) -> None:
        # Many a second while a Room is recorded: this process's own view (recording stays
        # with the process that placed the Room; not across a fleet yet).
        node = self._nodes.get(sid)
        if node is not None and isinstance(data, dict) \
                and self._relays.for_room(str(data.get("room_id"))) is node:
            node.deliver(data)


def _refusal(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def _stats(relay: Relay, room_id: str, timeout_s: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout_s):
            return await relay.stats(room_id)
    except (RelayError, TimeoutError):
        return {}


async def _participants(relay: Relay, room_id: str, timeout_s: float) -> list[str]:
    """Who is in the Room on ``relay`` (empty if it does not answer)."""
    return list(await _stats(relay, room_id, timeout_s))


async def _connected(relay: Relay, room_id: str, participants: Iterable[str],
                     timeout_s: float) -> int:
    """How many of ``participants`` have media flowing on ``relay``: joined, and packets
    forwarded to them (their subscribe connection is up) or received from them (their
    publish connection is, when there is nothing yet to forward)."""
    stats = await _stats(relay, room_id, timeout_s)
    count = 0
    for participant_id in participants:
        entry = stats.get(participant_id)
        if not isinstance(entry, dict):
            continue
        forwarded = any(s.get("forwarded", 0) > 0
                        for s in (entry.get("subscriptions") or {}).values())
        sent = any(p.get("packets", 0) > 0 for p in (entry.get("publications") or {}).values())
        if forwarded or sent:
            count += 1
    return count
