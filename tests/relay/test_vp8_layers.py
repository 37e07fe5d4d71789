"""VP8 temporal layers without transcoding: the payload descriptor read and its picture id
rewritten (codec.rtp), and the per-subscriber filter (relay.subscription.LayerFilter) fed
hand-made L1T3 streams: gapless sequence numbers and picture ids through drops, losses and
retransmissions, switches up only at layer-sync frames, down at frame boundaries."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from codec.rtp import SEQ_MOD, vp8_descriptor, vp8_with_picture_id
from relay.subscription import LayerFilter

L1T3 = [(0, False), (2, True), (1, True), (2, False)]
"""(TID, Y) of Chromium's L1T3 pattern: TL0, TL2 (refs TL0), TL1 (refs TL0), TL2 (refs TL1)."""


def descriptor(*, start: bool = True, picture_id: int | None = None, bits: int = 15,
               tl0picidx: int | None = None, tid: int | None = None, sync: bool = False,
               keyidx: int | None = None) -> bytes:
    """A VP8 payload descriptor (RFC 7741 4.2) with exactly the fields given."""
    ext = 0
    tail = b""
    if picture_id is not None:
        ext |= 0x80
        tail += (bytes((0x80 | picture_id >> 8, picture_id & 0xFF)) if bits == 15
                 else bytes((picture_id,)))
    if tl0picidx is not None:
        ext |= 0x40
        tail += bytes((tl0picidx,))
    if tid is not None or keyidx is not None:
        ext |= (0x20 if tid is not None else 0) | (0x10 if keyidx is not None else 0)
        tail += bytes((((tid or 0) << 6) | (0x20 if sync else 0) | (keyidx or 0),))
    first = (0x80 if ext else 0) | (0x10 if start else 0)
    return bytes((first,)) + (bytes((ext,)) + tail if ext else b"")


# -- the descriptor --------------------------------------------------------------------------
def test_a_full_descriptor_with_a_15_bit_picture_id_is_read_field_by_field() -> None:
    payload = descriptor(picture_id=0x1234, tl0picidx=200, tid=2, sync=True, keyidx=5) + b"\x01"
    d = vp8_descriptor(payload)
    assert d is not None
    assert (d.start, d.picture_id, d.picture_id_bits, d.tl0picidx, d.tid, d.sync, d.keyidx,
            d.length) == (True, 0x1234, 15, 200, 2, True, 5, 6)


def test_a_7_bit_picture_id_k_without_t_and_a_bare_descriptor() -> None:
    d = vp8_descriptor(descriptor(start=False, picture_id=0x55, bits=7, keyidx=3) + b"x")
    assert d is not None
    assert (d.start, d.picture_id, d.picture_id_bits, d.tl0picidx, d.tid, d.keyidx,
            d.length) == (False, 0x55, 7, -1, -1, 3, 4)
    bare = vp8_descriptor(b"\x10\x9d")
    assert bare is not None and (bare.start, bare.tid, bare.picture_id, bare.length) == (
        True, -1, -1, 1)
    # Partition 1 with S set does not start a frame.
    assert not vp8_descriptor(b"\x11\x00").start  # type: ignore[union-attr]


def test_empty_or_truncated_descriptors_give_none() -> None:
    full = descriptor(picture_id=0x1234, tl0picidx=1, tid=1)
    assert vp8_descriptor(b"") is None
    for cut in range(1, len(full)):
        assert vp8_descriptor(full[:cut]) is None, cut
    assert vp8_descriptor(full) is not None


@pytest.mark.parametrize(("bits", "before", "new", "after"), [
    (15, 0x7FFE, 0x8000, 0),  # past the 15-bit wrap
    (15, 0x0001, -1, 0x7FFF),  # back across it
    (15, 0x0100, 0x00FF, 0x00FF),
    (7, 0x7E, 0x80, 0),
    (7, 0x00, -1, 0x7F),
])
def test_the_picture_id_is_rewritten_in_place_modulo_its_width(
        bits: int, before: int, new: int, after: int) -> None:
    payload = descriptor(picture_id=before, bits=bits, tl0picidx=9, tid=1, sync=True) + b"DATA"
    d = vp8_descriptor(payload)
    assert d is not None
    out = vp8_with_picture_id(payload, d, new)
    e = vp8_descriptor(out)
    assert e is not None
    assert (e.picture_id, e.picture_id_bits, e.tl0picidx, e.tid, e.sync, e.length) == (
        after, bits, 9, 1, True, d.length)
    assert out[e.length:] == b"DATA" and len(out) == len(payload)


# -- the filter ------------------------------------------------------------------------------
@dataclass
class Packet:
    seq: int
    ts: int
    payload: bytes
    marker: bool
    keyframe: bool
    frame: int
    tid: int


def stream(frames: int, *, first_seq: int = 65530, first_picture: int = 0x7FFC,
           packets_per_frame: int = 2, layered: bool = True) -> list[Packet]:
    """An L1T3 stream: a keyframe, then the pattern; ``packets_per_frame`` packets a frame,
    the sequence numbers and picture ids wrapping early on."""
    out = []
    seq = first_seq
    tl0 = 250
    for n in range(frames):
        tid, sync = L1T3[n % 4]
        if tid == 0 and n:
            tl0 = (tl0 + 1) % 256
        for k in range(packets_per_frame):
            head = descriptor(start=k == 0, picture_id=(first_picture + n) % 0x8000,
                              tl0picidx=tl0, tid=tid, sync=sync) if layered else \
                descriptor(start=k == 0, picture_id=(first_picture + n) % 0x8000)
            body = (b"\x00" if n == 0 else b"\x01") if k == 0 else b"\xaa"
            out.append(Packet(seq % SEQ_MOD, 3000 * n, head + body + bytes((n % 256,)),
                              k == packets_per_frame - 1, n == 0 and k == 0, n, tid))
            seq += 1
    return out


class Receiver:
    """What a subscriber gets out of a LayerFilter."""

    def __init__(self, layers: LayerFilter, first_out: int = 100) -> None:
        self.layers = layers
        self.got: list[tuple[int, bytes, int, bool]] = []
        self._first_out = first_out
        self._started = False

    def feed(self, packet: Packet) -> None:
        if not self._started:
            self.layers.restart(packet.seq, self._first_out)
            self._started = True
        d = vp8_descriptor(packet.payload)
        taken = self.layers.take(packet.seq, packet.ts, packet.payload, d, packet.keyframe)
        if taken is not None:
            seq, payload, ts = taken
            self.got.append((seq, payload, ts, packet.marker if payload else False))

    def seqs(self) -> list[int]:
        return [seq for seq, _, _, _ in self.got]

    def frames(self) -> list[int]:
        """The frame numbers received (each frame's last byte), in sequence order."""
        ordered = sorted(self.got, key=lambda g: (g[0] - self._first_out) % SEQ_MOD)
        seen: list[int] = []
        for _, payload, _, _ in ordered:
            if payload and (not seen or seen[-1] != payload[-1]):
                seen.append(payload[-1])
        return seen

    def check_continuous(self, picture_gaps: int = 0) -> None:
        """Sequence numbers without a gap or a repeat, picture ids +1 per frame (modulo
        2^15) but ``picture_gaps`` steps of +2, markers on each frame's last packet."""
        ordered = sorted(self.got, key=lambda g: (g[0] - self._first_out) % SEQ_MOD)
        seqs = [(g[0] - self._first_out) % SEQ_MOD for g in ordered]
        assert seqs == list(range(len(seqs))), seqs
        last_picture: int | None = None
        last_frame_ts = None
        for index, (_, payload, ts, marker) in enumerate(ordered):
            if not payload:
                continue
            d = vp8_descriptor(payload)
            assert d is not None
            if ts != last_frame_ts:
                if last_picture is not None:
                    step = (d.picture_id - last_picture) % 0x8000
                    if step == 2 and picture_gaps:
                        picture_gaps -= 1
                    else:
                        assert step == 1, (index, d, last_picture)
                last_picture, last_frame_ts = d.picture_id, ts
            following = next((g for g in ordered[index + 1:] if g[1]), None)
            assert marker == (following is None or following[2] != ts), index


def test_every_layer_passes_untouched_with_only_the_sequence_numbers_offset() -> None:
    packets = stream(40)
    receiver = Receiver(LayerFilter())
    for packet in packets:
        receiver.feed(packet)
    assert [p for _, p, _, _ in receiver.got] == [p.payload for p in packets]
    assert receiver.seqs() == [(100 + n) % SEQ_MOD for n in range(len(packets))]
    receiver.check_continuous()


@pytest.mark.parametrize(("layer", "frames"), [(0, list(range(0, 40, 4))),
                                               (1, [n for n in range(40) if n % 2 == 0])])
def test_a_capped_subscriber_gets_its_layers_gapless_across_both_wraps(
        layer: int, frames: list[int]) -> None:
    layers = LayerFilter()
    layers.target = layer
    receiver = Receiver(layers, first_out=65500)
    for packet in stream(40):
        receiver.feed(packet)
    assert receiver.frames() == frames
    receiver.check_continuous()
    first = vp8_descriptor(receiver.got[0][1])
    last = vp8_descriptor(receiver.got[-1][1])
    assert first is not None and last is not None
    assert first.picture_id == 0x7FFC  # the keyframe keeps the publisher's id
    assert last.picture_id == (0x7FFC + len(frames) - 1) % 0x8000  # wrapped, gapless
    assert layers.dropped_frames == 40 - len(frames)


def test_packets_without_the_t_bit_are_all_forwarded_whatever_the_cap() -> None:
    layers = LayerFilter()
    layers.target = 0
    receiver = Receiver(layers)
    packets = stream(12, layered=False)
    for packet in packets:
        receiver.feed(packet)
    assert [p for _, p, _, _ in receiver.got] == [p.payload for p in packets]
    receiver.check_continuous()


def test_going_up_waits_for_a_sync_frame_of_the_next_layer_one_layer_at_a_time() -> None:
    layers = LayerFilter()
    layers.target = 0
    receiver = Receiver(layers)
    packets = stream(24)
    for packet in packets[:2 * 5]:  # frames 0-4: layer 0 only
        receiver.feed(packet)
    layers.target = 2
    for packet in packets[2 * 5:]:
        receiver.feed(packet)
    # Frame 5 (TL2, sync) is one layer too far; 6 (TL1, sync) brings layer 1; 7 (TL2, not
    # sync) waits; 9 (TL2, sync) brings layer 2.
    assert receiver.frames() == [0, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                 21, 22, 23]
    assert layers.current == 2
    receiver.check_continuous()


def test_without_sync_frames_going_up_waits_for_a_keyframe() -> None:
    layers = LayerFilter()
    layers.target = 0
    receiver = Receiver(layers)
    packets = stream(12)
    for packet in packets:
        packet.payload = packet.payload[:5] + bytes((packet.payload[5] & ~0x20,)) + \
            packet.payload[6:]  # clear Y
    for packet in packets[:8]:
        receiver.feed(packet)
    layers.target = 2
    for packet in packets[8:]:
        receiver.feed(packet)
    assert receiver.frames() == [0, 4, 8]
    keyframe = stream(1, first_seq=packets[-1].seq + 1, first_picture=0x7FFC + 12)[0]
    keyframe.ts = 3000 * 12
    receiver.feed(keyframe)
    assert layers.current == 2


def test_going_down_keeps_the_frame_in_progress_whole() -> None:
    layers = LayerFilter()
    receiver = Receiver(layers)
    packets = stream(16, packets_per_frame=3)
    for packet in packets[:3 * 5 + 1]:  # frame 5 (TL2) started
        receiver.feed(packet)
    layers.target = 0
    for packet in packets[3 * 5 + 1:]:
        receiver.feed(packet)
    assert receiver.frames() == [0, 1, 2, 3, 4, 5, 8, 12]
    receiver.check_continuous()


def test_a_lost_packet_of_a_kept_frame_keeps_its_place_for_the_retransmission() -> None:
    layers = LayerFilter()
    layers.target = 0
    receiver = Receiver(layers)
    packets = stream(12, packets_per_frame=3)
    lost = packets[3 * 4 + 1]  # the middle of frame 4 (TL0)
    for packet in packets:
        if packet is not lost:
            receiver.feed(packet)
    assert len(receiver.got) == 3 * 3 - 1
    receiver.feed(lost)  # NACKed upstream, retransmitted
    receiver.feed(lost)  # twice: the duplicate goes nowhere
    assert receiver.frames() == [0, 4, 8]
    receiver.check_continuous()


def test_loss_inside_a_dropped_frame_leaves_no_hole_and_its_retransmission_is_dropped() -> None:
    layers = LayerFilter()
    layers.target = 0
    receiver = Receiver(layers)
    packets = stream(12, packets_per_frame=3)
    lost = packets[3 * 5 + 1]  # the middle of frame 5 (TL2, dropped)
    for packet in packets:
        if packet is not lost:
            receiver.feed(packet)
    receiver.check_continuous()
    count = len(receiver.got)
    receiver.feed(lost)
    assert len(receiver.got) == count


def test_a_frame_lost_whole_is_padded_if_dropped_and_forwarded_if_kept() -> None:
    layers = LayerFilter()
    layers.target = 1
    receiver = Receiver(layers)
    packets = stream(16, packets_per_frame=2)
    dropped_frame = packets[2 * 5:2 * 6]  # frame 5: TL2, not for this subscriber
    kept_frame = packets[2 * 10:2 * 11]  # frame 10: TL1
    for packet in packets:
        if packet not in dropped_frame and packet not in kept_frame:
            receiver.feed(packet)
    # The places of both frames are kept: the subscriber sees holes it may ask about.
    assert len(receiver.got) == 7 * 2  # frames 0, 2, ..., 14 but 10
    for packet in dropped_frame + kept_frame:
        receiver.feed(packet)
    padding = [g for g in receiver.got if not g[1]]
    assert len(padding) == 2 and all(not marker for *_, marker in padding)
    # Padding joins the frame before it (its timestamp): no empty frame for the decoder.
    assert {ts for _, _, ts, _ in padding} == {3000 * 4}
    assert receiver.frames() == [0, 2, 4, 6, 8, 10, 12, 14]
    # Frame 5's id was not known to be dropped when frame 6 went out: one id is skipped, as
    # if a frame had been lost on the way (layer 1 frames reference layer 0 only, and layer 0
    # is whole).
    receiver.check_continuous(picture_gaps=1)


def test_a_restart_at_a_keyframe_starts_the_picture_ids_afresh() -> None:
    layers = LayerFilter()
    layers.target = 0
    receiver = Receiver(layers)
    packets = stream(12)
    for packet in packets:
        receiver.feed(packet)
    assert layers.picture_offset == 9
    keyframe = stream(1, first_seq=packets[-1].seq + 40, first_picture=5)[0]
    layers.restart(keyframe.seq, 700)
    assert layers.picture_offset == 0 and layers.current == 0
    taken = layers.take(keyframe.seq, 99_000, keyframe.payload,
                        vp8_descriptor(keyframe.payload), True)
    assert taken is not None and taken[0] == 700 and taken[1] == keyframe.payload
