"""The relay that runs inside the `serve` process. For now it keeps the set of open rooms
(placement and load); the media plane is added on top of the same interface."""

from __future__ import annotations

import logging
import time

from relay.api import RelayInfo

logger = logging.getLogger(__name__)


class EmbeddedRelay:
    def __init__(self, relay_id: str = "embedded", *, region: str = "",
                 public_address: str = "", capacity: int = 500) -> None:
        self.info = RelayInfo(id=relay_id, region=region, public_address=public_address,
                              capacity=capacity, embedded=True, heartbeat_at=time.time())
        self.rooms: set[str] = set()

    async def open_room(self, room_id: str) -> None:
        if room_id not in self.rooms:
            self.rooms.add(room_id)
            self.info.load = len(self.rooms)
            logger.info("EmbeddedRelay(%s) room %s opened", self.info.id, room_id)

    async def close_room(self, room_id: str) -> None:
        if room_id in self.rooms:
            self.rooms.discard(room_id)
            self.info.load = len(self.rooms)
            logger.info("EmbeddedRelay(%s) room %s closed", self.info.id, room_id)
