"""Rendition: one low-rate re-encoding of a VP8 publication (fitted into 320x180, 5 to 15 fps,
40 to 150 kbps) for the subscribers whose link cannot carry even its base layer: the step
between layer 0 and the video pause. One per publication whatever the number of such
subscribers; the publication starts it for the first and closes it once the last has gone back
(relay/publication.py).

Its rate is a rung of a short ladder (``LADDER``), the best one the weakest of its subscribers
can carry: each subscription's ``budget_bps`` (the video its subscriber's link may take now,
set from the relay's pacer estimate) is read every ``RUNG_CHECK_S``; ``choose_rung`` steps down
as soon as the weakest budget is under the rung's bitrate x ``DOWN_MARGIN`` and up only past
the next rung's x ``UP_MARGIN``, and ``RungChooser`` moves at most once per ``RUNG_HOLD_S``: a
move reopens the encoder, so each costs a keyframe (several frames' worth of bits on the very
links that are short of them). One rendition serves all its subscribers, so a vsat site and an
island watching the same camera both get the island's rung: a second rendition per publication
would double the relay's CPU for the better of the two.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
from aiortc.rtp import RtpPacket

from codec.rtp import SEQ_MOD, TS_MOD, Vp8Descriptor, seq_newer, vp8_descriptor_length
from relay.pacer import PACKET_OVERHEAD
from relay.tasks import Tasks
from relay.timing import ntp_now

if TYPE_CHECKING:
    from relay.forwarding import Forwarder, KeyframeSource

logger = logging.getLogger(__name__)

WIDTH, HEIGHT = 320, 180
"""The rendition fits in this box, keeping the publisher's aspect ratio (320x240 -> 240x180)."""


@dataclass(frozen=True)
class Rung:
    """One rate of the rendition: frames per second kept of the publisher's, libvpx's target
    bitrate (bits per second), and the box the picture is fitted into."""

    fps: int
    bitrate: int
    box: tuple[int, int] = (WIDTH, HEIGHT)

    def __str__(self) -> str:
        return f"{self.fps} fps {self.bitrate // 1000} kbps"


LADDER: tuple[Rung, ...] = (Rung(15, 150_000), Rung(10, 100_000), Rung(8, 64_000),
                            Rung(5, 40_000))
"""Best first. About 0.2 bits per pixel a frame on each rung at 240x180 (a 4:3 camera), where
libvpx keeps a readable picture; measured (tests/relay/test_rendition_rungs.py, figures in
docs/benchmarks.md "#15 thin rendition"): each rung comes out within 5 % of its bitrate with
a keyframe every 2 s, its keyframes 1-4 KB (well inside truong-sa's 16 KB queue). The same
box on every rung: a smaller one (180x136) gave a worse picture at the same bitrate (PSNR 32
against 40 dB, scaled back) and keyframes no smaller, so the ladder trades frames, not pixels.
vsat's budget (about 200 kbps of video a camera with two cameras and their audio on 512
kbps) takes the first rung, 15 fps; truong-sa's (about 90 of 256 kbps) the third, 8 fps."""
DEFAULT_RUNG = 1
"""Where a rendition starts when no subscriber's budget is known, and what an unknown budget
(None) counts as: the rate the rendition had before the ladder, 10 fps at 100 kbps."""
DOWN_MARGIN = 1.1
"""Step down as soon as the weakest budget is under the current rung's bitrate times this."""
UP_MARGIN = 1.3
"""Step up only when the weakest budget is over the higher rung's bitrate times this."""
RUNG_HOLD_S = 3.0
"""At least this long between two changes of rung (each reopens the encoder: a keyframe)."""
UP_FAILED_S = 10.0
"""A step down this soon after a step up means the step up failed."""
UP_BLOCK_S = 12.0
"""A rung whose step up failed is not stepped up to again for this long ..."""
UP_BLOCK_MAX_S = 48.0
"""... doubled by each step up that fails after it, up to this."""
RUNG_CHECK_S = 1.0
"""How often the subscribers' budgets are read."""
PACKET_MAX = 1200
"""Largest payload of a rendition packet (descriptor included)."""
QUEUE_FRAMES = 30
"""Whole frames waiting for the worker at most; past that it is behind: the frames are dropped
up to the publisher's next keyframe (asked for)."""
RATE_MEASURE_S = 2.0
"""A rung's output rate is measured over at least this long since it began."""
RATIO_MIN = 0.25
"""The picture is taken to fill at least this share of a rung's bitrate (a still picture's
first seconds say little of the next movement)."""
KEYFRAME_INTERVAL_S = 0.3
"""Keyframes of the rendition on request at most this often."""
CLOCK = 90000
TIME_BASE = fractions.Fraction(1, CLOCK)


def choose_rung(budgets: Iterable[float | None], current: int | None,
                ladder: tuple[Rung, ...] = LADDER, default: int = DEFAULT_RUNG) -> int:
    """The rung (an index in ``ladder``, best first) for subscribers of these video budgets
    (bits per second; None: unknown), being on ``current`` now (None: starting). The weakest
    budget decides. An unknown budget counts as just enough for the ``default`` rung, up to it
    and not past it; no subscriber at all keeps the current rung. Down at once to the best
    rung under the budget (``DOWN_MARGIN``), the lowest if none is; up only to a rung whose
    bitrate the budget passes by ``UP_MARGIN``, so a budget near a rung's bitrate does not make
    it flap."""
    unknown = round(ladder[default].bitrate * UP_MARGIN)
    weakest = min((unknown if b is None else b for b in budgets), default=None)
    if weakest is None:
        return default if current is None else current
    fits = [n for n, rung in enumerate(ladder) if round(rung.bitrate * DOWN_MARGIN) <= weakest]
    if current is None:
        return fits[0] if fits else len(ladder) - 1
    if current not in fits:
        below = [n for n in fits if n > current]
        return below[0] if below else len(ladder) - 1
    above = [n for n, rung in enumerate(ladder[:current])
             if round(rung.bitrate * UP_MARGIN) <= weakest]
    return above[0] if above else current


class RungChooser:
    """``choose_rung`` on a clock: a change at most once per ``hold_s``; a step up that a step
    down follows within ``UP_FAILED_S`` failed, and its rung is not stepped up to again for
    ``UP_BLOCK_S``, doubled by each failure after it (up to ``UP_BLOCK_MAX_S``); a step up
    that holds resets it. Why: the budget comes from the
    pacer's estimate, which grows while nothing is lost up to twice what is sent, so on a
    link whose every rung is near its rate it climbs past it; each step costs a keyframe, and
    an island's rendition went 8, 10, 15, 10, 5 fps in 20 s (bench/thin_link.py)."""

    def __init__(self, budgets: Iterable[float | None], ladder: tuple[Rung, ...] = LADDER,
                 hold_s: float = RUNG_HOLD_S, now: float | None = None) -> None:
        self.ladder = ladder
        self.hold_s = hold_s
        self.index = choose_rung(budgets, None, ladder)
        self.changed_at = time.monotonic() if now is None else now
        self.changes = 0
        self.block_s = UP_BLOCK_S
        """How long a rung that failed is not stepped up to (doubled by each failure)."""
        self.blocked: tuple[int, float] | None = None
        """(the rung that failed, until when): no step up to it or past it before then."""
        self._up_at: float | None = None

    @property
    def rung(self) -> Rung:
        return self.ladder[self.index]

    def update(self, now: float, budgets: Iterable[float | None]) -> Rung | None:
        """The new rung if it changes now, else None."""
        if self._up_at is not None and now - self._up_at > UP_FAILED_S:
            self._up_at = None  # the last step up held
            self.block_s = UP_BLOCK_S
        if now - self.changed_at < self.hold_s:
            return None
        index = choose_rung(budgets, self.index, self.ladder)
        if index < self.index and self.blocked is not None and now < self.blocked[1]:
            index = max(index, self.blocked[0] + 1)  # not up to the rung that failed
        if index == self.index:
            return None
        if index < self.index:  # up
            self._up_at = now
        elif self._up_at is not None:  # down soon after a step up: it failed
            self._up_at = None
            self.blocked = (self.index, now + self.block_s)
            self.block_s = min(self.block_s * 2, UP_BLOCK_MAX_S)
        self.index = index
        self.changed_at = now
        self.changes += 1
        return self.ladder[index]


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
    """The codec work, in the worker thread: VP8 frames in, fewer smaller VP8 frames out, at
    the rate of its rung (``set_rung``)."""

    def __init__(self, rung: Rung = LADDER[DEFAULT_RUNG]) -> None:
        self.decoder: Any = av.CodecContext.create("vp8", "r")
        self.encoder: Any = None
        self.rung = rung
        self.size: tuple[int, int] | None = None
        self.due: int | None = None
        """Unwrapped RTP timestamp from which the next frame is kept."""
        self.decoded = 0
        self.encoded = 0

    @property
    def fps(self) -> int:
        return self.rung.fps

    @property
    def bitrate(self) -> int:
        return self.rung.bitrate

    def set_rung(self, rung: Rung) -> None:
        """Encode at ``rung`` from the next frame kept: libvpx is reopened (its rate control
        is set when it opens), so that frame is a keyframe."""
        if rung != self.rung:
            self.rung = rung
            self.encoder = None
            self.due = None

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

    def _keep(self, ts: int, want_key: bool) -> bool:
        """Whether the frame at ``ts`` is one of the rung's: one each ``1/fps`` on average.
        The next one is due a frame interval after the last one was due, not after it came,
        so a rate that does not divide the publisher's still comes out whole (15 of 20 fps:
        three frames in four; "one at least 1/15 s after the last" would keep one in two).
        After a gap, or a frame forced (a keyframe), it counts from that frame."""
        interval = CLOCK // self.fps
        due = self.due
        if not want_key and due is not None and ts < due:
            return False
        if want_key or due is None or ts - due >= interval:
            due = ts
        self.due = due + interval
        return True

    def frame(self, data: bytes, ts: int, want_key: bool) -> list[tuple[bytes, bool]]:
        """Decode one frame of the publisher (``ts``: its unwrapped RTP timestamp); the
        encoded frames due, with whether each is a keyframe."""
        packet = av.Packet(data)
        packet.pts = ts
        packet.time_base = TIME_BASE
        out: list[tuple[bytes, bool]] = []
        for picture in self.decoder.decode(packet):
            self.decoded += 1
            if not self._keep(ts, want_key or self.encoder is None):
                continue
            width, height = fit(picture.width, picture.height, self.rung.box)
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
            self.encoded += 1
            want_key = False
        return out

    def close(self) -> None:
        self.decoder = None
        self.encoder = None


class Rendition:
    """The thin rendition of one publication (see the module doc)."""

    def __init__(self, publication: KeyframeSource, *,
                 budgets: Callable[[], Iterable[float | None]] = tuple,
                 ladder: tuple[Rung, ...] = LADDER) -> None:
        """``budgets``: the video budgets (bits per second, None: unknown) of the subscribers
        it is for, read now and every ``RUNG_CHECK_S`` to choose its rung."""
        self.publication = publication
        self._budgets = budgets
        self._chooser = RungChooser(budgets(), ladder)
        self.rung = self._chooser.rung
        """The rung chosen; the worker encodes at it from its next frame."""
        self.subscriptions: set[Forwarder] = set()
        """What receives its packets (subscriptions on it, handovers waiting for its
        keyframe)."""
        self.closed = False
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        """Publisher's frames not decoded: incomplete, or the worker was behind."""
        self.keyframes_out = 0
        self.bytes_out = 0
        """Bytes of its packets on the link (with ``PACKET_OVERHEAD``)."""
        self.fill = 1.0
        """The share of its rung's bitrate the picture filled lately (``check_rung``)."""
        self._rung_mark = (time.monotonic(), 0)
        """When the rung began, and ``bytes_out`` then."""
        self.cpu_s = 0.0
        """CPU time the worker thread spent (decode, scale, encode)."""
        self.size: tuple[int, int] | None = None
        self._transcoder: Transcoder | None = Transcoder(self.rung)
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
        self._tasks.spawn(self._rung_loop())
        publication.request_keyframe()
        logger.info("%s started at %s", self._label, self.rung)

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

    @property
    def fps(self) -> int:
        return self.rung.fps

    @property
    def rung_changes(self) -> int:
        return self._chooser.changes

    def frame_rate(self) -> float:
        """The frames per second its rung keeps (fewer if the publisher sends fewer)."""
        return float(self.rung.fps)

    # -- its rung -------------------------------------------------------------------------
    def check_rung(self, now: float | None = None) -> Rung | None:
        """Read the subscribers' budgets and move to the rung they call for, if it is time
        (``RungChooser``); the new rung, or None."""
        now = time.monotonic() if now is None else now
        budgets = list(self._budgets())
        # What the rung really gives: libvpx reaches its target on a noisy camera, far less
        # on a still one (Chromium's fake camera: 60 of 100 kbps at 10 fps). A budget is
        # compared with the rungs as this picture fills them, so a link that carries the
        # next rung as it would come out gets it.
        at, sent = self._rung_mark
        ratio = 1.0
        if now - at >= RATE_MEASURE_S and self.rung.bitrate:
            ratio = min(1.0, max(RATIO_MIN, (self.bytes_out - sent) * 8 / (now - at)
                                 / self.rung.bitrate))
        self.fill = ratio
        scaled = [None if b is None else b / ratio for b in budgets]
        rung = self._chooser.update(now, scaled)
        if rung is None or self.closed:
            return None
        self._rung_mark = (now, self.bytes_out)
        before, self.rung = self.rung, rung
        known = [b for b in budgets if b is not None]
        logger.info("%s rung %s -> %s (weakest budget %s of %d subscribers; the picture "
                    "fills %.0f %% of a rung's bitrate)", self._label, before, rung,
                    f"{min(known) / 1000:.0f} kbps" if known else "unknown", len(budgets),
                    ratio * 100)
        return rung

    async def _rung_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(RUNG_CHECK_S)
            self.check_rung()

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
                transcoder.set_rung(self.rung)  # a new rung: libvpx reopened, a keyframe
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
            self.bytes_out += sum(len(p) + PACKET_OVERHEAD for p in payloads)
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
                "cpu_s": round(self.cpu_s, 3), "size": self.size, "rung": str(self.rung),
                "rung_changes": self.rung_changes,
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
