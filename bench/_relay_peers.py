"""The processes of ``bench/relay_fanout.py``: the VP8 clip, the media server under test (the
relay's ``LocalRelay``, or aiortc's ``MediaRelay`` as the baseline) behind a small JSON-lines
RPC, the publisher and the subscriber workers. Each process is an asyncio program driven by the
orchestrator over a multiprocessing pipe; nothing here decodes video except the baseline server.

Measurement points (all ``time.time()``, comparable across processes on one machine):

* publisher: each RTP packet of its video sender, after it was handed to the socket (a wrapper
  around the sender's ``RTCDtlsTransport._send_rtp``): per frame, the time its last (marker)
  packet left, its RTP timestamp and its VP8 picture id;
* subscriber: each RTP packet that reaches its receiver's jitter buffer (aiortc's receive path
  ran: SRTP, statistics, NACK, REMB), which is replaced by a counting tap: per frame, the time it
  became complete (first and marker packet and every sequence number between them).

The relay forwards payloads untouched, so a subscriber's frame is matched to the publisher's by
the VP8 picture id. The baseline re-encodes: there the match is by RTP timestamp, through each
outgoing sender's timestamp origin, which the baseline server learns from its first packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, convert_timebase
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, pack_remb_fci

from codec.rtp import (
    rtp_marker,
    rtp_payload_offset,
    rtp_ssrc,
    rtp_timestamp,
    seq_distance,
    ts_add,
    vp8_frame_is_keyframe,
    vp8_frame_start,
    vp8_picture_id,
)
from relay import hooks
from relay.config import MediaConfig
from relay.embedded import LocalRelay
from relay.errors import UnknownRoom
from relay.udp_mux import UdpMux

try:
    from bench._clips import encode_vp8_ivf
except ImportError:  # run as a script: bench/ itself is on sys.path
    from _clips import encode_vp8_ivf  # type: ignore[no-redef]

HOST = "127.0.0.1"
ROOM = "fanout"
PUBLISHER_ID = "publisher"
WIDTH, HEIGHT, FPS, BITRATE, GOP = 640, 480, 30, 500_000, 30
ENCODER_BITRATE = 540_000
"""libvpx undershoots on this content: asked for 540 kbps, the clip comes out at ~500 kbps."""
VIDEO_CLOCK = 90_000
TICKS_PER_FRAME = VIDEO_CLOCK // FPS
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
CLIP_SECONDS = 10
CLIP_WARMUP_FRAMES = GOP
"""libvpx's first keyframe is ~100 KB (it starts at high quality): the clip starts at the second."""
CLIP_SOURCE = f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS},noise=alls=10:allf=t"
RPC_LINE_LIMIT = 1 << 20
RPC_TIMEOUT_S = 30.0
SUBSCRIBE_CONCURRENCY = 4
CLOSE_TIMEOUT_S = 20.0
SFU_MODES = ("sfu", "sfu-1port")
"""The relay with aioice's socket per connection, and in single-port mode (relay.udp_port)."""
JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"
ESTIMATOR_ATTR = "_RTCRtpReceiver__remote_bitrate_estimator"
RTCP_SSRC_ATTR = "_RTCRtpReceiver__rtcp_ssrc"
REMB_BPS = 1_500_000
REMB_TICK_S = 0.05
"""Browser-like REMB: each subscriber reports once a second, the subscribers of a process
spread over the second in ticks of this length."""

logger = logging.getLogger("bench.relay_fanout")


# -- the clip -------------------------------------------------------------------------------


def clip_path(cache_dir: Path) -> Path:
    return cache_dir / f"vp8-{WIDTH}x{HEIGHT}-{FPS}fps-{BITRATE // 1000}k-g{GOP}-v3.ivf"


def ensure_clip(cache_dir: Path) -> tuple[Path, bool]:
    """The cached clip, encoded once with libvpx (PyAV) from FFmpeg's ``testsrc2`` pattern with
    temporal noise. Returns the path and whether it was made now."""
    path = clip_path(cache_dir)
    if path.exists():
        try:
            if len(load_clip(path)) == CLIP_SECONDS * FPS:
                return path, False
        except (av.error.FFmpegError, ValueError):
            pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.part")
    try:
        _encode_clip(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path, True


def _encode_clip(path: Path) -> None:
    encode_vp8_ivf(path, source=CLIP_SOURCE, seconds=CLIP_SECONDS,
                   warmup=CLIP_WARMUP_FRAMES, fps=FPS, width=WIDTH, height=HEIGHT,
                   bitrate=ENCODER_BITRATE, gop=GOP)


def load_clip(path: Path) -> list[tuple[bytes, bool]]:
    """The clip's encoded frames and whether each is a keyframe."""
    frames: list[tuple[bytes, bool]] = []
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            if packet.size:
                data = bytes(packet)
                frames.append((data, vp8_frame_is_keyframe(data)))
    if not frames or not frames[0][1]:
        raise ValueError(f"{path}: the clip must start with a keyframe")
    return frames


def clip_summary(frames: list[tuple[bytes, bool]]) -> dict[str, Any]:
    size = sum(len(data) for data, _ in frames)
    return {"frames": len(frames), "keyframes": sum(1 for _, key in frames if key),
            "kbps": round(size * 8 * FPS / len(frames) / 1000),
            "max_frame_bytes": max(len(data) for data, _ in frames)}


class ClipTrack(MediaStreamTrack):
    """Pre-encoded VP8 at 30 fps: ``recv()`` returns ``av.Packet``s (the sender only packetizes
    them), the clip looped with steadily increasing timestamps. A keyframe request (PLI/FIR)
    jumps to the clip's next keyframe, the way a live encoder answers one."""

    kind = "video"

    def __init__(self, frames: list[tuple[bytes, bool]]) -> None:
        super().__init__()
        self._frames = frames
        self._keyframes = [i for i, (_, key) in enumerate(frames) if key]
        self._position = 0
        self.sent = 0
        self.keyframes_forced = 0
        self.keyframe_wanted = False
        self._start: float | None = None

    async def recv(self) -> av.Packet[Any]:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + self.sent / FPS - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.2:
            # Far behind (an overloaded machine): resume the pace instead of bursting.
            self._start = loop.time() - self.sent / FPS
        position = self._position % len(self._frames)
        if self.keyframe_wanted:
            self.keyframe_wanted = False
            if not self._frames[position][1]:
                position = next((k for k in self._keyframes if k > position), 0)
                self.keyframes_forced += 1
        data, _ = self._frames[position]
        packet = av.Packet(data)
        packet.pts = self.sent * TICKS_PER_FRAME
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._position = position + 1
        self.sent += 1
        return packet


# -- publisher-side send log ----------------------------------------------------------------


@dataclass(slots=True)
class SentFrame:
    picture_id: int
    timestamp: int
    first_t: float
    last_t: float
    packets: int


class SendLog:
    """Per frame: when its packets left the publisher (after SRTP and ``sendto``)."""

    def __init__(self, ssrc: int) -> None:
        self.ssrc = ssrc
        self.frames: dict[int, SentFrame] = {}

    def record(self, data: bytes) -> None:
        now = time.time()
        if len(data) < 13 or rtp_ssrc(data) != self.ssrc:
            return  # RTX or another stream
        timestamp = rtp_timestamp(data)
        frame = self.frames.get(timestamp)
        if frame is None:
            frame = SentFrame(vp8_picture_id(data, rtp_payload_offset(data)), timestamp, now,
                              0.0, 0)
            self.frames[timestamp] = frame
        frame.packets += 1
        if rtp_marker(data) and not frame.last_t:
            frame.last_t = now

    def window(self, t0: float, t1: float) -> list[tuple[int, int, float, float, int]]:
        """Frames whose last packet left in [t0, t1); older frames are forgotten."""
        chosen = [(f.picture_id, f.timestamp, f.first_t, f.last_t, f.packets)
                  for f in self.frames.values() if f.last_t and t0 <= f.last_t < t1]
        self.frames = {k: f for k, f in self.frames.items() if f.first_t >= t0 - 5.0}
        return chosen


def tap_sender(sender: RTCRtpSender, log: SendLog) -> None:
    transport = sender.transport
    original = transport._send_rtp

    async def send(data: bytes) -> None:
        await original(data)
        log.record(data)

    transport._send_rtp = send  # type: ignore[method-assign]


def vp8_only(kind: str = "video") -> list[RTCRtpCodecCapability]:
    capabilities = RTCRtpSender.getCapabilities(kind)
    return [c for c in capabilities.codecs
            if c.mimeType.lower() in ("video/vp8", "video/rtx")]


# -- subscriber-side tap ---------------------------------------------------------------------


class FrameRecord:
    __slots__ = ("done_t", "end_seq", "first_t", "picture_id", "seqs", "start_seq")

    def __init__(self, now: float, picture_id: int) -> None:
        self.first_t = now
        self.done_t = 0.0
        self.picture_id = picture_id
        self.start_seq = -1
        self.end_seq = -1
        self.seqs: set[int] = set()


class FrameTap:
    """Replaces a receiver's jitter buffer: counts complete frames and when they completed;
    returns no frame, so nothing is decoded."""

    __slots__ = ("complete", "frames", "packets", "ssrc")

    def __init__(self) -> None:
        self.frames: dict[int, FrameRecord] = {}
        self.complete = 0
        self.packets = 0
        self.ssrc: int | None = None

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        now = time.time()
        self.packets += 1
        self.ssrc = packet.ssrc
        payload = packet.payload
        record = self.frames.get(packet.timestamp)
        if record is None:
            record = FrameRecord(now, vp8_picture_id(payload))
            self.frames[packet.timestamp] = record
        elif record.done_t:
            return False, None
        seq = packet.sequence_number
        if seq in record.seqs:
            return False, None
        record.seqs.add(seq)
        if vp8_frame_start(payload):
            record.start_seq = seq
        if packet.marker:
            record.end_seq = seq
        if record.start_seq >= 0 and record.end_seq >= 0 and \
                len(record.seqs) == seq_distance(record.end_seq, record.start_seq) + 1:
            record.done_t = now
            self.complete += 1
        return False, None

    def collect(self, since: float) -> list[tuple[int, int, float]]:
        """Complete frames that started at or after ``since``: (rtp timestamp, picture id,
        completion time). Forgets every frame that started before now - 1 s."""
        done = [(ts, r.picture_id, r.done_t) for ts, r in self.frames.items()
                if r.done_t and r.first_t >= since]
        horizon = time.time() - 1.0
        self.frames = {ts: r for ts, r in self.frames.items() if r.first_t >= horizon}
        return done


def tap_receiver(receiver: RTCRtpReceiver, tap: FrameTap) -> None:
    if not hasattr(receiver, JITTER_ATTR):
        raise RuntimeError(f"this aiortc's RTCRtpReceiver has no {JITTER_ATTR}")
    setattr(receiver, JITTER_ATTR, tap)


# -- JSON-lines RPC ---------------------------------------------------------------------------


class RpcPeer:
    """One client connection of the server: replies and pushed events."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def push(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")


class Backend:
    async def handle(self, peer: RpcPeer, cmd: str, args: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


async def start_rpc_server(backend: Backend) -> asyncio.Server:
    tasks: set[asyncio.Task[None]] = set()

    async def answer(peer: RpcPeer, message: dict[str, Any]) -> None:
        try:
            result = await backend.handle(peer, str(message["cmd"]), message.get("args") or {})
            peer.push({"id": message["id"], "result": result})
        except Exception as exc:
            logger.debug("rpc %s failed", message.get("cmd"), exc_info=True)
            peer.push({"id": message["id"], "error": f"{type(exc).__name__}: {exc}"})

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RpcPeer(writer)
        try:
            while line := await reader.readline():
                task = asyncio.get_running_loop().create_task(answer(peer, json.loads(line)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_client, HOST, 0, limit=RPC_LINE_LIMIT)


class RpcClient:
    def __init__(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        self._on_event = on_event
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self, port: int) -> None:
        self._reader, self._writer = await asyncio.open_connection(HOST, port,
                                                                   limit=RPC_LINE_LIMIT)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def call(self, cmd: str, **args: Any) -> Any:
        if self._writer is None:
            raise ConnectionError("not connected")
        self._next += 1
        request_id = self._next
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._writer.write(json.dumps({"id": request_id, "cmd": cmd, "args": args}).encode()
                           + b"\n")
        try:
            return await asyncio.wait_for(future, RPC_TIMEOUT_S)
        finally:
            self._pending.pop(request_id, None)

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "id" in message:
                    future = self._pending.pop(message["id"], None)
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(RuntimeError(message["error"]))
                    else:
                        future.set_result(message.get("result"))
                else:
                    self._on_event(message)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("rpc connection closed"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


# -- servers under test -------------------------------------------------------------------------


class SfuBackend(Backend):
    """The relay under test: a ``LocalRelay`` driven through the RPC; its renegotiation offers
    and notices are pushed to the connection that joined the participant."""

    def __init__(self, udp_port: int | None = None) -> None:
        """``udp_port``: single-port mode (relay.udp_port), every connection on that port."""
        self.owners: dict[str, RpcPeer] = {}
        self.notices: Counter[str] = Counter()
        self.offers_pushed = 0
        self.relay = LocalRelay("bench", config=MediaConfig(host_addresses=[HOST],
                                                            udp_port=udp_port), events=self)
        self.timing: list[tuple[bytes, float]] | None = None
        self._untimed_send = hooks.SenderLeg.send

    def timing_start(self) -> None:
        """Until ``timing_stop``, note when the relay hands each frame's last (marker) packet to
        a subscriber's transport: with the publisher's send times, the relay's own share of the
        latency, whatever the subscribers' processes do. Costs a wrapper coroutine per
        forwarded packet (~1 % of the relay's CPU, measured at N=128)."""
        original = self._untimed_send
        timing: list[tuple[bytes, float]] = []
        self.timing = timing

        async def send(leg: hooks.SenderLeg, packet: RtpPacket, ntp_time: int) -> None:
            await original(leg, packet, ntp_time)
            if packet.marker:
                timing.append((packet.payload[:4], time.time()))

        hooks.SenderLeg.send = send  # type: ignore[method-assign,assignment]

    def timing_stop(self) -> list[tuple[int, float]]:
        hooks.SenderLeg.send = self._untimed_send  # type: ignore[method-assign]
        timing, self.timing = self.timing or [], None
        return [(vp8_picture_id(head), t) for head, t in timing]

    # RelayEvents
    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        owner = self.owners.get(participant_id)
        if owner is not None:
            self.offers_pushed += 1
            owner.push({"event": "offer", "participant": participant_id, "offer": offer})

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        return None

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        self.notices[str(notice.get("code"))] += 1
        owner = self.owners.get(participant_id)
        if owner is not None:
            owner.push({"event": "notice", "participant": participant_id, "notice": notice})

    async def handle(self, peer: RpcPeer, cmd: str, args: dict[str, Any]) -> Any:
        relay = self.relay
        room = str(args.get("room", ROOM))
        participant = str(args.get("participant", ""))
        if cmd == "open_room":
            await relay.open_room(room)
        elif cmd == "join":
            self.owners[participant] = peer
            await relay.join(room, participant)
        elif cmd == "publish":
            return await relay.publish(room, participant, args["sdp"], args["sources"])
        elif cmd == "subscribe":
            return await relay.subscribe(room, participant)
        elif cmd == "answer":
            await relay.answer(room, participant, args["transport_id"], args["sdp"])
        elif cmd == "leave":
            await relay.leave(room, participant)
        else:
            raise ValueError(f"unknown command {cmd!r}")
        return None

    async def start(self) -> None:
        """As ``serve`` starts the relay: hooks checked, the single port bound if asked."""
        await self.relay.start()

    async def stats(self) -> dict[str, Any]:
        try:
            room = await self.relay.stats(ROOM)
        except UnknownRoom:
            return {}
        subscriptions = [s for p in room.values() for s in p["subscriptions"].values()]
        source = room.get(PUBLISHER_ID, {}).get("publications", {}).get("camera", {})
        return {
            "forwarded": sum(s["forwarded"] for s in subscriptions),
            "skipped": sum(s["skipped"] for s in subscriptions),
            "paused": sum(1 for s in subscriptions if s["paused"]),
            "subscriptions": len(subscriptions),
            "packets_in": source.get("packets", 0),
            "keyframes_in": source.get("keyframes", 0),
            "plis": source.get("plis", 0),
            "notices": dict(self.notices),
            "offers_pushed": self.offers_pushed,
            **({"mux": ports.stats()} if isinstance(ports := self.relay.udp_ports, UdpMux)
               else {}),
        }

    async def close(self) -> None:
        await self.relay.close()


class StampTrack(MediaStreamTrack):
    """Passes a MediaRelay proxy's frames on and remembers the last one's timestamp, converted
    the way aiortc's encoder converts it."""

    kind = "video"

    def __init__(self, inner: MediaStreamTrack) -> None:
        super().__init__()
        self.inner = inner
        self.last_ts: int | None = None

    async def recv(self) -> av.VideoFrame:
        frame = await self.inner.recv()
        if frame.pts is not None and frame.time_base is not None:
            self.last_ts = convert_timebase(frame.pts, frame.time_base, VIDEO_TIME_BASE)
        return frame  # type: ignore[return-value]

    def stop(self) -> None:
        self.inner.stop()
        super().stop()


class MediaRelayBackend(Backend):
    """The baseline: a plain aiortc server, the publisher's track decoded once and re-encoded
    per subscriber through ``aiortc.contrib.media.MediaRelay``. Same RPC as the relay."""

    def __init__(self) -> None:
        self.media_relay = MediaRelay()
        self.source: MediaStreamTrack | None = None
        self.source_receiver: RTCRtpReceiver | None = None
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.stamps: dict[str, StampTrack] = {}
        self.origins: dict[str, int] = {}
        self._drain: asyncio.Task[None] | None = None

    async def handle(self, peer: RpcPeer, cmd: str, args: dict[str, Any]) -> Any:
        participant = str(args.get("participant", ""))
        if cmd in ("open_room", "join", "leave"):
            return None
        if cmd == "publish":
            return await self._publish(participant, str(args["sdp"]))
        if cmd == "subscribe":
            return await self._subscribe(participant)
        if cmd == "answer":
            pc = self.pcs[participant]
            await pc.setRemoteDescription(RTCSessionDescription(str(args["sdp"]), "answer"))
            self._learn_origin(participant)
            return None
        raise ValueError(f"unknown command {cmd!r}")

    async def _publish(self, participant: str, sdp: str) -> dict[str, Any]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs[participant] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and self.source is None:
                self.source = track
                self.source_receiver = next(t.receiver for t in pc.getTransceivers()
                                            if t.receiver.track is track)
                # A consumer from the start, so decoded frames never pile up before the
                # first subscriber (it costs one queue put/get a frame).
                drain = self.media_relay.subscribe(track)
                self._drain = asyncio.get_running_loop().create_task(self._run_drain(drain))

        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        for transceiver in pc.getTransceivers():
            transceiver.direction = "recvonly"
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        return {"transport_id": participant, "type": "answer",
                "sdp": pc.localDescription.sdp, "publications": []}

    @staticmethod
    async def _run_drain(track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    async def _subscribe(self, participant: str) -> dict[str, Any]:
        if self.source is None:
            raise RuntimeError("nothing published yet")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[],
                                                bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
        self.pcs[participant] = pc
        stamp = StampTrack(self.media_relay.subscribe(self.source))
        self.stamps[participant] = stamp
        transceiver = pc.addTransceiver(stamp, direction="sendonly")
        transceiver.setCodecPreferences(vp8_only())
        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        mid = transceiver.mid or "0"
        return {"transport_id": participant, "type": "offer", "sdp": pc.localDescription.sdp,
                "tracks": {mid: {"participant_id": PUBLISHER_ID, "source": "camera"}}}

    def _learn_origin(self, participant: str) -> None:
        """The sender's RTP timestamp origin (random, private to its ``_run_rtp``): its first
        packet's timestamp minus the timestamp of the frame being sent."""
        pc, stamp = self.pcs[participant], self.stamps[participant]
        transceiver: RTCRtpTransceiver = pc.getTransceivers()[0]
        sender = transceiver.sender
        ssrc = sender._ssrc
        transport = sender.transport
        original = transport._send_rtp

        async def send(data: bytes) -> None:
            if participant not in self.origins and stamp.last_ts is not None and \
                    len(data) >= 12 and rtp_ssrc(data) == ssrc:
                self.origins[participant] = ts_add(rtp_timestamp(data), -stamp.last_ts)
            await original(data)

        transport._send_rtp = send  # type: ignore[method-assign]

    async def stats(self) -> dict[str, Any]:
        """``offsets``: per subscriber, its RTP timestamp minus the publisher's for one frame
        (the sender's origin minus the first publisher timestamp the server received: aiortc's
        receiver rebases timestamps to 0 before decoding)."""
        mapper = getattr(self.source_receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        first = getattr(mapper, "_origin", None)
        offsets = {} if first is None else {
            p: ts_add(origin, -first) for p, origin in self.origins.items()}
        return {"offsets": offsets, "subscriptions": len(self.stamps)}

    async def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        await asyncio.gather(*(asyncio.wait_for(pc.close(), CLOSE_TIMEOUT_S)
                               for pc in self.pcs.values()), return_exceptions=True)
        self.pcs.clear()


# -- process roles ----------------------------------------------------------------------------


class Role:
    def hello(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def start(self) -> None:
        return None

    async def command(self, cmd: str, args: dict[str, Any]) -> Any:
        raise ValueError(f"unknown command {cmd!r}")

    async def close(self) -> None:
        return None


class ServerRole(Role):
    def __init__(self, options: dict[str, Any]) -> None:
        self.mode = str(options["mode"])
        self.udp_port: int | None = options.get("udp_port")
        self.backend: Backend | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        if self.mode in SFU_MODES:
            backend = SfuBackend(self.udp_port if self.mode == "sfu-1port" else None)
            await backend.start()
            self.backend = backend
        else:
            self.backend = MediaRelayBackend()
        self.server = await start_rpc_server(self.backend)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def hello(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "port": self.port}

    async def command(self, cmd: str, args: dict[str, Any]) -> Any:
        assert self.backend is not None
        if cmd == "stats":
            return await self.backend.stats()
        if cmd == "timing_start" and isinstance(self.backend, SfuBackend):
            self.backend.timing_start()
            return True
        if cmd == "timing_start":
            return False
        if cmd == "timing_stop":
            return self.backend.timing_stop() if isinstance(self.backend, SfuBackend) else []
        return await super().command(cmd, args)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.backend is not None:
            await asyncio.wait_for(self.backend.close(), CLOSE_TIMEOUT_S)


class PublisherRole(Role):
    """Publishes the clip to the server under test ("main"), or straight to one subscriber
    ("direct": the same path without a relay, for the latency reference)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.frames = load_clip(Path(options["clip"]))
        self.rpc: RpcClient | None = None
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.tracks: dict[str, ClipTrack] = {}
        self.logs: dict[str, SendLog] = {}

    def _connection(self, name: str) -> tuple[RTCPeerConnection, RTCRtpTransceiver]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = ClipTrack(self.frames)
        transceiver = pc.addTransceiver(track, direction="sendonly")
        transceiver.setCodecPreferences(vp8_only())
        # A keyframe request reaches _send_keyframe, which does nothing for packets.
        transceiver.sender._send_keyframe = (  # type: ignore[method-assign]
            lambda: setattr(track, "keyframe_wanted", True))
        self.pcs[name], self.tracks[name] = pc, track
        return pc, transceiver

    def _tap(self, name: str, transceiver: RTCRtpTransceiver) -> None:
        log = SendLog(transceiver.sender._ssrc)
        self.logs[name] = log
        tap_sender(transceiver.sender, log)

    async def command(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "publish":
            self.rpc = RpcClient(lambda message: None)
            await self.rpc.connect(int(args["port"]))
            await self.rpc.call("open_room")
            await self.rpc.call("join", participant=PUBLISHER_ID)
            pc, transceiver = self._connection("main")
            await pc.setLocalDescription(await pc.createOffer())
            answer = await self.rpc.call("publish", participant=PUBLISHER_ID,
                                         sdp=pc.localDescription.sdp,
                                         sources={transceiver.mid: "camera"})
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            self._tap("main", transceiver)
            return {"publications": answer.get("publications", [])}
        if cmd == "direct_offer":
            pc, transceiver = self._connection("direct")
            await pc.setLocalDescription(await pc.createOffer())
            return {"sdp": pc.localDescription.sdp}
        if cmd == "direct_answer":
            pc = self.pcs["direct"]
            await pc.setRemoteDescription(RTCSessionDescription(str(args["sdp"]), "answer"))
            self._tap("direct", pc.getTransceivers()[0])
            return None
        if cmd == "frames":
            log = self.logs.get(str(args["name"]))
            return [] if log is None else log.window(float(args["t0"]), float(args["t1"]))
        if cmd == "status":
            return {name: {"sent": t.sent, "keyframes_forced": t.keyframes_forced}
                    for name, t in self.tracks.items()}
        if cmd == "close":
            await self._close(str(args["name"]))
            return None
        return await super().command(cmd, args)

    async def _close(self, name: str) -> None:
        pc = self.pcs.pop(name, None)
        self.tracks.pop(name, None)
        self.logs.pop(name, None)
        if pc is not None:
            await asyncio.wait_for(pc.close(), CLOSE_TIMEOUT_S)
        if name == "main" and self.rpc is not None:
            await self.rpc.close()
            self.rpc = None

    async def close(self) -> None:
        for name in list(self.pcs):
            with contextlib.suppress(Exception):
                await self._close(name)


class Subscriber:
    """One subscriber: a max-bundle peer connection that answers the server's offers and
    counts frames through a jitter-buffer tap."""

    def __init__(self, participant: str, rpc: RpcClient | None, browser_remb: bool) -> None:
        self.id = participant
        self.rpc = rpc
        self.browser_remb = browser_remb
        self.receiver: RTCRtpReceiver | None = None
        self.tap = FrameTap()
        self.rtcp: Counter[str] = Counter()
        self.offers = 0
        self._lock = asyncio.Lock()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[],
                                                     bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "video":
            return
        for transceiver in self.pc.getTransceivers():
            if transceiver.receiver.track is track:
                tap_receiver(transceiver.receiver, self.tap)
                self._count_rtcp(transceiver.receiver)
                if self.browser_remb:
                    # aiortc's estimator runs on every packet and, on a loaded machine, sees
                    # "overuse" in scheduling jitter and sends a REMB per packet (~30/s per
                    # subscriber measured at N=64), a storm no browser sends: replaced by one
                    # REMB a second (see send_remb).
                    setattr(transceiver.receiver, ESTIMATOR_ATTR, None)
                self.receiver = transceiver.receiver

    async def send_remb(self) -> None:
        receiver, ssrc = self.receiver, self.tap.ssrc
        rtcp_ssrc = getattr(receiver, RTCP_SSRC_ATTR, None)
        if receiver is None or ssrc is None or rtcp_ssrc is None:
            return
        await receiver._send_rtcp(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0,
                                                 fci=pack_remb_fci(REMB_BPS, [ssrc])))

    def _count_rtcp(self, receiver: RTCRtpReceiver) -> None:
        """Counts the feedback this subscriber sends the server (REMB, NACK, PLI, reports)."""
        original = receiver._send_rtcp
        counts = self.rtcp

        async def send(packet: Any) -> None:
            name = type(packet).__name__
            if name == "RtcpPsfbPacket":
                name = "remb" if packet.fmt == 15 else "pli"
            counts[name] += 1
            await original(packet)

        receiver._send_rtcp = send  # type: ignore[method-assign]

    async def start(self) -> None:
        assert self.rpc is not None
        await self.rpc.call("join", participant=self.id)
        offer = await self.rpc.call("subscribe", participant=self.id)
        await self.answer_offer(offer)

    async def answer_offer(self, offer: dict[str, Any]) -> str:
        async with self._lock:
            self.offers += 1
            await self.pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            sdp = self.pc.localDescription.sdp
            if self.rpc is not None:
                await self.rpc.call("answer", participant=self.id,
                                    transport_id=offer["transport_id"], sdp=sdp)
            return sdp

    async def close(self) -> None:
        await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)


class WorkerRole(Role):
    """Hosts a share of the subscribers, each with its own peer connection."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.rpc: RpcClient | None = None
        self.browser_remb = options.get("remb", "browser") == "browser"
        self.max_life_s = float(options.get("max_life_s", 900))
        self._remb_task: asyncio.Task[None] | None = None
        self.subscribers: dict[str, Subscriber] = {}
        self.notices: Counter[str] = Counter()
        self.errors: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("event") == "notice":
            self.notices[str(message["notice"].get("code"))] += 1
            return
        subscriber = self.subscribers.get(str(message.get("participant")))
        if message.get("event") == "offer" and subscriber is not None:
            task = asyncio.get_running_loop().create_task(
                self._answer(subscriber, message["offer"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, subscriber: Subscriber, offer: dict[str, Any]) -> None:
        try:
            await subscriber.answer_offer(offer)
        except Exception as exc:
            self.errors.append(f"{subscriber.id} renegotiation: {exc}")

    async def start(self) -> None:
        if self.browser_remb:
            self._remb_task = asyncio.get_running_loop().create_task(self._remb_loop())

    async def _remb_loop(self) -> None:
        """One REMB a second per subscriber, spread over the second; bounded by the process's
        life."""
        ticks = round(1 / REMB_TICK_S)
        for tick in range(int(self.max_life_s / REMB_TICK_S)):
            await asyncio.sleep(REMB_TICK_S)
            for index, subscriber in enumerate(list(self.subscribers.values())):
                if index % ticks == tick % ticks:
                    with contextlib.suppress(Exception):
                        await subscriber.send_remb()

    async def _add(self, participant: str, limit: asyncio.Semaphore) -> None:
        async with limit:
            subscriber = Subscriber(participant, self.rpc, self.browser_remb)
            self.subscribers[participant] = subscriber
            try:
                await subscriber.start()
            except Exception as exc:
                self.errors.append(f"{participant}: {type(exc).__name__}: {exc}")

    async def command(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "connect":
            self.rpc = RpcClient(self._on_event)
            await self.rpc.connect(int(args["port"]))
            return None
        if cmd == "add":
            limit = asyncio.Semaphore(SUBSCRIBE_CONCURRENCY)
            errors = len(self.errors)
            await asyncio.gather(*(self._add(str(p), limit) for p in args["ids"]))
            return {"subscribers": len(self.subscribers), "errors": self.errors[errors:]}
        if cmd == "ready":
            least = int(args["frames"])
            return sum(1 for s in self.subscribers.values() if s.tap.complete >= least)
        if cmd == "collect":
            since = float(args["since"])
            return {p: s.tap.collect(since) for p, s in self.subscribers.items()}
        if cmd == "status":
            rtcp: Counter[str] = Counter()
            for subscriber in self.subscribers.values():
                rtcp.update(subscriber.rtcp)
            return {"subscribers": len(self.subscribers), "notices": dict(self.notices),
                    "rtcp": dict(rtcp),
                    "errors": self.errors[-5:],
                    "offers": sum(s.offers for s in self.subscribers.values())}
        if cmd == "direct_answer":
            subscriber = Subscriber("direct", None, self.browser_remb)
            self.subscribers["direct"] = subscriber
            return {"sdp": await subscriber.answer_offer({"sdp": args["sdp"]})}
        if cmd == "close_all":
            await self._close_all()
            return None
        return await super().command(cmd, args)

    async def _close_all(self) -> None:
        subscribers = list(self.subscribers.values())
        self.subscribers.clear()
        await asyncio.gather(*(s.close() for s in subscribers), return_exceptions=True)
        if self.rpc is not None:
            await self.rpc.close()
            self.rpc = None

    async def close(self) -> None:
        if self._remb_task is not None:
            self._remb_task.cancel()
        await self._close_all()


ROLES: dict[str, Callable[[dict[str, Any]], Role]] = {
    "server": ServerRole, "publisher": PublisherRole, "worker": WorkerRole,
}


def child_main(role: str, conn: Connection, options: dict[str, Any]) -> None:
    """Entry point of every child process (multiprocessing, spawn)."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"[{role} {os.getpid()}] %(levelname)s %(name)s: %(message)s")
    hooks.set_host_addresses([HOST])
    if options.get("cpus"):
        os.sched_setaffinity(0, set(options["cpus"]))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_child(role, conn, options))


async def _child(role_name: str, conn: Connection, options: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    role = ROLES[role_name](options)
    try:
        await role.start()
        conn.send({"id": 0, "ok": True, "result": role.hello()})
    except Exception:
        conn.send({"id": 0, "ok": False, "error": traceback.format_exc()})
        return
    # Bounded life: a child never outlives the run by more than its budget.
    loop.call_later(float(options.get("max_life_s", 900)), stop.set)

    async def dispatch(message: dict[str, Any]) -> None:
        try:
            if message["cmd"] == "stop":
                await role.close()
                result: Any = None
                stop.set()
            else:
                result = await role.command(str(message["cmd"]), message.get("args") or {})
            conn.send({"id": message["id"], "ok": True, "result": result})
        except Exception:
            with contextlib.suppress(OSError):
                conn.send({"id": message["id"], "ok": False, "error": traceback.format_exc()})

    def readable() -> None:
        try:
            while conn.poll():
                task = loop.create_task(dispatch(conn.recv()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (EOFError, OSError):
            stop.set()  # the orchestrator is gone

    loop.add_reader(conn.fileno(), readable)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(role.close(), CLOSE_TIMEOUT_S)
