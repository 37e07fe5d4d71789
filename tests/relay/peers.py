"""aiortc peers driving a LocalRelay directly through its relay.api methods: no server, no
socket.io. ``RelayEvents`` here records what the relay reports and answers each renegotiation
offer from the peer it is meant for, as a client does on media:offer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from relay.config import MediaConfig
from relay.embedded import LocalRelay
from tests.media import MediaPeer
from tests.relay.loopback import loopback

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
ROOM = "room-1"


class RecordedEvents:
    """``relay.api.RelayEvents`` that keep everything the relay says; a subscribe offer for a
    participant with a peer is answered by that peer (in its own task, as a client would)."""

    def __init__(self) -> None:
        self.offers: list[tuple[str, str, dict[str, Any]]] = []
        self.publications: list[tuple[str, str, dict[str, Any]]] = []
        self.notices: list[tuple[str, str, dict[str, Any]]] = []
        self.peers: dict[tuple[str, str], MediaPeer] = {}
        self.failures: list[BaseException] = []
        self._answering: set[asyncio.Task[None]] = set()

    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        self.offers.append((room_id, participant_id, offer))
        peer = self.peers.get((room_id, participant_id))
        if peer is None:
            return
        task = asyncio.get_running_loop().create_task(peer.answer_offer(offer))
        self._answering.add(task)
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._answering.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failure = task.exception()
            assert failure is not None
            logger.warning("answering a renegotiation offer failed: %r", failure)
            self.failures.append(failure)

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        self.publications.append((room_id, event, publication))

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        self.notices.append((room_id, participant_id, notice))

    def offers_to(self, participant_id: str) -> int:
        return sum(1 for _, pid, _ in self.offers if pid == participant_id)

    async def close(self) -> None:
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)


@dataclass
class RelayRoom:
    """One room on a LocalRelay and the aiortc peers of its participants."""

    relay: LocalRelay
    events: RecordedEvents
    id: str = ROOM
    peers: dict[str, MediaPeer] = field(default_factory=dict)

    def peer(self, participant_id: str, *, label: str = "") -> MediaPeer:
        """A MediaPeer whose commands go straight to the relay's methods for this room.
        ``label`` names a further client of the same participant that only publishes (a
        screen share): the participant's subscribe offers still go to its first peer."""

        async def call(command: str, payload: dict[str, Any]) -> dict[str, Any]:
            relay, room = self.relay, self.id
            if command == "publish":
                return await relay.publish(room, participant_id, payload["sdp"],
                                           payload["sources"])
            if command == "subscribe":
                return await relay.subscribe(room, participant_id)
            if command == "answer":
                await relay.answer(room, participant_id, payload["transport_id"],
                                   payload["sdp"])
                return {}
            raise ValueError(f"no relay command {command!r}")

        peer = MediaPeer(participant_id + label, call)
        self.peers[peer.name] = peer
        if not label:
            self.events.peers[(self.id, participant_id)] = peer
        return peer

    async def join(self, participant_id: str, *, subscribe: bool = True, publish: bool = True,
                   fps: int = 15, video_codec: str | None = None,
                   audio_hz: float = 440.0) -> MediaPeer:
        """Join the room; subscribe, then publish a camera and a tone (each unless told not
        to)."""
        await self.relay.join(self.id, participant_id)
        peer = self.peer(participant_id)
        if subscribe:
            await peer.subscribe()
        if publish:
            await peer.publish(fps=fps, video_codec=video_codec, audio_hz=audio_hz)
        return peer

    async def stats(self, participant_id: str) -> dict[str, Any]:
        """The relay's stats of one participant: publications by source, subscriptions by
        publication id."""
        everyone = await self.relay.stats(self.id)
        mine: dict[str, Any] = everyone[participant_id]
        return mine

    async def close_peers(self) -> None:
        for peer in self.peers.values():
            await peer.close()


@asynccontextmanager
async def relay_room(**config: Any) -> AsyncIterator[RelayRoom]:
    """A LocalRelay gathering on 127.0.0.1 with ``MediaConfig(**config)`` and one open room;
    every peer, the room and the relay are closed on exit."""
    with loopback():
        events = RecordedEvents()
        relay = LocalRelay("test-relay", config=MediaConfig(host_addresses=[HOST], **config),
                           events=events, embedded=True)
        room = RelayRoom(relay, events)
        await relay.open_room(room.id)
        try:
            yield room
        finally:
            await room.close_peers()
            await relay.close()
            await events.close()


class PacketSink:
    """A ``relay.api.MediaSink`` (what the recorder is) that counts what it is given."""

    def __init__(self) -> None:
        self.added: dict[str, dict[str, Any]] = {}
        self.removed: list[str] = []
        self.packets: dict[str, int] = {}

    def publication_added(self, publication: dict[str, Any]) -> None:
        self.added[publication["id"]] = publication

    def publication_removed(self, publication_id: str) -> None:
        self.removed.append(publication_id)

    def packet(self, publication_id: str, sequence_number: int, timestamp: int, marker: bool,
               payload: bytes, arrival: float) -> None:
        self.packets[publication_id] = self.packets.get(publication_id, 0) + 1
