"""Relays as signaling sees them: the registry of relays, the placement of each consultation's
Room on one of them, and the standalone relay nodes that dial in.

Placement: a relay of the requesting site's region with capacity to spare, least loaded first;
otherwise the least loaded relay anywhere (the embedded relay serves every region). A placement
is reserved while the accept that asked for it is written, then opened on the relay
(``open_room``), adopted again after a restart, and released when the consultation ends.

Standalone relay nodes dial in on the ``relay.api.NODE_NAMESPACE`` socket.io namespace with a
node token, register region and capacity, heartbeat, and are dropped when silent or gone; their
consultations are then placed on another relay and the participants told to rejoin. The start-up
module hands in the factory that builds a ``Relay`` for each node (``relay.remote.RemoteRelay``),
so this module knows nodes only through ``relay.api``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import socketio

from relay.api import NODE_NAMESPACE, Relay, RelayEvents, RelayInfo
from signaling.errors import SignalingError, Unauthenticated
from signaling.tokens import TokenAuthority

logger = logging.getLogger(__name__)


class NoRelayAvailable(SignalingError):
    code = "no_relay"
    http_status = 503


class RelayDirectory:
    """The relays signaling knows and where each consultation's Room is placed."""

    def __init__(self) -> None:
        self._relays: dict[str, Relay] = {}
        self._placements: dict[str, str] = {}
        """Consultation (its Room's id) -> the relay it is placed on."""
        self._regions: dict[str, str] = {}
        self._reserved: dict[str, int] = {}
        """Placements promised to a relay by ``reserve`` and not opened yet."""

    def register(self, relay: Relay) -> None:
        self._relays[relay.info.id] = relay
        logger.info("relay %s registered (region %r, capacity %d)",
                    relay.info.id, relay.info.region, relay.info.capacity)

    def unregister(self, relay_id: str) -> None:
        self._relays.pop(relay_id, None)

    def for_room(self, room_id: str) -> Relay | None:
        """The relay the Room is placed on."""
        relay_id = self._placements.get(room_id)
        return self._relays.get(relay_id) if relay_id else None

    def relays(self) -> list[Relay]:
        return list(self._relays.values())

    def _free(self, relay: Relay) -> bool:
        return relay.info.load + self._reserved.get(relay.info.id, 0) < relay.info.capacity

    def choose(self, region: str) -> Relay:
        candidates = [r for r in self._relays.values() if self._free(r)]
        if not candidates:
            raise NoRelayAvailable("no relay has capacity for another consultation")

        def rank(relay: Relay) -> tuple[int, float, str]:
            local = 0 if relay.info.region == region else 1
            return (local, relay.info.load / relay.info.capacity, relay.info.id)

        return min(candidates, key=rank)

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
        """Open the Room on ``relay`` (from ``choose``, or from ``reserve`` with
        ``reserved=True``) and remember where it is."""
        if reserved:
            self.unreserve(relay)
        await relay.open_room(room_id)
        self._placements[room_id] = relay.info.id
        self._regions[room_id] = region
        return relay

    async def place(self, room_id: str, region: str) -> Relay:
        """Open the Room on the relay ``choose`` picks."""
        return await self.open(room_id, self.choose(region), region)

    def placements_on(self, relay_id: str) -> list[tuple[str, str]]:
        """(Room, region) of every consultation placed on the relay."""
        return [(room, self._regions.get(room, "")) for room, where in self._placements.items()
                if where == relay_id]

    async def adopt(self, room_id: str, relay_id: str, region: str) -> Relay:
        """After a restart: reopen a live consultation's Room where it was, else place it."""
        relay = self._relays.get(relay_id)
        if relay is None or not relay.info.has_capacity:
            return await self.place(room_id, region)
        return await self.open(room_id, relay, region)

    async def release(self, room_id: str) -> None:
        relay_id = self._placements.pop(room_id, None)
        self._regions.pop(room_id, None)
        relay = self._relays.get(relay_id) if relay_id else None
        if relay is not None:
            await relay.close_room(room_id)


# -- standalone relay nodes ---------------------------------------------------------------------


class NodeRelay(Relay, Protocol):
    """A ``Relay`` over a node's connection: it also takes the node's ``relay:media``
    messages (the recorded Room's packets) for the sink attached to the Room."""

    def deliver(self, data: dict[str, Any]) -> None: ...


NodeRelayFactory = Callable[[RelayInfo, str], NodeRelay]
"""Builds the ``Relay`` of a node that dialled in, from its info and its connection (sid)."""

Moved = Callable[[str, Relay | None], Awaitable[None]]
"""Told that a consultation's Room moved to another relay (None: no relay had capacity)."""


class RelayNodes:
    """The ``relay.api.NODE_NAMESPACE`` socket.io namespace: nodes register, heartbeat and
    report; each becomes a relay in the ``RelayDirectory`` while connected."""

    def __init__(self, sio: socketio.AsyncServer, *, tokens: TokenAuthority,
                 relays: RelayDirectory, events: RelayEvents, on_moved: Moved,
                 node_relay: NodeRelayFactory, heartbeat_s: float) -> None:
        self._sio = sio
        self._tokens = tokens
        self._relays = relays
        self._events = events
        self._on_moved = on_moved
        self._node_relay = node_relay
        self._heartbeat_s = heartbeat_s
        self._nodes: dict[str, NodeRelay] = {}
        sio.on("connect", self._connect, namespace=NODE_NAMESPACE)
        sio.on("disconnect", self._disconnect, namespace=NODE_NAMESPACE)
        sio.on("relay:heartbeat", self._heartbeat, namespace=NODE_NAMESPACE)
        sio.on("relay:offer", self._offer, namespace=NODE_NAMESPACE)
        sio.on("relay:publication", self._publication, namespace=NODE_NAMESPACE)
        sio.on("relay:notice", self._notice, namespace=NODE_NAMESPACE)
        sio.on("relay:media", self._media, namespace=NODE_NAMESPACE)

    async def _connect(self, sid: str, _environ: dict[str, Any], auth: Any = None) -> None:
        auth = auth if isinstance(auth, dict) else {}
        try:
            relay_id = self._tokens.verify_node(auth.get("token"))
            capacity = int(auth.get("capacity") or 0)
            if capacity <= 0:
                raise Unauthenticated(f"capacity must be > 0, got {auth.get('capacity')!r}",
                                      code="invalid_registration")
        except (Unauthenticated, ValueError, TypeError) as exc:
            code = getattr(exc, "code", "invalid_registration")
            logger.info("relay node connection %s refused: %s", sid, code)
            raise socketio.exceptions.ConnectionRefusedError(
                str(exc), {"code": code, "message": str(exc)}) from None
        if relay_id in {n.info.id for n in self._nodes.values()}:
            raise socketio.exceptions.ConnectionRefusedError(
                f"relay {relay_id!r} is already connected",
                {"code": "duplicate_relay", "message": f"relay {relay_id!r} is connected"})
        info = RelayInfo(id=relay_id, region=str(auth.get("region") or ""),
                         public_address=str(auth.get("public_address") or ""),
                         capacity=capacity, heartbeat_at=time.time())
        node = self._node_relay(info, sid)
        self._nodes[sid] = node
        self._relays.register(node)
        logger.info("relay node %s connected (region %r, capacity %d)", relay_id, info.region,
                    capacity)

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        node = self._nodes.pop(sid, None)
        if node is not None:
            await self._lost(node, f"disconnected ({reason})")

    async def _lost(self, node: NodeRelay, why: str) -> None:
        self._relays.unregister(node.info.id)
        placements = self._relays.placements_on(node.info.id)
        logger.warning("relay node %s %s; moving %d consultations", node.info.id, why,
                       len(placements))
        for room_id, region in placements:
            try:
                relay: Relay | None = await self._relays.place(room_id, region)
            except NoRelayAvailable:
                relay = None
                logger.error("consultation %s lost its relay and no other has capacity",
                             room_id)
            await self._on_moved(room_id, relay)

    async def _heartbeat(self, sid: str, data: Any = None) -> None:
        node = self._nodes.get(sid)
        if node is None:
            return
        node.info.heartbeat_at = time.time()
        if isinstance(data, dict) and isinstance(data.get("load"), int):
            node.info.load = data["load"]

    async def sweep(self) -> None:
        """Drop nodes that missed three heartbeats."""
        deadline = time.time() - 3 * self._heartbeat_s
        for sid, node in list(self._nodes.items()):
            if node.info.heartbeat_at < deadline:
                self._nodes.pop(sid, None)
                await self._sio.disconnect(sid, namespace=NODE_NAMESPACE)
                await self._lost(node, "stopped heartbeating")

    def _owns(self, sid: str, data: Any) -> bool:
        """A node speaks only for the Rooms placed on it."""
        node = self._nodes.get(sid)
        if node is None or not isinstance(data, dict):
            return False
        placed = self._relays.for_room(str(data.get("room_id")))
        return placed is node

    async def _offer(self, sid: str, data: Any = None) -> None:
        if self._owns(sid, data):
            await self._events.offer(str(data.get("room_id")), str(data.get("participant_id")),
                                     dict(data.get("offer") or {}))

    async def _publication(self, sid: str, data: Any = None) -> None:
        if self._owns(sid, data):
            await self._events.publication(str(data.get("room_id")), str(data.get("event")),
                                           dict(data.get("publication") or {}))

    async def _notice(self, sid: str, data: Any = None) -> None:
        if self._owns(sid, data):
            await self._events.notice(str(data.get("room_id")),
                                      str(data.get("participant_id")),
                                      dict(data.get("notice") or {}))

    async def _media(self, sid: str, data: Any = None) -> None:
        if self._owns(sid, data):
            self._nodes[sid].deliver(data)
