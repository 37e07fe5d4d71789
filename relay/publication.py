"""Publication: one media track a participant sends into a room (microphone, camera, screen).

Its packets come from the receiver tap (never decoded) and go to every Subscription. Keyframe
requests from subscribers reach the publisher as one PLI per ``keyframe_interval_s`` at most."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiortc import RTCRtpReceiver
from aiortc.rtp import RtpPacket

from relay import hooks
from relay.api import MediaSink
from relay.keyframes import is_keyframe_start, vp8_keyframe_size
from relay.timing import ntp_now

if TYPE_CHECKING:
    from relay.subscription import Subscription

logger = logging.getLogger(__name__)

SOURCES = {"microphone": "audio", "camera": "video", "screen": "video"}


class Publication:
    def __init__(self, *, publication_id: str, room_id: str, participant_id: str, source: str,
                 kind: str, mime_type: str, clock_rate: int, receiver: RTCRtpReceiver,
                 keyframe_interval_s: float = 0.3) -> None:
        self.id = publication_id
        self.room_id = room_id
        self.participant_id = participant_id
        self.source = source
        self.kind = kind
        self.mime_type = mime_type
        self.clock_rate = clock_rate
        self.receiver = receiver
        self.subscriptions: set[Subscription] = set()
        self.sinks: tuple[MediaSink, ...] = ()
        """Receivers of every packet as it arrives (the recorder)."""
        self.media_ssrc: int | None = None
        self.size: tuple[int, int] | None = None
        self.packets = 0
        self.keyframes = 0
        self.plis_sent = 0
        self.closed = False
        self._keyframe_interval_s = keyframe_interval_s
        self._last_pli = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        hooks.tap_receiver(receiver, self._on_packet)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "participant_id": self.participant_id,
            "source": self.source,
            "kind": self.kind,
            "codec": self.mime_type,
        }

    def sink_info(self) -> dict[str, Any]:
        return {**self.to_wire(), "clock_rate": self.clock_rate}

    async def _on_packet(self, packet: RtpPacket, arrival_ms: int) -> None:
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
        keyframe = is_keyframe_start(self.mime_type, packet.payload)
        if keyframe and self.kind == "video":
            self.keyframes += 1
            if self.mime_type.lower() == "video/vp8":
                self.size = vp8_keyframe_size(packet.payload) or self.size
        ntp = ntp_now()
        for subscription in tuple(self.subscriptions):
            await subscription.forward(packet, keyframe, ntp)

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe, at most once per ``keyframe_interval_s``."""
        if self.kind != "video" or self.closed or self.media_ssrc is None:
            return
        now = time.monotonic()
        if now - self._last_pli < self._keyframe_interval_s:
            return
        self._last_pli = now
        self.plis_sent += 1
        task = asyncio.get_running_loop().create_task(
            hooks.send_pli(self.receiver, self.media_ssrc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> list[Subscription]:
        """End the publication; returns the subscriptions that must be taken down."""
        if self.closed:
            return []
        self.closed = True
        ended = list(self.subscriptions)
        self.subscriptions.clear()
        sinks, self.sinks = self.sinks, ()
        for sink in sinks:
            try:
                sink.publication_removed(self.id)
            except Exception:
                logger.exception("Publication(%s): media sink failed on removal", self.id)
        for task in self._tasks:
            task.cancel()
        logger.info("Publication(%s) %s of %s closed after %d packets", self.id, self.source,
                    self.participant_id, self.packets)
        return ended
