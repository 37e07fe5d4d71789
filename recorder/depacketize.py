"""RTP packets of one publication -> whole encoded frames, in order, never decoded.

Packets come as the relay received them: mostly in order, retransmissions late. A short reorder
window puts them back in sequence; a gap that outlives it is given up, the frame it broke is
dropped and (video) everything up to the next keyframe too, so the archive never holds a frame
whose reference is missing. The payload formats are aiortc's (its depayload functions, through
``relay.hooks.depayloader``): VP8 (RFC 7741) and H.264 (RFC 6184: single NAL, STAP-A, FU-A, to
Annex-B); Opus is one frame per packet. Keyframes and sequence numbers: :mod:`codec.rtp`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from codec.rtp import SequenceUnwrapper, frame_is_keyframe, vp8_frame_start
from relay.hooks import depayloader


@dataclass(frozen=True, slots=True)
class Frame:
    data: bytes
    timestamp: int
    """RTP timestamp."""
    keyframe: bool
    arrival: float
    """Wall-clock arrival of the frame's last packet."""


class Depacketizer:
    def __init__(self, kind: str, codec: str, *, reorder_s: float = 0.2,
                 max_pending: int = 512) -> None:
        if codec not in ("vp8", "h264", "opus"):
            raise ValueError(f"cannot record codec {codec!r}")
        self.kind = kind
        self.codec = codec
        self._reorder_s = reorder_s
        self._max_pending = max_pending
        self._depayload: Callable[[bytes], bytes] | None = depayloader(codec)
        self._sequence = SequenceUnwrapper()
        self._next: int | None = None
        self._pending: dict[int, tuple[int, bool, bytes, float]] = {}
        self._parts: list[bytes] = []
        self._frame_ts: int | None = None
        self._frame_broken = False
        self.waiting_keyframe = kind == "video"
        """Video starts at a keyframe, and starts over at one after a loss."""
        self.lost_packets = 0
        self.dropped_frames = 0

    def push(self, seq: int, timestamp: int, marker: bool, payload: bytes,
             arrival: float) -> list[Frame]:
        """One packet in; the frames it completes out (usually none or one)."""
        ext = self._sequence.extend(seq)
        if self._next is None:
            self._next = ext
        if ext < self._next or ext in self._pending:
            return []  # a duplicate, or a retransmission that came after we gave up on it
        out: list[Frame] = []
        if ext == self._next and not self._pending:
            self._next += 1
            self._packet(timestamp, marker, payload, arrival, out)
            return out
        self._pending[ext] = (timestamp, marker, payload, arrival)
        self._drain(out)
        if self._pending:
            oldest = min(p[3] for p in self._pending.values())
            if arrival - oldest > self._reorder_s or len(self._pending) > self._max_pending:
                first = min(self._pending)
                self.lost_packets += first - self._next
                self._next = first
                self._gap()
                self._drain(out)
        return out

    def _drain(self, out: list[Frame]) -> None:
        while self._next in self._pending:
            timestamp, marker, payload, arrival = self._pending.pop(self._next)
            self._next += 1
            self._packet(timestamp, marker, payload, arrival, out)

    def _gap(self) -> None:
        """Packets were lost: the frame under assembly (or, between frames, the next one) is
        broken, and video starts again at a keyframe."""
        if self.kind == "video":
            self._frame_broken = True
            self.waiting_keyframe = True

    def _packet(self, timestamp: int, marker: bool, payload: bytes, arrival: float,
                out: list[Frame]) -> None:
        if self._depayload is None:  # audio: a packet is a frame
            if payload:
                out.append(Frame(payload, timestamp, True, arrival))
            return
        if self._frame_ts is not None and timestamp != self._frame_ts:
            # The previous frame ended without its marker packet.
            self._finish(arrival, out)
        if self._frame_ts is None:
            self._frame_ts = timestamp
            if self.codec == "vp8" and payload and not vp8_frame_start(payload):
                self._frame_broken = True  # its first packets were lost
        try:
            self._parts.append(self._depayload(payload))
        except (ValueError, IndexError):
            self._frame_broken = True  # malformed
        if marker:
            self._finish(arrival, out)

    def _finish(self, arrival: float, out: list[Frame]) -> None:
        data = b"".join(self._parts)
        timestamp = self._frame_ts
        broken = self._frame_broken
        self._parts = []
        self._frame_ts = None
        self._frame_broken = False
        if timestamp is None or not data:
            return
        if broken:
            self.dropped_frames += 1
            self.waiting_keyframe = True
            return
        keyframe = frame_is_keyframe(self.codec, data)
        if self.waiting_keyframe and not keyframe:
            self.dropped_frames += 1
            return
        self.waiting_keyframe = False
        out.append(Frame(data, timestamp, keyframe, arrival))
