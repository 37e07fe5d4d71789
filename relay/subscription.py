"""Subscription: one participant's receipt of one Publication, over one sender (a "leg") of the
subscriber's peer connection.

Forwarding rewrites only what differs between the two legs: SSRC, payload type, sequence
number and timestamp offsets, the MID and abs-send-time header extensions. The payload is never
touched, but for one field: a VP8 publication sent with temporal layers (``scalabilityMode``
L1T2/L1T3) may reach a subscriber without its upper layers (a lower frame rate, no
transcoding), and then the frames it does not get are taken out of its sequence numbers and
of the VP8 picture ids (``LayerFilter``). A subscription starts at a keyframe; when it must
skip (paused, too slow, resumed) it waits for the next keyframe and continues the sequence
numbers without a gap, so the subscriber never asks for packets the relay chose not to
send."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from aiortc import RTCRtpTransceiver
from aiortc.rtp import RtpPacket

from codec.rtp import (
    SEQ_MOD,
    TS_MOD,
    Vp8Descriptor,
    seq_newer,
    ts_delta,
    vp8_descriptor,
    vp8_with_picture_id,
)
from relay import hooks
from relay.fec import UlpfecEncoder
from relay.forwarding import Forwarder
from relay.pacer import Pacer
from relay.publication import Publication
from relay.track import ForwardTrack

BACKLOG_CHECK_EVERY = 8
"""The send backlog is looked at every this many packets of a subscription."""
ALL_LAYERS = 3
"""The highest temporal layer id VP8 can name (TID is 2 bits): "every layer"."""
MAX_MISSING = 256
"""A gap in the publisher's sequence numbers up to this long keeps a place for each missing
packet (its retransmission goes out in it); a longer jump is taken as it comes."""
RECENT_FRAMES = 64
"""How many frames' forward-or-drop decisions are remembered for late packets."""
SWITCH_TS_STEP = 90
"""RTP ticks (1 ms at 90 kHz) between the last frame of the old source and the first of the
new one when the new one's own timestamp would not come after it: the smallest shift, so the
video leaves the publisher's timeline (and the audio's) by no more than the rendition's
delay, and finds it again at the next change of source."""


class LayerFilter:
    """Which packets of a VP8 publication one subscriber gets, and under which sequence
    number and picture id, when it takes only the temporal layers up to ``target``.

    Whole frames are kept or dropped, so the marker of a kept frame's last packet stays right;
    the frame is decided on its first packet seen. A dropped frame takes no sequence number and
    no picture id, so the subscriber sees both run on without a gap; TL0PICIDX passes unchanged
    (layer 0 is never dropped). Going down takes effect at the next frame; going up one layer
    only at a frame of that layer with the layer-sync bit (Y: it references only layer 0) or at
    a keyframe, since the frames of that layer before it reference ones the subscriber never
    had.

    Loss upstream: a packet missing from the publisher's sequence keeps its place in the
    subscriber's, unless the frame it lies inside is dropped. If it comes later (aiortc's NACK
    brought its retransmission) it goes out in that place, or as an empty packet (padding) if
    its frame turned out to be dropped, so the subscriber is not left waiting on a hole the
    relay could fill. A frame lost whole and found dropped only then leaves its picture id
    skipped, as a frame lost on the way would (the frames kept reference layer 0, which is
    whole). A retransmission that never comes leaves the hole, as it did before layers.
    Publishers without the T bit (``tid`` -1) have every frame forwarded: only the sequence
    numbers are offset, as for any other codec.

    Pure: no I/O, no clock. Pure also in cost: a few integer operations per packet, a dict
    write per frame or per lost packet."""

    __slots__ = ("_decided", "_frame_forwarded", "_frame_ts", "_highest", "_last_ts",
                 "_missing", "current", "dropped_frames", "picture_offset", "places_filled",
                 "places_kept", "seq_offset", "target")

    def __init__(self) -> None:
        self.target = ALL_LAYERS
        """The highest layer wanted."""
        self.current = ALL_LAYERS
        """The highest layer forwarded now (catches up with ``target`` at sync points)."""
        self.seq_offset = 0
        self.picture_offset = 0
        """Picture ids dropped since the last (re)start: subtracted from the publisher's."""
        self.dropped_frames = 0
        self.places_kept = 0
        """Packets missing from the publisher's sequence given a place in the subscriber's."""
        self.places_filled = 0
        """Of those, how many came late and went out in their place (as padding or not)."""
        self._highest = 0
        self._frame_ts: int | None = None
        self._frame_forwarded = True
        self._last_ts = 0
        """RTP timestamp of the last packet forwarded in order (padding in a hole takes it:
        it joins that frame, empty, rather than make a frame of its own)."""
        self._missing: dict[int, tuple[int, int, int]] = {}
        """Publisher sequence number -> (subscriber's sequence number, picture offset,
        padding timestamp) of the packets a gap left out."""
        self._decided: dict[int, bool] = {}
        """RTP timestamp -> forwarded, for the recent frames."""

    def restart(self, in_seq: int, out_seq: int) -> None:
        """Start afresh at the keyframe ``in_seq``, sent as ``out_seq``: the subscriber's
        decoder starts over, so the picture ids need not continue across."""
        self.seq_offset = (out_seq - in_seq) % SEQ_MOD
        self.picture_offset = 0
        self.current = self.target
        self._highest = (in_seq - 1) % SEQ_MOD
        self._frame_ts = None
        self._frame_forwarded = True
        self._missing.clear()
        self._decided.clear()

    def take(self, seq: int, timestamp: int, payload: bytes, descriptor: Vp8Descriptor | None,
             keyframe: bool) -> tuple[int, bytes, int] | None:
        """The packet ``seq`` as the subscriber gets it: (sequence number, payload,
        timestamp), or None if it gets nothing."""
        diff = (seq - self._highest) % SEQ_MOD
        if diff == 0 or diff >= SEQ_MOD // 2:
            return self._late(seq, timestamp, payload, descriptor)
        if descriptor is None:  # padding only: carries nothing a decoder needs
            self._highest = seq
            self.seq_offset = (self.seq_offset - 1) % SEQ_MOD
            return None
        lost = diff - 1
        if timestamp != self._frame_ts:
            if lost:  # whole frames, or the ends of this one and the last: places kept
                self._keep_places(lost)
            forwarded = self._choose(descriptor, keyframe)
            self._frame_ts = timestamp
            self._frame_forwarded = forwarded
            self._decided[timestamp] = forwarded
            if len(self._decided) > RECENT_FRAMES:
                del self._decided[next(iter(self._decided))]
            if not forwarded:
                self.dropped_frames += 1
                if descriptor.picture_id >= 0:
                    self.picture_offset += 1
        elif lost:
            if self._frame_forwarded:
                self._keep_places(lost)
            else:  # lost from inside a dropped frame: they would have been dropped too
                self.seq_offset = (self.seq_offset - lost) % SEQ_MOD
        self._highest = seq
        if not self._frame_forwarded:
            self.seq_offset = (self.seq_offset - 1) % SEQ_MOD
            return None
        self._last_ts = timestamp
        if self.picture_offset and descriptor.picture_id >= 0:
            payload = vp8_with_picture_id(payload, descriptor,
                                          descriptor.picture_id - self.picture_offset)
        return (seq + self.seq_offset) % SEQ_MOD, payload, timestamp

    def _choose(self, descriptor: Vp8Descriptor, keyframe: bool) -> bool:
        tid = descriptor.tid
        if keyframe:
            self.current = self.target
            return True
        if tid < 0:
            return True
        if self.target < self.current:
            self.current = self.target  # down: at this frame boundary
        elif tid == self.current + 1 and tid <= self.target and descriptor.sync:
            self.current = tid  # up one layer, at a frame that needs only layer 0
        return tid <= self.current

    def _keep_places(self, lost: int) -> None:
        if lost > MAX_MISSING:
            return
        missing = self._missing
        place = (self.seq_offset, self.picture_offset, self._last_ts)
        first = self._highest + 1
        self.places_kept += lost
        for n in range(lost):
            in_seq = (first + n) % SEQ_MOD
            missing[in_seq] = ((in_seq + place[0]) % SEQ_MOD, place[1], place[2])
        while len(missing) > MAX_MISSING:
            del missing[next(iter(missing))]

    def _late(self, seq: int, timestamp: int, payload: bytes,
              descriptor: Vp8Descriptor | None) -> tuple[int, bytes, int] | None:
        """A packet older than the newest: only one a gap kept a place for goes out (a
        duplicate, or one from before the start, does not)."""
        place = self._missing.pop(seq, None)
        if place is None:
            return None
        self.places_filled += 1
        out_seq, picture_offset, padding_ts = place
        if descriptor is None:
            return out_seq, b"", padding_ts
        forwarded = self._decided.get(timestamp)
        if forwarded is None:  # a frame lost whole until now
            forwarded = descriptor.tid < 0 or descriptor.tid <= self.current
            self._decided[timestamp] = forwarded
        if not forwarded:
            return out_seq, b"", padding_ts
        if picture_offset and descriptor.picture_id >= 0:
            payload = vp8_with_picture_id(payload, descriptor,
                                          descriptor.picture_id - picture_offset)
        return out_seq, payload, timestamp


class Source(Protocol):
    """What a subscription takes its packets from: the publication, or its thin rendition."""

    def attach(self, forwarder: Forwarder) -> None: ...

    def detach(self, forwarder: Forwarder) -> None: ...

    def request_keyframe(self) -> None: ...


class Handover:
    """Moves a subscription from one source to another at the new one's next keyframe: until
    then it keeps the old one, so the subscriber sees no gap. Attached to the new source as a
    forwarder of its own, and only while the move waits: the forwarding path of a
    publication without a rendition is untouched."""

    def __init__(self, subscription: Subscription, old: Source, new: Source,
                 done: Callable[[], None]) -> None:
        self.subscription = subscription
        self.old = old
        self.new = new
        self._done = done
        self.finished = False
        new.attach(self)
        new.request_keyframe()

    async def forward(self, packet: RtpPacket, keyframe: bool, ntp: int,
                      descriptor: Vp8Descriptor | None = None) -> None:
        if self.finished:
            return
        if not keyframe:
            self.new.request_keyframe()  # rate limited by the source
            return
        self.cancel()
        subscription = self.subscription
        subscription.handover = None
        if subscription.closed:
            return
        self.old.detach(subscription)
        self.new.attach(subscription)
        subscription.source = self.new
        subscription.restart_from_leg()
        await subscription.forward(packet, keyframe, ntp, descriptor)
        self._done()

    def cancel(self) -> None:
        self.finished = True
        self.new.detach(self)


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
        self.last_out: RtpPacket | None = None
        """The last packet given to the send path (``last_sent``)."""
        self.fec: UlpfecEncoder | None = None
        """While FEC is on for this leg (relay/fec.py; the subscriber turns it on and off)."""
        self.ulpfec_pt: int | None = None
        """ULPFEC's payload type in the subscriber's answer (RED's is ``sender.red_pt``)."""

    def set_fec(self, on: bool) -> bool:
        """FEC on or off for this leg (on only if the answer kept RED and ULPFEC); whether it
        changed."""
        on = on and self.sender.red_pt is not None and self.ulpfec_pt is not None
        if on == (self.fec is not None):
            return False
        self.fec = UlpfecEncoder() if on else None
        self.sender.fec_on = on
        return True

    def last_sent(self) -> RtpPacket | None:
        """The last packet given to the leg's send path (sent, or waiting in the subscriber's
        pacer): what a change of source continues from (``Subscription.restart_from_leg``).
        Not read back from the retransmission history: a packet still queued is not there
        yet, and the new source's timestamps must follow the newest the subscriber may see
        (aiortc's receiver takes time going back for a wrap)."""
        return self.last_out


class Subscription:
    """Forwards one Publication on one Leg. Its owner (the subscriber) attaches it to the
    publication and detaches it when it closes it."""

    def __init__(self, publication: Publication, subscriber_id: str, leg: Leg, *,
                 max_backlog_bytes: int = 512 * 1024, pacer: Pacer | None = None) -> None:
        """``pacer``: the subscriber's (relay/pacer.py); None: every packet goes out at once."""
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
        self._pacer = pacer
        self._audio = publication.kind == "audio"
        self._seq_offset = 0
        self._ts_offset = self._base_ts_offset = random.randrange(TS_MOD)
        self._start_seq: int | None = None
        self.layers = LayerFilter() if publication.mime_type.lower() == "video/vp8" else None
        """Temporal-layer selection (VP8 only; every layer until ``set_max_layer``)."""
        self.closed = False
        self.source: Source = publication
        """Where its packets come from now: the publication, or its thin rendition."""
        self.handover: Handover | None = None
        """A change of source waiting for the new source's keyframe."""
        self.budget_bps: float | None = None
        """The video bitrate this subscription may take on the subscriber's link now: the
        link's estimate less the audio, shared by the video subscriptions (set by the
        Subscriber from its pacer's estimate; relay/pacer.py). None: unknown, no limit. The
        thin rendition is sized to the lowest of its subscribers' (relay/rendition.py)."""
        self._continue: RtpPacket | None = None
        """The last packet the leg sent before a change of source (``restart_from_leg``)."""
        leg.subscription = self

    @property
    def thin(self) -> bool:
        """The subscriber gets (or is moving to) the publication's thin rendition."""
        return self.publication.is_thin(self)

    def move_to(self, source: Source, done: Callable[[], None]) -> None:
        """Take the packets of ``source`` from its next keyframe on (``done`` once moved); a
        move still waiting is given up first."""
        if self.handover is not None:
            self.handover.cancel()
            self.handover = None
        if self.source is not source and not self.closed:
            self.handover = Handover(self, self.source, source, done)

    def restart_from_leg(self) -> None:
        """Start again at the next keyframe, the timestamps and picture ids continuing from
        the last packet sent on the leg (a change of source: the sequence numbers continue by
        themselves)."""
        self.waiting_keyframe = True
        self._continue = self.leg.last_sent()

    @property
    def max_layer(self) -> int | None:
        """The highest temporal layer this subscriber takes of the publication; None: all."""
        layers = self.layers
        return None if layers is None or layers.target >= ALL_LAYERS else layers.target

    def set_max_layer(self, layer: int | None) -> None:
        """Take the temporal layers up to ``layer`` (0: the base layer only) from the next
        frame down, or from the next sync point up; None: every layer. Nothing changes for a
        publisher that sends no layers, nor for a codec other than VP8."""
        if self.layers is not None:
            self.layers.target = ALL_LAYERS if layer is None else max(0, min(layer, ALL_LAYERS))
            if self.publication.kind == "video":
                # Below layer 0 (THIN, -1): the publication's thin rendition.
                self.publication.want_thin(self, layer is not None and layer < 0)

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

    def restart_after_drop(self, first_seq: int | None) -> None:
        """The subscriber's pacer gave up this subscription's queued packets from
        ``first_seq`` on, never sent: the leg's sequence numbers go back there (the subscriber
        sees no gap) and the subscription starts again at a keyframe."""
        if first_seq is not None and self.leg.subscription is self:
            self.leg.next_seq = first_seq
        if self.leg.fec is not None:
            self.leg.fec.reset()
        self.skipped += 1
        self._restart()

    def _restart(self) -> None:
        """Wait for the next keyframe, and ask for one."""
        self.waiting_keyframe = True
        self.source.request_keyframe()

    async def forward(self, packet: RtpPacket, keyframe: bool, ntp: int,
                      descriptor: Vp8Descriptor | None = None) -> None:
        """Send one packet of the publication on this leg. ``ntp`` is the arrival time (NTP
        format), ``descriptor`` the VP8 payload descriptor (VP8 only), both computed once per
        packet for every subscription."""
        if self.closed or self.paused or not self.ready:
            return
        leg = self.leg
        in_seq = packet.sequence_number
        if self.waiting_keyframe:
            if not keyframe:
                self.skipped += 1
                self.source.request_keyframe()
                return
            self.waiting_keyframe = False
            if leg.fec is not None:
                leg.fec.reset()
            self._seq_offset = (leg.next_seq - in_seq) % SEQ_MOD
            self._start_seq = in_seq
            if self.layers is not None:
                self.layers.restart(in_seq, leg.next_seq)
            if self._continue is not None:
                self._continue_from(packet.timestamp, descriptor)
        elif self._start_seq is not None and seq_newer(self._start_seq, in_seq):
            return  # a retransmission from before this subscription (re)started
        if (self._max_backlog and not self.forwarded % BACKLOG_CHECK_EVERY
                and hooks.backlog_exceeded(leg.transceiver.sender, self._max_backlog)):
            # The subscriber's path cannot take more: skip to the next keyframe rather than
            # queue without bound or slow the others. Audio first: its limit is higher.
            self.skipped += 1
            self._restart()
            return
        layers = self.layers
        if layers is None:
            out_seq = (in_seq + self._seq_offset) % SEQ_MOD
            payload = packet.payload
            timestamp = packet.timestamp
            marker = packet.marker
        else:
            taken = layers.take(in_seq, packet.timestamp, packet.payload, descriptor, keyframe)
            if taken is None:
                return
            out_seq, payload, timestamp = taken
            marker = packet.marker if payload else 0  # padding in a hole ends no frame
        out = RtpPacket(
            payload_type=leg.payload_type or packet.payload_type,
            marker=marker,
            sequence_number=out_seq,
            timestamp=(timestamp + self._ts_offset) % TS_MOD,
            ssrc=leg.sender.ssrc,
            payload=payload,
        )
        out.extensions.mid = leg.mid
        out.extensions.abs_send_time = (ntp >> 14) & 0x00FFFFFF
        out.extensions.audio_level = packet.extensions.audio_level
        if in_order := seq_newer(out_seq, (leg.next_seq - 1) % SEQ_MOD):
            leg.last_out = out
        if in_order:
            # Taken before the send: the pacer may give this very packet up (and take the
            # sequence numbers back to it) before ``send`` returns.
            leg.next_seq = (out_seq + 1) % SEQ_MOD
        fec = leg.fec
        parity = (fec.add(out_seq, leg.sender.serialize(out), bool(marker))
                  if fec is not None and in_order else None)
        if not await self._send(out, ntp, in_order):
            return
        self.forwarded += 1
        self.forwarded_bytes += len(payload)
        if parity is not None and leg.next_seq == (out_seq + 1) % SEQ_MOD:
            await self._send_fec(out, parity, ntp)

    async def _send(self, out: RtpPacket, ntp: int, in_order: bool, *,
                    spare: bool = False) -> bool:
        """``out`` to the leg: through the subscriber's pacer, or at once; False if the
        transport refused it (not yet, or no longer, connected: the subscription starts again
        at a keyframe once it is)."""
        leg = self.leg
        try:
            if self._pacer is None or not in_order:
                # A late packet goes into its place at once (rare: a publisher's packet
                # recovered upstream); the pacer queues only in order (relay/pacer.py).
                await leg.sender.send(out, ntp)
            else:
                await self._pacer.send(leg.sender, out, ntp, audio=self._audio,
                                       subscription=self, spare=spare)
        except ConnectionError:
            if in_order and leg.next_seq == (out.sequence_number + 1) % SEQ_MOD:
                leg.next_seq = out.sequence_number  # never sent: no gap
            self.waiting_keyframe = True
            return False
        return True

    async def _send_fec(self, after: RtpPacket, parity: bytes, ntp: int) -> None:
        """The FEC packet of the group that ``after`` closed, in the next sequence number:
        the publisher's packets that follow move one place on."""
        leg = self.leg
        red_pt, ulpfec_pt = leg.sender.red_pt, leg.ulpfec_pt
        if red_pt is None or ulpfec_pt is None:
            return
        seq = leg.next_seq
        leg.next_seq = (seq + 1) % SEQ_MOD
        if self.layers is not None:
            self.layers.seq_offset = (self.layers.seq_offset + 1) % SEQ_MOD
        else:
            self._seq_offset = (self._seq_offset + 1) % SEQ_MOD
        packet = RtpPacket(payload_type=red_pt, sequence_number=seq, timestamp=after.timestamp,
                           ssrc=after.ssrc, payload=bytes((ulpfec_pt,)) + parity)
        packet.extensions.mid = after.extensions.mid
        packet.extensions.abs_send_time = after.extensions.abs_send_time
        await self._send(packet, ntp, True, spare=True)

    def _continue_from(self, timestamp: int, descriptor: Vp8Descriptor | None) -> None:
        """After a change of source, at its first keyframe (``timestamp``): the timestamps go
        on from the last one sent (the rendition's frames come a few tens of milliseconds
        after the original's: a receiver must never see time go back, aiortc's takes it for a
        wrap), in the publisher's timeline again as soon as that is ahead; the new source's
        picture ids are shifted to follow the last one the subscriber had."""
        last, self._continue = self._continue, None
        assert last is not None
        if ts_delta((timestamp + self._base_ts_offset) % TS_MOD, last.timestamp) > 0:
            self._ts_offset = self._base_ts_offset
        else:
            self._ts_offset = (last.timestamp + SWITCH_TS_STEP - timestamp) % TS_MOD
        before = vp8_descriptor(last.payload) if self.layers is not None else None
        if (before is not None and before.picture_id >= 0 and self.layers is not None
                and descriptor is not None and descriptor.picture_id >= 0):
            self.layers.picture_offset = descriptor.picture_id - (before.picture_id + 1)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.handover is not None:
            self.handover.cancel()
            self.handover = None
        self.source.detach(self)
        self.publication.drop_thin(self)
        if self.leg.subscription is self:
            self.leg.subscription = None
