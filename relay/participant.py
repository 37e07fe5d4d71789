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
from relay.bandwidth import (
    THIN,
    THIN_OVER_BASE,
    THIN_SHORTFALL,
    TOP_LAYER,
    BandwidthPolicy,
    LayerPolicy,
    SendRate,
)
from relay.config import MediaConfig
from relay.errors import NotInRoom
from relay.publication import Publication
from relay.publisher import Publisher
from relay.rendition import LADDER
from relay.sdp import parse_candidate
from relay.subscriber import Subscriber
from relay.subscription import Leg, Subscription
from relay.tasks import Tasks

logger = logging.getLogger(__name__)

QUALITY_CHECK_S = 0.5
"""Between layer changes, what each participant receives is looked at again at most this
often (for a frame rate that became known or moved)."""


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


def video_quality(subscription: Subscription) -> tuple[str, int | None]:
    """What a subscriber receives of a video publication: ``full`` (every layer, or the
    publisher sends none), ``reduced`` (only the lower temporal layers), ``thin`` (the
    publication's thin rendition, or the move to it under way) or ``audio_only`` (paused);
    and the highest layer it gets (None: all; ``THIN``)."""
    if subscription.paused:
        return "audio_only", None
    if subscription.thin:
        return "thin", THIN
    layer = subscription.max_layer
    if layer is None or layer >= subscription.publication.temporal_layers:
        return "full", None
    return "reduced", layer


def rate_news(quality: str, told: float | None, now: float | None) -> bool:
    """Whether a frame rate is worth a notice of its own, the quality being the same: it was
    unknown and is known now, or (reduced) it moved by more than a quarter and 2 fps (the
    publisher's encoder changed its rate)."""
    if now is None:
        return False
    if told is None:
        return True
    if quality == "thin":
        return now != told  # the rendition moved to another rung (relay/rendition.py)
    return quality == "reduced" and abs(now - told) >= max(2.0, told / 4)


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
        self.layers = LayerPolicy(config.layers, bottom=THIN, thin_over_base=THIN_OVER_BASE)
        """Which temporal layers of layered video it gets, or the thin rendition below them
        (relay/bandwidth.py)."""
        self.layer_cap: int | None = None
        """An upper bound on the policy's layer, set through ``cap_layer``."""
        self._send_rate = SendRate()
        self._retry: asyncio.TimerHandle | None = None
        self._told_at = 0.0
        self._qualities: dict[str, tuple[str, float | None]] = {}
        """What it was last told it receives of each video publication, and at what frame
        rate (absent: full)."""

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
        self._tell_quality()

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
        """A receiver report block for one of its legs: the layer policy's clock."""
        now = time.monotonic()
        self.bandwidth.loss_reported(fraction, now)
        if (self.subscriber.max_layer == THIN
                and now - self._told_at >= QUALITY_CHECK_S):
            self._tell_quality()  # the rendition's rung may have moved
        if not self._adapting() or self.subscriber.paused:
            # Nothing to choose (video as before: an unlayered camera's layer 0 is the whole
            # stream, and taking it thin on this policy's evidence alone was found too eager:
            # a loaded relay's own delay reads as a rising round trip), or no video to judge
            # by: the pause is left at the step it was taken (thin) and tried again from there.
            return
        spared = self.layers.probes_spared
        self.layers.update(now, loss=fraction, rtt_s=self.subscriber.rtt_s(),
                           backlog_bytes=self.subscriber.backlog_bytes(),
                           estimate_bps=self.bandwidth.estimate_bps,
                           send_bps=self._send_rate.total_bps,
                           queue_delay_s=self.subscriber.queue_delay_s(),
                           delivered_bps=self._link_rate(now),
                           need_bps=self._need_bps)
        if self.layers.probes_spared != spared and self.layers.ceiling is not None:
            logger.info("%s no probe up: the link carried %d kbps when it was full, the next "
                        "layer needs more", self._label, self.layers.ceiling[1] / 1000)
        self._apply_layer()

    def _link_rate(self, now: float) -> float | None:
        """What the link carries, for the layer policy's ceiling: the rate delivered, no
        more than the pacer's estimate (one reading of the rate delivered, summed over legs
        reported at different times, read 737 kbps on a 512 kbps link, and the probe it let
        through froze the picture)."""
        delivered = self.subscriber.delivered_bps(now)
        paced = self.subscriber.pacer.rate_bps
        if delivered is None or paced is None:
            return delivered
        return min(delivered, paced)

    def _need_bps(self, layer: int) -> float | None:
        """What it would receive with every layered video at ``layer`` (the others whole)
        and its audio, as the publishers send now (FEC takes only what is left over); None if
        a rate is not measured yet."""
        total = self.subscriber.pacer.audio_bps() or 0.0
        for subscription in self.subscriber.subscriptions.values():
            publication = subscription.publication
            if publication.kind != "video" or subscription.paused:
                continue
            rate = publication.layer_bps(layer if publication.temporal_layers > 0 else None)
            if rate is None:
                return None
            total += rate
        return total

    def _adapting(self) -> bool:
        """Whether the layer policy chooses what it receives: ``relay.adaptation`` is on and
        it receives video sent in layers. Else video as before #15: every layer, and only the
        pause for bandwidth acts."""
        return self.config.adaptation and self.subscriber.layered()

    def cap_layer(self, layer: int | None) -> None:
        """Never more than the temporal layers up to ``layer`` (None: as the policy says;
        ``THIN``, -1: the thin rendition of every VP8 video, layered or not), whatever the
        policy says: an operator's or a test's hand on the layer."""
        self.layer_cap = layer
        self._apply_layer()

    def _apply_layer(self) -> None:
        layer = self.layers.layer
        if self.layer_cap is not None:
            layer = min(layer, self.layer_cap)
        wanted = None if layer >= TOP_LAYER else layer
        if wanted != self.subscriber.max_layer:
            was_thin = self.subscriber.max_layer == THIN
            if wanted == THIN and self.layers.layer == THIN:
                # The policy's own step for the link (not an operator's cap): paced, before
                # the rendition starts, so that it starts at the rung the budget carries.
                self.subscriber.pace_from_now()
            self.subscriber.set_max_layer(wanted)
            if was_thin and wanted != THIN:
                self.subscriber.pace_released()
            logger.info("%s video layers up to %s (%s)", self._label,
                        "all" if wanted is None else wanted,
                        "cap" if self.layer_cap is not None and layer == self.layer_cap
                        else self.layers.reason)
        elif time.monotonic() - self._told_at < QUALITY_CHECK_S:
            return  # report blocks come one per leg: the rest of them change nothing
        self._tell_quality()

    def _on_remb(self, bitrate: int, ssrcs: list[int]) -> None:
        now = time.monotonic()
        rate = self._send_rate.sample(ssrcs, self.subscriber.sent_bytes(ssrcs), now)
        logger.debug("%s REMB %d bps for %d legs sent %s bps", self._label, bitrate,
                     len(ssrcs), rate)
        if self.subscriber.max_layer != self.layers.bottom and self._adapting():
            # Layers, then the thin rendition, are the first steps down: the pause waits
            # for the bottom one.
            self.bandwidth.estimate_held(bitrate)
            return
        floor = self._thin_floor(rate)
        paced = self.subscriber.pacer.rate_bps
        if self.subscriber.max_layer == THIN and paced is not None:
            # On the thin rendition and paced, the relay's own estimate of the link decides,
            # against what the rendition's lowest rung needs: Chromium's REMB reads a
            # satellite link's jitter as congestion (71 kbps on an island carrying 250,
            # where the pause then took its video for 20 s: bench/thin_link.py).
            bitrate, floor = int(paced), self._lowest_rung_floor()
        if self.bandwidth.estimate_reported(bitrate, now, floor_bps=floor):
            self._pause_for_bandwidth(bitrate)

    def _lowest_rung_floor(self) -> int:
        """What the link must carry for every video of it at the rendition's lowest rung
        (with a quarter to spare) and its audio: under it, video pauses."""
        videos = sum(1 for s in self.subscriber.subscriptions.values()
                     if s.publication.kind == "video" and not s.paused)
        audio = self.subscriber.pacer.audio_bps() or 0.0
        return int(audio + videos * LADDER[-1].bitrate * 0.75)

    def _thin_floor(self, send_bps: float | None) -> int | None:
        """On the thin rendition the estimate follows what is sent (~100 kbps of video and the
        audio), below ``relay.bandwidth_floor_bps`` on any link: there, video pauses only when
        the estimate falls short of what is being sent (H7's end-to-end finding: the pause
        followed every step to thin, on a 512 kbps link too). None: the configured floor."""
        if self.subscriber.max_layer != THIN or not send_bps:
            return None
        return int(send_bps * THIN_SHORTFALL)

    def _pause_for_bandwidth(self, bitrate: int) -> None:
        self.subscriber.pause("bandwidth")
        logger.info("%s video paused: estimated %d bps below the floor", self._label, bitrate)
        self._notice({"code": "video_paused", "reason": "bandwidth", "estimate_bps": bitrate})
        self._tell_quality()
        loop = asyncio.get_running_loop()
        self._retry = loop.call_later(self.config.bandwidth_retry_s, self._retry_video)

    def _retry_video(self) -> None:
        self._retry = None
        if self.closed:
            return
        self.bandwidth.resumed()
        self.subscriber.resume("bandwidth")
        self._notice({"code": "video_resumed", "reason": "bandwidth"})
        self._tell_quality()

    def _tell_quality(self) -> None:
        """A ``video_quality`` notice for each video publication whose quality toward this
        participant changed since it was last told (full unless told otherwise), or whose
        frame rate is news (``rate_news``)."""
        self._told_at = time.monotonic()
        told = self._qualities
        current = self.subscriber.subscriptions
        for gone in [pid for pid in told if pid not in current]:
            del told[gone]
        for pid, subscription in current.items():
            publication = subscription.publication
            if publication.kind != "video":
                continue
            quality, layer = video_quality(subscription)
            before, before_fps = told.get(pid, ("full", 0.0))
            if (before == quality and before_fps is not None
                    and quality not in ("reduced", "thin")):
                continue  # nothing new, and no rate to measure
            # The rate the chosen layers carry, as the publisher sends it now.
            if quality == "thin":
                rendition = publication.rendition
                fps = rendition.frame_rate() if rendition is not None else None
            else:
                fps = None if quality == "audio_only" else publication.frame_rate(layer)
            if before == quality and not rate_news(quality, before_fps, fps):
                continue
            told[pid] = (quality, fps)
            self._notice({"code": "video_quality", "publication_id": pid,
                          "participant_id": publication.participant_id, "quality": quality,
                          "fps": fps})

    def _notice(self, notice: dict[str, Any]) -> None:
        self._tasks.spawn(self._events.notice(self.room_id, self.id, notice))

    # -- lifecycle ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "publications": {p.source: {"packets": p.packets, "keyframes": p.keyframes,
                                        "plis": p.plis_sent} for p in self.publications.values()},
            "subscriptions": {s.publication.id: {"forwarded": s.forwarded, "skipped": s.skipped,
                                                 "paused": sorted(s.paused_reasons),
                                                 "max_layer": s.max_layer,
                                                 "dropped_frames": (s.layers.dropped_frames
                                                                    if s.layers else 0),
                                                 "places": ((s.layers.places_kept,
                                                             s.layers.places_filled)
                                                            if s.layers else None)}
                              for s in self.subscriptions.values()},
            "layer": self.subscriber.max_layer,
            "thin": sorted(s.publication.id for s in self.subscriptions.values() if s.thin),
            "remb_bps": self.bandwidth.estimate_bps,
            "send_bps": self._send_rate.total_bps,
            "pacer": self.subscriber.pacer.stats(),
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
