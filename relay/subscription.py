"""Subscription: one participant's receipt of one Publication, over one sender (a "leg") of the
subscriber's peer connection.

Forwarding rewrites only what differs between the two legs: SSRC, payload type, sequence
number and timestamp offsets, the MID and abs-send-time header extensions. The payload is never
touched. A subscription starts at a keyframe; when it must skip (paused, too slow, resumed) it
waits for the next keyframe and continues the sequence numbers without a gap, so the
subscriber never asks for packets the relay chose not to send."""

from __future__ import annotations

import random

from aiortc import RTCRtpTransceiver
from aiortc.rtp import RtpPacket

from codec.rtp import SEQ_MOD, TS_MOD, seq_newer
from relay import hooks
from relay.publication import Publication
from relay.track import ForwardTrack

BACKLOG_CHECK_EVERY = 8
"""The send backlog is looked at every this many packets of a subscription."""


class Leg:
    """A sender of the subscriber's peer connection. Legs are reused when publications come
    and go (aiortc cannot remove an m-line); the sequence numbers run on across reuse."""

    def __init__(self, transceiver: RTCRtpTransceiver, kind: str) -> None:
        self.transceiver = transceiver
        self.kind = kind
        self.track = ForwardTrack(kind)
        transceiver.sender.replaceTrack(self.track)
        self.sender = hooks.SenderLeg(transceiver.sender)
        self.next_seq = random.randrange(0x8000)
        self.payload_type: int | None = None
        self.mid: str | None = None
        self.subscription: Subscription | None = None
        self.retired = False
        """Its subscription ended: the m-line stays inactive for good."""


class Subscription:
    """Forwards one Publication on one Leg. Its owner (the subscriber) attaches it to the
    publication and detaches it when it closes it."""

    def __init__(self, publication: Publication, subscriber_id: str, leg: Leg, *,
                 max_backlog_bytes: int = 512 * 1024) -> None:
        self.publication = publication
        self.subscriber_id = subscriber_id
        self.leg = leg
        self.ready = False
        """Set once the subscriber's answer for this leg is applied."""
        self.paused_reasons: set[str] = set()
        self.waiting_keyframe = True
        self.forwarded = 0
        self.forwarded_bytes = 0
        self.skipped = 0
        self._max_backlog = max_backlog_bytes
        self._seq_offset = 0
        self._ts_offset = random.randrange(TS_MOD)
        self._start_seq: int | None = None
        self.closed = False
        leg.subscription = self

    @property
    def paused(self) -> bool:
        return bool(self.paused_reasons)

    def pause(self, reason: str) -> None:
        if self.publication.kind != "video":
            return
        self.paused_reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self.paused_reasons:
            return
        self.paused_reasons.discard(reason)
        if not self.paused_reasons:
            self._restart()

    def _restart(self) -> None:
        """Wait for the next keyframe, and ask for one."""
        self.waiting_keyframe = True
        self.publication.request_keyframe()

    async def forward(self, packet: RtpPacket, keyframe: bool, ntp: int) -> None:
        """Send one packet of the publication on this leg. ``ntp`` is the arrival time (NTP
        format), computed once per packet for every subscription."""
        if self.closed or self.paused or not self.ready:
            return
        leg = self.leg
        in_seq = packet.sequence_number
        if self.waiting_keyframe:
            if not keyframe:
                self.skipped += 1
                self.publication.request_keyframe()
                return
            self.waiting_keyframe = False
            self._seq_offset = (leg.next_seq - in_seq) % SEQ_MOD
            self._start_seq = in_seq
        elif self._start_seq is not None and seq_newer(self._start_seq, in_seq):
            return  # a retransmission from before this subscription (re)started
        if (self._max_backlog and not self.forwarded % BACKLOG_CHECK_EVERY
                and hooks.backlog_bytes(leg.transceiver.sender) > self._max_backlog):
            # The subscriber's path cannot take more: skip to the next keyframe rather than
            # queue without bound or slow the others.
            self.skipped += 1
            self._restart()
            return
        out_seq = (in_seq + self._seq_offset) % SEQ_MOD
        out = RtpPacket(
            payload_type=leg.payload_type or packet.payload_type,
            marker=packet.marker,
            sequence_number=out_seq,
            timestamp=(packet.timestamp + self._ts_offset) % TS_MOD,
            ssrc=leg.sender.ssrc,
            payload=packet.payload,
        )
        out.extensions.mid = leg.mid
        out.extensions.abs_send_time = (ntp >> 14) & 0x00FFFFFF
        out.extensions.audio_level = packet.extensions.audio_level
        try:
            # Not yet (or no longer) connected: the transport refuses, and the subscription
            # starts again at a keyframe once it is.
            await leg.sender.send(out, ntp)
        except ConnectionError:
            self.waiting_keyframe = True
            return
        if seq_newer(out_seq, (leg.next_seq - 1) % SEQ_MOD):
            leg.next_seq = (out_seq + 1) % SEQ_MOD
        self.forwarded += 1
        self.forwarded_bytes += len(packet.payload)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leg.subscription is self:
            self.leg.subscription = None
