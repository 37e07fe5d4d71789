"""Recorder load benchmark: K participants (camera VP8 640x480 30 fps + microphone Opus) recorded
at once by ``recorder.session.RoomRecording`` (RTP depacketized and muxed into WebM, never
decoded), against aiortc's ``MediaRecorder`` (decode + re-encode) recording the same input.

    python bench/recorder_load.py                 # 3 rounds of each side, ~1.5-2.5 minutes
    python bench/recorder_load.py --quick         # 1 round, shorter input, ~20 s
    python bench/recorder_load.py --streams 16    # K recorded participants (default 8)
    python bench/recorder_load.py --profile /tmp/recorder.prof   # + a cProfile'd recorder round
    python bench/recorder_load.py --tick-ms 0     # wake up for each packet, as the relay does
    python bench/recorder_load.py --baseline-encoder realtime    # experiment: a faster baseline

Input, made once and cached (``--cache-dir``): 10 s of FFmpeg's ``testsrc2`` pattern with
temporal noise, 640x480 30 fps, encoded with libvpx (realtime, ~600 kbps, a keyframe every 3 s),
and 10 s of a swept tone encoded with libopus (mono, 20 ms frames, 32 kbps). The VP8 frames are
cut into RTP payloads with aiortc's own packetizer (``Vp8Encoder.pack``), the Opus packets are
the payloads; longer runs loop the clip with increasing timestamps and sequence numbers.

Each side runs in its own child process (multiprocessing, spawn), one at a time, in alternating
rounds (recorder, baseline, baseline, recorder, ...), so that both see the same machine. The
CPU counted is the child's process CPU time (every thread: fsync and file-closing threads,
libvpx's threads) from just before the first packet or frame to the last file closed; the
child's start-up (imports) is not counted. Figures are CPU milliseconds per recorded
stream-second, a stream being one participant (camera + microphone, one file).

* recorder: ``--per-room`` participants (default 2) per ``RoomRecording``, each a camera and a
  microphone publication, every participant allowed. The RTP packets are handed to
  ``RoomRecording.packet`` in real time (every 10 ms, the packets that are due; ``--tick-ms``),
  from the event loop as the relay calls it, so that its fsync ticker and file clusters run
  at their real rate and the cost of being woken up is counted (``--pace fast``: as fast as
  possible, arrival times synthesized). Then ``close()`` finishes the files.
* baseline: ``MediaRecorder(path.webm)`` per participant (aiortc's default for WebM: libvpx
  and libopus encoders at FFmpeg's default settings) whose two tracks return decoded frames:
  the same RTP payloads depayloaded (``vp8_depayload``) and decoded with aiortc's
  ``Vp8Decoder`` and ``OpusDecoder``, as an aiortc server would. It cannot keep up in real
  time (~0.6 s of CPU per stream-second), so it runs as fast as it can, with fewer streams
  and shorter input (``--baseline-streams``, ``--baseline-seconds``): per stream-second either
  way. Its CPU includes the decoding, the encoding and the muxing; the decoding alone is
  shown too. ``--baseline-encoder realtime`` (an experiment) sets its libvpx encoder to
  realtime, cpu-used 8 and the input's bitrate.
* two rows measured once after the rounds (``--no-extras`` skips them): "feed", the
  recorder's child with a sink that does nothing, i.e. the harness's own share (packet loop
  and wake-ups) of the recorder's figure, which is not subtracted; and "recorder fast", the
  recorder fed as fast as possible, i.e. its cost with the packets in one batch.

After each child the files are checked in this process: every one is decoded with PyAV and
its video and audio frames counted against what was fed, so a run that records nothing fails.
A child during which other programs kept more than 0.3 cores busy is run again once (not with
``--quick``) and the attempt with less load kept. Every wait is bounded; children are killed
on timeout. ``--profile FILE`` adds one recorder round under cProfile (main thread's CPU
clock; not counted) and times the recorder's steps one by one without a profiler. The last
line printed is

    RESULT cpu_ratio_vs_mediarecorder=<x> streams=<k>

x = (recorder CPU / recorder stream-seconds) / (baseline CPU / baseline stream-seconds), pooled
over the rounds; k = recorded participants per recorder round. The goal is x <= 0.05.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import fractions
import json
import math
import multiprocessing as mp
import os
import pstats
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil

from codec.rtp import SEQ_MOD, TS_MOD, seq_add, ts_add, vp8_frame_is_keyframe, vp8_frame_size

try:
    from bench._clips import encode_vp8_ivf
except ImportError:  # run as a script: bench/ itself is on sys.path
    from _clips import encode_vp8_ivf  # type: ignore[no-redef]

WIDTH, HEIGHT, FPS = 640, 480, 30
VIDEO_BITRATE = 600_000
GOP = 90
CLIP_SECONDS = 10
WARMUP_FRAMES = 30
"""Frames encoded and thrown away first, so that the clip starts in the encoder's steady state
(it then starts with a forced keyframe)."""
CLIP_SOURCE = f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS},noise=alls=10:allf=t"
AUDIO_RATE, AUDIO_FRAME, AUDIO_BITRATE = 48_000, 960, 32_000
VIDEO_CLOCK = 90_000
TICKS_PER_FRAME = VIDEO_CLOCK // FPS
AUDIO_PER_S = AUDIO_RATE // AUDIO_FRAME
INPUT_VERSION = 1

GOAL = 0.05
TICK_S = 0.010
"""Real-time pace: every tick hands over the packets that are due."""
NOISE_CORES = 0.3
START_TIMEOUT_S = 60.0


class BenchError(Exception):
    """The benchmark could not go on (a child failed or timed out, a file did not verify)."""


# -- input ----------------------------------------------------------------------------------


@dataclass
class Clip:
    video: list[tuple[list[bytes], bool]]
    """Per frame: its RTP payloads (aiortc's VP8 packetizer) and whether it is a keyframe."""
    audio: list[bytes]
    """Opus packets, 20 ms each."""

    @property
    def video_kbps(self) -> float:
        size = sum(len(p) for payloads, _ in self.video for p in payloads)
        return size * 8 * FPS / len(self.video) / 1000

    @property
    def audio_kbps(self) -> float:
        return sum(len(p) for p in self.audio) * 8 * AUDIO_PER_S / len(self.audio) / 1000

    @property
    def packets_per_frame(self) -> float:
        return sum(len(payloads) for payloads, _ in self.video) / len(self.video)


def input_paths(cache_dir: Path) -> tuple[Path, Path]:
    stem = f"recorder-v{INPUT_VERSION}"
    return (cache_dir / f"{stem}-vp8-{WIDTH}x{HEIGHT}-{FPS}fps-{VIDEO_BITRATE // 1000}k-g{GOP}.ivf",
            cache_dir / f"{stem}-opus-{AUDIO_BITRATE // 1000}k.ogg")


def ensure_input(cache_dir: Path) -> tuple[Clip, bool]:
    """The cached clip (encoded now if missing or unreadable), packetized."""
    video_path, audio_path = input_paths(cache_dir)
    made = False
    try:
        frames, packets = _load(video_path, audio_path)
    except (OSError, av.FFmpegError, ValueError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, encode in ((video_path, _encode_video), (audio_path, _encode_audio)):
            partial = path.with_name(f"{path.name}.{os.getpid()}.part")
            try:
                encode(partial)
                partial.replace(path)
            finally:
                partial.unlink(missing_ok=True)
        frames, packets = _load(video_path, audio_path)
        made = True
    return Clip(packetize_vp8(frames), packets), made


def _encode_video(path: Path) -> None:
    encode_vp8_ivf(path, source=CLIP_SOURCE, seconds=CLIP_SECONDS, warmup=WARMUP_FRAMES, fps=FPS,
                   width=WIDTH, height=HEIGHT, bitrate=VIDEO_BITRATE, gop=GOP,
                   key_first=True)


def _encode_audio(path: Path) -> None:
    """A tone sweeping 300-900 Hz with a slow tremolo, so the encoder has something to do."""
    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=AUDIO_RATE)
        stream.layout = "mono"
        stream.bit_rate = AUDIO_BITRATE
        stream.options = {"application": "voip", "frame_duration": "20"}
        phase = 0.0
        for n in range(CLIP_SECONDS * AUDIO_PER_S):
            t = (np.arange(AUDIO_FRAME) + n * AUDIO_FRAME) / AUDIO_RATE
            hz = 600 + 300 * np.sin(2 * math.pi * 0.2 * t)
            phases = phase + np.cumsum(2 * math.pi * hz / AUDIO_RATE)
            phase = float(phases[-1])
            level = 0.25 + 0.15 * np.sin(2 * math.pi * 3 * t)
            pcm = (level * np.sin(phases)).astype(np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts = n * AUDIO_FRAME
            frame.time_base = fractions.Fraction(1, AUDIO_RATE)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _load(video_path: Path, audio_path: Path) -> tuple[list[bytes], list[bytes]]:
    with av.open(str(video_path)) as container:
        frames = [bytes(p) for p in container.demux(video=0) if p.size]
    with av.open(str(audio_path)) as container:
        packets = [bytes(p) for p in container.demux(audio=0) if p.size]
    packets = packets[:CLIP_SECONDS * AUDIO_PER_S]
    if len(frames) != CLIP_SECONDS * FPS or not vp8_frame_is_keyframe(frames[0]):
        raise ValueError(f"{video_path}: expected {CLIP_SECONDS * FPS} frames from a keyframe")
    if len(packets) < CLIP_SECONDS * AUDIO_PER_S:
        raise ValueError(f"{audio_path}: {len(packets)} Opus packets")
    return frames, packets


def vp8_depayloader() -> Callable[[bytes], bytes]:
    """aiortc's VP8 depayloader, reached through relay.hooks as the recorder reaches it."""
    from relay.hooks import depayloader

    depayload = depayloader("vp8")
    if depayload is None:
        raise RuntimeError("relay.hooks has no VP8 depayloader")
    return depayload


def packetize_vp8(frames: list[bytes]) -> list[tuple[list[bytes], bool]]:
    """aiortc's public packetization: ``Vp8Encoder.pack(av.Packet)`` -> RTP payloads."""
    from aiortc.codecs.vpx import Vp8Encoder

    encoder = Vp8Encoder()
    out: list[tuple[list[bytes], bool]] = []
    for index, data in enumerate(frames):
        packet = av.Packet(data)
        packet.pts = index
        packet.time_base = fractions.Fraction(1, FPS)
        payloads, timestamp = encoder.pack(packet)
        assert timestamp == index * TICKS_PER_FRAME
        out.append((payloads, vp8_frame_is_keyframe(data)))
    return out


# -- what a child does -----------------------------------------------------------------------


@dataclass
class Job:
    side: str
    """``recorder``, ``feed`` (the recorder's harness with a sink doing nothing) or
    ``mediarecorder``."""
    streams: int
    seconds: float
    directory: str
    per_room: int = 2
    pace: str = "realtime"
    tick_s: float = TICK_S
    baseline_encoder: str = "default"
    seed: int = 1
    profile: str | None = None

    @property
    def video_frames(self) -> int:
        return round(self.seconds * FPS)

    @property
    def audio_frames(self) -> int:
        return round(self.seconds * AUDIO_PER_S)


def child_main(job: Job, clip: Clip, conn: Connection) -> None:
    try:
        if job.side == "mediarecorder":
            result = asyncio.run(run_mediarecorder(job, clip))
        else:
            result = asyncio.run(run_recorder(job, clip))
        result["process_cpu_s"] = time.process_time()
        conn.send({"ok": True, "result": result})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


class Meter:
    """The process's CPU time (every thread) and the main thread's, from ``start()``; both
    calls from the main thread."""

    def __init__(self) -> None:
        self._cpu0 = self._wall0 = self._main0 = 0.0

    def start(self) -> None:
        self._main0 = time.thread_time()
        self._wall0 = time.monotonic()
        self._cpu0 = time.process_time()

    def stop(self) -> dict[str, float]:
        cpu = time.process_time() - self._cpu0
        wall = time.monotonic() - self._wall0
        main = time.thread_time() - self._main0
        return {"cpu_s": cpu, "wall_s": wall, "main_thread_cpu_s": main,
                "other_threads_cpu_s": cpu - main}


class NullSink:
    def packet(self, publication_id: str, sequence_number: int, timestamp: int, marker: bool,
               payload: bytes, arrival: float) -> None:
        return None


Event = tuple[float, Callable[..., None], str, int, int, bool, bytes]


def schedule(job: Job, clip: Clip, sinks: Sequence[Any]) -> tuple[list[Event], dict[str, Any]]:
    """Every packet of every participant, in order of due time (seconds from the start).
    Participant j starts j * 33 ms / K late, so their frames do not all fall together; each
    publication has a random first sequence number and timestamp (fixed seed)."""
    rng = random.Random(job.seed)
    events: list[Event] = []
    fed: dict[str, Any] = {}
    for j in range(job.streams):
        sink = sinks[j // job.per_room]
        offset = j / FPS / job.streams
        cam, mic = f"p{j}-cam", f"p{j}-mic"
        seq, ts0 = rng.randrange(SEQ_MOD), rng.randrange(TS_MOD)
        packets = 0
        for i in range(job.video_frames):
            payloads, _ = clip.video[i % len(clip.video)]
            ts = ts_add(ts0, i * TICKS_PER_FRAME)
            due = offset + i / FPS
            last = len(payloads) - 1
            for k, payload in enumerate(payloads):
                events.append((due, sink.packet, cam, seq, ts, k == last, payload))
                seq = seq_add(seq, 1)
            packets += len(payloads)
        seq, ts0 = rng.randrange(SEQ_MOD), rng.randrange(TS_MOD)
        for n in range(job.audio_frames):
            ts = ts_add(ts0, n * AUDIO_FRAME)
            events.append((offset + n / AUDIO_PER_S + 0.001, sink.packet, mic, seq, ts, True,
                           clip.audio[n % len(clip.audio)]))
            seq = seq_add(seq, 1)
        fed[f"p{j}"] = {"video_frames": job.video_frames, "audio_frames": job.audio_frames,
                        "packets": packets + job.audio_frames}
    events.sort(key=lambda e: e[0])
    return events, fed


async def feed(events: list[Event], pace: str, seconds: float,
               tick_s: float = TICK_S) -> dict[str, float]:
    """Hand the packets over: real time (every TICK_S, what is due) or as fast as possible.
    Bounded by the event count and by a deadline of 3x the media time + 30 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3 * seconds + 30
    lag_max = 0.0
    ticks = 0
    index, total = 0, len(events)
    if pace == "fast":
        base = time.time()
        while index < total:
            for due, call, pub, seq, ts, marker, payload in events[index:index + 200]:
                call(pub, seq, ts, marker, payload, base + due)
            index += 200
            ticks += 1
            await asyncio.sleep(0)
            if loop.time() > deadline:
                raise BenchError("the feed ran past its deadline")
        return {"lag_max_ms": 0.0, "ticks": ticks}
    start = loop.time()
    while index < total:
        now = loop.time() - start
        if events[index][0] <= now:
            lag_max = max(lag_max, now - events[index][0])
            arrival = time.time()
            while index < total and events[index][0] <= now:
                _, call, pub, seq, ts, marker, payload = events[index]
                call(pub, seq, ts, marker, payload, arrival)
                index += 1
        ticks += 1
        if loop.time() > deadline:
            raise BenchError("the feed ran past its deadline")
        if tick_s > 0 or index >= total:
            await asyncio.sleep(tick_s)
        else:  # wake up when the next packet is due, as the relay does for each datagram
            await asyncio.sleep(max(0.0, events[index][0] - (loop.time() - start)))
    return {"lag_max_ms": lag_max * 1000, "ticks": ticks}


async def run_recorder(job: Job, clip: Clip) -> dict[str, Any]:
    from recorder.session import RoomRecording

    directory = Path(job.directory)
    opened: list[dict[str, Any]] = []
    closed: list[dict[str, Any]] = []
    failures: list[str] = []
    keyframe_requests = [0]

    async def on_opened(entry: Any) -> None:
        opened.append(entry.model_dump(mode="json"))

    async def on_closed(entry: Any) -> None:
        closed.append(entry.model_dump(mode="json"))

    def on_failure(message: str) -> None:
        failures.append(message)

    async def request_keyframe(publication_id: str) -> None:
        keyframe_requests[0] += 1

    rooms_n = math.ceil(job.streams / job.per_room)
    rooms: list[Any] = []
    if job.side == "recorder":
        for r in range(rooms_n):
            room = RoomRecording(f"bench-{r}", directory / f"room{r}",
                                 on_file_opened=on_opened, on_file_closed=on_closed,
                                 on_failure=on_failure, request_keyframe=request_keyframe)
            members = range(r * job.per_room, min(job.streams, (r + 1) * job.per_room))
            for j in members:
                for source, kind, codec, rate in (("camera", "video", "video/VP8", VIDEO_CLOCK),
                                                  ("microphone", "audio", "audio/opus",
                                                   AUDIO_RATE)):
                    room.publication_added({
                        "id": f"p{j}-{'cam' if kind == 'video' else 'mic'}",
                        "participant_id": f"p{j}", "source": source, "kind": kind,
                        "codec": codec, "clock_rate": rate})
            room.allow({f"p{j}" for j in members})
            rooms.append(room)
        sinks: Sequence[Any] = rooms
    else:
        sinks = [NullSink() for _ in range(rooms_n)]
    events, fed = schedule(job, clip, sinks)
    # Main-thread CPU time, not wall time: the event loop's idle waits cost nothing.
    profiler = cProfile.Profile(time.thread_time) if job.profile else None
    meter = Meter()
    await asyncio.sleep(0)
    meter.start()
    if profiler is not None:
        profiler.enable()
    fed_stats = await feed(events, job.pace, job.seconds, job.tick_s)
    for room in rooms:
        await asyncio.wait_for(room.close(), timeout=60)
    if profiler is not None:
        profiler.disable()
    measured = meter.stop()
    if profiler is not None and job.profile:
        profiler.dump_stats(job.profile)
    return {**measured, **fed_stats, "fed": fed, "events": len(events),
            "files_opened": len(opened), "files_closed": closed, "failures": failures,
            "keyframe_requests": keyframe_requests[0]}


async def run_mediarecorder(job: Job, clip: Clip) -> dict[str, Any]:
    from aiortc.codecs.opus import OpusDecoder
    from aiortc.codecs.vpx import Vp8Decoder
    from aiortc.contrib.media import MediaRecorder
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class DecodedTrack(MediaStreamTrack):
        """What an aiortc server's remote track gives a MediaRecorder: decoded frames. Each
        frame is depayloaded from its RTP payloads and decoded here, as aiortc's receiver
        does (its jitter buffer and RTP parsing left out)."""

        def __init__(self, kind: str, count: int, rng: random.Random) -> None:
            super().__init__()
            self.kind = kind
            self._count = count
            self._index = 0
            self._ts0 = rng.randrange(TS_MOD)
            self._decoder: Any = Vp8Decoder() if kind == "video" else OpusDecoder()
            self._ready: list[Any] = []
            self.finished = asyncio.Event()
            self.decoded = 0
            self.decode_cpu_s = 0.0
            """Process CPU during the decode calls (the encoders' threads are idle then)."""

        def _next_encoded(self) -> JitterFrame:
            if self.kind == "video":
                payloads, _ = clip.video[self._index % len(clip.video)]
                data = b"".join(vp8_depayload(p) for p in payloads)
                ts = ts_add(self._ts0, self._index * TICKS_PER_FRAME)
            else:
                data = clip.audio[self._index % len(clip.audio)]
                ts = ts_add(self._ts0, self._index * AUDIO_FRAME)
            self._index += 1
            return JitterFrame(data=data, timestamp=ts)

        async def recv(self) -> Any:
            await asyncio.sleep(0)  # let the other tracks run, as network arrivals would
            while not self._ready:
                if self._index >= self._count:
                    self.finished.set()
                    raise MediaStreamError
                start = time.process_time()
                self._ready.extend(self._decoder.decode(self._next_encoded()))
                self.decode_cpu_s += time.process_time() - start
            self.decoded += 1
            return self._ready.pop(0)

    vp8_depayload = vp8_depayloader()
    directory = Path(job.directory)  # made by the parent
    rng = random.Random(job.seed)
    meter = Meter()
    meter.start()
    recorders: list[Any] = []
    tracks: list[DecodedTrack] = []
    fed: dict[str, Any] = {}
    for j in range(job.streams):
        recorder = MediaRecorder(str(directory / f"p{j}.webm"))
        video = DecodedTrack("video", job.video_frames, rng)
        audio = DecodedTrack("audio", job.audio_frames, rng)
        recorder.addTrack(video)
        recorder.addTrack(audio)
        if job.baseline_encoder == "realtime":
            # Experiment: libvpx tuned the way aiortc's own sender is (MediaRecorder has no
            # option for it, hence its private track table).
            stream = recorder._MediaRecorder__tracks[video].stream
            stream.bit_rate = VIDEO_BITRATE
            stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        recorders.append(recorder)
        tracks += [video, audio]
        fed[f"p{j}"] = {"video_frames": job.video_frames, "audio_frames": job.audio_frames}
    for recorder in recorders:
        await recorder.start()
    timeout = 30 + 3 * job.streams * job.seconds
    await asyncio.wait_for(asyncio.gather(*(t.finished.wait() for t in tracks)), timeout)
    await asyncio.sleep(0)
    for recorder in recorders:
        await recorder.stop()
    measured = meter.stop()
    return {**measured, "fed": fed, "decoded": sum(t.decoded for t in tracks),
            "decode_cpu_s": sum(t.decode_cpu_s for t in tracks),
            "lag_max_ms": math.nan, "failures": [], "files_closed": [], "files_opened": 0}


# -- the parent ------------------------------------------------------------------------------


@dataclass
class Row:
    side: str
    round: int
    streams: int
    seconds: float
    cpu_s: float
    wall_s: float
    main_thread_cpu_s: float
    other_threads_cpu_s: float
    child_total_cpu_s: float
    other_cores: float
    files: int
    video_expected: int
    video_frames: int
    audio_expected: int
    audio_frames: int
    bytes: int
    lag_max_ms: float
    verified: bool
    pace: str = "realtime"
    packets: int = 0
    decode_cpu_s: float = 0.0
    attempt: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def stream_s(self) -> float:
        return self.streams * self.seconds

    @property
    def ms_per_stream_s(self) -> float:
        return 1000 * self.cpu_s / self.stream_s

    @property
    def kbps(self) -> float:
        return self.bytes * 8 / self.stream_s / 1000 if self.stream_s else math.nan


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(ctx: Any, job: Job, clip: Clip) -> tuple[dict[str, Any], float, float]:
    """Run one job in a fresh child; its result, its whole CPU time (start-up included) and the
    cores other programs kept busy meanwhile."""
    timeout = START_TIMEOUT_S + 3 * job.seconds * (job.streams if job.side == "mediarecorder"
                                                   else 1) + 60
    parent, child = ctx.Pipe(duplex=False)
    cpu0, busy0, wall0 = children_cpu(), machine_busy_seconds(), time.monotonic()
    process = ctx.Process(target=child_main, args=(job, clip, child), name=job.side,
                          daemon=True)
    process.start()
    child.close()
    try:
        deadline = time.monotonic() + timeout
        message: dict[str, Any] | None = None
        while message is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{job.side}: no result within {timeout:.0f} s")
            if parent.poll(min(remaining, 0.5)):
                message = parent.recv()
            elif not process.is_alive():
                raise BenchError(f"{job.side} exited with {process.exitcode} and no result")
        process.join(30)
    finally:
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        parent.close()
    wall = time.monotonic() - wall0
    total = children_cpu() - cpu0
    other = max(0.0, (machine_busy_seconds() - busy0 - total) / wall)
    if not message["ok"]:
        raise BenchError(f"{job.side} failed:\n{message['error']}")
    return message["result"], total, other


def count_frames(path: Path) -> tuple[int, int]:
    """Decode every frame of the file: (video frames, audio frames)."""
    video = audio = 0
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type in ("video", "audio")]
        for frame in container.decode(*streams):
            if isinstance(frame, av.VideoFrame):
                video += 1
            else:
                audio += 1
    return video, audio


def verify(job: Job, result: dict[str, Any]) -> tuple[int, int, int, int, int, bool, list[str]]:
    """Every participant has one file that decodes to (nearly) what was fed."""
    files = sorted(Path(job.directory).rglob("*.webm"))
    notes: list[str] = []
    video = audio = size = 0
    ok = len(files) == job.streams
    if not ok:
        notes.append(f"{len(files)} files for {job.streams} participants")
    for path in files:
        size += path.stat().st_size
        try:
            v, a = count_frames(path)
        except av.FFmpegError as exc:
            notes.append(f"{path.name} does not decode: {exc}")
            ok = False
            continue
        video += v
        audio += a
        # Video: every frame fed. Audio: the encoder's first frame or the muxer may leave
        # one or two out.
        if v != job.video_frames or not job.audio_frames - 3 <= a <= job.audio_frames + 1:
            notes.append(f"{path.name}: {v}/{job.video_frames} video, {a}/{job.audio_frames} "
                         "audio frames")
            ok = False
    if result.get("failures"):
        notes.append(f"failures: {result['failures']}")
        ok = False
    for entry in result.get("files_closed", []):
        if entry.get("status") != "complete":
            notes.append(f"{entry.get('name')}: {entry.get('status')}")
            ok = False
    expected_v = job.streams * job.video_frames
    expected_a = job.streams * job.audio_frames
    return video, expected_v, audio, expected_a, size, ok, notes


def measure(ctx: Any, job: Job, clip: Clip, round_no: int, retries: int) -> Row:
    """Run the job; again (at most ``retries`` times) while other programs kept more than
    NOISE_CORES busy. The attempt with the least other load is kept, whatever its figure."""
    attempt = 0
    kept: Row | None = None
    while True:
        attempt += 1
        shutil.rmtree(job.directory, ignore_errors=True)
        Path(job.directory).mkdir(parents=True)
        result, total, other = run_child(ctx, job, clip)
        if job.side == "feed":  # nothing is recorded
            video, expected_v, audio, expected_a, size, ok, notes = 0, 0, 0, 0, 0, True, []
        else:
            video, expected_v, audio, expected_a, size, ok, notes = verify(job, result)
        shutil.rmtree(job.directory, ignore_errors=True)
        row = Row(side=job.side, round=round_no, streams=job.streams, seconds=job.seconds,
                  cpu_s=result["cpu_s"], wall_s=result["wall_s"],
                  main_thread_cpu_s=result["main_thread_cpu_s"],
                  other_threads_cpu_s=result["other_threads_cpu_s"],
                  child_total_cpu_s=total, other_cores=other,
                  files=0 if job.side == "feed" else len(result["fed"]),
                  video_expected=expected_v,
                  video_frames=video, audio_expected=expected_a, audio_frames=audio,
                  bytes=size, lag_max_ms=float(result.get("lag_max_ms", math.nan)),
                  verified=ok, pace=job.pace if job.side != "mediarecorder" else "fast",
                  packets=sum(int(p.get("packets", 0)) for p in result["fed"].values()),
                  decode_cpu_s=float(result.get("decode_cpu_s", 0.0)),
                  attempt=attempt, notes=notes)
        if job.side != "mediarecorder" and result.get("keyframe_requests"):
            row.notes.append(f"{result['keyframe_requests']} keyframe requests for "
                             f"{job.streams} video publications")
        if not ok:
            raise BenchError(f"{job.side} round {round_no}: the files do not verify: "
                             + "; ".join(notes))
        print(format_row(row), flush=True)
        if kept is None or row.other_cores < kept.other_cores:
            kept = row
        if other <= NOISE_CORES or attempt > retries:
            if kept.other_cores > NOISE_CORES:
                kept.notes.append(f"noisy: other programs used {kept.other_cores:.2f} cores")
            if attempt > 1:
                print(f"  (kept attempt {kept.attempt})", flush=True)
            return kept
        print(f"  (other programs used {other:.2f} cores: measured again)", flush=True)


HEADER = (f"{'side':<14}{'round':>5}{'streams':>8}{'str-s':>7}{'wall s':>8}{'CPU s':>8}"
          f"{'cores':>6}{'ms/str-s':>10}{'main/thr':>10}{'other':>6}{'files':>6}"
          f"{'video frames':>15}{'audio frames':>15}{'kbps':>6}{'lag ms':>7}")


def format_row(row: Row) -> str:
    share = row.main_thread_cpu_s / row.cpu_s if row.cpu_s else math.nan
    label = row.side if row.side == "mediarecorder" or row.pace == "realtime" else (
        f"{row.side} fast")
    return (f"{label:<14}{row.round:>5}{row.streams:>8}{row.stream_s:>7.0f}"
            f"{row.wall_s:>8.1f}{row.cpu_s:>8.2f}{row.cpu_s / row.wall_s:>6.2f}"
            f"{row.ms_per_stream_s:>10.2f}{share:>9.0%} {row.other_cores:>5.2f}{row.files:>6}"
            f"{f'{row.video_frames}/{row.video_expected}':>15}"
            f"{f'{row.audio_frames}/{row.audio_expected}':>15}{row.kbps:>6.0f}"
            f"{row.lag_max_ms:>7.1f}")


def pooled(rows: Sequence[Row]) -> float:
    return 1000 * sum(r.cpu_s for r in rows) / sum(r.stream_s for r in rows)


# -- profile ---------------------------------------------------------------------------------


BUCKETS = (
    ("depacketize", ("recorder/depacketize.py", "aiortc/codecs/vpx.py")),
    ("mux (writer + PyAV)", ("recorder/writer.py", "av.", "<built-in method av", "fractions.py")),
    ("session", ("recorder/session.py",)),
    ("harness (feed)", ("recorder_load.py",)),
    ("asyncio + selectors", ("asyncio/", "selectors.py", "select.epoll", "_asyncio")),
)


def _bucket(filename: str, name: str) -> str:
    where = f"{filename} {name}"
    for bucket, markers in BUCKETS:
        if any(m in where for m in markers):
            return bucket
    return "other"


def summarize_profile(path: Path, packets: int, frames: int, top: int = 16) -> list[str]:
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    buckets: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in raw.items():
        bucket = _bucket(filename, name)
        buckets[bucket] = buckets.get(bucket, 0.0) + tottime
        rows.append((tottime, cumtime, calls, f"{_short(filename)}:{line}({name})"))
    lines = [f"profile (cProfile on the main thread's CPU clock; {total:.2f} s of self time, "
             "inflated by the profiler):"]
    for bucket, seconds in sorted(buckets.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {bucket:<24}{seconds:>7.2f} s {seconds / total:>6.1%}")
    lines.append(f"  {'self s':>8}{'cum s':>8}{'calls':>9}  function")
    for tottime, cumtime, calls, label in sorted(rows, reverse=True)[:top]:
        lines.append(f"  {tottime:>8.3f}{cumtime:>8.3f}{calls:>9}  {label}")
    lines.append(f"  per call (inclusive), over {packets} packets and {frames} frames:")
    for label, key in _profile_targets():
        found = raw.get(key)
        if found is not None:
            calls, cumtime = found[1], found[3]
            per_call = cumtime / max(calls, 1) * 1e6
            lines.append(f"    {label:<28}{calls:>9} calls {per_call:>8.1f} µs")
    return lines


def microbench(clip: Clip, directory: Path, repeats: int = 3) -> list[str]:
    """The recorder's steps timed one by one without a profiler (this process's CPU clock,
    best of ``repeats``) over the clip: 10 s of one participant."""
    from recorder.depacketize import Depacketizer
    from recorder.writer import MediaFile, Timeline, TrackSpec

    vp8_depayload = vp8_depayloader()
    rng = random.Random(7)
    video: list[tuple[int, int, bool, bytes]] = []
    seq, ts0 = rng.randrange(SEQ_MOD), rng.randrange(TS_MOD)
    for i, (payloads, _) in enumerate(clip.video):
        for k, payload in enumerate(payloads):
            video.append((seq, ts_add(ts0, i * TICKS_PER_FRAME), k == len(payloads) - 1,
                          payload))
            seq = seq_add(seq, 1)
    audio = [(seq_add(100, n), n * AUDIO_FRAME, True, data)
             for n, data in enumerate(clip.audio)]
    base = time.time()

    def best(run: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            run()
            times.append(time.thread_time() - start)
        return min(times)

    def depayload_all() -> None:
        for _, _, _, payload in video:
            vp8_depayload(payload)

    def push_all(kind: str, packets: list[tuple[int, int, bool, bytes]]) -> Callable[[], None]:
        def run() -> None:
            depacketizer = Depacketizer(kind, "vp8" if kind == "video" else "opus")
            for n, (seq, ts, marker, payload) in enumerate(packets):
                depacketizer.push(seq, ts, marker, payload, base + n * 0.01)
        return run

    frames: list[tuple[int, bytes, int, bool]] = []  # (track, data, rtp ts, keyframe)
    for i, (payloads, key) in enumerate(clip.video):
        frames.append((0, b"".join(vp8_depayload(p) for p in payloads), i * TICKS_PER_FRAME, key))
    frames += [(1, data, n * AUDIO_FRAME, True) for n, data in enumerate(clip.audio)]
    frames.sort(key=lambda f: f[2] / (VIDEO_CLOCK if f[0] == 0 else AUDIO_RATE))

    def timeline_all() -> None:
        lines = [Timeline(VIDEO_CLOCK, base), Timeline(AUDIO_RATE, base)]
        for track, _, ts, _ in frames:
            clock = VIDEO_CLOCK if track == 0 else AUDIO_RATE
            lines[track].ms(ts, base + ts / clock)

    size = vp8_frame_size(frames[0][1]) or (WIDTH, HEIGHT)
    tracks = [TrackSpec("video", "vp8", size[0], size[1], keyframe=frames[0][1]),
              TrackSpec("audio", "opus", sample_rate=AUDIO_RATE)]
    made = [0]
    opened = [0.0]
    closed = [0.0]

    def mux_all() -> None:
        made[0] += 1
        start = time.thread_time()
        media = MediaFile(directory / f"micro-{made[0]}.webm", tracks)
        opened[0] = time.thread_time() - start
        for track, data, ts, key in frames:
            clock = VIDEO_CLOCK if track == 0 else AUDIO_RATE
            media.write(track, data, round(ts * 1000 / clock), key)
        start = time.thread_time()
        media.close()
        closed[0] = time.thread_time() - start

    def packets_only() -> None:
        for _, data, ts, key in frames:
            packet = av.Packet(data)
            packet.time_base = fractions.Fraction(1, 1000)
            packet.pts = packet.dts = ts
            packet.is_keyframe = key

    directory.mkdir(parents=True, exist_ok=True)
    mux = best(mux_all)
    rows = [
        ("vp8_depayload", best(depayload_all), len(video), "video packet"),
        ("Depacketizer.push (VP8)", best(push_all("video", video)), len(video), "video packet"),
        ("Depacketizer.push (Opus)", best(push_all("audio", audio)), len(audio), "audio packet"),
        ("Timeline.ms", best(timeline_all), len(frames), "frame"),
        ("av.Packet + pts/time_base/key", best(packets_only), len(frames), "frame"),
        ("MediaFile.write (incl. the above)", mux - opened[0] - closed[0], len(frames),
         "frame"),
        ("MediaFile open + close (fsync)", opened[0] + closed[0], 1, "file"),
    ]
    seconds = len(clip.video) / FPS
    lines = ["recorder steps without a profiler (one participant, the 10 s clip, best of "
             f"{repeats}; CPU of this process's thread):",
             f"  {'step':<36}{'µs per call':>12}{'calls/str-s':>13}{'ms/str-s':>10}"]
    for name, cpu, calls, unit in rows:
        per_s = calls / seconds if unit != "file" else 0.0
        lines.append(f"  {name:<36}{cpu / calls * 1e6:>12.1f}{per_s:>13.1f}"
                     f"{cpu / seconds * 1000 if unit != 'file' else math.nan:>10.2f}  per {unit}")
    return lines


def _profile_targets() -> list[tuple[str, tuple[str, int, str]]]:
    """pstats keys of the recorder's per-packet and per-frame steps."""
    from recorder.depacketize import Depacketizer
    from recorder.session import RoomRecording
    from recorder.writer import MediaFile, Timeline

    targets: list[tuple[str, tuple[str, int, str]]] = []
    for label, function in (("RoomRecording.packet", RoomRecording.packet),
                            ("Depacketizer.push", Depacketizer.push),
                            ("vp8_depayload", vp8_depayloader()),
                            ("RoomRecording._frame", RoomRecording._frame),
                            ("RoomRecording._write", RoomRecording._write),
                            ("Timeline.ms", Timeline.ms),
                            ("MediaFile.write", MediaFile.write)):
        code = function.__code__
        targets.append((label, (code.co_filename, code.co_firstlineno, code.co_name)))
    targets.append(("OutputContainer.mux_one", (
        "~", 0, "<method 'mux_one' of 'av.container.output.OutputContainer' objects>")))
    return targets


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# -- main ------------------------------------------------------------------------------------


@dataclass
class Settings:
    streams: int
    per_room: int
    seconds: float
    baseline_streams: int
    baseline_seconds: float
    rounds: int
    pace: str
    retries: int
    cache_dir: Path
    work_dir: Path | None
    profile: Path | None
    json_path: Path | None
    extras: bool
    tick_s: float
    baseline_encoder: str


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="one round, 5 s of recorder input, baseline 2 streams x 3 s (~20 s)")
    parser.add_argument("--streams", type=int, help="participants recorded per recorder round "
                        "(default 8)")
    parser.add_argument("--per-room", type=int, default=2,
                        help="participants per RoomRecording (default 2)")
    parser.add_argument("--seconds", type=float,
                        help="recorder input per round, seconds (default 10, quick 5)")
    parser.add_argument("--baseline-streams", type=int,
                        help="participants per MediaRecorder round (default min(K, 4), quick 2)")
    parser.add_argument("--baseline-seconds", type=float,
                        help="MediaRecorder input per round, seconds (default 4, quick 3)")
    parser.add_argument("--rounds", type=int, help="rounds of each side (default 3, quick 1)")
    parser.add_argument("--pace", choices=("realtime", "fast"), default="realtime",
                        help="recorder input in real time (default) or as fast as possible")
    parser.add_argument("--cache-dir", type=Path, default=Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "telehealth-bench",
        help="where the encoded input is kept")
    parser.add_argument("--dir", type=Path, help="where recordings are written (a temporary "
                        "directory in it, removed at the end; default: the system's temp dir)")
    parser.add_argument("--profile", type=Path, help="one more recorder round (not counted) "
                        "under cProfile; stats written here and summarized")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--tick-ms", type=float, default=TICK_S * 1000,
                        help="real-time pace: hand over the due packets every this many ms "
                        f"(default {TICK_S * 1000:g}; 0: wake up at each packet's due time)")
    parser.add_argument("--baseline-encoder", choices=("default", "realtime"),
                        default="default", help="MediaRecorder's VP8 encoder as it comes "
                        "(FFmpeg's libvpx defaults) or, as an experiment, set to realtime, "
                        "cpu-used 8 and the input's bitrate")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the two rows measured once after the rounds: the harness "
                        "alone (null sink) and the recorder fed as fast as possible")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    streams = args.streams or 8
    for name in ("streams", "per_room", "baseline_streams", "rounds"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("seconds", "baseline_seconds"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 600:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 600]")
    return Settings(
        streams=streams, per_room=args.per_room,
        seconds=args.seconds or (5.0 if quick else 10.0),
        baseline_streams=args.baseline_streams or (min(streams, 2) if quick
                                                   else min(streams, 4)),
        baseline_seconds=args.baseline_seconds or (3.0 if quick else 4.0),
        rounds=args.rounds or (1 if quick else 3), pace=args.pace,
        retries=0 if quick else 1, cache_dir=args.cache_dir, work_dir=args.dir,
        profile=args.profile, json_path=args.json, extras=not args.no_extras,
        tick_s=max(0.0, args.tick_ms / 1000), baseline_encoder=args.baseline_encoder)


def code_version() -> str:
    """The recorder's files as measured: their git blob ids (the files may be uncommitted)."""
    root = Path(__file__).resolve().parent.parent
    import hashlib

    parts = []
    for name in ("session.py", "depacketize.py", "writer.py"):
        data = (root / "recorder" / name).read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()[:10]
        parts.append(f"{name} {blob}")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.monotonic()
    before = machine_busy_seconds()
    time.sleep(1.0)
    background = machine_busy_seconds() - before
    print(f"machine: {psutil.cpu_count()} cores, {background:.2f} cores busy before the run; "
          f"Python {sys.version.split()[0]}, av {av.__version__}", flush=True)
    try:
        print(f"recorder code: {code_version()}", flush=True)
    except OSError:
        pass
    clip, made = ensure_input(settings.cache_dir)
    print(f"input ({'encoded now' if made else 'cached'} in {settings.cache_dir}): "
          f"VP8 {WIDTH}x{HEIGHT} {FPS} fps, {len(clip.video)} frames, "
          f"{sum(1 for _, key in clip.video if key)} keyframes, {clip.video_kbps:.0f} kbps, "
          f"{clip.packets_per_frame:.2f} RTP packets per frame; Opus {len(clip.audio)} x 20 ms, "
          f"{clip.audio_kbps:.0f} kbps", flush=True)
    ctx = mp.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="recorder-load-", dir=settings.work_dir))
    rows: list[Row] = []
    notes: list[str] = []
    try:
        def job(side: str) -> Job:
            baseline = side == "mediarecorder"
            return Job(side=side,
                       streams=settings.baseline_streams if baseline else settings.streams,
                       seconds=settings.baseline_seconds if baseline else settings.seconds,
                       directory=str(work / side), per_room=settings.per_room,
                       pace=settings.pace, tick_s=settings.tick_s,
                       baseline_encoder=settings.baseline_encoder)

        print(f"recorder: {settings.streams} participants in "
              f"{math.ceil(settings.streams / settings.per_room)} RoomRecordings, "
              f"{settings.seconds:g} s each, {settings.pace}"
              f"{f' (tick {settings.tick_s * 1000:g} ms)' if settings.pace == 'realtime' else ''}"
              "; baseline: "
              f"{settings.baseline_streams} x {settings.baseline_seconds:g} s, as fast as it "
              f"goes, libvpx {settings.baseline_encoder}; {settings.rounds} round(s)", flush=True)
        print(HEADER, flush=True)
        for r in range(1, settings.rounds + 1):
            order = ["recorder", "mediarecorder"]
            if r % 2 == 0:
                order.reverse()
            for side in order:
                rows.append(measure(ctx, job(side), clip, r, settings.retries))
        extras: list[Row] = []
        if settings.extras:
            extras.append(measure(ctx, job("feed"), clip, 0, settings.retries))
            if settings.pace == "realtime":
                fast = job("recorder")
                fast.pace = "fast"
                extras.append(measure(ctx, fast, clip, 0, settings.retries))
        profile_lines: list[str] = []
        if settings.profile is not None:
            profile_job = job("recorder")
            profile_job.profile = str(settings.profile)
            shutil.rmtree(profile_job.directory, ignore_errors=True)
            Path(profile_job.directory).mkdir(parents=True)
            result, _, _ = run_child(ctx, profile_job, clip)
            shutil.rmtree(profile_job.directory, ignore_errors=True)
            packets = sum(p["packets"] for p in result["fed"].values())
            frames = sum(p["video_frames"] + p["audio_frames"] for p in result["fed"].values())
            profile_lines = summarize_profile(settings.profile, packets, frames)
            profile_lines += microbench(clip, work / "micro")
            per_stream_s = 1000 * result["cpu_s"] / profile_job.streams / profile_job.seconds
            profile_lines.insert(0, f"profiled recorder round: {result['cpu_s']:.2f} s CPU "
                                 f"under the profiler ({per_stream_s:.1f} ms/str-s)")
    except BenchError as exc:
        print(f"recorder_load: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recorder_rows = [r for r in rows if r.side == "recorder"]
    baseline_rows = [r for r in rows if r.side == "mediarecorder"]
    ours, theirs = pooled(recorder_rows), pooled(baseline_rows)
    ratio = ours / theirs
    print()
    print(f"{'':<32}{'recorder':>12}{'mediarecorder':>15}")
    print(f"{'streams per round':<32}{settings.streams:>12}{settings.baseline_streams:>15}")
    print(f"{'stream-seconds in all':<32}{sum(r.stream_s for r in recorder_rows):>12.0f}"
          f"{sum(r.stream_s for r in baseline_rows):>15.0f}")
    print(f"{'CPU seconds in all':<32}{sum(r.cpu_s for r in recorder_rows):>12.2f}"
          f"{sum(r.cpu_s for r in baseline_rows):>15.2f}")
    print(f"{'CPU ms per stream-second':<32}{ours:>12.2f}{theirs:>15.1f}")
    print(f"{'  range over rounds':<32}"
          f"{min(r.ms_per_stream_s for r in recorder_rows):>5.2f}-"
          f"{max(r.ms_per_stream_s for r in recorder_rows):<6.2f}"
          f"{min(r.ms_per_stream_s for r in baseline_rows):>8.1f}-"
          f"{max(r.ms_per_stream_s for r in baseline_rows):<6.1f}")
    shares = [sum(r.main_thread_cpu_s for r in side) / sum(r.cpu_s for r in side)
              for side in (recorder_rows, baseline_rows)]
    print(f"{'main thread share of CPU':<32}{shares[0]:>12.0%}{shares[1]:>15.0%}")
    decoding = 1000 * sum(r.decode_cpu_s for r in baseline_rows) / sum(
        r.stream_s for r in baseline_rows)
    print(f"{'  of which decoding (+ depayload)':<32}{'':>12}{decoding:>15.1f}")
    print(f"{'cores per stream (1 core =)':<32}{1000 / ours:>9.0f} st{1000 / theirs:>12.1f} st")
    packets = sum(r.packets for r in recorder_rows) / sum(r.stream_s for r in recorder_rows)
    print(f"{'RTP packets per stream-second':<32}{packets:>12.1f}")
    print(f"{'recorder CPU per packet':<32}{1000 * ours / packets:>9.1f} µs")
    for row in extras:
        if row.side == "feed":
            share = row.ms_per_stream_s / ours
            print(f"harness alone (null sink, {row.streams} x {row.seconds:g} s, {row.pace}): "
                  f"{row.ms_per_stream_s:.2f} ms per stream-second ({share:.0%} of the "
                  "recorder's figure, included in it)")
        else:
            print(f"recorder fed as fast as possible (one run, {row.streams} x {row.seconds:g} s): "
                  f"{row.ms_per_stream_s:.2f} ms per stream-second, "
                  f"{1000 * row.ms_per_stream_s / packets:.1f} µs per packet")
    per_round = [r.ms_per_stream_s / b.ms_per_stream_s
                 for r, b in zip(recorder_rows, baseline_rows, strict=True)]
    print(f"ratio per round: {', '.join(f'{x:.4f}' for x in per_round)}")
    met = "met" if ratio <= GOAL else "NOT met"
    print(f"cpu ratio vs MediaRecorder (pooled): {ratio:.4f}; goal <= {GOAL}: {met}")
    for row in rows + extras:
        for note in row.notes:
            where = f"round {row.round}" if row.round else "extra row"
            notes.append(f"{row.side} ({row.pace}) {where}: {note}")
    if background > 0.2:
        notes.append(f"{background:.2f} cores were busy before the run started")
    for note in notes:
        print(f"note: {note}")
    for line in profile_lines:
        print(line)
    if settings.json_path is not None:
        settings.json_path.write_text(json.dumps({
            "settings": {k: str(v) if isinstance(v, Path) else v
                         for k, v in asdict(settings).items()},
            "rows": [{**asdict(r), "stream_s": r.stream_s, "ms_per_stream_s": r.ms_per_stream_s}
                     for r in rows + extras],
            "recorder_ms_per_stream_s": ours, "baseline_ms_per_stream_s": theirs,
            "ratio": ratio, "per_round": per_round, "notes": notes}, indent=2))
    print(f"(run took {time.monotonic() - started:.0f} s)", flush=True)
    print(f"RESULT cpu_ratio_vs_mediarecorder={ratio:.4f} streams={settings.streams}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
