"""Publication: one media track a participant sends into a room (microphone, camera, screen).

Its packets come from the receiver tap (never decoded) and go to every Forwarder attached to it
(the subscriptions) and every media sink (the recorder). Keyframe requests from subscribers
reach the publisher as one PLI per ``keyframe_interval_s`` at most. A publication knows nothing
of who attached its forwarders: their owners attach and detach them."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from aiortc import RTCRtpReceiver
from aiortc.rtp import RtpPacket

from codec.rtp import (
    TS_MOD,
    SequenceUnwrapper,
    is_keyframe_start,
    vp8_descriptor,
    vp8_keyframe_size,
)
from relay import hooks
from relay.api import MediaSink
from relay.forwarding import Forwarder
from relay.pacer import PACKET_OVERHEAD
from relay.rendition import Rendition
from relay.sdp import Codec
from relay.tasks import Tasks
from relay.timing import ntp_now

logger = logging.getLogger(__name__)

SOURCES = {"microphone": "audio", "camera": "video", "screen": "video"}
FRAME_RATE_WINDOW_S = 2.0
"""The input frame rate (per temporal layer) is measured over the last this many seconds."""
LAYER_MARK_S = 0.5
"""The bytes per temporal layer are noted this often, for ``layer_bps``."""


class Publication:
    def __init__(self, *, publication_id: str, room_id: str, participant_id: str, source: str,
                 kind: str, codec: Codec, receiver: RTCRtpReceiver,
                 keyframe_interval_s: float = 0.3) -> None:
        self.id = publication_id
        self.room_id = room_id
        self.participant_id = participant_id
        self.source = source
        self.kind = kind
        self.codec = codec
        self.mime_type = codec.mime_type
        self.receiver = receiver
        self.subscriptions: set[Forwarder] = set()
        self.sinks: tuple[MediaSink, ...] = ()
        """Receivers of every packet as it arrives (the recorder)."""
        self.media_ssrc: int | None = None
        self.size: tuple[int, int] | None = None
        self.packets = 0
        self.sequence = SequenceUnwrapper()
        """Its highest extended sequence number (``sequence.highest``): with ``packets``,
        the loss on the publisher's own link, which no subscriber's link should answer for."""
        self.keyframes = 0
        self.plis_sent = 0
        self.closed = False
        self.temporal_layers = -1
        """The highest VP8 temporal layer id seen (0: the T bit, one layer); -1: none, the
        publisher sends no temporal layers (or the codec is not VP8)."""
        self._vp8 = self.mime_type.lower() == "video/vp8"
        self._frames: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=512)
        """(arrival, temporal layer, RTP timestamp) of the frames' first packets, for
        ``frame_rate``."""
        self._layer_bytes = [0, 0, 0, 0]
        """Bytes received per temporal layer (VP8; 0 without layers), with the link's
        per-packet overhead, for ``layer_bps``."""
        self._byte_marks: collections.deque[tuple[float, tuple[int, ...]]] = collections.deque(
            [(time.monotonic(), (0, 0, 0, 0))], maxlen=int(FRAME_RATE_WINDOW_S / LAYER_MARK_S) + 2)
        self._keyframe_interval_s = keyframe_interval_s
        self._last_pli = 0.0
        self.rendition: Rendition | None = None
        """The thin rendition, while a subscriber wants it (relay/rendition.py)."""
        self.renditions_started = 0
        self._thin: set[Any] = set()
        """The subscriptions that want the thin rendition."""
        self._tasks = Tasks(f"Publication({publication_id})")
        hooks.tap_receiver(receiver, self._on_packet)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "participant_id": self.participant_id,
            "source": self.source,
            "kind": self.kind,
            "codec": self.mime_type,
        }

    # -- who receives it ------------------------------------------------------------------
    def attach(self, forwarder: Forwarder) -> None:
        if not self.closed:
            self.subscriptions.add(forwarder)

    def detach(self, forwarder: Forwarder) -> None:
        self.subscriptions.discard(forwarder)

    def add_sink(self, sink: MediaSink) -> bool:
        """Hand every packet to ``sink`` from now on (it starts at a keyframe, asked for now).
        False if the sink refused the publication."""
        if self.closed or sink in self.sinks:
            return False
        try:
            sink.publication_added({**self.to_wire(), "clock_rate": self.codec.clock_rate})
        except Exception:
            logger.exception("Publication(%s): media sink refused it", self.id)
            return False
        self.sinks = (*self.sinks, sink)
        self.request_keyframe()
        return True

    def remove_sink(self, sink: MediaSink) -> None:
        self.sinks = tuple(s for s in self.sinks if s is not sink)

    # -- media ----------------------------------------------------------------------------
    async def _on_packet(self, packet: RtpPacket, _arrival_ms: int) -> None:
        if self.closed:
            return
        if self.sinks:
            now = time.time()
            for sink in self.sinks:
                try:
                    sink.packet(self.id, packet.sequence_number, packet.timestamp,
                                bool(packet.marker), packet.payload, now)
                except Exception:
                    # A sink's trouble (a full disk under the recorder) never stops the media.
                    logger.exception("Publication(%s): media sink failed; detached", self.id)
                    self.sinks = tuple(s for s in self.sinks if s is not sink)
        self.media_ssrc = packet.ssrc
        self.packets += 1
        self.sequence.extend(packet.sequence_number)
        keyframe = is_keyframe_start(self.mime_type, packet.payload)
        if keyframe and self.kind == "video":
            self.keyframes += 1
            if self.mime_type.lower() == "video/vp8":
                self.size = vp8_keyframe_size(packet.payload) or self.size
        ntp = ntp_now()
        if not self._vp8:
            for subscription in tuple(self.subscriptions):
                await subscription.forward(packet, keyframe, ntp)
            return
        descriptor = vp8_descriptor(packet.payload)
        if descriptor is not None:
            tid = descriptor.tid if descriptor.tid > 0 else 0
            self._layer_bytes[min(tid, 3)] += len(packet.payload) + PACKET_OVERHEAD
            if descriptor.start:
                if descriptor.tid > self.temporal_layers:
                    self.temporal_layers = descriptor.tid
                now = time.monotonic()
                self._frames.append((now, tid, packet.timestamp))
                if now - self._byte_marks[-1][0] >= LAYER_MARK_S:
                    self._byte_marks.append((now, tuple(self._layer_bytes)))
        for subscription in tuple(self.subscriptions):
            await subscription.forward(packet, keyframe, ntp, descriptor)

    def frame_rate(self, max_layer: int | None = None, now: float | None = None) -> float | None:
        """Frames per second the publisher sends in the temporal layers up to ``max_layer``
        (None: all), over the frames that arrived in the last ``FRAME_RATE_WINDOW_S`` (VP8
        only). Timed by their RTP timestamps, not their arrival: frames that arrive in a burst
        (after a stall, at the start) do not look faster. None until there is a measure."""
        frames = self._frames
        now = time.monotonic() if now is None else now
        since = now - FRAME_RATE_WINDOW_S
        top = 3 if max_layer is None else max_layer
        total = counted = 0
        newest = oldest = None
        for arrival, tid, timestamp in reversed(frames):
            if arrival < since:
                break
            if newest is None:
                newest = timestamp
            oldest = timestamp
            total += 1
            if tid <= top:
                counted += 1
        if total < 3 or newest is None or oldest is None:
            return None if len(frames) < 3 else 0.0  # nothing lately: none sent
        span = ((newest - oldest) % TS_MOD) / self.codec.clock_rate
        if span <= 0:
            return None
        return round((total - 1) / span * counted / total, 1)

    def layer_bps(self, max_layer: int | None = None, now: float | None = None) -> float | None:
        """The rate (bits per second, on the link) of the temporal layers up to ``max_layer``
        (None: all) over about the last ``FRAME_RATE_WINDOW_S`` (VP8 only): what a subscriber
        at that layer needs. None until measured."""
        now = time.monotonic() if now is None else now
        top = 3 if max_layer is None else max(0, min(max_layer, 3))
        for at, counts in self._byte_marks:
            if now - at <= FRAME_RATE_WINDOW_S + LAYER_MARK_S and now - at >= LAYER_MARK_S:
                sent = sum(self._layer_bytes[:top + 1]) - sum(counts[:top + 1])
                return sent * 8 / (now - at)
        return None

    # -- the thin rendition ----------------------------------------------------------------
    def is_thin(self, subscription: Any) -> bool:
        return subscription in self._thin

    def want_thin(self, subscription: Any, thin: bool) -> None:
        """Move ``subscription`` (a relay.subscription.Subscription) to the thin rendition,
        started for the first such subscriber, or back to the publication itself; each move
        at the new source's next keyframe. VP8 video only."""
        if thin == (subscription in self._thin) or self.closed:
            return
        if thin:
            if not self._vp8 or self.kind != "video":
                return
            self._thin.add(subscription)
            if self.rendition is None:
                self.rendition = Rendition(self, budgets=self.thin_budgets)
                self.renditions_started += 1
                self.attach(self.rendition)
            subscription.move_to(self.rendition, self._rendition_check)
        else:
            self._thin.discard(subscription)
            subscription.move_to(self, self._rendition_check)
            self._rendition_check()

    def thin_budgets(self) -> list[float | None]:
        """The video budgets of the subscriptions that want the thin rendition (bits per
        second; None: unknown), which size it: it runs at the best rung the weakest of them
        carries (relay/rendition.py, ``choose_rung``). One moving back to the publication
        no longer counts, though it takes the rendition until the publisher's keyframe; nor
        does one paused (audio only): it receives none of it, and its budget is no longer
        kept up to date."""
        return [subscription.budget_bps for subscription in self._thin
                if not subscription.paused]

    def drop_thin(self, subscription: Any) -> None:
        """A subscription closed: it no longer counts for the rendition."""
        self._thin.discard(subscription)
        self._rendition_check()

    def _rendition_check(self) -> None:
        """Stop the rendition once no subscription wants it or still takes it (one moving
        back takes it until the publisher's keyframe)."""
        rendition = self.rendition
        if rendition is None or self._thin:
            return
        if any(forwarder is not rendition and getattr(forwarder, "source", None) is rendition
               for forwarder in (*self.subscriptions, *rendition.subscriptions)):
            return
        self.rendition = None
        self.detach(rendition)
        rendition.stop()  # now: a task could be cancelled before it ran (the publication closing)
        self._tasks.spawn(rendition.close())

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe, at most once per ``keyframe_interval_s``."""
        if self.kind != "video" or self.closed or self.media_ssrc is None:
            return
        now = time.monotonic()
        if now - self._last_pli < self._keyframe_interval_s:
            return
        self._last_pli = now
        self.plis_sent += 1
        self._tasks.spawn(hooks.send_pli(self.receiver, self.media_ssrc))

    def close(self) -> None:
        """End the publication: nothing is forwarded any more, its sinks are told. Those who
        attached forwarders learn it from the publication's owner."""
        if self.closed:
            return
        self.closed = True
        self.subscriptions.clear()
        self._thin.clear()
        if self.rendition is not None:
            self.rendition.stop()
            self.rendition = None
        sinks, self.sinks = self.sinks, ()
        for sink in sinks:
            try:
                sink.publication_removed(self.id)
            except Exception:
                logger.exception("Publication(%s): media sink failed on removal", self.id)
        self._tasks.cancel()
        logger.info("Publication(%s) %s of %s closed after %d packets", self.id, self.source,
                    self.participant_id, self.packets)
