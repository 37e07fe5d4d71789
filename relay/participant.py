"""Participant: one clinician's media in a room. It owns a Publisher (its publish connections
and Publications), a Subscriber (its subscribe connection and Subscriptions) and the
bandwidth policy toward it, and reaches its room only through the RoomLink it is handed."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection

from relay.api import RelayEvents
from relay.bandwidth import BandwidthPolicy, SendRate
from relay.config import MediaConfig
from relay.errors import NotInRoom
from relay.publication import Publication
from relay.publisher import Publisher
from relay.sdp import parse_candidate
from relay.subscriber import Subscriber
from relay.subscription import Leg, Subscription
from relay.tasks import Tasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoomLink:
    """All a participant is given of its room."""

    room_id: str
    events: RelayEvents
    """Where offers and notices for the client go."""
    publications: Callable[[], list[Publication]]
    """The publications of the others in the room."""
    publication_added: Callable[[Publication], None]
    """Reports one of this participant's publications as new."""
    publication_removed: Callable[[Publication], None]
    """Reports one of this participant's publications as ended."""


class Participant:
    def __init__(self, participant_id: str, config: MediaConfig, room: RoomLink) -> None:
        self.id = participant_id
        self.room_id = room.room_id
        self.config = config
        self.closed = False
        self.audio_only = False
        self._events = room.events
        self._label = f"Participant({room.room_id}/{participant_id})"
        self._tasks = Tasks(self._label)
        self.publisher = Publisher(room.room_id, participant_id, config,
                                   added=room.publication_added,
                                   removed=room.publication_removed)
        self.subscriber = Subscriber(
            room.room_id, participant_id, f"sub_{uuid.uuid4().hex[:12]}", config,
            publications=room.publications, send_offer=self._send_offer,
            spawn=self._tasks.spawn, on_remb=self._on_remb, on_loss=self._on_loss)
        self.bandwidth = BandwidthPolicy(config.bandwidth_floor_bps, config.bandwidth_window_s)
        self._send_rate = SendRate()
        self._retry: asyncio.TimerHandle | None = None

    # -- what tests and tools look at ------------------------------------------------------
    @property
    def publications(self) -> dict[str, Publication]:
        return self.publisher.publications

    @property
    def publish_pcs(self) -> dict[str, RTCPeerConnection]:
        return self.publisher.connections

    @property
    def subscribe_pc(self) -> RTCPeerConnection | None:
        return self.subscriber.pc

    @property
    def subscribe_id(self) -> str:
        return self.subscriber.transport_id

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        return self.subscriber.subscriptions

    @property
    def legs(self) -> list[Leg]:
        return self.subscriber.legs

    @property
    def media_lost(self) -> bool:
        """One of its connections has failed or closed (the client went away, or its network
        did): the client must join afresh rather than resume with what it has."""
        connections = [*self.publish_pcs.values(), self.subscribe_pc]
        return any(pc is not None and pc.connectionState in ("failed", "closed")
                   for pc in connections)

    # -- relay.api steps ------------------------------------------------------------------
    async def publish(self, sdp: object, sources: dict[str, str]) -> dict[str, Any]:
        return await self.publisher.publish(sdp, sources)

    async def unpublish(self, source: str) -> None:
        await self.publisher.unpublish(source)

    async def subscribe(self) -> dict[str, Any]:
        return await self.subscriber.subscribe()

    async def answer(self, transport_id: str, sdp: object) -> None:
        await self.subscriber.answer(transport_id, sdp)

    async def add_ice_candidate(self, transport_id: str, candidate: dict[str, Any]) -> None:
        pc = self.publisher.connection(transport_id)
        if pc is None and transport_id == self.subscribe_id:
            pc = self.subscriber.pc
        if pc is None:
            raise NotInRoom(f"no connection {transport_id!r} for {self.id!r}")
        parsed = parse_candidate(candidate)
        if parsed is not None:
            await pc.addIceCandidate(parsed)

    def set_audio_only(self, audio_only: bool) -> None:
        self.audio_only = audio_only
        if audio_only:
            self.subscriber.pause("audio_only")
        else:
            self.subscriber.resume("audio_only")
        logger.info("%s audio only %s", self._label, "on" if audio_only else "off")

    # -- what the room tells it -----------------------------------------------------------
    def publication_added(self, publication: Publication) -> None:
        """Another participant's new publication."""
        self.subscriber.publication_added(publication)

    def publication_removed(self, publication: Publication) -> None:
        """Another participant's publication ended."""
        self.subscriber.publication_removed(publication)

    async def _send_offer(self, offer: dict[str, Any]) -> None:
        await self._events.offer(self.room_id, self.id, offer)

    # -- bandwidth ------------------------------------------------------------------------
    def _on_loss(self, fraction: float) -> None:
        self.bandwidth.loss_reported(fraction, time.monotonic())

    def _on_remb(self, bitrate: int, ssrcs: list[int]) -> None:
        now = time.monotonic()
        rate = self._send_rate.sample(ssrcs, self.subscriber.sent_bytes(ssrcs), now)
        logger.debug("%s REMB %d bps for %d legs sent %s bps", self._label, bitrate,
                     len(ssrcs), rate)
        if self.bandwidth.estimate_reported(bitrate, now):
            self._pause_for_bandwidth(bitrate)

    def _pause_for_bandwidth(self, bitrate: int) -> None:
        self.subscriber.pause("bandwidth")
        logger.info("%s video paused: estimated %d bps below the floor", self._label, bitrate)
        self._notice({"code": "video_paused", "reason": "bandwidth", "estimate_bps": bitrate})
        loop = asyncio.get_running_loop()
        self._retry = loop.call_later(self.config.bandwidth_retry_s, self._retry_video)

    def _retry_video(self) -> None:
        self._retry = None
        if self.closed:
            return
        self.bandwidth.resumed()
        self.subscriber.resume("bandwidth")
        self._notice({"code": "video_resumed", "reason": "bandwidth"})

    def _notice(self, notice: dict[str, Any]) -> None:
        self._tasks.spawn(self._events.notice(self.room_id, self.id, notice))

    # -- lifecycle ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "publications": {p.source: {"packets": p.packets, "keyframes": p.keyframes,
                                        "plis": p.plis_sent} for p in self.publications.values()},
            "subscriptions": {s.publication.id: {"forwarded": s.forwarded, "skipped": s.skipped,
                                                 "paused": sorted(s.paused_reasons)}
                              for s in self.subscriptions.values()},
            "remb_bps": self.bandwidth.estimate_bps,
            "send_bps": self._send_rate.total_bps,
        }

    async def close(self) -> None:
        """Close exactly this participant's publications (each reported to the room once),
        subscriptions, connections and background steps."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        await asyncio.gather(self.publisher.close(), self.subscriber.close())
        await self._tasks.close()
        logger.info("%s left", self._label)
