"""Participant: one clinician's media in a room: publish peer connections (the client offers,
the relay answers; one per publish call), one subscribe peer connection (the relay offers and
renegotiates as publications come and go), its Publications and Subscriptions."""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import SessionDescription, candidate_from_sdp

from relay import hooks
from relay.config import MediaConfig
from relay.errors import AlreadyPublished, BadSdp, NotInRoom, UnsupportedCodec
from relay.publication import SOURCES, Publication
from relay.subscription import Leg, Subscription

if TYPE_CHECKING:
    from relay.room import Room

logger = logging.getLogger(__name__)

MAX_SDP_BYTES = 64 * 1024
LOSS_WINDOW_S = 3.0
CONGESTION_LOSS = 0.05
"""Reported loss (fraction) at or above which a low bandwidth estimate counts as congestion."""


def parse_sdp(sdp: object, kind: str) -> SessionDescription:
    if not isinstance(sdp, str) or not sdp.strip():
        raise BadSdp(f"the {kind} must be an SDP string")
    if len(sdp) > MAX_SDP_BYTES:
        raise BadSdp(f"the {kind} is {len(sdp)} bytes; at most {MAX_SDP_BYTES}")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:
        raise BadSdp(f"the {kind} is not valid SDP: {exc}") from None
    if not parsed.media:
        raise BadSdp(f"the {kind} has no media section")
    return parsed


def _configuration(config: MediaConfig, *, max_bundle: bool = False) -> RTCConfiguration:
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in config.ice_servers]
    policy = RTCBundlePolicy.MAX_BUNDLE if max_bundle else RTCBundlePolicy.BALANCED
    return RTCConfiguration(iceServers=servers, bundlePolicy=policy)


def _announce(sdp: str, config: MediaConfig) -> str:
    """Write the announced (public) address into host candidates."""
    if not config.announced_address:
        return sdp
    hosts = set(config.host_addresses)

    def swap(match: re.Match[str]) -> str:
        if hosts and match.group(2) not in hosts:
            return match.group(0)
        return f"{match.group(1)}{config.announced_address}{match.group(3)}"

    return re.sub(r"(a=candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host)", swap, sdp)


def _capabilities(kind: str, mime_type: str, parameters: dict[str, Any] | None
                  ) -> list[RTCRtpCodecCapability]:
    """The codec (and its RTX) a subscriber leg may use: the publisher's, exactly."""
    caps = RTCRtpSender.getCapabilities(kind).codecs
    same = [c for c in caps if c.mimeType.lower() == mime_type.lower()]
    exact = [c for c in same if parameters is not None and c.parameters == parameters]
    chosen = exact or same
    rtx = [c for c in caps if c.mimeType.lower().endswith("/rtx")]
    return chosen + rtx


class Participant:
    def __init__(self, room: Room, participant_id: str, config: MediaConfig) -> None:
        self.room = room
        self.id = participant_id
        self.config = config
        self.publish_pcs: dict[str, RTCPeerConnection] = {}
        self.publications: dict[str, Publication] = {}
        self.subscribe_pc: RTCPeerConnection | None = None
        self.subscribe_id = f"sub_{uuid.uuid4().hex[:12]}"
        self.legs: list[Leg] = []
        self.subscriptions: dict[str, Subscription] = {}
        self.audio_only = False
        self.closed = False
        self._negotiating = False
        self._dirty = False
        self._offered: set[str] = set()
        self._pending: list[Publication] = []
        self._low_since: float | None = None
        self._bandwidth_paused = False
        self._retry: asyncio.TimerHandle | None = None
        self.remb_bps: int | None = None
        self._losses: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self._rate_marks: dict[tuple[int, ...], tuple[float, int]] = {}
        self._rates: dict[tuple[int, ...], float] = {}

    def _log(self, message: str, *args: object) -> None:
        logger.info("Participant(%s/%s) " + message, self.room.id, self.id, *args)

    # -- publish -------------------------------------------------------------------------
    async def publish(self, sdp: object, sources: dict[str, str]) -> dict[str, Any]:
        offer = parse_sdp(sdp, "offer")
        wanted: dict[str, str] = {}
        for media in offer.media:
            if media.kind not in ("audio", "video"):
                continue
            mid = media.rtp.muxId
            source = sources.get(mid)
            if source is None:
                raise BadSdp(f"m-line {mid!r} ({media.kind}) has no source; give sources "
                             "{mid: 'microphone'|'camera'|'screen'}")
            if SOURCES.get(source) != media.kind:
                raise BadSdp(f"source {source!r} cannot be sent on a {media.kind} m-line")
            if source in self.publications or source in wanted.values():
                raise AlreadyPublished(f"participant {self.id!r} already publishes {source!r}; "
                                       "unpublish it first")
            if media.direction not in ("sendonly", "sendrecv"):
                raise BadSdp(f"m-line {mid!r} does not send (direction {media.direction})")
            wanted[mid] = source
        if not wanted:
            raise BadSdp("the offer has no audio or video m-line to publish")

        pc = RTCPeerConnection(_configuration(self.config))
        transport_id = f"pub_{uuid.uuid4().hex[:12]}"
        try:
            for media in offer.media:
                if media.kind in ("audio", "video"):
                    transceiver = pc.addTransceiver(media.kind, direction="recvonly")
                    transceiver.setCodecPreferences(self._accepted(media.kind))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=str(sdp), type="offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except (ValueError, TypeError) as exc:
            await pc.close()
            raise BadSdp(f"the offer cannot be answered: {exc}") from None
        except Exception as exc:
            await pc.close()
            if "codec" in str(exc).lower() or "parameters" in str(exc).lower():
                raise UnsupportedCodec(
                    f"no common codec: the relay accepts {', '.join(self.config.video_codecs)} "
                    "video and Opus audio") from None
            raise BadSdp(f"the offer cannot be answered: {exc}") from None
        local = SessionDescription.parse(pc.localDescription.sdp)
        chosen = {m.rtp.muxId: m.rtp.codecs[0] for m in local.media
                  if m.kind in ("audio", "video") and m.rtp.codecs}
        made = []
        for transceiver in pc.getTransceivers():
            answered = transceiver.mid
            if answered is None or answered not in wanted:
                continue
            codec = chosen[answered]
            publication = Publication(
                publication_id=f"pubn_{uuid.uuid4().hex[:12]}", room_id=self.room.id,
                participant_id=self.id, source=wanted[answered], kind=transceiver.kind,
                mime_type=codec.mimeType, clock_rate=codec.clockRate,
                receiver=transceiver.receiver,
                keyframe_interval_s=self.config.keyframe_interval_s,
            )
            publication.codec_parameters = dict(codec.parameters)  # type: ignore[attr-defined]
            made.append(publication)
        self.publish_pcs[transport_id] = pc
        for publication in made:
            self.publications[publication.source] = publication
        self._watch(pc, transport_id)
        self._log("publishes %s over %s", ", ".join(p.source for p in made), transport_id)
        for publication in made:
            self.room.publication_added(publication)
        return {
            "transport_id": transport_id,
            "sdp": _announce(pc.localDescription.sdp, self.config),
            "type": "answer",
            "publications": [p.to_wire() for p in made],
        }

    def _accepted(self, kind: str) -> list[RTCRtpCodecCapability]:
        capabilities = RTCRtpReceiver.getCapabilities(kind)
        caps = capabilities.codecs if capabilities is not None else []
        if kind == "audio":
            return [c for c in caps if c.mimeType.lower() == "audio/opus"]
        ordered: list[RTCRtpCodecCapability] = []
        for name in self.config.video_codecs:
            ordered += [c for c in caps if c.mimeType.lower() == f"video/{name.lower()}"]
        return ordered + [c for c in caps if c.mimeType.lower() == "video/rtx"]

    async def unpublish(self, source: str) -> None:
        publication = self.publications.pop(source, None)
        if publication is None:
            raise NotInRoom(f"participant {self.id!r} does not publish {source!r}")
        await self._end_publication(publication)

    async def _end_publication(self, publication: Publication) -> None:
        self.room.publication_removed(publication)
        # Close the publish connection once none of its publications is left.
        for transport_id, pc in list(self.publish_pcs.items()):
            receivers = {t.receiver for t in pc.getTransceivers()}
            if publication.receiver in receivers and not any(
                p.receiver in receivers for p in self.publications.values()
            ):
                del self.publish_pcs[transport_id]
                await pc.close()

    # -- subscribe -----------------------------------------------------------------------
    async def subscribe(self) -> dict[str, Any]:
        """Start (or restart) the subscribe connection; returns the first offer."""
        if self.subscribe_pc is None:
            # Every sender shares the first one's transport (max-bundle). aiortc's balanced
            # bundling leaves a sender that joined a non-primary transport on a transport it
            # then discards. The first sender is an (inactive) audio leg: it keeps the first
            # offer from being empty (an empty BUNDLE group is refused by browsers) and is
            # reused by the first audio subscription.
            self.subscribe_pc = RTCPeerConnection(_configuration(self.config, max_bundle=True))
            self._free_leg("audio")
            self._watch(self.subscribe_pc, self.subscribe_id)
        for publication in self.room.publications_for(self):
            self._attach(publication)
        offer = await self._make_offer()
        assert offer is not None
        return offer

    def _attach(self, publication: Publication) -> Subscription | None:
        if publication.id in self.subscriptions or publication.closed:
            return None
        subscription_leg = self._free_leg(publication.kind)
        subscription = Subscription(publication, self.id, subscription_leg,
                                    max_backlog_bytes=self.config.max_backlog_bytes)
        if self.audio_only:
            subscription.pause("audio_only")
        if self._bandwidth_paused:
            subscription.pause("bandwidth")
        self.subscriptions[publication.id] = subscription
        publication.subscriptions.add(subscription)
        return subscription

    def _free_leg(self, kind: str) -> Leg:
        for leg in self.legs:
            if leg.kind == kind and leg.subscription is None and not leg.retired:
                return leg
        assert self.subscribe_pc is not None
        transceiver = self.subscribe_pc.addTransceiver(kind, direction="sendonly")
        leg = Leg(transceiver, kind)
        hooks.intercept_feedback(
            transceiver.sender,
            on_keyframe_request=lambda: self._keyframe_wanted(leg),
            on_remb=self._on_remb,
            on_loss=self._on_loss,
        )
        self.legs.append(leg)
        return leg

    def _keyframe_wanted(self, leg: Leg) -> None:
        if leg.subscription is not None:
            leg.subscription.publication.request_keyframe()

    def publication_added(self, publication: Publication) -> None:
        if self.subscribe_pc is None or self.closed:
            return
        if self._negotiating:
            # No sender may be added while an offer is in flight: aiortc would give it a
            # transport that the pending answer's BUNDLE then discards. Attach after it.
            self._pending.append(publication)
            self._dirty = True
            return
        if self._attach(publication) is not None:
            self._renegotiate()

    def publication_removed(self, publication: Publication) -> None:
        subscription = self.subscriptions.pop(publication.id, None)
        if subscription is None:
            return
        leg = subscription.leg
        subscription.close()
        if self.closed:
            return
        # The subscriber's track ends (RTCP BYE) and the m-line goes inactive. The leg is not
        # reused: an ended receiver does not come back to life in every client (aiortc's
        # does not), so a later publication gets a fresh m-line.
        leg.retired = True
        self.room.spawn(hooks.send_bye(leg.transceiver.sender))
        self._renegotiate()

    def _renegotiate(self) -> None:
        """Send a new offer, or merge the change into the next one if an offer is in flight."""
        if self._negotiating:
            self._dirty = True
            return
        self.room.spawn(self._send_offer())

    async def _send_offer(self) -> None:
        offer = await self._make_offer()
        if offer is not None:
            await self.room.events.offer(self.room.id, self.id, offer)

    async def _make_offer(self) -> dict[str, Any] | None:
        pc = self.subscribe_pc
        if pc is None or self.closed or self._negotiating:
            if self._negotiating:
                self._dirty = True
            return None
        self._negotiating = True
        self._dirty = False
        for leg in self.legs:
            subscription = leg.subscription
            if subscription is None:
                leg.transceiver.direction = "inactive"
                continue
            leg.transceiver.direction = "sendonly"
            publication = subscription.publication
            leg.transceiver.setCodecPreferences(_capabilities(
                leg.kind, publication.mime_type,
                getattr(publication, "codec_parameters", None)))
        try:
            offer = await pc.createOffer()
            await pc.setLocalDescription(offer)
        except Exception:
            self._negotiating = False
            raise
        local = SessionDescription.parse(pc.localDescription.sdp)
        types = {m.rtp.muxId: m.rtp.codecs[0].payloadType for m in local.media
                 if m.kind in ("audio", "video") and m.rtp.codecs}
        tracks: dict[str, dict[str, Any]] = {}
        self._offered = set()
        for leg in self.legs:
            leg.mid = leg.transceiver.mid
            if leg.subscription is not None and leg.mid is not None:
                leg.payload_type = types.get(leg.mid)
                tracks[leg.mid] = leg.subscription.publication.to_wire()
                self._offered.add(leg.subscription.publication.id)
        return {"transport_id": self.subscribe_id, "type": "offer",
                "sdp": _announce(pc.localDescription.sdp, self.config), "tracks": tracks}

    async def answer(self, transport_id: str, sdp: object) -> None:
        if transport_id != self.subscribe_id or self.subscribe_pc is None:
            raise NotInRoom(f"no subscribe connection {transport_id!r} for {self.id!r}")
        if not self._negotiating:
            raise BadSdp("no offer is waiting for an answer")
        parse_sdp(sdp, "answer")
        try:
            await self.subscribe_pc.setRemoteDescription(
                RTCSessionDescription(sdp=str(sdp), type="answer"))
        except Exception as exc:
            raise BadSdp(f"the answer cannot be applied: {exc}") from None
        finally:
            self._negotiating = False
        pending, self._pending = self._pending, []
        for publication in pending:
            self._attach(publication)
        for subscription in self.subscriptions.values():
            if subscription.publication.id in self._offered and not subscription.ready:
                subscription.ready = True
                subscription.publication.request_keyframe()
        if self._dirty:
            self._renegotiate()

    async def add_ice_candidate(self, transport_id: str, candidate: dict[str, Any]) -> None:
        pc = self.publish_pcs.get(transport_id)
        if pc is None and transport_id == self.subscribe_id:
            pc = self.subscribe_pc
        if pc is None:
            raise NotInRoom(f"no connection {transport_id!r} for {self.id!r}")
        text = str(candidate.get("candidate") or "")
        if not text:
            return  # end of candidates
        try:
            parsed = candidate_from_sdp(text.removeprefix("candidate:"))
        except Exception as exc:
            raise BadSdp(f"candidate is not valid: {exc}") from None
        parsed.sdpMid = candidate.get("sdpMid")
        parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
        await pc.addIceCandidate(parsed)

    # -- quality --------------------------------------------------------------------------
    def set_audio_only(self, audio_only: bool) -> None:
        self.audio_only = audio_only
        for subscription in self.subscriptions.values():
            if audio_only:
                subscription.pause("audio_only")
            else:
                subscription.resume("audio_only")
        self._log("audio only %s", "on" if audio_only else "off")

    def _send_rate(self, now: float, ssrcs: list[int]) -> float | None:
        """Bits per second the relay sent on the legs ``ssrcs`` since the last report on
        the same legs."""
        key = tuple(sorted(ssrcs))
        total = sum(s.forwarded_bytes for s in self.subscriptions.values()
                    if s.leg.sender.ssrc in ssrcs)
        previous = self._rate_marks.get(key)
        if previous is not None and now - previous[0] < 0.5:
            return self._rates.get(key)
        self._rate_marks[key] = (now, total)
        if previous is None:
            return None
        self._rates[key] = (total - previous[1]) * 8 / (now - previous[0])
        return self._rates[key]

    def _on_loss(self, fraction: float) -> None:
        self._losses.append((time.monotonic(), fraction))

    def _recent_loss(self, now: float) -> float:
        while self._losses and now - self._losses[0][0] > LOSS_WINDOW_S:
            self._losses.popleft()
        return max((f for _, f in self._losses), default=0.0)

    def _on_remb(self, bitrate: int, ssrcs: list[int]) -> None:
        """A receiver estimate (REMB) from the subscriber. Video is paused when the estimate
        stays under the floor while the subscriber reports loss: a low estimate alone is no
        proof (aiortc's estimator reports about half of what it receives, and a still screen
        is simply sent little)."""
        self.remb_bps = bitrate
        floor = self.config.bandwidth_floor_bps
        now = time.monotonic()
        rate = self._send_rate(now, ssrcs)
        logger.debug("Participant(%s/%s) REMB %d bps for %d legs sent %s bps", self.room.id,
                     self.id, bitrate, len(ssrcs), rate)
        if not floor or self._bandwidth_paused:
            return
        if bitrate >= floor or self._recent_loss(now) < CONGESTION_LOSS:
            self._low_since = None
            return
        if self._low_since is None:
            self._low_since = now
        elif now - self._low_since >= self.config.bandwidth_window_s:
            self._pause_for_bandwidth(bitrate)

    def _pause_for_bandwidth(self, bitrate: int) -> None:
        self._bandwidth_paused = True
        self._low_since = None
        for subscription in self.subscriptions.values():
            subscription.pause("bandwidth")
        self._log("video paused: estimated %d bps below the floor", bitrate)
        self.room.spawn(self.room.events.notice(self.room.id, self.id, {
            "code": "video_paused", "reason": "bandwidth", "estimate_bps": bitrate}))
        loop = asyncio.get_running_loop()
        self._retry = loop.call_later(self.config.bandwidth_retry_s, self._retry_video)

    def _retry_video(self) -> None:
        self._retry = None
        if self.closed:
            return
        self._bandwidth_paused = False
        for subscription in self.subscriptions.values():
            subscription.resume("bandwidth")
        self.room.spawn(self.room.events.notice(self.room.id, self.id, {
            "code": "video_resumed", "reason": "bandwidth"}))

    # -- lifecycle ------------------------------------------------------------------------
    def _watch(self, pc: RTCPeerConnection, transport_id: str) -> None:
        @pc.on("connectionstatechange")
        async def changed() -> None:
            self._log("%s is %s", transport_id, pc.connectionState)

    def stats(self) -> dict[str, Any]:
        return {
            "publications": {p.source: {"packets": p.packets, "keyframes": p.keyframes,
                                        "plis": p.plis_sent} for p in self.publications.values()},
            "subscriptions": {s.publication.id: {"forwarded": s.forwarded, "skipped": s.skipped,
                                                 "paused": sorted(s.paused_reasons)}
                              for s in self.subscriptions.values()},
            "remb_bps": self.remb_bps,
            "send_bps": sum(self._rates.values()) if self._rates else None,
        }

    async def close(self) -> None:
        """Close exactly this participant's publications, subscriptions and connections."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        for publication in list(self.publications.values()):
            self.room.publication_removed(publication)
        self.publications.clear()
        for subscription in self.subscriptions.values():
            subscription.close()
        self.subscriptions.clear()
        for leg in self.legs:
            leg.track.stop()
        pcs = list(self.publish_pcs.values())
        if self.subscribe_pc is not None:
            pcs.append(self.subscribe_pc)
        self.publish_pcs.clear()
        self.subscribe_pc = None
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        self._log("left")
