"""RelayDirectory: the relays signaling knows and where each consultation's Room is placed.

Placement: a relay of the requesting site's region with room to spare, least loaded first;
otherwise the least loaded relay anywhere (the embedded relay serves every region).
"""

from __future__ import annotations

import logging

from relay.api import Relay
from signaling.errors import SignalingError

logger = logging.getLogger(__name__)


class NoRelayAvailable(SignalingError):
    code = "no_relay"
    http_status = 503


class RelayDirectory:
    def __init__(self) -> None:
        self._relays: dict[str, Relay] = {}
        self._placements: dict[str, str] = {}
        self._regions: dict[str, str] = {}
        self._reserved: dict[str, int] = {}
        """Rooms promised to a relay by ``reserve`` and not opened yet."""

    def register(self, relay: Relay) -> None:
        self._relays[relay.info.id] = relay
        logger.info("relay %s registered (region %r, capacity %d)",
                    relay.info.id, relay.info.region, relay.info.capacity)

    def unregister(self, relay_id: str) -> None:
        self._relays.pop(relay_id, None)

    def get(self, relay_id: str) -> Relay | None:
        return self._relays.get(relay_id)

    def for_room(self, room_id: str) -> Relay | None:
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
        """Choose a relay and hold a room on it until ``open`` (or ``unreserve``), so that
        accepts running at the same time cannot overfill it."""
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
        """Open the room on ``relay`` (from ``choose``, or from ``reserve`` with
        ``reserved=True``) and remember where it is."""
        if reserved:
            self.unreserve(relay)
        await relay.open_room(room_id)
        self._placements[room_id] = relay.info.id
        self._regions[room_id] = region
        return relay

    async def place(self, room_id: str, region: str) -> Relay:
        """Open the room on the relay ``choose`` picks."""
        return await self.open(room_id, self.choose(region), region)

    def rooms_on(self, relay_id: str) -> list[tuple[str, str]]:
        """(room, region) of every room placed on the relay."""
        return [(room, self._regions.get(room, "")) for room, where in self._placements.items()
                if where == relay_id]

    async def adopt(self, room_id: str, relay_id: str, region: str) -> Relay:
        """After a restart: reopen a live consultation's room where it was, else place it."""
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
