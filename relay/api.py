"""The narrow interface between signaling and a relay node, embedded or standalone.

Signaling places each consultation's Room on one relay and drives its media through ``Relay``;
the relay reports back through ``RelayEvents``. Signaling never knows which kind of relay it
talks to, and this module imports nothing from aiortc."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

NODE_NAMESPACE = "/relay"
"""The socket.io namespace standalone relay nodes dial in on (see relay/remote.py)."""
MAX_WORKERS = 64
"""Relay processes of one machine at most (``relay.workers``, relay/workers.py): worker
indexes 0-63."""
NODE_TOKEN_ENV = "TELEHEALTH_NODE_TOKEN"
"""A node's token in its environment (`telehealth relay` without ``--node-token``, and every
worker process: kept out of the machine's process list). Not a setting."""


def worker_relay_id(machine_id: str, worker: int) -> str:
    """The relay id worker ``worker`` of a machine registers under: the node composes it, and
    signaling composes the same from the machine's node token and the worker index."""
    return f"{machine_id}.w{worker}"


@dataclass
class RelayInfo:
    id: str
    region: str
    """Province code the relay serves; empty: it serves any region (the embedded relay)."""
    public_address: str
    capacity: int
    """How many rooms the relay accepts at most."""
    load: int = 0
    """Rooms open on it now."""
    heartbeat_at: float = 0.0
    embedded: bool = False

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"relay {self.id!r}: capacity must be > 0, got {self.capacity}")

    @property
    def has_capacity(self) -> bool:
        return self.load < self.capacity

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "region": self.region, "public_address": self.public_address,
                "capacity": self.capacity, "load": self.load, "embedded": self.embedded}


class RelayEvents(Protocol):
    """What a relay tells signaling."""

    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        """A new subscribe offer ``{transport_id, type, sdp, tracks}`` for the participant."""

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        """A publication was ``added`` or ``removed`` in the room."""

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        """Something the participant should know (``{code, ...}``: video paused/resumed)."""


class MediaSink(Protocol):
    """Receives a room's encoded media as it arrives, never decoded: the recorder. Called on
    the relay's event loop for every packet, so it must return quickly and never block."""

    def publication_added(self, publication: dict[str, Any]) -> None:
        """``{id, participant_id, source, kind, codec, clock_rate}`` of a publication in the
        room (every existing one when the sink is attached, then each new one)."""

    def publication_removed(self, publication_id: str) -> None: ...

    def packet(self, publication_id: str, sequence_number: int, timestamp: int, marker: bool,
               payload: bytes, arrival: float) -> None:
        """One RTP packet of the publication, as received (RTX unwrapped; retransmissions
        arrive late and out of order). ``arrival`` is the wall-clock time (``time.time()``)."""


class Relay(Protocol):
    """What signaling asks of a relay. Errors are raised as ``relay.errors.RelayError`` (with a
    ``code``), the same for the embedded relay and a remote node."""

    info: RelayInfo

    async def open_room(self, room_id: str) -> None:
        """Prepare the Room of a consultation (idempotent)."""

    async def close_room(self, room_id: str) -> None:
        """Close the Room and everything in it (idempotent)."""

    async def join(self, room_id: str, participant_id: str) -> None:
        """Add a participant's media presence; a second join starts it afresh (reconnect)."""

    async def leave(self, room_id: str, participant_id: str) -> None:
        """Close exactly this participant's publications, subscriptions and connections."""

    async def resume(self, room_id: str, participant_id: str) -> bool:
        """The participant's signaling connection changed (a reconnect, a restarted
        signaling, the same relay found again): True if its media is still here, so the
        client keeps its peer connections (a subscribe offer still unanswered is sent again
        through ``RelayEvents.offer``); False if it must join afresh (``join``)."""

    async def publish(self, room_id: str, participant_id: str, sdp: str,
                      sources: dict[str, str]) -> dict[str, Any]:
        """Answer a publish offer: ``{transport_id, type: "answer", sdp, publications}``."""

    async def unpublish(self, room_id: str, participant_id: str, source: str) -> None: ...

    async def subscribe(self, room_id: str, participant_id: str) -> dict[str, Any]:
        """The first subscribe offer ``{transport_id, type: "offer", sdp, tracks}``."""

    async def answer(self, room_id: str, participant_id: str, transport_id: str,
                     sdp: str) -> None: ...

    async def add_ice_candidate(self, room_id: str, participant_id: str, transport_id: str,
                                candidate: dict[str, Any]) -> None: ...

    async def set_audio_only(self, room_id: str, participant_id: str,
                             audio_only: bool) -> None: ...

    async def stats(self, room_id: str) -> dict[str, Any]: ...

    async def attach_sink(self, room_id: str, sink: MediaSink) -> None:
        """Give ``sink`` every publication of the room, present and future, until detached.
        A relay that cannot hand media to this process raises RelayError
        (``recording_unavailable``)."""

    async def detach_sink(self, room_id: str, sink: MediaSink) -> None: ...

    async def request_keyframe(self, room_id: str, publication_id: str) -> None:
        """Ask the publisher of a video publication for a keyframe (rate limited)."""

    async def probe(self, room_id: str, participant_id: str, sdp: str) -> dict[str, Any]:
        """Answer a network probe (the pre-call check: an offer with one data channel and no
        media, relay/probe.py): ``{type: "answer", sdp}``. The participant need not have
        joined; its previous probe is closed; every probe closes by itself within seconds."""
