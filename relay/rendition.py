"""Rendition: one low-rate re-encoding of a VP8 publication (about 320x180, 10 fps, 100 kbps)
for the subscribers whose link cannot carry even its base layer: the step between layer 0 and
the video pause. One per publication whatever the number of such subscribers; the publication
starts it for the first and closes it once the last has gone back (relay/publication.py).

It is a forwarder of the publication like any subscription: it assembles the publisher's
frames from their packets on the event loop (a few dict operations a packet) and hands each
whole frame to its own worker thread, which decodes every frame (the later ones reference
them), keeps one each ``1/fps`` seconds of RTP time, scales it and encodes it with libvpx.
A thread, not a process: PyAV releases the GIL around the codec calls, and the frames are a
few kilobytes, so nothing is gained by a process's copies and start-up (the cost to the
forwarding loop was measured: docs/benchmarks.md, "#15 thin rendition"). The encoded frames
come back to the loop and go out in order, in RTP packets of the rendition's own sequence
numbers and picture ids, with the publisher's RTP timestamps (so a subscriber's timestamps run
on when its leg changes source), to the subscriptions attached to it.

A subscription changes source only at a keyframe of the new one (``Handover``): it keeps the
old stream until then, so there is no gap, and the Subscription restarts its offsets there
(sequence numbers run on, picture ids continue from the last one sent on the leg)."""

from __future__ import annotations

import asyncio
import fractions
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import av
from aiortc.rtp import RtpPacket

from codec.rtp import SEQ_MOD, TS_MOD, Vp8Descriptor, seq_newer, vp8_descriptor_length
from relay.tasks import Tasks
from relay.timing import ntp_now

if TYPE_CHECKING:
    from relay.forwarding import Forwarder, KeyframeSource

logger = logging.getLogger(__name__)

WIDTH, HEIGHT = 320, 180
"""The rendition fits in this box, keeping the publisher's aspect ratio (320x240 -> 240x180)."""
FPS = 10
BITRATE = 100_000
PACKET_MAX = 1200
"""Largest payload of a rendition packet (descriptor included)."""
QUEUE_FRAMES = 30
"""Whole frames waiting for the worker at most; past that it is behind: the frames are dropped
up to the publisher's next keyframe (asked for)."""
KEYFRAME_INTERVAL_S = 0.3
"""Keyframes of the rendition on request at most this often."""
CLOCK = 90000
TIME_BASE = fractions.Fraction(1, CLOCK)


def fit(width: int, height: int, box: tuple[int, int] = (WIDTH, HEIGHT)) -> tuple[int, int]:
    """The largest even size of the publisher's aspect ratio within ``box`` (never larger
    than the publisher's own)."""
    scale = min(box[0] / width, box[1] / height, 1.0)
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def packetize(frame: bytes, picture_id: int) -> list[bytes]:
    """RFC 7741 payloads of one frame: X and I set, a 15-bit picture id, S on the first."""
    pid = bytes((0x80 | (picture_id >> 8 & 0x7F), picture_id & 0xFF))
    payloads = []
    step = PACKET_MAX - 4
    for pos in range(0, max(len(frame), 1), step):
        payloads.append(bytes((0x90 if pos == 0 else 0x80, 0x80)) + pid + frame[pos:pos + step])
    return payloads


class Transcoder:
    """The codec work, in the worker thread: VP8 frames in, fewer smaller VP8 frames out."""

    def __init__(self, fps: int = FPS, bitrate: int = BITRATE) -> None:
        self.decoder: Any = av.CodecContext.create("vp8", "r")
        self.encoder: Any = None
        self.interval = CLOCK // fps
        self.fps = fps
        self.bitrate = bitrate
        self.size: tuple[int, int] | None = None
        self.last_ts: int | None = None
        """Unwrapped RTP timestamp of the last frame encoded."""
        self.decoded = 0
        self.encoded = 0

    def _open_encoder(self, width: int, height: int) -> None:
        encoder: Any = av.CodecContext.create("libvpx", "w")
        encoder.width, encoder.height = width, height
        encoder.pix_fmt = "yuv420p"
        encoder.time_base = TIME_BASE
        encoder.framerate = fractions.Fraction(self.fps, 1)
        encoder.bit_rate = self.bitrate
        encoder.gop_size = 100 * self.fps  # keyframes when asked for (a new subscriber, a PLI)
        encoder.qmin, encoder.qmax = 4, 56
        encoder.thread_count = 1
        encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                           "bufsize": str(self.bitrate), "minrate": str(self.bitrate),
                           "maxrate": str(self.bitrate), "undershoot-pct": "100",
                           "overshoot-pct": "15", "static-thresh": "1", "partitions": "0"}
        self.encoder = encoder
        self.size = (width, height)

    def frame(self, data: bytes, ts: int, want_key: bool) -> list[tuple[bytes, bool]]:
        """Decode one frame of the publisher (``ts``: its unwrapped RTP timestamp); the
        encoded frames due, with whether each is a keyframe."""
        packet = av.Packet(data)
        packet.pts = ts
        packet.time_base = TIME_BASE
        out: list[tuple[bytes, bool]] = []
        for picture in self.decoder.decode(packet):
            self.decoded += 1
            if not want_key and self.last_ts is not None and ts - self.last_ts < self.interval:
                continue
            width, height = fit(picture.width, picture.height)
            if self.encoder is None or self.size != (width, height):
                self._open_encoder(width, height)
                want_key = True
            small = picture.reformat(width=width, height=height, format="yuv420p")
            small.pts = ts
            small.time_base = TIME_BASE
            small.pict_type = av.video.frame.PictureType.I if want_key else \
                av.video.frame.PictureType.NONE
            for encoded in self.encoder.encode(small):
                out.append((bytes(encoded), bool(encoded.is_keyframe)))
            self.last_ts = ts
            self.encoded += 1
            want_key = False
        return out

    def close(self) -> None:
        self.decoder = None
        self.encoder = None


class Rendition:
    """The thin rendition of one publication (see the module doc)."""

    def __init__(self, publication: KeyframeSource, *, fps: int = FPS,
                 bitrate: int = BITRATE) -> None:
        self.publication = publication
        self.fps = fps
        self.subscriptions: set[Forwarder] = set()
        """What receives its packets (subscriptions on it, handovers waiting for its
        keyframe)."""
        self.closed = False
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        """Publisher's frames not decoded: incomplete, or the worker was behind."""
        self.keyframes_out = 0
        self.cpu_s = 0.0
        """CPU time the worker thread spent (decode, scale, encode)."""
        self.size: tuple[int, int] | None = None
        self._transcoder: Transcoder | None = Transcoder(fps, bitrate)
        self._loop = asyncio.get_running_loop()
        self._work: queue.Queue[tuple[bytes, int, bool] | None] = queue.Queue()
        self._out: asyncio.Queue[tuple[list[bytes], int, bool]] = asyncio.Queue()
        self._want_key = threading.Event()
        self._want_key.set()
        self._last_key_asked = time.monotonic()
        self._last_key_request = 0.0
        # Frame assembly (event loop).
        self._frame_ts: int | None = None
        self._parts: dict[int, bytes] = {}
        self._first: int | None = None
        self._last: int | None = None
        self._newest_seq: int | None = None
        self._next_seq: int | None = None
        """The sequence number the frame after the last one decoded starts at."""
        self._done_ts: int | None = None
        self._frame_key = False
        self._need_keyframe = True
        self._ts_high = 0
        self._ts_wraps = 0
        # Output (event loop).
        self._seq = 0
        self._picture_id = 0
        self._label = f"Rendition({publication.id})"
        self._tasks = Tasks(self._label)
        self._thread = threading.Thread(target=self._run, name=self._label, daemon=True)
        self._thread.start()
        self._tasks.spawn(self._send_loop())
        publication.request_keyframe()
        logger.info("%s started (%d fps, %d bps)", self._label, fps, bitrate)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- who receives it ------------------------------------------------------------------
    def attach(self, forwarder: Forwarder) -> None:
        if not self.closed:
            self.subscriptions.add(forwarder)

    def detach(self, forwarder: Forwarder) -> None:
        self.subscriptions.discard(forwarder)

    def request_keyframe(self) -> None:
        """The next frame encoded is a keyframe (a subscriber joins, or lost a picture), at
        most one per ``KEYFRAME_INTERVAL_S`` (a keyframe is several frames' worth of bits)."""
        now = time.monotonic()
        if now - self._last_key_asked >= KEYFRAME_INTERVAL_S:
            self._last_key_asked = now
            self._want_key.set()

    def frame_rate(self) -> float:
        return float(self.fps)

    # -- in: the publisher's packets (a forwarder of the publication) ---------------------
    async def forward(self, packet: RtpPacket, keyframe: bool, ntp: int,
                      descriptor: Vp8Descriptor | None = None) -> None:
        if self.closed:
            return
        seq = packet.sequence_number
        if descriptor is None:  # padding: takes a sequence number, carries no frame
            if seq == self._next_seq:
                self._next_seq = (seq + 1) % SEQ_MOD
            return
        ts = packet.timestamp
        if ts == self._done_ts:
            return  # a late copy of a frame already decoded
        if self._newest_seq is not None and not seq_newer(seq, self._newest_seq):
            if ts != self._frame_ts or seq in self._parts:
                return  # late, of a frame already given up: the keyframe wait covers it
        else:
            self._newest_seq = seq
        if ts != self._frame_ts:
            if self._frame_ts is not None and self._parts:
                self._lost()  # the last frame never completed
            self._frame_ts = ts
            self._parts = {}
            self._first = self._last = None
            self._frame_key = False
        if keyframe:
            self._need_keyframe = False
            self._frame_key = True
        if self._need_keyframe:
            return
        self._parts[seq] = packet.payload
        if descriptor.start:
            self._first = seq
        if packet.marker:
            self._last = seq
        first, last = self._first, self._last
        if first is None or last is None or len(self._parts) != (last - first) % SEQ_MOD + 1:
            return
        seqs = [(first + n) % SEQ_MOD for n in range(len(self._parts))]
        try:
            data = b"".join(self._parts[s][vp8_descriptor_length(self._parts[s]):] for s in seqs)
        except KeyError:
            return
        self._parts = {}
        self._done_ts = ts
        if not self._frame_key and self._next_seq is not None and first != self._next_seq:
            self._lost()  # a whole frame went missing before this one: its reference
            return
        self._next_seq = (last + 1) % SEQ_MOD
        self.frames_in += 1
        if self._work.qsize() >= QUEUE_FRAMES:
            self._lost()
            return
        self._work.put((data, self._unwrap(ts), self._frame_key))

    def _lost(self) -> None:
        """A frame will not be decoded: the decoder waits for the publisher's next keyframe."""
        self.frames_dropped += 1
        self._parts = {}
        self._need_keyframe = True
        self._next_seq = None
        now = time.monotonic()
        if now - self._last_key_request >= 0.3:
            self._last_key_request = now
            self.publication.request_keyframe()

    def _unwrap(self, ts: int) -> int:
        if ts < self._ts_high and self._ts_high - ts > TS_MOD // 2:
            self._ts_wraps += 1
        self._ts_high = ts
        return ts + self._ts_wraps * TS_MOD

    # -- the worker thread ----------------------------------------------------------------
    def _run(self) -> None:
        start = time.thread_time()
        try:
            while True:
                item = self._work.get()
                transcoder = self._transcoder
                if item is None or transcoder is None:
                    return
                data, ts, _key = item
                want_key = self._want_key.is_set()
                if want_key:
                    self._want_key.clear()  # a request while this frame is encoded stays
                try:
                    encoded = transcoder.frame(data, ts, want_key)
                except av.FFmpegError:
                    logger.warning("%s: a frame did not decode; waiting for a keyframe",
                                   self._label)
                    encoded = []
                    self._loop.call_soon_threadsafe(self._lost)
                if want_key and not any(key for _, key in encoded):
                    self._want_key.set()  # nothing came out of this one: the next
                self.size = transcoder.size
                for frame, is_key in encoded:
                    self._loop.call_soon_threadsafe(self._out.put_nowait,
                                                    ([frame], ts % TS_MOD, is_key))
                self.cpu_s = time.thread_time() - start
        except Exception:
            logger.exception("%s: the worker failed", self._label)
        finally:
            self.cpu_s = time.thread_time() - start
            if self._transcoder is not None:
                self._transcoder.close()
                self._transcoder = None

    # -- out: the rendition's packets -----------------------------------------------------
    async def _send_loop(self) -> None:
        payload_type = 96  # each leg puts its own (Subscription.forward)
        while True:
            frames, ts, is_key = await self._out.get()
            picture_id = self._picture_id
            self._picture_id = (picture_id + 1) & 0x7FFF
            payloads = packetize(frames[0], picture_id)
            self.frames_out += 1
            self.keyframes_out += is_key
            ntp = ntp_now()
            last = len(payloads) - 1
            for n, payload in enumerate(payloads):
                packet = RtpPacket(payload_type=payload_type, marker=int(n == last),
                                   sequence_number=self._seq, timestamp=ts, payload=payload)
                self._seq = (self._seq + 1) % SEQ_MOD
                descriptor = Vp8Descriptor(start=n == 0, picture_id=picture_id,
                                           picture_id_bits=15, picture_id_at=2, length=4)
                for forwarder in tuple(self.subscriptions):
                    await forwarder.forward(packet, is_key and n == 0, ntp, descriptor)

    def stats(self) -> dict[str, Any]:
        return {"frames_in": self.frames_in, "frames_out": self.frames_out,
                "keyframes_out": self.keyframes_out, "frames_dropped": self.frames_dropped,
                "cpu_s": round(self.cpu_s, 3), "size": self.size,
                "subscriptions": len(self.subscriptions), "running": self.running}

    def stop(self) -> None:
        """Stop at once (the worker ends after the frame in hand and frees the codecs)."""
        if self.closed:
            return
        self.closed = True
        self.subscriptions.clear()
        self._work.put(None)
        self._tasks.cancel()
        logger.info("%s stopped after %d frames in, %d out, %.2f s of CPU", self._label,
                    self.frames_in, self.frames_out, self.cpu_s)

    async def close(self) -> None:
        """``stop``, and wait for the worker thread to end."""
        self.stop()
        await self._tasks.close()
        await asyncio.to_thread(self._thread.join, 5.0)
