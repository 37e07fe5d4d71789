"""Subscriber: the receiving side of one participant. One peer connection (the relay offers,
the client answers) whose senders ("legs") carry one Subscription each; the relay renegotiates
as publications come and go.

``Negotiation`` is the renegotiation state machine, without I/O: one offer in flight at a time,
changes made meanwhile merged into the next offer, and new m-lines introduced so that any
WebRTC answerer (a plain aiortc peer with its default bundle policy too) gets every one.

Why one new m-line of a kind at a time: aiortc's *balanced* answerer gives the first m-line of
each kind a transport of its own and puts every later m-line of that kind on it; applying the
offer's BUNDLE group then moves only that first one onto the bundle's transport and stops the
transport the others still sit on. Their packets reach the first receiver of the kind instead
(the router learns an unknown SSRC by payload type), so nothing of that kind decodes, while
the connection reports ``connected``. Once the client has answered an offer carrying an m-line
of a kind, its later receivers of that kind join the bundle's transport. The first m-line of
every offer (the primary, an audio leg) is on that transport from the start."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from codec.rtp import SEQ_MOD
from relay import hooks
from relay.config import MediaConfig
from relay.errors import BadSdp, MediaPortsExhausted, NegotiationPending, NotInRoom
from relay.fec import FecPolicy
from relay.link import AUDIO_GAP_S, REPORT_GAP_S, LinkReports
from relay.pacer import PACKET_OVERHEAD, Pacer
from relay.publication import Publication
from relay.sdp import (
    announce,
    fec_accepted,
    leg_codecs,
    offer_fec,
    parse_sdp,
    payload_types,
    peer_connection,
)
from relay.subscription import Leg, Subscription

logger = logging.getLogger(__name__)

FILL_WITHIN = 48
"""A hole further behind the leg's newest packet than this is not padded."""
VP8_FILLER = b"\x00\x00"
"""A VP8 payload descriptor byte (X, N, S and PID clear) and one byte of data."""
RTT_MIN_PACKETS = 2
"""A leg's round trip counts if it sent this many packets since its previous one."""
RTT_STALE_S = 5.0
"""A round trip older than this is no longer the link's."""
PRIMARY_KIND = "audio"
"""The kind of the first leg, created with the connection: it keeps the first offer from being
empty (browsers refuse an empty BUNDLE group) and is the bundle's primary m-line."""


class Negotiation:
    """Offer/answer bookkeeping of a subscribe connection."""

    def __init__(self) -> None:
        self.in_flight = False
        """An offer was made and its answer has not been applied."""
        self.dirty = False
        """Something changed since the offer in flight: another offer must follow."""
        self.settled_kinds: set[str] = {PRIMARY_KIND}
        """Kinds the client has answered an m-line of (or the primary's)."""
        self._offered_kinds: set[str] = set()

    def change(self) -> bool:
        """Something needs an offer: True if one may be made now, else it is merged into the
        one after the offer in flight."""
        if self.in_flight:
            self.dirty = True
            return False
        return True

    def may_open(self, kind: str, legs_of_kind: int) -> bool:
        """Whether a new m-line of ``kind`` may go into the coming offer, given how many
        m-lines of that kind the connection has already."""
        return kind in self.settled_kinds or legs_of_kind == 0

    def defer(self) -> None:
        """A change waits for the answer: another offer follows it."""
        self.dirty = True

    def offering(self, kinds: set[str], *, deferred: bool = False) -> None:
        """An offer with m-lines of ``kinds`` is being made; ``deferred``: changes wait for
        its answer, so another offer follows it."""
        self.in_flight = True
        self.dirty = deferred
        self._offered_kinds = set(kinds)

    def offer_failed(self) -> None:
        self.in_flight = False

    def answered(self, applied: bool) -> bool:
        """The answer came (``applied``: it was accepted). True if another offer must
        follow."""
        self.in_flight = False
        if applied:
            self.settled_kinds |= self._offered_kinds
        return self.dirty


class Subscriber:
    def __init__(self, room_id: str, participant_id: str, transport_id: str,
                 config: MediaConfig, *, publications: Callable[[], list[Publication]],
                 send_offer: Callable[[dict[str, Any]], Awaitable[None]],
                 spawn: Callable[[Coroutine[Any, Any, Any]], None],
                 on_remb: Callable[[int, list[int]], None],
                 on_loss: Callable[[float], None]) -> None:
        """``publications``: the room's publications this participant may receive;
        ``send_offer``: deliver a renegotiation offer to the client; ``spawn``: run a
        background step owned by the participant; ``on_remb``/``on_loss``: the client's
        receiver estimates and loss reports."""
        self.participant_id = participant_id
        self.transport_id = transport_id
        self.config = config
        self.pc: RTCPeerConnection | None = None
        self.legs: list[Leg] = []
        self.subscriptions: dict[str, Subscription] = {}
        """By publication id."""
        self.paused: set[str] = set()
        """Reasons every video subscription is paused for (``audio_only``, ``bandwidth``)."""
        self.max_layer: int | None = None
        """The highest VP8 temporal layer every video subscription takes (None: all)."""
        self.negotiation = Negotiation()
        self.closed = False
        self._publications = publications
        self._send_offer = send_offer
        self._spawn = spawn
        self._on_remb = on_remb
        self._on_loss = on_loss
        self._rtt_packets: dict[int, int] = {}
        self._rtts: collections.deque[tuple[float, float]] = collections.deque(maxlen=5)
        self.reports = LinkReports()
        """What the client's receiver reports say of its link (relay/link.py)."""
        self._offered: set[str] = set()
        self._pending: list[Publication] = []
        self._last_offer: dict[str, Any] | None = None
        """The offer in flight, sent again by ``resend_offer`` (the client's signaling
        connection changed while it was on its way)."""
        self._label = f"Subscriber({room_id}/{participant_id})"
        self._traced_at = 0.0
        self.fec = FecPolicy(config.fec)
        """Whether its video goes out with FEC (relay/fec.py)."""
        self.pacer = self._new_pacer()
        """What leaves toward the client, and when (relay/pacer.py)."""

    # -- offers ---------------------------------------------------------------------------
    async def subscribe(self) -> dict[str, Any]:
        """Start (or restart) the subscribe connection; returns the offer."""
        if self.negotiation.in_flight:
            raise NegotiationPending(
                f"subscribe connection {self.transport_id!r} of {self.participant_id!r} has an "
                "offer waiting for its answer: answer that offer before subscribing again")
        fresh = self.pc is None
        if self.pc is None:
            # Every sender shares the first one's transport (max-bundle); see the module doc.
            self.pc = peer_connection(self.config, f"{self._label} {self.transport_id}",
                                      max_bundle=True)
            self._free_leg(PRIMARY_KIND)
        for publication in self._publications():
            self._add(publication)
        try:
            offer = await self._make_offer()
        except MediaPortsExhausted:
            if fresh:
                # aiortc never gathers a connection twice: the next subscribe starts afresh.
                await self._drop_connection()
            raise
        if offer is None:  # the participant left (closed) while its offer was being made
            raise NotInRoom(f"{self.participant_id!r} left before its subscribe offer was made")
        return offer

    def _renegotiate(self) -> None:
        """Send a new offer, or merge the change into the next one if an offer is in flight."""
        if self.negotiation.change():
            self._spawn(self._offer_now())

    async def _offer_now(self) -> None:
        offer = await self._make_offer()
        if offer is not None:
            await self._send_offer(offer)

    async def _make_offer(self) -> dict[str, Any] | None:
        pc = self.pc
        if pc is None or self.closed or not self.negotiation.change():
            return None
        for leg in self.legs:
            subscription = leg.subscription
            if subscription is None:
                leg.transceiver.direction = "inactive"
                continue
            leg.transceiver.direction = "sendonly"
            leg.transceiver.setCodecPreferences(
                leg_codecs(leg.kind, subscription.publication.codec))
        self.negotiation.offering({leg.kind for leg in self.legs},
                                  deferred=bool(self._pending))
        try:
            offer = await pc.createOffer()
            with hooks.relay_gathering():  # on the relay's UDP ports (relay/udp_mux.py)
                await pc.setLocalDescription(offer)
        except Exception:
            self.negotiation.offer_failed()
            raise
        sdp = pc.localDescription.sdp
        types = payload_types(sdp)
        tracks: dict[str, dict[str, Any]] = {}
        self._offered = set()
        for leg in self.legs:
            leg.mid = leg.transceiver.mid
            if leg.subscription is not None and leg.mid is not None:
                leg.payload_type = types.get(leg.mid)
                tracks[leg.mid] = leg.subscription.publication.to_wire()
                self._offered.add(leg.subscription.publication.id)
        if self.config.fec != "off":
            sdp = offer_fec(sdp)
        self._last_offer = {"transport_id": self.transport_id, "type": "offer",
                            "sdp": announce(sdp, self.config), "tracks": tracks}
        return self._last_offer

    async def resend_offer(self) -> None:
        """Send the unanswered offer again, if there is one."""
        if self.negotiation.in_flight and self._last_offer is not None and not self.closed:
            await self._send_offer(self._last_offer)

    async def answer(self, transport_id: str, sdp: object) -> None:
        if transport_id != self.transport_id or self.pc is None:
            raise NotInRoom(f"no subscribe connection {transport_id!r} for "
                            f"{self.participant_id!r}")
        if not self.negotiation.in_flight:
            raise BadSdp("no offer is waiting for an answer")
        parse_sdp(sdp, "answer")
        applied = False
        try:
            await self.pc.setRemoteDescription(
                RTCSessionDescription(sdp=str(sdp), type="answer"))
            applied = True
        except Exception as exc:
            raise BadSdp(f"the answer cannot be applied: {exc}") from None
        finally:
            again = self.negotiation.answered(applied)
        fec = fec_accepted(str(sdp)) if self.config.fec != "off" else {}
        for leg in self.legs:
            leg.sender.red_pt, leg.ulpfec_pt = fec.get(leg.mid or "", (None, None))
            leg.set_fec(self.fec.on)
        pending, self._pending = self._pending, []
        for publication in pending:
            self._add(publication)
        for subscription in self.subscriptions.values():
            if subscription.publication.id in self._offered and not subscription.ready:
                subscription.ready = True
                subscription.publication.request_keyframe()
        if again:
            self._renegotiate()

    # -- publications ---------------------------------------------------------------------
    def publication_added(self, publication: Publication) -> None:
        if self.pc is None or self.closed:
            return
        if self.negotiation.in_flight:
            # No sender may be added while an offer is in flight: aiortc would give it a
            # transport that the pending answer's BUNDLE then discards. Attach after it.
            self._defer(publication)
            return
        if self._add(publication):
            self._renegotiate()

    def _defer(self, publication: Publication) -> None:
        self._pending.append(publication)
        self.negotiation.defer()

    def _add(self, publication: Publication) -> bool:
        """Subscribe to ``publication`` on a free or new leg; False if there is nothing to
        offer now (already subscribed, gone, or deferred to the next offer)."""
        if publication.id in self.subscriptions or publication.closed:
            return False
        leg = self._reusable_leg(publication.kind)
        if leg is None:
            legs_of_kind = sum(1 for leg in self.legs if leg.kind == publication.kind)
            if not self.negotiation.may_open(publication.kind, legs_of_kind):
                self._defer(publication)
                return False
            leg = self._free_leg(publication.kind)
        subscription = Subscription(publication, self.participant_id, leg,
                                    max_backlog_bytes=self.config.max_backlog_bytes,
                                    pacer=self.pacer)
        for reason in self.paused:
            subscription.pause(reason)
        subscription.set_max_layer(self.max_layer)
        self.subscriptions[publication.id] = subscription
        publication.attach(subscription)
        return True

    def _reusable_leg(self, kind: str) -> Leg | None:
        for leg in self.legs:
            if leg.kind == kind and leg.subscription is None and not leg.retired:
                return leg
        return None

    def _free_leg(self, kind: str) -> Leg:
        leg = self._reusable_leg(kind)
        if leg is not None:
            return leg
        assert self.pc is not None
        transceiver = self.pc.addTransceiver(kind, direction="sendonly")
        leg = Leg(transceiver, kind)
        hooks.intercept_feedback(
            transceiver.sender,
            on_keyframe_request=lambda: self._keyframe_wanted(leg),
            on_remb=self._on_remb,
            on_receipt=lambda highest, lost: self._on_receipt(leg, highest, lost),
            on_rtt=lambda rtt: self._on_rtt(leg, rtt),
        )
        # Looked up at each call: a connection started afresh has a pacer of its own.
        hooks.intercept_retransmit(
            transceiver.sender,
            lambda resend, pad, ssrc, seq, size: self.pacer.retransmit(resend, pad, ssrc, seq,
                                                                       size),
            filler=lambda seq: self._filler(leg, seq))
        self.legs.append(leg)
        return leg

    def _on_receipt(self, leg: Leg, highest: int, lost: int, now: float | None = None) -> None:
        """A receiver report of ``leg``: its extended highest sequence number and cumulative
        packets lost. Over an interval of the leg's (relay/link.py), the share its own link
        lost and the rate that reached the client: the pacer's estimate follows the link's
        loss, the video budgets after it, and the layer policy hears it.

        The relay forwards a publication's packets in their places, so what the publisher's
        link lost shows in every subscriber's reports too (a hospital on a good link would be
        stepped down for an island's uplink): the publication's own loss over the interval is
        taken off."""
        now = time.monotonic() if now is None else now
        counters = leg.transceiver.sender
        packets = getattr(counters, "_RTCRtpSender__packet_count", 0)
        octets = getattr(counters, "_RTCRtpSender__octet_count", 0)
        size = (octets / packets if packets else 0.0) + PACKET_OVERHEAD
        subscription = leg.subscription
        publication = subscription.publication if subscription is not None else None
        upstream = None
        if publication is not None and publication.sequence.highest is not None:
            upstream = (publication.id, publication.packets, publication.sequence.highest)
        video = any(s.publication.kind == "video" and not s.paused
                    for s in self.subscriptions.values())
        self.pacer.audio_bps(now)  # measured from the first report on (delivered_bps)
        interval = self.reports.receipt(id(leg), now, highest, lost, size=size,
                                        upstream=upstream,
                                        gap_s=REPORT_GAP_S if video else AUDIO_GAP_S)
        if interval is None:
            return
        loss = self.reports.loss(now)
        self._update_fec(now, loss)
        if self.config.adaptation and loss is not None:  # off: nothing paced, as before #15
            self.pacer.report(loss, self.rtt_s(), self.delivered_bps(now), now)
            self._set_budgets()
        if logger.isEnabledFor(logging.DEBUG) and now - self._traced_at >= 1.0:
            self._traced_at = now
            self._trace(now, loss)
        # The layer policy hears the link's loss, once there are packets enough to judge
        # by: one leg at a thin rate that lost one of its ten packets is not a 10 % link (a
        # 3G link's 1 % stepped its subscriber down to 5 fps that way, against 18 fps left
        # alone: bench/thin_link.py).
        self._on_loss(interval.lost if loss is None else loss)

    def _trace(self, now: float, loss: float | None) -> None:
        rtt, delivered = self.rtt_s(), self.delivered_bps(now)
        paced, sent = self.pacer.rate_bps, self.pacer.sent_bps
        logger.debug("%s link: loss %s, rtt %s s, delivered %s kbps, paced %s kbps, sent %s "
                     "kbps, queued %d B, layer %s", self._label,
                     "-" if loss is None else f"{loss:.3f}",
                     "-" if rtt is None else f"{rtt:.3f}",
                     "-" if delivered is None else int(delivered / 1000),
                     "-" if paced is None else int(paced / 1000),
                     "-" if sent is None else int(sent / 1000),
                     self.pacer.queued_bytes, self.max_layer)

    def delivered_bps(self, now: float | None = None) -> float | None:
        """The rate that reached the client lately, over every leg; None before reports.
        An audio leg not measured yet (Chromium reports one every 5 s: its first interval
        comes 5-10 s after the connection) counts what was sent on it: without it, an
        island's first estimate was its video alone (120 of its 256 kbps), and its audio,
        never queued, left the video nothing."""
        now = time.monotonic() if now is None else now
        delivered = self.reports.delivered_bps(now)
        if delivered is None:
            return None
        audio = [s for s in self.subscriptions.values() if s.publication.kind == "audio"]
        unmeasured = [s for s in audio if not self.reports.measured(id(s.leg), now)]
        if unmeasured:
            delivered += (self.pacer.audio_bps() or 0.0) * len(unmeasured) / len(audio)
        return delivered

    def _update_fec(self, now: float, loss: float | None) -> None:
        """FEC on or off for its video legs, as ``FecPolicy`` says of its link."""
        on = self.fec.update(now, loss=loss, rtt_s=self.rtt_s())
        changed = [leg for leg in self.legs if leg.kind == "video" and leg.set_fec(on)]
        if changed:  # (a client that did not accept FEC, aiortc's, has no leg to change)
            logger.info("%s %s: FEC %s on %d video legs (loss %s, round trip %s)", self._label,
                        self.transport_id, "on" if on else "off",
                        sum(1 for leg in self.legs if leg.fec is not None),
                        "?" if loss is None else f"{loss:.1%}",
                        "?" if self.rtt_s() is None else f"{self.rtt_s():.2f} s")

    def _set_budgets(self) -> None:
        """Each video subscription's share of the link (``Subscription.budget_bps``): the
        pacer's estimate less the audio, shared evenly (FEC takes only what is left over:
        ``Pacer.send``'s ``spare``); None while there is no estimate."""
        rate = self.pacer.rate_bps
        videos = [s for s in self.subscriptions.values()
                  if s.publication.kind == "video" and not s.paused]
        budget = None
        if rate is not None and videos:
            budget = max(0.0, rate - (self.pacer.audio_bps() or 0.0)) / len(videos)
        for subscription in videos:
            subscription.budget_bps = budget

    @staticmethod
    def _keyframe_wanted(leg: Leg) -> None:
        if leg.subscription is not None:
            # The publisher, or the thin rendition the subscriber is on.
            leg.subscription.source.request_keyframe()

    def publication_removed(self, publication: Publication) -> None:
        if publication in self._pending:
            self._pending.remove(publication)
        subscription = self.subscriptions.pop(publication.id, None)
        if subscription is None:
            return
        leg = subscription.leg
        self._end(subscription)
        if self.closed:
            return
        # The subscriber's track ends (RTCP BYE) and the m-line goes inactive. The leg is not
        # reused: an ended receiver does not come back to life in every client (aiortc's
        # does not), so a later publication gets a fresh m-line.
        leg.retired = True
        self._spawn(hooks.send_bye(leg.transceiver.sender))
        self._renegotiate()

    @staticmethod
    def _end(subscription: Subscription) -> None:
        subscription.close()
        subscription.publication.detach(subscription)

    # -- quality --------------------------------------------------------------------------
    def pause(self, reason: str) -> None:
        self.paused.add(reason)
        for subscription in self.subscriptions.values():
            subscription.pause(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        for subscription in self.subscriptions.values():
            subscription.resume(reason)

    def set_max_layer(self, layer: int | None) -> None:
        """Give every video subscription (and those to come) the temporal layers up to
        ``layer`` of publications sent in layers (0: the base layer, a quarter of the frame
        rate in L1T3); None: every layer; ``THIN`` (-1): the thin rendition of every VP8
        video (relay/rendition.py), layered or not. The layer policy decides it
        (relay/bandwidth.py); a test may set it directly."""
        self.max_layer = layer
        for subscription in self.subscriptions.values():
            subscription.set_max_layer(layer)

    def pace_released(self) -> None:
        """The client left the thin rendition on a probe: pacing that only its step down
        started stops (``Pacer.unseed``)."""
        if self.pacer.unseed():
            self._set_budgets()

    def pace_from_now(self) -> None:
        """The layer policy took the client below layer 0 for its link: the link is paced
        from then on, from what reaches the client now if it was not yet (``Pacer.seed``).
        The rendition's rung follows the budget the estimate gives
        (``Subscription.budget_bps``), and an estimate that grows while nothing is lost is how
        the rendition finds the link can carry its next rung."""
        delivered = self.delivered_bps()
        if self.config.adaptation and delivered and self.pacer.seed(delivered):
            self._set_budgets()

    def layered(self) -> bool:
        """One of its video subscriptions carries a publication sent in temporal layers."""
        return any(s.publication.temporal_layers > 0 for s in self.subscriptions.values())

    def _on_rtt(self, leg: Leg, rtt: float) -> None:
        """A round trip measured on ``leg``'s receiver report, kept if the leg forwarded
        packets since its last one: aiortc matches a report to the last sender report by its
        NTP time alone, and a leg that sent nothing between two sender reports gives both the
        same, so the report on the first reads the second's send time (short, or below zero:
        -0.66 s was seen, and every real round trip after it read as a rise)."""
        packets = getattr(leg.transceiver.sender, "_RTCRtpSender__packet_count", 0)
        before = self._rtt_packets.get(id(leg))
        self._rtt_packets[id(leg)] = packets
        if before is not None and packets - before >= RTT_MIN_PACKETS and rtt > 0:
            self._rtts.append((time.monotonic(), rtt))

    def rtt_s(self) -> float | None:
        """The round trip to the client: the median of the last five measured on receiver
        reports of legs that were sending (``_on_rtt``) within ``RTT_STALE_S``; None before,
        or if none came for that long (the link's state is then unknown, not what it was)."""
        now = time.monotonic()
        recent = sorted(r for at, r in self._rtts if now - at <= RTT_STALE_S)
        # The median of the last few: one report held up by a busy machine (a few hundred
        # milliseconds on a loaded one) is not a queue on the path.
        return recent[len(recent) // 2] if recent else None

    def queue_delay_s(self) -> float:
        """How long the video waiting in the pacer takes to leave (0: nothing waits)."""
        return self.pacer.queue_delay_s()

    def _new_pacer(self) -> Pacer:
        return Pacer(f"{self._label} {self.transport_id}", rtt=self.rtt_s,
                     on_hole=self._hole)

    @staticmethod
    def _filler(leg: Leg, seq: int) -> bytes | None:
        """What the hole ``seq`` of ``leg`` is padded with (``hooks.intercept_retransmit``):
        for VP8, a payload descriptor (not a partition start) and one byte, which no decoder
        takes for a frame; None (not padded) for other codecs, and for a hole more than
        ``FILL_WITHIN`` packets behind the newest (aiortc's jitter buffer takes a packet 100
        behind its start for a restart of the stream and lets out the old frames it held)."""
        subscription = leg.subscription
        if subscription is None or subscription.publication.mime_type.lower() != "video/vp8":
            return None
        if (leg.next_seq - seq) % SEQ_MOD > FILL_WITHIN:
            return None
        return VP8_FILLER

    def _hole(self, ssrc: int) -> None:
        """A packet of the leg ``ssrc`` will never reach the client: its subscription starts
        again at the next keyframe (unless it waits for one already)."""
        for leg in self.legs:
            subscription = leg.subscription
            if leg.sender.ssrc == ssrc and subscription is not None:
                if not subscription.waiting_keyframe and subscription.publication.kind == "video":
                    subscription.restart_after_drop(None)
                return

    def backlog_bytes(self) -> int:
        """Bytes waiting to be sent to the client (the legs share one transport)."""
        return hooks.backlog_bytes(self.legs[0].transceiver.sender) if self.legs else 0

    def sent_bytes(self, ssrcs: list[int]) -> int:
        """Payload bytes forwarded so far on the legs with these SSRCs."""
        return sum(s.forwarded_bytes for s in self.subscriptions.values()
                   if s.leg.sender.ssrc in ssrcs)

    # -- lifecycle ------------------------------------------------------------------------
    async def close(self) -> None:
        """Close every subscription and the connection."""
        if self.closed:
            return
        self.closed = True
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        """End every subscription, stop the legs and close the connection."""
        self._pending.clear()
        for subscription in self.subscriptions.values():
            self._end(subscription)
        self.subscriptions.clear()
        for leg in self.legs:
            leg.track.stop()
        self.legs = []
        self.negotiation = Negotiation()
        self.pacer.close()
        if not self.closed:
            self.pacer = self._new_pacer()
        pc, self.pc = self.pc, None
        if pc is not None:
            await asyncio.gather(pc.close(), return_exceptions=True)
