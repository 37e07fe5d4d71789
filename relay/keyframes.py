"""Codec-specific facts read from an RTP payload without decoding it: does this packet start a
keyframe, and what are a VP8 keyframe's dimensions."""

from __future__ import annotations


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


def vp8_is_keyframe_start(payload: bytes) -> bool:
    """True if the packet starts partition 0 of a VP8 keyframe (S=1, PID=0, P=0)."""
    if not payload or not payload[0] & 0x10 or payload[0] & 0x0F:
        return False
    pos = vp8_descriptor_length(payload)
    return 0 < pos < len(payload) and not payload[pos] & 0x01


def vp8_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """Width and height from the first packet of a VP8 keyframe (RFC 6386 section 9.1)."""
    if not vp8_is_keyframe_start(payload):
        return None
    frame = payload[vp8_descriptor_length(payload):]
    if len(frame) < 10 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    return width, height


_H264_IDR = 5
_H264_SPS = 7
_H264_STAP_A = 24
_H264_FU_A = 28


def h264_is_keyframe_start(payload: bytes) -> bool:
    """True if the packet carries (the start of) an IDR picture or its SPS (RFC 6184)."""
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


def is_keyframe_start(mime_type: str, payload: bytes) -> bool:
    """Whether a subscriber may start decoding at this packet. Audio: always."""
    mime = mime_type.lower()
    if mime == "video/vp8":
        return vp8_is_keyframe_start(payload)
    if mime == "video/h264":
        return h264_is_keyframe_start(payload)
    return not mime.startswith("video/")
