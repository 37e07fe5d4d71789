"""LocalRelay: the relay that runs inside this process: the embedded relay of `serve`, and the
engine of a standalone `telehealth relay` node."""

from __future__ import annotations

import logging
import time
from typing import Any

from relay import hooks, udp_mux
from relay.api import MediaSink, RelayEvents, RelayInfo
from relay.config import MediaConfig
from relay.errors import UnknownRoom
from relay.probe import Probes
from relay.room import Room

logger = logging.getLogger(__name__)


class NullEvents:
    """RelayEvents for a relay nobody listens to (placement-only uses, tools)."""

    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        return None

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        return None

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        return None


class LocalRelay:
    def __init__(self, relay_id: str = "embedded", *, region: str = "",
                 public_address: str = "", capacity: int = 500,
                 config: MediaConfig | None = None, events: RelayEvents | None = None,
                 embedded: bool = True) -> None:
        self.info = RelayInfo(id=relay_id, region=region, public_address=public_address,
                              capacity=capacity, embedded=embedded, heartbeat_at=time.time())
        self.config = config or MediaConfig()
        self.events: RelayEvents = events or NullEvents()
        self.rooms: dict[str, Room] = {}
        self.probes = Probes(self.config)
        """Network probes of the pre-call check (relay/probe.py), closed with their room."""
        self.udp_ports: udp_mux.UdpPorts | None = None
        """relay.udp_port_range or relay.udp_port, once started (relay/udp_mux.py)."""

    async def start(self) -> None:
        """Before any media flows: aiortc's private hooks checked (HookMissing otherwise),
        the ICE host addresses set, and the UDP port range checked or the single port bound
        (UdpPortsUnavailable). Raises a RelayError subclass naming what stops the relay from
        serving."""
        await hooks.check()
        hooks.set_host_addresses(self.config.host_addresses)
        hooks.patient_consent()
        self.udp_ports = await udp_mux.open_ports(self.config)

    def _room(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            raise UnknownRoom(f"relay {self.info.id!r} has no room {room_id!r}")
        return room

    async def open_room(self, room_id: str) -> None:
        if room_id not in self.rooms:
            self.rooms[room_id] = Room(room_id, self.config, self.events)
            self.info.load = len(self.rooms)
            logger.info("LocalRelay(%s) room %s opened", self.info.id, room_id)

    async def close_room(self, room_id: str) -> None:
        await self.probes.close_room(room_id)
        room = self.rooms.pop(room_id, None)
        if room is not None:
            self.info.load = len(self.rooms)
            await room.close()

    async def join(self, room_id: str, participant_id: str) -> None:
        await self._room(room_id).join(participant_id)

    async def resume(self, room_id: str, participant_id: str) -> bool:
        room = self.rooms.get(room_id)
        participant = room.participants.get(participant_id) if room is not None else None
        if participant is None or participant.media_lost:
            return False
        await participant.subscriber.resend_offer()
        return True

    async def leave(self, room_id: str, participant_id: str) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        await room.leave(participant_id)
        if not room.participants:
            # The last one out closes the room and everything in it; the consultation keeps
            # its place on this relay, so a fresh room takes the next join.
            await room.close()
            fresh = Room(room_id, self.config, self.events)
            for sink in room.sinks:
                fresh.attach_sink(sink)
            self.rooms[room_id] = fresh

    async def publish(self, room_id: str, participant_id: str, sdp: str,
                      sources: dict[str, str]) -> dict[str, Any]:
        return await self._room(room_id).get(participant_id).publish(sdp, sources)

    async def unpublish(self, room_id: str, participant_id: str, source: str) -> None:
        await self._room(room_id).get(participant_id).unpublish(source)

    async def subscribe(self, room_id: str, participant_id: str) -> dict[str, Any]:
        return await self._room(room_id).get(participant_id).subscribe()

    async def answer(self, room_id: str, participant_id: str, transport_id: str,
                     sdp: str) -> None:
        await self._room(room_id).get(participant_id).answer(transport_id, sdp)

    async def add_ice_candidate(self, room_id: str, participant_id: str, transport_id: str,
                                candidate: dict[str, Any]) -> None:
        await self._room(room_id).get(participant_id).add_ice_candidate(transport_id, candidate)

    async def set_audio_only(self, room_id: str, participant_id: str,
                             audio_only: bool) -> None:
        self._room(room_id).get(participant_id).set_audio_only(audio_only)

    async def stats(self, room_id: str) -> dict[str, Any]:
        return self._room(room_id).stats()

    async def attach_sink(self, room_id: str, sink: MediaSink) -> None:
        self._room(room_id).attach_sink(sink)

    async def announce_to(self, room_id: str, sink: MediaSink) -> int:
        """Announce every publication of the room to ``sink`` again (Room.announce_to)."""
        return self._room(room_id).announce_to(sink)

    async def detach_sink(self, room_id: str, sink: MediaSink) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            room.detach_sink(sink)

    async def request_keyframe(self, room_id: str, publication_id: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            room.request_keyframe(publication_id)

    async def probe(self, room_id: str, participant_id: str, sdp: str) -> dict[str, Any]:
        self._room(room_id)
        with hooks.relay_gathering():  # a probe gathers on the relay's UDP ports
            return await self.probes.answer(room_id, participant_id, sdp)

    async def close(self) -> None:
        for room_id in list(self.rooms):
            await self.close_room(room_id)
        await self.probes.close()
        if self.udp_ports is not None:
            self.udp_ports.close()
