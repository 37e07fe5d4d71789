"""RTP packets back into frames, and RTP timestamps onto the file's timeline."""

from __future__ import annotations

from codec.rtp import h264_access_unit_is_keyframe, vp8_frame_size
from recorder.depacketize import Depacketizer, Frame
from recorder.writer import Timeline

KEY = b"\x50\x02\x00\x9d\x01\x2a\x40\x01\xf0\x00"  # VP8 keyframe header, 320x240
DELTA = b"\x31\x02\x00"  # a VP8 interframe's first bytes (P bit set)


def vp8_packets(first_seq: int, timestamp: int, frame: bytes, parts: int = 3
                ) -> list[tuple[int, int, bool, bytes]]:
    """``frame`` split over ``parts`` packets with RFC 7741 descriptors (S bit on the first)."""
    size = -(-len(frame) // parts)
    chunks = [frame[i:i + size] for i in range(0, len(frame), size)]
    return [((first_seq + i) & 0xFFFF, timestamp, i == len(chunks) - 1,
             bytes([0x10 if i == 0 else 0x00]) + chunk) for i, chunk in enumerate(chunks)]


def stream(frames: list[bytes], first_seq: int = 100, ts_step: int = 6000
           ) -> list[tuple[int, int, bool, bytes]]:
    packets: list[tuple[int, int, bool, bytes]] = []
    seq = first_seq
    for n, frame in enumerate(frames):
        made = vp8_packets(seq, (1000 + n * ts_step) & 0xFFFFFFFF, frame)
        packets += made
        seq += len(made)
    return packets


def feed(d: Depacketizer, packets: list[tuple[int, int, bool, bytes]], start: float = 0.0,
         step: float = 0.01) -> list[Frame]:
    out: list[Frame] = []
    for i, (seq, ts, marker, payload) in enumerate(packets):
        out += d.push(seq, ts, marker, payload, start + i * step)
    return out


FRAMES = [KEY + b"k" * 20, DELTA + b"a" * 20, DELTA + b"b" * 20, KEY + b"K" * 20,
          DELTA + b"c" * 20]


def test_frames_come_out_whole_and_in_order_across_a_sequence_wrap() -> None:
    d = Depacketizer("video", "vp8")
    out = feed(d, stream(FRAMES, first_seq=65530))
    assert [f.data for f in out] == FRAMES
    assert [f.keyframe for f in out] == [True, False, False, True, False]


def test_reordered_packets_are_put_back_in_sequence() -> None:
    packets = stream(FRAMES)
    packets[1], packets[2] = packets[2], packets[1]
    packets[7], packets[4] = packets[4], packets[7]
    out = feed(Depacketizer("video", "vp8"), packets)
    assert [f.data for f in out] == FRAMES


def test_a_lost_packet_drops_frames_until_the_next_keyframe() -> None:
    packets = stream(FRAMES)
    del packets[4]  # in the second frame
    d = Depacketizer("video", "vp8", reorder_s=0.05)
    out = feed(d, packets, step=0.03)
    assert [f.data for f in out] == [FRAMES[0], FRAMES[3], FRAMES[4]]
    assert d.lost_packets == 1
    assert d.dropped_frames == 2
    assert not d.waiting_keyframe


def test_video_starts_at_a_keyframe_and_duplicates_are_ignored() -> None:
    packets = stream(FRAMES[1:])
    packets.insert(2, packets[1])
    out = feed(Depacketizer("video", "vp8"), packets)
    assert [f.data for f in out] == FRAMES[3:]


def test_opus_is_a_frame_per_packet() -> None:
    d = Depacketizer("audio", "opus")
    out = feed(d, [(10, 960, False, b"\x01"), (12, 2880, False, b"\x03"),
                   (11, 1920, False, b"\x02")])
    assert [f.data for f in out] == [b"\x01", b"\x02", b"\x03"]


def test_h264_keyframes_and_vp8_sizes() -> None:
    assert h264_access_unit_is_keyframe(
        b"\x00\x00\x00\x01\x67xx\x00\x00\x00\x01\x68y\x00\x00\x01\x65z")
    assert not h264_access_unit_is_keyframe(b"\x00\x00\x00\x01\x41zzz")
    assert vp8_frame_size(KEY) == (320, 240)
    assert vp8_frame_size(DELTA + b"0000000") is None


def test_timeline_is_smooth_wraps_and_never_goes_back() -> None:
    t = Timeline(90000, origin=100.0)
    start = 0xFFFFFFFF - 3000
    assert t.ms(start, 100.5) == 500
    assert t.ms((start + 9000) & 0xFFFFFFFF, 100.62) == 600  # across 2^32: RTP spacing kept
    assert t.ms((start + 4500) & 0xFFFFFFFF, 100.7) == 601  # went back: strictly increasing
    # A jump of minutes (a restarted publisher): anchored again on arrival.
    assert t.ms((start + 90000 * 300) & 0xFFFFFFFF, 101.0) == 1000
    assert t.reanchored == 1
