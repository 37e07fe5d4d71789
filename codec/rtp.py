"""Codec and RTP facts read from encoded media without decoding it, written once for the relay,
the recorder and the benchmarks (as Galene's ``codecs/`` package does).

- RTP packets: where the payload starts.
- VP8 (RFC 7741 payload descriptor, RFC 6386 frame header): descriptor length, picture id,
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
