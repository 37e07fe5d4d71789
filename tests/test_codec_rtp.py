"""codec.rtp: the codec and RTP facts the relay, the recorder and the benchmarks share."""

from __future__ import annotations

from codec import rtp

VP8_KEYFRAME = bytes([0x9D, 0x01, 0x2A])


def vp8_keyframe_payload(width: int, height: int, picture_id: int = 0x1234) -> bytes:
    descriptor = bytes([0x90, 0x80, 0x80 | (picture_id >> 8), picture_id & 0xFF])
    frame = bytes([0x10, 0x02, 0x00]) + VP8_KEYFRAME + width.to_bytes(2, "little") + \
        height.to_bytes(2, "little") + b"\x00" * 8
    return descriptor + frame


def test_a_vp8_keyframe_start_gives_its_dimensions_and_picture_id() -> None:
    payload = vp8_keyframe_payload(640, 360)
    assert rtp.vp8_descriptor_length(payload) == 4
    assert rtp.vp8_is_keyframe_start(payload)
    assert rtp.is_keyframe_start("video/VP8", payload)
    assert rtp.vp8_keyframe_size(payload) == (640, 360)
    assert rtp.vp8_picture_id(payload) == 0x1234
    assert rtp.vp8_frame_start(payload)
    assert rtp.frame_is_keyframe("vp8", payload[4:])
    assert rtp.vp8_frame_size(payload[4:]) == (640, 360)


def test_a_vp8_interframe_or_continuation_is_no_keyframe_start() -> None:
    interframe = bytes([0x10]) + bytes([0x01]) + b"\x00" * 12
    continuation = bytes([0x00]) + bytes([0x10]) + b"\x00" * 12
    assert not rtp.vp8_is_keyframe_start(interframe)
    assert not rtp.vp8_is_keyframe_start(continuation)
    assert rtp.vp8_keyframe_size(interframe) is None
    assert not rtp.frame_is_keyframe("vp8", interframe[1:])
    assert rtp.vp8_descriptor_length(b"") == 0
    assert rtp.vp8_descriptor_length(bytes([0x80])) == 0


def test_h264_keyframes_in_single_nal_stap_a_fu_a_and_annex_b() -> None:
    assert rtp.h264_is_keyframe_start(bytes([0x65, 0x88]))  # IDR
    assert rtp.h264_is_keyframe_start(bytes([0x67, 0x42]))  # SPS
    assert not rtp.h264_is_keyframe_start(bytes([0x41, 0x9A]))  # non-IDR slice
    stap_a = bytes([0x18]) + (2).to_bytes(2, "big") + bytes([0x67, 0x42]) + \
        (2).to_bytes(2, "big") + bytes([0x68, 0xCE])
    assert rtp.h264_is_keyframe_start(stap_a)
    assert rtp.h264_is_keyframe_start(bytes([0x7C, 0x85, 0x00]))  # FU-A start of an IDR
    assert not rtp.h264_is_keyframe_start(bytes([0x7C, 0x05, 0x00]))  # FU-A middle
    assert rtp.frame_is_keyframe("h264", b"\x00\x00\x00\x01\x67\x42\x00\x00\x01\x65\x88")
    assert not rtp.frame_is_keyframe("h264", b"\x00\x00\x00\x01\x41\x9a")
    assert rtp.is_keyframe_start("audio/opus", b"\x01")


def test_sequence_numbers_compare_and_unwrap_across_the_wrap() -> None:
    assert rtp.seq_newer(1, 65535)
    assert not rtp.seq_newer(65535, 1)
    assert not rtp.seq_newer(7, 7)
    assert rtp.seq_add(65535, 2) == 1
    assert rtp.seq_add(0, -1) == 65535
    unwrap = rtp.SequenceUnwrapper()
    assert [unwrap.extend(s) for s in (65534, 65535, 0, 65533, 1)] == \
        [65534, 65535, 65536, 65533, 65537]
    assert unwrap.highest == 65537


def test_rtp_timestamps_unwrap_forward_and_step_back() -> None:
    assert rtp.ts_delta(10, rtp.TS_MOD - 10) == 20
    assert rtp.ts_delta(rtp.TS_MOD - 10, 10) == -20
    unwrap = rtp.TimestampUnwrapper()
    assert [unwrap.extend(t) for t in (rtp.TS_MOD - 3000, 0, 3000, 1500)] == \
        [rtp.TS_MOD - 3000, rtp.TS_MOD, rtp.TS_MOD + 3000, rtp.TS_MOD + 1500]


def test_the_payload_offset_skips_csrcs_and_the_header_extension() -> None:
    plain = bytes([0x80, 96]) + b"\x00" * 10 + b"payload"
    assert rtp.rtp_payload_offset(plain) == 12
    extended = bytes([0x91, 96]) + b"\x00" * 10 + b"\x00" * 4 + \
        bytes([0xBE, 0xDE, 0x00, 0x01]) + b"\x00" * 4 + b"payload"
    assert rtp.rtp_payload_offset(extended) == 12 + 4 + 4 + 4
    assert rtp.codec_name("video/VP8") == "vp8"


def test_header_fields_of_a_serialized_packet_and_wrapping_arithmetic() -> None:
    packet = bytes([0x80, 0x80 | 96, 0x12, 0x34]) + (0xDEADBEEF).to_bytes(4, "big") + \
        (0x01020304).to_bytes(4, "big") + b"payload"
    assert rtp.rtp_marker(packet)
    assert not rtp.rtp_marker(bytes([0x80, 96]) + packet[2:])
    assert rtp.rtp_timestamp(packet) == 0xDEADBEEF
    assert rtp.rtp_ssrc(packet) == 0x01020304
    assert rtp.seq_distance(2, 65534) == 4
    assert rtp.seq_distance(7, 7) == 0
    assert rtp.seq_distance(65534, 2) == 65532
    assert rtp.ts_add(rtp.TS_MOD - 10, 30) == 20
    assert rtp.ts_add(5, -10) == rtp.TS_MOD - 5
