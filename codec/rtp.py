"""Codec and RTP facts read from encoded media without decoding it, written once for the relay,
the recorder and the benchmarks (as Galene's ``codecs/`` package does).

- RTP packets: where the payload starts.
- VP8 (RFC 7741 payload descriptor, RFC 6386 frame header): descriptor fields (picture id,
  TL0PICIDX, temporal layer, layer sync) and the picture id rewritten, descriptor length,
  first packet of a frame, first packet of a keyframe, keyframe dimensions.
- H.264 (RFC 6184 payloads, Annex-B access units): keyframe start, IDR in an access unit.
- Sequence-number arithmetic modulo 2^16 and RTP timestamp unwrapping modulo 2^32.

Nothing here imports aiortc or PyAV."""

from __future__ import annotations

SEQ_MOD = 1 << 16
"""RTP sequence numbers count modulo this."""
TS_MOD = 1 << 32
"""RTP timestamps count modulo this."""
_SEQ_HALF = SEQ_MOD // 2
_TS_HALF = TS_MOD // 2

_VP8_START_CODE = b"\x9d\x01\x2a"
_H264_IDR = 5
_H264_SPS = 7
_H264_STAP_A = 24
_H264_FU_A = 28


# -- RTP -------------------------------------------------------------------------------------
def rtp_payload_offset(data: bytes) -> int:
    """Where the payload of the serialized RTP packet ``data`` starts (after CSRCs and the
    header extension)."""
    offset = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10 and len(data) >= offset + 4:
        offset += 4 + 4 * int.from_bytes(data[offset + 2:offset + 4], "big")
    return offset


# -- sequence numbers and timestamps ----------------------------------------------------------
def seq_newer(a: int, b: int) -> bool:
    """True if sequence number ``a`` comes after ``b`` (modulo 2^16)."""
    return a != b and ((a - b) % SEQ_MOD) < _SEQ_HALF


def seq_add(seq: int, delta: int) -> int:
    """``seq + delta`` modulo 2^16 (``delta`` may be negative)."""
    return (seq + delta) % SEQ_MOD


def ts_delta(timestamp: int, previous: int) -> int:
    """Signed distance from ``previous`` to ``timestamp`` modulo 2^32, in [-2^31, 2^31)."""
    delta = (timestamp - previous) % TS_MOD
    return delta - TS_MOD if delta >= _TS_HALF else delta


class SequenceUnwrapper:
    """16-bit sequence numbers -> an unbounded extended counter, the closest value to the
    highest one seen (a late retransmission lands before it, a wrap after it)."""

    __slots__ = ("highest",)

    def __init__(self) -> None:
        self.highest: int | None = None

    def extend(self, seq: int) -> int:
        highest = self.highest
        if highest is None:
            self.highest = seq
            return seq
        ext = (highest & ~0xFFFF) | seq
        if ext - highest > _SEQ_HALF:
            ext -= SEQ_MOD
        elif highest - ext > _SEQ_HALF:
            ext += SEQ_MOD
        if ext > highest:
            self.highest = ext
        return ext


class TimestampUnwrapper:
    """32-bit RTP timestamps -> an unbounded counter that follows each step's signed distance
    (a wrap moves forward, a slightly older timestamp steps back)."""

    __slots__ = ("_last", "value")

    def __init__(self) -> None:
        self.value: int | None = None
        self._last = 0

    def extend(self, timestamp: int) -> int:
        if self.value is None:
            self.value = timestamp
        else:
            self.value += ts_delta(timestamp, self._last)
        self._last = timestamp
        return self.value


# -- VP8 -------------------------------------------------------------------------------------
def vp8_descriptor_length(payload: bytes) -> int:
    """Length of the VP8 payload descriptor (RFC 7741 section 4.2) at the start of ``payload``;
    0 if it is truncated."""
    if not payload:
        return 0
    pos = 1
    if payload[0] & 0x80:  # X: extended control bits
        if len(payload) < 2:
            return 0
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if len(payload) <= pos:
                return 0
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX
            pos += 1
    return pos if pos <= len(payload) else 0


def vp8_picture_id(payload: bytes, offset: int = 0) -> int:
    """The payload descriptor's picture id (RFC 7741) of the VP8 payload at ``offset``; -1 if
    it carries none."""
    if len(payload) < offset + 3 or not payload[offset] & 0x80 or not payload[offset + 1] & 0x80:
        return -1
    first = payload[offset + 2]
    if first & 0x80:
        if len(payload) < offset + 4:
            return -1
        return ((first & 0x7F) << 8) | payload[offset + 3]
    return first


def vp8_frame_start(payload: bytes) -> bool:
    """S=1 and partition id 0: the packet starts a frame."""
    return bool(payload) and bool(payload[0] & 0x10) and not payload[0] & 0x0F


def vp8_frame_is_keyframe(frame: bytes) -> bool:
    """A depayloaded VP8 frame is a keyframe (RFC 6386 9.1: P bit clear)."""
    return bool(frame) and not frame[0] & 0x01


def vp8_frame_size(frame: bytes) -> tuple[int, int] | None:
    """Width and height of a depayloaded VP8 keyframe (RFC 6386 9.1: after the start code);
    None if it is not a keyframe or is truncated."""
    if len(frame) < 10 or frame[0] & 0x01 or frame[3:6] != _VP8_START_CODE:
        return None
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    return (width, height) if width and height else None


def vp8_is_keyframe_start(payload: bytes) -> bool:
    """True if the RTP payload starts partition 0 of a VP8 keyframe (S=1, PID=0, P=0)."""
    if not vp8_frame_start(payload):
        return False
    pos = vp8_descriptor_length(payload)
    return 0 < pos < len(payload) and vp8_frame_is_keyframe(payload[pos:pos + 1])


def vp8_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """Width and height from the RTP payload that starts a VP8 keyframe."""
    if not vp8_is_keyframe_start(payload):
        return None
    return vp8_frame_size(payload[vp8_descriptor_length(payload):])


# -- H.264 -----------------------------------------------------------------------------------
def h264_is_keyframe_start(payload: bytes) -> bool:
    """True if the RTP payload carries (the start of) an IDR picture or its SPS (RFC 6184)."""
    if not payload:
        return False
    nal_type = payload[0] & 0x1F
    if nal_type in (_H264_IDR, _H264_SPS):
        return True
    if nal_type == _H264_STAP_A:
        pos = 1
        while pos + 2 < len(payload):
            size = int.from_bytes(payload[pos:pos + 2], "big")
            if size == 0 or pos + 2 + size > len(payload):
                return False
            if payload[pos + 2] & 0x1F in (_H264_IDR, _H264_SPS):
                return True
            pos += 2 + size
        return False
    if nal_type == _H264_FU_A and len(payload) > 1:
        return bool(payload[1] & 0x80) and payload[1] & 0x1F in (_H264_IDR, _H264_SPS)
    return False


def h264_access_unit_is_keyframe(annex_b: bytes) -> bool:
    """An IDR slice (NAL type 5) is in the Annex-B access unit."""
    position = annex_b.find(b"\x00\x00\x01")
    while position != -1 and position + 3 < len(annex_b):
        if annex_b[position + 3] & 0x1F == _H264_IDR:
            return True
        position = annex_b.find(b"\x00\x00\x01", position + 3)
    return False


# -- any codec -------------------------------------------------------------------------------
def codec_name(mime_type: str) -> str:
    """``video/VP8`` -> ``vp8``."""
    return mime_type.split("/", 1)[-1].lower()


def is_keyframe_start(mime_type: str, payload: bytes) -> bool:
    """Whether a receiver may start decoding at this RTP payload. Audio: always."""
    mime = mime_type.lower()
    if mime == "video/vp8":
        return vp8_is_keyframe_start(payload)
    if mime == "video/h264":
        return h264_is_keyframe_start(payload)
    return not mime.startswith("video/")


def frame_is_keyframe(codec: str, frame: bytes) -> bool:
    """A whole depayloaded frame of ``codec`` (``vp8``, ``h264``; audio: always) is a
    keyframe."""
    if codec == "vp8":
        return vp8_frame_is_keyframe(frame)
    if codec == "h264":
        return h264_access_unit_is_keyframe(frame)
    return True


# -- RTP header fields and modular arithmetic (the benchmarks read serialized packets) ------
def rtp_marker(data: bytes) -> bool:
    """The marker bit of the serialized RTP packet ``data`` (RFC 3550 5.1; video: the last
    packet of a frame)."""
    return bool(data[1] & 0x80)


def rtp_timestamp(data: bytes) -> int:
    """The timestamp of the serialized RTP packet ``data``."""
    return int.from_bytes(data[4:8], "big")


def rtp_ssrc(data: bytes) -> int:
    """The SSRC of the serialized RTP packet ``data``."""
    return int.from_bytes(data[8:12], "big")


def seq_distance(newer: int, older: int) -> int:
    """How many sequence numbers ``newer`` lies after ``older`` (modulo 2^16, in [0, 2^16))."""
    return (newer - older) % SEQ_MOD


def ts_add(timestamp: int, delta: int) -> int:
    """``timestamp + delta`` modulo 2^32 (``delta`` may be negative)."""
    return (timestamp + delta) % TS_MOD


# -- VP8 payload descriptor, field by field (temporal layers) ---------------------------------
class Vp8Descriptor:
    """The fields of a VP8 payload descriptor (RFC 7741 section 4.2) a layer-selecting
    forwarder reads: which frame a packet belongs to, its temporal layer, and whether a
    receiver may switch up to that layer here. Absent fields are -1 (``tid``: no T bit, the
    publisher sends no temporal layers)."""

    __slots__ = ("keyidx", "length", "picture_id", "picture_id_at", "picture_id_bits",
                 "start", "sync", "tid", "tl0picidx")

    def __init__(self, start: bool, picture_id: int = -1, picture_id_bits: int = 0,
                 picture_id_at: int = 0, tl0picidx: int = -1, tid: int = -1,
                 sync: bool = False, keyidx: int = -1, length: int = 1) -> None:
        self.start = start
        """S=1 and partition id 0: the first packet of a frame."""
        self.picture_id = picture_id
        self.picture_id_bits = picture_id_bits
        """7 or 15 (the M bit), 0 without a picture id."""
        self.picture_id_at = picture_id_at
        """Where the picture id's first byte is in the payload."""
        self.tl0picidx = tl0picidx
        self.tid = tid
        self.sync = sync
        """Y: this frame depends only on the base layer (TL0) frames: a receiver that had
        only the lower layers may start taking ``tid`` here."""
        self.keyidx = keyidx
        self.length = length

    def __repr__(self) -> str:
        return (f"Vp8Descriptor(start={self.start}, picture_id={self.picture_id}/"
                f"{self.picture_id_bits}, tl0picidx={self.tl0picidx}, tid={self.tid}, "
                f"sync={self.sync}, keyidx={self.keyidx}, length={self.length})")


def vp8_descriptor(payload: bytes) -> Vp8Descriptor | None:
    """Parse the VP8 payload descriptor at the start of an RTP payload; None if the payload
    is empty (padding) or the descriptor is truncated. Reads only the descriptor's bytes."""
    size = len(payload)
    if not size:
        return None
    first = payload[0]
    start = bool(first & 0x10) and not first & 0x0F
    if not first & 0x80:  # X clear: no extension, no layers
        return Vp8Descriptor(start)
    if size < 2:
        return None
    ext = payload[1]
    pos = 2
    picture_id = -1
    bits = 0
    picture_id_at = 0
    if ext & 0x80:  # I
        if size <= pos:
            return None
        picture_id_at = pos
        if payload[pos] & 0x80:  # M: 15 bits
            if size <= pos + 1:
                return None
            picture_id = ((payload[pos] & 0x7F) << 8) | payload[pos + 1]
            bits = 15
            pos += 2
        else:
            picture_id = payload[pos]
            bits = 7
            pos += 1
    tl0picidx = -1
    if ext & 0x40:  # L
        if size <= pos:
            return None
        tl0picidx = payload[pos]
        pos += 1
    tid = -1
    sync = False
    keyidx = -1
    if ext & 0x30:  # T or K: one byte TID(2) Y(1) KEYIDX(5)
        if size <= pos:
            return None
        byte = payload[pos]
        if ext & 0x20:
            tid = byte >> 6
            sync = bool(byte & 0x20)
        if ext & 0x10:
            keyidx = byte & 0x1F
        pos += 1
    # Positional: this runs once per packet of every VP8 publication.
    return Vp8Descriptor(start, picture_id, bits, picture_id_at, tl0picidx, tid, sync, keyidx,
                         pos)


def vp8_with_picture_id(payload: bytes, descriptor: Vp8Descriptor, picture_id: int) -> bytes:
    """``payload`` with its descriptor's picture id replaced by ``picture_id`` (taken modulo
    the field's width, which stays as the publisher chose it: the descriptor keeps its length
    and nothing after it moves). Everything else is copied unchanged."""
    at = descriptor.picture_id_at
    if descriptor.picture_id_bits == 15:
        value = picture_id & 0x7FFF
        return b"".join((payload[:at], bytes((0x80 | value >> 8, value & 0xFF)),
                         payload[at + 2:]))
    if descriptor.picture_id_bits == 7:
        return b"".join((payload[:at], bytes((picture_id & 0x7F,)), payload[at + 1:]))
    return payload

