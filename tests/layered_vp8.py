"""VP8 in temporal layers (L1T3) for aiortc test peers, as Chromium sends its camera with
``scalabilityMode: "L1T3"``: what the relay's layer policy needs to run for an aiortc publisher
(aiortc's own encoder sends no temporal layers, so ``Subscriber.layered()`` stays False).

- ``LayeredVp8Encoder``: an aiortc ``Encoder`` on PyAV's libvpx, with FFmpeg libvpxenc's
  temporal pattern 3 (``ts-parameters``, ``ts_layering_mode=3``): four frames a period, layers
  0, 2, 1, 2. Frame 0 (TL0) references and updates LAST; frame 1 (TL2) references LAST and
  updates nothing; frame 2 (TL1) references LAST and updates GOLDEN; frame 3 (TL2) references
  GOLDEN and updates nothing. So TL0 needs only TL0 (7.5 fps of 30), TL0+TL1 only those (15
  fps), and frames 1 and 2 depend on TL0 alone: layer sync (Y) points, the places a receiver
  may climb a layer. Error-resilient mode keeps the entropy context from carrying over from a
  frame a receiver never got (Chromium runs its temporal layers so too).
- ``vp8_payloads``: the RFC 7741 packetizer with the payload descriptor Chromium writes for
  L1T3: a 15-bit picture id, TL0PICIDX (+1 per TL0 frame), TID and Y (and N on TL2, which no
  frame references).
- ``use_layered_vp8(sender)``: gives an ``RTCRtpSender`` this encoder instead of aiortc's own,
  through the sender's one private slot (``__encoder``, taken at its first frame if empty):
  nothing else of aiortc changes, PLI/FIR still force a keyframe through ``encode``.

The layer of a frame is the one libvpxenc gave it: its pattern index advances once per frame
given (no frame is dropped: ``drop-threshold`` 0, ``lag-in-frames`` 0) and restarts at 0 on a
keyframe asked for. A keyframe libvpx chooses by itself mid-period is sent as TL0 with Y: it
refreshes every reference buffer, so the frames after it depend on nothing older whatever
their place in the pattern.

The bitrate is fixed (``bitrate``): receiver estimates (REMB) are recorded, not followed (a
test wants a known offer; aiortc's own encoder re-opens its codec, a keyframe, on each 10 %
move). Nothing here reaches the relay's code: codec/rtp.py reads what this writes."""

from __future__ import annotations

import asyncio
import fractions
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import av
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender
from aiortc.codecs.base import Encoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from av.frame import Frame
from av.packet import Packet

from tests.media import BLOCK, HEIGHT, WIDTH, CounterTrack

PACKET_MAX = 1300
"""Payload bytes per RTP packet, descriptor included (aiortc's own VP8 packetizer's)."""
L1T3_TIDS = (0, 2, 1, 2)
"""The temporal layer of each frame of the period (libvpxenc's ts_layering_mode 3)."""
L1T3_SYNC = (False, True, True, False)
"""Y per place in the period: frames 1 and 2 reference only LAST (a TL0 frame)."""
LAYER_SHARES = (0.4, 0.6, 1.0)
"""The cumulative share of the bitrate up to each layer (libvpx's temporal-layer examples;
TL0 frames are referenced four times as long, so they get more bits than a quarter)."""
DEFAULT_BITRATE = 400_000
DEFAULT_FPS = 30
CHROMIUM_OPUS_BPS = 32_000
"""Chromium's Opus bitrate for a microphone (aiortc's encoder asks libopus for 96 kbps stereo:
about 120 kbps of a tone, two of which would take half of a 512 kbps satellite link)."""
NOISE_BLOCKS = 60
"""Blocks of random grey a ``BusyCounterTrack`` frame carries: a camera's worth of change, so
that the encoder spends its bitrate (the bare counter costs ~30 kbps)."""
NOISE_SIZE = 16
NOISE_PLANES = 31
"""Noise planes a ``BusyCounterTrack`` takes in turn (prime: never in step with the 4-frame
layer pattern)."""
TONE_SAMPLE_RATE = 48000
TONE_FRAME = 960


def vp8_descriptor_bytes(*, start: bool, picture_id: int, tl0picidx: int, tid: int,
                         sync: bool) -> bytes:
    """The RFC 7741 (4.2) payload descriptor of one packet: X, N (TL2: a frame no other
    references), S, partition 0; I (15-bit picture id, M set), L, T (TID, Y); no K."""
    first = 0x80 | (0x20 if tid == 2 else 0) | (0x10 if start else 0)
    return bytes((first, 0xE0, 0x80 | (picture_id >> 8) & 0x7F, picture_id & 0xFF,
                  tl0picidx & 0xFF, (tid & 0x03) << 6 | (0x20 if sync else 0)))


def vp8_payloads(frame: bytes, *, picture_id: int, tl0picidx: int, tid: int, sync: bool,
                 max_size: int = PACKET_MAX) -> list[bytes]:
    """One encoded VP8 frame cut into RTP payloads of at most ``max_size`` bytes, each with
    its descriptor (S only on the first)."""
    payloads = []
    step = max_size - 6
    for pos in range(0, len(frame), step):
        payloads.append(vp8_descriptor_bytes(start=pos == 0, picture_id=picture_id,
                                             tl0picidx=tl0picidx, tid=tid, sync=sync)
                        + frame[pos:pos + step])
    return payloads


class LayeredVp8Encoder(Encoder):
    """VP8 L1T3 for an aiortc ``RTCRtpSender`` (``use_layered_vp8``). ``encode`` runs in
    aiortc's thread pool; the counters are for a test's figures."""

    def __init__(self, bitrate: int = DEFAULT_BITRATE, fps: int = DEFAULT_FPS) -> None:
        self.bitrate = bitrate
        self.fps = fps
        self.codec: Any = None
        self.picture_id = random.randrange(1 << 15)
        self.tl0picidx = random.randrange(256)
        self.remb_bps: int | None = None
        """The last receiver estimate aiortc gave (recorded, not followed)."""
        self.frames = [0, 0, 0]
        """Frames sent per temporal layer."""
        self.bytes = [0, 0, 0]
        """Encoded bytes sent per temporal layer."""
        self.keyframes = 0
        self.forced_keyframes = 0
        self._inputs = 0
        self._index = 0
        self._size: tuple[int, int] | None = None
        self._lock = threading.Lock()

    # aiortc sets this from REMB when the attribute exists.
    @property
    def target_bitrate(self) -> int:
        return self.bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self.remb_bps = bitrate

    def _open(self, width: int, height: int) -> None:
        codec = av.CodecContext.create("libvpx", "w")
        codec.width = width
        codec.height = height
        codec.pix_fmt = "yuv420p"
        codec.time_base = fractions.Fraction(1, self.fps)
        codec.framerate = fractions.Fraction(self.fps, 1)
        codec.bit_rate = self.bitrate
        codec.gop_size = 3000  # no periodic keyframe: PLI asks for them
        codec.qmin = 2
        codec.qmax = 56
        layers = ",".join(str(round(self.bitrate * share / 1000)) for share in LAYER_SHARES)
        codec.options = {
            "deadline": "realtime",
            "cpu-used": "-6",
            "lag-in-frames": "0",
            "drop-threshold": "0",
            "error-resilient": "default",
            # CBR, as aiortc's own encoder (minrate = maxrate = bit_rate).
            "minrate": str(self.bitrate),
            "maxrate": str(self.bitrate),
            "bufsize": str(self.bitrate),
            "undershoot-pct": "100",
            "overshoot-pct": "15",
            "static-thresh": "1",
            "partitions": "0",
            # ts_layering_mode last: it sets the pattern over what comes before it.
            "ts-parameters": f"ts_target_bitrate={layers}:ts_layering_mode=3",
        }
        codec.thread_count = 1
        codec.open()
        self.codec = codec
        self._size = (width, height)
        self._index = 0

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        assert isinstance(frame, av.VideoFrame)
        with self._lock:
            if frame.format.name != "yuv420p":
                frame = frame.reformat(format="yuv420p")
            if self.codec is None or self._size != (frame.width, frame.height):
                self._open(frame.width, frame.height)
            index = self._index
            if force_keyframe:
                frame.pict_type = av.video.frame.PictureType.I
                index = 0  # libvpxenc restarts its pattern at a keyframe asked for
                self.forced_keyframes += 1
            assert frame.pts is not None and frame.time_base is not None
            timestamp = convert_timebase(frame.pts, frame.time_base, VIDEO_TIME_BASE)
            # libvpxenc counts frames in its own time base: one tick a frame.
            frame.pts = self._inputs
            frame.time_base = fractions.Fraction(1, self.fps)
            self._inputs += 1
            data = b"".join(bytes(packet) for packet in self.codec.encode(frame))
            self._index = (index + 1) % len(L1T3_TIDS)
            if not data:
                return [], timestamp
            keyframe = not data[0] & 0x01
            tid, sync = (0, True) if keyframe else (L1T3_TIDS[index], L1T3_SYNC[index])
            if tid == 0:
                self.tl0picidx = (self.tl0picidx + 1) % 256
            payloads = vp8_payloads(data, picture_id=self.picture_id, tl0picidx=self.tl0picidx,
                                    tid=tid, sync=sync)
            self.picture_id = (self.picture_id + 1) % (1 << 15)
            self.frames[tid] += 1
            self.bytes[tid] += len(data)
            self.keyframes += keyframe
            return payloads, timestamp

    @property
    def frames_total(self) -> int:
        return sum(self.frames)

    def pack(self, packet: Packet[Any]) -> tuple[list[bytes], int]:
        raise NotImplementedError("LayeredVp8Encoder encodes frames; it packs no pre-encoded "
                                  "packet (its layers come from its own pattern)")


def use_layered_vp8(sender: RTCRtpSender, encoder: LayeredVp8Encoder | None = None
                    ) -> LayeredVp8Encoder:
    """Make ``sender`` (a video sender negotiated to VP8, before its first frame) encode with
    ``encoder`` (a new ``LayeredVp8Encoder`` by default); returns it. aiortc creates its own
    encoder at the first frame only if the slot is empty."""
    encoder = encoder or LayeredVp8Encoder()
    slot = "_RTCRtpSender__encoder"
    if not hasattr(sender, slot):
        raise RuntimeError("aiortc's RTCRtpSender has no __encoder slot any more: "
                           "tests/layered_vp8.py needs another way in")
    if getattr(sender, slot) is not None:
        raise RuntimeError("the sender has encoded already: give it the layered encoder "
                           "before it starts")
    setattr(sender, slot, encoder)
    return encoder


def use_opus_bitrate(sender: RTCRtpSender, bitrate: int = CHROMIUM_OPUS_BPS) -> OpusEncoder:
    """Make an audio ``sender`` (before its first frame) encode Opus at ``bitrate``, as
    Chromium does, through the same slot as ``use_layered_vp8``."""
    encoder = OpusEncoder()
    encoder.codec.bit_rate = bitrate  # PyAV opens the codec at the first frame
    slot = "_RTCRtpSender__encoder"
    if getattr(sender, slot, None) is not None:
        raise RuntimeError("the sender has encoded already")
    setattr(sender, slot, encoder)
    return encoder


def layered_senders(bitrate: int = DEFAULT_BITRATE, fps: int = DEFAULT_FPS,
                    encoders: list[LayeredVp8Encoder] | None = None
                    ) -> Callable[[RTCPeerConnection], None]:
    """A ``prepare`` for ``MediaPeer.publish`` (tests/media.py): the video sender in L1T3 at
    ``bitrate``, the microphone a ``TableToneTrack`` at Chromium's Opus rate; each video
    encoder is appended to ``encoders`` (its figures)."""

    def prepare(pc: RTCPeerConnection) -> None:
        for transceiver in pc.getTransceivers():
            sender = transceiver.sender
            if sender.kind == "video":
                encoder = use_layered_vp8(sender, LayeredVp8Encoder(bitrate, fps))
                if encoders is not None:
                    encoders.append(encoder)
            elif sender.kind == "audio":
                sender.replaceTrack(TableToneTrack())
                use_opus_bitrate(sender)

    return prepare


def noise_plane(rng: random.Random) -> bytes:
    """A luma plane of ``NOISE_BLOCKS`` random grey squares on the counter's background, none
    in the counter's two block heights (it stays readable)."""
    luma = bytearray(b"\x20" * (WIDTH * HEIGHT))
    for _ in range(NOISE_BLOCKS):
        x = rng.randrange(WIDTH - NOISE_SIZE)
        y = rng.randrange(2 * BLOCK, HEIGHT - NOISE_SIZE)
        square = bytes((rng.randrange(256),)) * NOISE_SIZE
        for row in range(y, y + NOISE_SIZE):
            luma[row * WIDTH + x:row * WIDTH + x + NOISE_SIZE] = square
    return bytes(luma)


_CHROMA = b"\x80" * (WIDTH * HEIGHT // 4)
_LIT = b"\xe0" * BLOCK


def with_counter(plane: bytes, n: int) -> av.VideoFrame:
    """A frame of ``plane`` with ``n`` drawn as ``counter_frame`` draws it."""
    luma = bytearray(plane)
    for bit in range(16):
        if n >> bit & 1:
            for y in range(BLOCK):
                start = y * WIDTH + bit * BLOCK
                luma[start:start + BLOCK] = _LIT
    frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
    frame.planes[0].update(bytes(luma))
    frame.planes[1].update(_CHROMA)
    frame.planes[2].update(_CHROMA)
    return frame


def busy_counter_frame(n: int, rng: random.Random) -> av.VideoFrame:
    """``counter_frame(n)`` with fresh random squares (``noise_plane``)."""
    return with_counter(noise_plane(rng), n)


class BusyCounterTrack(CounterTrack):
    """A ``CounterTrack`` whose pictures carry random squares: ``NOISE_PLANES`` planes made
    once (seeded) and taken in turn, so that a frame costs the process no more than the bare
    counter (the relay, the peers and the emulator share one event loop, on a shared machine);
    the turn is longer than any reference the encoder keeps, so every frame is news to it."""

    def __init__(self, fps: int = DEFAULT_FPS, seed: int = 0) -> None:
        super().__init__(fps)
        rng = random.Random(seed)
        self._planes = [noise_plane(rng) for _ in range(NOISE_PLANES)]

    def picture(self, n: int) -> av.VideoFrame:
        return with_counter(self._planes[n % NOISE_PLANES], n)


class TableToneTrack(MediaStreamTrack):
    """tests/media.py's ``ToneTrack`` (a sine, 20 ms frames of 48 kHz mono) from a table made
    once: the original computes each sample in Python, ~1.5 ms a frame, 50 frames a second
    per microphone on the shared event loop."""

    kind = "audio"

    def __init__(self, hz: float = 440.0) -> None:
        super().__init__()
        pcm = bytearray()
        for i in range(TONE_SAMPLE_RATE):  # one second: a whole number of 20 ms frames
            pcm += int(8000 * math.sin(2 * math.pi * hz * i / TONE_SAMPLE_RATE)).to_bytes(
                2, "little", signed=True)
        self._pcm = bytes(pcm)
        self.samples = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self.samples / TONE_SAMPLE_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        at = 2 * (self.samples % TONE_SAMPLE_RATE)
        frame = av.AudioFrame(format="s16", layout="mono", samples=TONE_FRAME)
        frame.planes[0].update(self._pcm[at:at + 2 * TONE_FRAME])
        frame.sample_rate = TONE_SAMPLE_RATE
        frame.pts = self.samples
        frame.time_base = fractions.Fraction(1, TONE_SAMPLE_RATE)
        self.samples += TONE_FRAME
        return frame
