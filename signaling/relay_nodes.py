"""Standalone relay nodes as signaling sees them: they dial in on the ``/relay`` namespace with
a node token, register region and capacity, heartbeat, and are dropped when silent or gone;
their consultations are then placed on another relay and the participants told to rejoin."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import socketio

from relay.api import Relay, RelayEvents, RelayInfo
from relay.remote import NAMESPACE, RemoteRelay
from signaling.errors import Unauthenticated
from signaling.relays import NoRelayAvailable, RelayDirectory
from signaling.tokens import TokenAuthority

logger = logging.getLogger(__name__)

Moved = Callable[[str, Relay | None], Awaitable[None]]


class RelayNodes:
    def __init__(self, sio: socketio.AsyncServer, *, tokens: TokenAuthority,
                 relays: RelayDirectory, events: RelayEvents, on_moved: Moved,
                 heartbeat_s: float) -> None:
        self._sio = sio
        self._tokens = tokens
        self._relays = relays
        self._events = events
        self._on_moved = on_moved
        self._heartbeat_s = heartbeat_s
        self._nodes: dict[str, RemoteRelay] = {}
        sio.on("connect", self._connect, namespace=NAMESPACE)
        sio.on("disconnect", self._disconnect, namespace=NAMESPACE)
        sio.on("relay:heartbeat", self._heartbeat, namespace=NAMESPACE)
        sio.on("relay:offer", self._offer, namespace=NAMESPACE)
        sio.on("relay:publication", self._publication, namespace=NAMESPACE)
        sio.on("relay:notice", self._notice, namespace=NAMESPACE)
        sio.on("relay:media", self._media, namespace=NAMESPACE)

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
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
        node = RemoteRelay(info, sid, self._sio)
        self._nodes[sid] = node
        self._relays.register(node)
        logger.info("relay node %s connected (region %r, capacity %d)", relay_id, info.region,
                    capacity)

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        node = self._nodes.pop(sid, None)
        if node is not None:
            await self._lost(node, f"disconnected ({reason})")

    async def _lost(self, node: RemoteRelay, why: str) -> None:
        self._relays.unregister(node.info.id)
        rooms = self._relays.rooms_on(node.info.id)
        logger.warning("relay node %s %s; moving %d consultations", node.info.id, why,
                       len(rooms))
        for room_id, region in rooms:
            try:
                relay: Relay | None = await self._relays.place(room_id, region)
            except NoRelayAvailable:
                relay = None
                logger.error("consultation %s lost its relay and no other has room", room_id)
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
                await self._sio.disconnect(sid, namespace=NAMESPACE)
                await self._lost(node, "stopped heartbeating")

    def _owns(self, sid: str, data: Any) -> bool:
        """A node speaks only for the rooms placed on it."""
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

    @property
    def nodes(self) -> list[RemoteRelay]:
        return list(self._nodes.values())
