"""tests/layered_vp8.py, the L1T3 publisher for aiortc test peers, checked against what the
relay reads and does: its payload descriptors through codec/rtp.py's parser, its frames through
the relay's LayerFilter (each layer decodes in order and bit-exact against the full stream),
then a real aiortc publisher through a LocalRelay: the publication is seen in 3 layers, the
subscriber counts as layered (the layer policy runs for it), and capped at layer 0 a viewer
decodes a quarter of the frames, in order, while another gets them all.

Without libvpx's error-resilient mode the same layer-0 decode matched the full stream in 2 of
61 frames (the entropy context carried over from frames the receiver never got): the bit-exact
check is what catches a wrong reference structure."""

from __future__ import annotations

import fractions
import itertools
import random
import time
from dataclasses import dataclass

import av
import pytest

from codec.rtp import SEQ_MOD, vp8_descriptor, vp8_is_keyframe_start, vp8_keyframe_size
from relay.subscription import LayerFilter
from tests.layered_vp8 import (
    L1T3_SYNC,
    L1T3_TIDS,
    PACKET_MAX,
    BusyCounterTrack,
    LayeredVp8Encoder,
    busy_counter_frame,
    layered_senders,
)
from tests.media import HEIGHT, WIDTH, read_counter, wait_for
from tests.relay.peers import relay_room

FPS = 30
FRAMES = 120
FORCED_KEYFRAME_AT = 50
"""A keyframe asked for mid-period (50 % 4 == 2: where a TL1 frame would be)."""


@dataclass
class Sent:
    frame: int
    seq: int
    ts: int
    payload: bytes
    marker: bool


def encode_stream(bitrate: int = 400_000) -> tuple[LayeredVp8Encoder, list[Sent]]:
    """``FRAMES`` busy counter frames through the encoder, as RTP packets (sequence numbers
    wrapping on the way, 3000 ticks a frame)."""
    encoder = LayeredVp8Encoder(bitrate, FPS)
    rng = random.Random(3)
    seq = SEQ_MOD - 40
    sent = []
    for n in range(FRAMES):
        frame = busy_counter_frame(n, rng)
        frame.pts = n * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, timestamp = encoder.encode(frame, force_keyframe=n == FORCED_KEYFRAME_AT)
        assert timestamp == n * 3000
        for i, payload in enumerate(payloads):
            sent.append(Sent(n, seq % SEQ_MOD, timestamp, payload, i == len(payloads) - 1))
            seq += 1
    return encoder, sent


@pytest.fixture(scope="module")
def stream() -> tuple[LayeredVp8Encoder, list[Sent]]:
    return encode_stream()


def test_the_descriptors_read_back_through_codec_rtp_as_chromium_writes_l1t3(
        stream: tuple[LayeredVp8Encoder, list[Sent]]) -> None:
    encoder, sent = stream
    assert all(len(s.payload) <= PACKET_MAX for s in sent)
    firsts: dict[int, Sent] = {}
    for s in sent:
        d = vp8_descriptor(s.payload)
        assert d is not None and d.picture_id_bits == 15 and d.keyidx == -1
        head = firsts.setdefault(s.frame, s)
        h = vp8_descriptor(head.payload)
        assert h is not None
        # Every packet of a frame carries the same fields; S only on the first.
        assert d.start == (s is head)
        assert (d.picture_id, d.tl0picidx, d.tid, d.sync) == (h.picture_id, h.tl0picidx, h.tid,
                                                              h.sync)
        assert bool(s.payload[0] & 0x20) == (d.tid == 2)  # N: no frame references TL2
    layers = []
    previous = None
    for n in range(FRAMES):
        d = vp8_descriptor(firsts[n].payload)
        assert d is not None
        keyframe = vp8_is_keyframe_start(firsts[n].payload)
        assert keyframe == (n in (0, FORCED_KEYFRAME_AT)), n
        # The period restarts at a keyframe asked for: TL0, with Y.
        place = n % 4 if n < FORCED_KEYFRAME_AT else (n - FORCED_KEYFRAME_AT) % 4
        assert (d.tid, d.sync) == ((0, True) if keyframe else (L1T3_TIDS[place],
                                                                L1T3_SYNC[place])), n
        if previous is not None:
            assert d.picture_id == (previous.picture_id + 1) % 0x8000
            assert d.tl0picidx == (previous.tl0picidx + (d.tid == 0)) % 256
        previous = d
        layers.append(d.tid)
    assert vp8_keyframe_size(firsts[0].payload) == (WIDTH, HEIGHT)
    assert encoder.frames == [layers.count(0), layers.count(1), layers.count(2)]
    assert encoder.keyframes == 2 and encoder.forced_keyframes == 1
    kbps = [round(b * 8 * FPS / FRAMES / 1000) for b in encoder.bytes]
    print(f"\nL1T3 at 400 kbps, {FRAMES} busy frames: frames per layer {encoder.frames}, "
          f"kbps per layer {kbps} (cumulative {kbps[0]}, {kbps[0] + kbps[1]}, {sum(kbps)})")
    assert 0.7 * 400 < sum(kbps) < 1.3 * 400


def through_filter(sent: list[Sent], layer: int) -> dict[int, av.VideoFrame]:
    """The stream through a LayerFilter capped at ``layer`` (the relay's per-subscriber
    path), reassembled by timestamp as a receiver does and decoded; frame -> picture."""
    layers = LayerFilter()
    layers.target = layer
    layers.restart(sent[0].seq, 1000)
    out: list[tuple[int, bytes, int]] = []
    for s in sent:
        keyframe = vp8_is_keyframe_start(s.payload)
        taken = layers.take(s.seq, s.ts, s.payload, vp8_descriptor(s.payload), keyframe)
        if taken is not None:
            out.append(taken)
    seqs = [(seq - 1000) % SEQ_MOD for seq, _, _ in out]
    assert seqs == list(range(len(out))), "gapless sequence numbers"
    decoder = av.CodecContext.create("libvpx", "r")
    pictures: dict[int, av.VideoFrame] = {}
    frames: dict[int, list[bytes]] = {}
    for _, payload, ts in out:
        if payload:
            frames.setdefault(ts, []).append(payload)
    pids = []
    for ts, payloads in frames.items():
        d = vp8_descriptor(payloads[0])
        assert d is not None
        pids.append(d.picture_id)
        data = b"".join(p[vp8_descriptor(p).length:] for p in payloads)  # type: ignore[union-attr]
        for picture in decoder.decode(av.Packet(data)):
            assert isinstance(picture, av.VideoFrame)
            pictures[ts // 3000] = picture
    assert all((b - a) % 0x8000 == 1 for a, b in itertools.pairwise(pids)), "gapless picture ids"
    return pictures


def test_through_the_layer_filter_each_layer_decodes_in_order_and_bit_exact(
        stream: tuple[LayeredVp8Encoder, list[Sent]]) -> None:
    _, sent = stream
    full = through_filter(sent, 2)
    assert sorted(full) == list(range(FRAMES))
    assert all(read_counter(picture) == n for n, picture in full.items())
    for layer, share in ((0, 4), (1, 2)):
        part = through_filter(sent, layer)
        # A quarter (a half) of the frames, and the keyframe asked for mid-period.
        expected = sorted({n for n in range(0, FORCED_KEYFRAME_AT, share)}
                          | {FORCED_KEYFRAME_AT + n for n in range(0, FRAMES - FORCED_KEYFRAME_AT,
                                                                   share)})
        assert sorted(part) == expected, layer
        assert [read_counter(part[n]) for n in sorted(part)] == expected
        same = [n for n, picture in part.items()
                if bytes(picture.planes[0]) == bytes(full[n].planes[0])]
        assert len(same) == len(part), (layer, sorted(set(part) - set(same)))


async def test_an_aiortc_publisher_in_layers_through_the_relay_capped_at_layer_0() -> None:
    async with relay_room() as room:
        encoders: list[LayeredVp8Encoder] = []
        viewers = {}
        for name in ("capped", "whole"):
            await room.relay.join(room.id, name)
            viewers[name] = room.peer(name)
            await viewers[name].subscribe()
        await room.relay.join(room.id, "pub")
        pub = room.peer("pub")
        await pub.publish(fps=FPS, video_track=BusyCounterTrack(FPS, seed=1),
                          prepare=layered_senders(encoders=encoders))
        participants = room.relay.rooms[room.id].participants
        await wait_for(lambda: all(v.frames("pub") >= 10 for v in viewers.values()), 15,
                       "both viewers decoding")
        publication = next(p for p in participants["pub"].publications.values()
                           if p.kind == "video")
        assert publication.temporal_layers == 2
        assert participants["capped"].subscriber.layered()
        participants["capped"].cap_layer(0)
        await wait_for(lambda: participants["capped"].subscriber.max_layer == 0, 2, "the cap")
        await wait_for(lambda: all(s.layers is not None and s.layers.current == 0
                                   for s in participants["capped"].subscriptions.values()
                                   if s.publication.kind == "video"), 3, "layer 0")
        start = time.monotonic()
        await wait_for(lambda: time.monotonic() - start > 4, 5, "4 s")
        end = time.monotonic()
        got = {}
        for name, viewer in viewers.items():
            received = viewer.video_from("pub")
            assert received is not None
            got[name] = [c for c, at in zip(received.counters, received.arrivals, strict=True)
                         if start <= at < end]
        encoder = encoders[0]
        print(f"\nrelay, 4 s: capped at layer 0 decoded {len(got['capped'])} frames, the other "
              f"{len(got['whole'])}; sent per layer {encoder.frames}, REMB {encoder.remb_bps}")
        whole, capped = got["whole"], got["capped"]
        assert whole == list(range(whole[0], whole[0] + len(whole))), "every frame, in order"
        assert len(whole) >= 0.8 * 4 * FPS
        # Layer 0: every fourth frame of the pattern (a keyframe asked for restarts it).
        assert all(b > a for a, b in itertools.pairwise(capped)), "in order"
        assert 0.2 * len(whole) <= len(capped) <= 0.3 * len(whole)
        steps = [b - a for a, b in itertools.pairwise(capped)]
        assert steps.count(4) >= len(steps) - 2, steps
