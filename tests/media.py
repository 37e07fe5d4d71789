"""Real aiortc peers for media tests: synthetic tracks that carry a frame counter (video) or a
tone (audio), and a peer that publishes and subscribes through the relay's protocol."""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

WIDTH, HEIGHT, BITS = 320, 240, 16
BLOCK = WIDTH // BITS
VIDEO_CLOCK = 90000


class CounterTrack(MediaStreamTrack):
    """Video whose frame n shows n as 16 black/white blocks along the top (readable after
    lossy coding), at ``fps`` frames a second."""

    kind = "video"

    def __init__(self, fps: int = 15) -> None:
        super().__init__()
        self.fps = fps
        self.count = 0
        self.sent_at: dict[int, float] = {}
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.count / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = self.picture(self.count)
        frame.pts = int(self.count * VIDEO_CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.sent_at[self.count] = time.monotonic()
        self.count += 1
        return frame

    def picture(self, n: int) -> av.VideoFrame:
        """Frame ``n``'s picture (a subclass may draw more around the counter)."""
        return counter_frame(n)


def counter_frame(n: int) -> av.VideoFrame:
    luma = bytearray(b"\x20" * (WIDTH * HEIGHT))
    for bit in range(BITS):
        if n >> bit & 1:
            for y in range(BLOCK):
                start = y * WIDTH + bit * BLOCK
                luma[start:start + BLOCK] = b"\xe0" * BLOCK
    frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
    frame.planes[0].update(bytes(luma))
    frame.planes[1].update(b"\x80" * (WIDTH * HEIGHT // 4))
    frame.planes[2].update(b"\x80" * (WIDTH * HEIGHT // 4))
    return frame


def read_counter(frame: av.VideoFrame) -> int:
    """The counter drawn by ``counter_frame``, read at each block's centre."""
    gray = frame.reformat(width=WIDTH, height=HEIGHT, format="gray")
    plane = gray.planes[0]
    row = BLOCK // 2
    data = bytes(plane)
    line = data[row * plane.line_size: row * plane.line_size + WIDTH]
    value = 0
    for bit in range(BITS):
        if line[bit * BLOCK + BLOCK // 2] > 128:
            value |= 1 << bit
    return value


class ToneTrack(MediaStreamTrack):
    """A sine tone, 20 ms frames of 48 kHz mono."""

    kind = "audio"

    def __init__(self, hz: float = 440.0) -> None:
        super().__init__()
        self.hz = hz
        self.samples = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.samples / 48000
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        count = 960
        pcm = bytearray()
        for i in range(count):
            value = int(8000 * math.sin(2 * math.pi * self.hz * (self.samples + i) / 48000))
            pcm += value.to_bytes(2, "little", signed=True)
        frame = av.AudioFrame(format="s16", layout="mono", samples=count)
        frame.planes[0].update(bytes(pcm))
        frame.sample_rate = 48000
        frame.pts = self.samples
        frame.time_base = fractions.Fraction(1, 48000)
        self.samples += count
        return frame


@dataclass
class Received:
    """What a subscriber got on one track."""

    mid: str
    kind: str
    info: dict[str, Any]
    counters: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    audio_frames: int = 0
    ended: bool = False
    reading: bool = True


Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class MediaPeer:
    """A participant's client side: one publish and one subscribe peer connection, driven
    through ``call(command, payload)`` (the relay directly, or the signaling socket)."""

    def __init__(self, name: str, call: Call) -> None:
        self.name = name
        self.call = call
        self.publish_pc: RTCPeerConnection | None = None
        self.subscribe_pc: RTCPeerConnection | None = None
        self.subscribe_id: str | None = None
        self.tracks: dict[str, dict[str, Any]] = {}
        self.received: dict[str, Received] = {}
        self.video: CounterTrack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.offers = 0

    async def publish(self, video: bool = True, audio: bool = True, fps: int = 15,
                      source: str = "camera", video_codec: str | None = None,
                      audio_hz: float = 440.0, video_track: CounterTrack | None = None,
                      prepare: Callable[[RTCPeerConnection], None] | None = None
                      ) -> dict[str, Any]:
        """``video_track``: the camera (a new ``CounterTrack(fps)`` by default);
        ``prepare``: called with the connection once its transceivers exist, before the offer
        (a sender's encoder, as tests/layered_vp8.py gives)."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.publish_pc = pc
        sources: dict[str, str] = {}
        transceivers = []
        if audio:
            transceivers.append((pc.addTransceiver(ToneTrack(audio_hz), direction="sendonly"),
                                 "microphone"))
        if video:
            self.video = video_track or CounterTrack(fps)
            transceiver = pc.addTransceiver(self.video, direction="sendonly")
            if video_codec is not None:
                capabilities = RTCRtpSender.getCapabilities("video")
                assert capabilities is not None
                transceiver.setCodecPreferences([
                    c for c in capabilities.codecs
                    if c.mimeType.lower() in (f"video/{video_codec.lower()}", "video/rtx")])
            transceivers.append((transceiver, source))
        if prepare is not None:
            prepare(pc)
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        for transceiver, name in transceivers:
            sources[transceiver.mid] = name
        answer = await self.call("publish", {"sdp": pc.localDescription.sdp,
                                             "sources": sources})
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return answer

    async def subscribe(self, configuration: RTCConfiguration | None = None) -> None:
        """``configuration``: the subscribe connection's (TURN tests); default no ICE
        servers, max-bundle."""
        # max-bundle: with aiortc's default (balanced) bundling, an answerer that creates
        # several receivers of one kind at once leaves some on a transport it discards.
        pc = RTCPeerConnection(configuration or RTCConfiguration(
            iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
        self.subscribe_pc = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            transceiver = next(t for t in pc.getTransceivers() if t.receiver.track is track)
            received = Received(transceiver.mid or "", track.kind,
                                self.tracks.get(transceiver.mid or "", {}))
            self.received[received.mid] = received
            self._tasks.append(asyncio.ensure_future(self._read(track, received)))

        offer = await self.call("subscribe", {})
        await self.answer_offer(offer)

    async def answer_offer(self, offer: dict[str, Any]) -> None:
        assert self.subscribe_pc is not None
        self.offers += 1
        self.subscribe_id = offer["transport_id"]
        self.tracks.update(offer["tracks"])
        for mid, info in offer["tracks"].items():
            if mid in self.received:
                self.received[mid].info = info
        await self.subscribe_pc.setRemoteDescription(RTCSessionDescription(offer["sdp"],
                                                                           "offer"))
        answer = await self.subscribe_pc.createAnswer()
        await self.subscribe_pc.setLocalDescription(answer)
        await self.call("answer", {"transport_id": offer["transport_id"],
                                   "sdp": self.subscribe_pc.localDescription.sdp})

    async def _read(self, track: MediaStreamTrack, received: Received) -> None:
        try:
            while True:
                if not received.reading:
                    await asyncio.sleep(0.05)
                    continue
                frame = await track.recv()
                received.arrivals.append(time.monotonic())
                if received.kind == "video":
                    received.counters.append(read_counter(frame))
                else:
                    received.audio_frames += 1
        except (MediaStreamError, asyncio.CancelledError):
            received.ended = True

    def video_from(self, participant_id: str, source: str = "camera") -> Received | None:
        for received in self.received.values():
            info = received.info
            if info.get("participant_id") == participant_id and info.get("source") == source:
                return received
        return None

    def frames(self, participant_id: str, source: str = "camera") -> int:
        """How many frames of the participant's video this peer decoded so far."""
        received = self.video_from(participant_id, source)
        return len(received.counters) if received is not None else 0

    async def send_pli(self, source: str = "camera") -> None:
        """Report picture loss (RTCP PLI) on the received track of ``source``, as a browser
        does when it cannot decode."""
        assert self.subscribe_pc is not None
        transceiver = next(t for t in self.subscribe_pc.getTransceivers()
                           if self.tracks.get(t.mid or "", {}).get("source") == source)
        ssrc = next(iter(transceiver.receiver._RTCRtpReceiver__remote_streams))
        await transceiver.receiver._send_rtcp_pli(ssrc)

    def stall(self) -> None:
        """Stop reading the subscribe connection's socket altogether: its kernel buffer
        fills and the rest of what the relay sends is dropped on the floor."""
        assert self.subscribe_pc is not None
        ice = self.subscribe_pc.getTransceivers()[0].receiver.transport.transport
        for protocol in ice._connection._protocols:
            protocol.transport.pause_reading()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for pc in (self.publish_pc, self.subscribe_pc):
            if pc is not None:
                await pc.close()


def check_stream(received: Received, *, at_least: int) -> None:
    counters = received.counters
    assert len(counters) >= at_least, (len(counters), counters[-5:])
    # In order, and no frame lost on loopback once the stream started.
    assert counters == list(range(counters[0], counters[0] + len(counters))), counters


async def check_everyone_sees_everyone(peers: dict[str, MediaPeer], *, frames: int = 45,
                                       audio_frames: int = 50, timeout: float = 30) -> None:
    """Every peer decodes every other peer's video (``frames`` in order, none lost) and hears
    its microphone."""
    for name, peer in peers.items():
        for other in peers:
            if other != name:
                await wait_for(lambda p=peer, o=other: p.frames(o) >= frames, timeout,
                               f"{name} decoding {other}")
    for name, peer in peers.items():
        for other in peers:
            if other == name:
                continue
            video = peer.video_from(other)
            assert video is not None
            check_stream(video, at_least=frames)
            audio = peer.video_from(other, source="microphone")
            assert audio is not None and audio.audio_frames >= audio_frames, (name, other)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll the coroutine ``check`` every 50 ms for at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
                   what: str = "condition") -> None:
    """Poll ``predicate`` every 50 ms for at most ``timeout`` seconds."""

    async def check() -> bool:
        return predicate()

    await wait_until(check, timeout, what)
