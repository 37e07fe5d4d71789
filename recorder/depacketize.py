"""RTP packets of one publication -> whole encoded frames, in order, never decoded.

Packets come as the relay received them: mostly in order, retransmissions late. A short reorder
window puts them back in sequence; a gap that outlives it is given up, the frame it broke is
dropped and (video) everything up to the next keyframe too, so the archive never holds a frame
whose reference is missing. The payload formats are aiortc's (its public depayload functions):
VP8 (RFC 7741) and H.264 (RFC 6184: single NAL, STAP-A, FU-A, to Annex-B); Opus is one frame per
packet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiortc.codecs.h264 import h264_depayload
from aiortc.codecs.vpx import vp8_depayload

_SEQ_MOD = 1 << 16


@dataclass(frozen=True, slots=True)
class Frame:
    data: bytes
    timestamp: int
    """RTP timestamp."""
    keyframe: bool
    arrival: float
    """Wall-clock arrival of the frame's last packet."""


def codec_of(mime_type: str) -> str:
    """``video/VP8`` -> ``vp8``."""
    return mime_type.split("/", 1)[-1].lower()


def h264_is_keyframe(annex_b: bytes) -> bool:
    """An IDR slice (NAL type 5) is in the access unit."""
    position = annex_b.find(b"\x00\x00\x01")
    while position != -1 and position + 3 < len(annex_b):
        if annex_b[position + 3] & 0x1F == 5:
            return True
        position = annex_b.find(b"\x00\x00\x01", position + 3)
    return False


def vp8_is_keyframe(frame: bytes) -> bool:
    return bool(frame) and not frame[0] & 0x01


class Depacketizer:
    def __init__(self, kind: str, codec: str, *, reorder_s: float = 0.2,
                 max_pending: int = 512) -> None:
        if codec not in ("vp8", "h264", "opus"):
            raise ValueError(f"cannot record codec {codec!r}")
        self.kind = kind
        self.codec = codec
        self._reorder_s = reorder_s
        self._max_pending = max_pending
        self._depayload: Callable[[bytes], bytes] | None = (
            vp8_depayload if codec == "vp8" else h264_depayload if codec == "h264" else None)
        self._highest: int | None = None
        self._next: int | None = None
        self._pending: dict[int, tuple[int, bool, bytes, float]] = {}
        self._parts: list[bytes] = []
        self._frame_ts: int | None = None
        self._frame_broken = False
        self.waiting_keyframe = kind == "video"
        """Video starts at a keyframe, and starts over at one after a loss."""
        self.lost_packets = 0
        self.dropped_frames = 0
        self.malformed = 0

    def _extend(self, seq: int) -> int:
        if self._highest is None:
            self._highest = seq
            return seq
        ext = (self._highest & ~0xFFFF) | seq
        if ext - self._highest > 0x8000:
            ext -= _SEQ_MOD
        elif self._highest - ext > 0x8000:
            ext += _SEQ_MOD
        if ext > self._highest:
            self._highest = ext
        return ext

    def push(self, seq: int, timestamp: int, marker: bool, payload: bytes,
             arrival: float) -> list[Frame]:
        """One packet in; the frames it completes out (usually none or one)."""
        ext = self._extend(seq)
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
            if self.codec == "vp8" and payload and not self._vp8_starts(payload):
                self._frame_broken = True  # its first packets were lost
        try:
            self._parts.append(self._depayload(payload))
        except (ValueError, IndexError):
            self.malformed += 1
            self._frame_broken = True
        if marker:
            self._finish(arrival, out)

    @staticmethod
    def _vp8_starts(payload: bytes) -> bool:
        """S bit set and partition 0 (RFC 7741 4.2)."""
        return bool(payload[0] & 0x10) and payload[0] & 0x07 == 0

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
        keyframe = vp8_is_keyframe(data) if self.codec == "vp8" else h264_is_keyframe(data)
        if self.waiting_keyframe and not keyframe:
            self.dropped_frames += 1
            return
        self.waiting_keyframe = False
        out.append(Frame(data, timestamp, keyframe, arrival))
