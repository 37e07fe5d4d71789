"""Export a consultation as one playable WebM: the participants side by side, all audio mixed.

Every recorded file is placed on one wall-clock timeline (a file's time 0 is its manifest
``started_at``) running from the earliest start to the latest end. Each participant's camera
(and each screen share) is a tile ``tile_height`` high keeping its aspect; a tile is black while
its participant sends no video (after ``FREEZE_S`` on its last frame), so a gap in the
recording (``recording.gaps``: a relay move, a server restart) is silent and black for its
length. All audio is summed (clipped) at 48 kHz mono. The result is encoded VP8 + Opus: this
runs offline, transcoding is fine.

The inputs are streamed (an hour-long consultation is never held in memory): every file is
decoded alongside the output, one frame ahead at most.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from av.audio.frame import AudioFrame
from av.video.frame import VideoFrame

from recorder import manifest
from recorder.archive import ArchiveError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 48000
AUDIO_CHUNK = 960
"""Samples per output audio frame (20 ms, Opus's own frame)."""
FREEZE_S = 2.0
"""A tile keeps showing its participant's last frame this long, then goes black (camera off)."""
RESYNC_S = 0.05
"""Audio placed contiguously unless its timestamp strays further than this (a gap in the
recording, or drift): then it is placed at its timestamp."""
BLACK_Y, BLACK_UV = 16, 128
DEFAULT_ASPECT = 4 / 3


def export(archive: Path, consultation_id: str, out: Path, *,
           progress: Callable[[float], None] | None = None, fps: int = 15,
           tile_height: int = 360) -> Path:
    """Write consultation ``consultation_id`` of ``archive`` to ``out`` (WebM) and return it.

    ``progress`` is called with the fraction done (0..1, ending with 1.0). Files whose status
    is ``failed``, or that are missing, are skipped with a warning; ``interrupted`` ones give
    what they hold. ``out`` appears only when complete (written beside it, then renamed).
    Raises :class:`ArchiveError` when the consultation or anything to export is missing.
    """
    if not 1 <= fps <= 60:
        raise ValueError(f"fps must be 1..60, not {fps!r}")
    if not 16 <= tile_height <= 2160:
        raise ValueError(f"tile_height must be 16..2160, not {tile_height!r}")
    try:
        directory = manifest.consultation_dir(archive, consultation_id)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from None
    path = directory / manifest.MANIFEST
    if not path.is_file():
        raise ArchiveError(f"no consultation {consultation_id!r} in {archive}")
    try:
        data = manifest.load(path)
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"{consultation_id}: manifest cannot be read: {exc}") from None
    sources = _sources(directory, data)
    if not sources:
        raise ArchiveError(f"{consultation_id}: no recorded file to export")
    plan = _Plan.of(sources, fps=fps, tile_height=tile_height & ~1)
    logger.info("export %s: %d files, %d tiles (%dx%d), %.1f s", consultation_id, len(sources),
                len(plan.tiles), plan.width, plan.height, plan.duration)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.part")
    try:
        _render(plan, partial, _Progress(progress))
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return out


@dataclass
class _Source:
    """One usable recorded file, placed on the timeline."""

    path: Path
    participant: str
    kind: str
    """``camera`` or ``screen``."""
    start: float
    """Wall-clock of the file's time 0."""
    end: float
    video: tuple[int, int] | None
    """(width, height), or None without a video track."""
    audio: bool


def _sources(directory: Path, data: manifest.Manifest) -> list[_Source]:
    cid = directory.name
    sources = []
    for item in data.files:
        name, status = item.name, item.status
        path = directory / name
        if status == "failed":
            logger.warning("export %s: %s failed while recording, skipped", cid, name)
            continue
        if not path.is_file():
            logger.warning("export %s: %s is missing, skipped", cid, name)
            continue
        if status == "recording":
            logger.warning("export %s: %s is still being recorded; exporting what it holds",
                           cid, name)
        try:
            source = _probe(path, item)
        except (av.FFmpegError, OSError) as exc:
            logger.warning("export %s: %s cannot be read, skipped: %s", cid, name, exc)
            continue
        if source is None:
            logger.warning("export %s: %s holds no audio or video, skipped", cid, name)
            continue
        sources.append(source)
    return sources


def _probe(path: Path, item: manifest.FileEntry) -> _Source | None:
    started = item.started_at
    with av.open(str(path)) as container:
        video = container.streams.video[0] if container.streams.video else None
        has_audio = bool(container.streams.audio)
        if video is None and not has_audio:
            return None
        size = None
        if video is not None:
            size = item.video_size() or (video.codec_context.width,
                                         video.codec_context.height)
        end = item.ended_at
        if end is None:
            if item.duration_s is not None:
                end = started + item.duration_s
            else:  # interrupted: no duration anywhere; the last timestamp says how long
                end = started + _last_timestamp(container)
    return _Source(path=path, participant=item.participant_id or path.stem,
                   kind=item.source, start=started,
                   end=max(started, float(end)), video=size, audio=has_audio)


def _last_timestamp(container: av.container.InputContainer) -> float:
    last = 0.0
    with contextlib.suppress(av.FFmpegError):
        for packet in container.demux():
            if packet.pts is not None and packet.time_base is not None:
                last = max(last, float((packet.pts + (packet.duration or 0))
                                       * packet.time_base))
    return last


@dataclass
class _Tile:
    x: int
    width: int
    sources: list[_Source]


@dataclass
class _Plan:
    sources: list[_Source]
    tiles: list[_Tile]
    origin: float
    duration: float
    fps: int
    width: int
    height: int

    @classmethod
    def of(cls, sources: list[_Source], *, fps: int, tile_height: int) -> _Plan:
        origin = min(s.start for s in sources)
        duration = max(s.end for s in sources) - origin
        groups: dict[tuple[str, str], list[_Source]] = {}
        for source in sorted(sources, key=lambda s: (s.kind != "camera", s.start)):
            if source.video is not None:
                groups.setdefault((source.participant, source.kind), []).append(source)
        tiles = []
        x = 0
        for members in groups.values():
            width = max(_even(tile_height * w / h if h else tile_height * DEFAULT_ASPECT)
                        for w, h in (s.video or (0, 0) for s in members))
            tiles.append(_Tile(x, width, members))
            x += width
        return cls(sources, tiles, origin, max(duration, 1 / fps), fps, x, tile_height)


def _even(value: float) -> int:
    return max(2, round(value / 2) * 2)


class _Progress:
    """Calls ``callback`` with a fraction that only grows, at most once per 0.1 %; 1.0 only
    once the output is complete."""

    def __init__(self, callback: Callable[[float], None] | None) -> None:
        self.callback = callback
        self.last = -1

    def __call__(self, fraction: float, *, done: bool = False) -> None:
        if self.callback is None:
            return
        permille = 1000 if done else int(min(0.999, max(0.0, fraction)) * 1000)
        if permille > self.last:
            self.last = permille
            self.callback(permille / 1000)


def _render(plan: _Plan, out: Path, progress: _Progress) -> None:
    total_samples = round(plan.duration * SAMPLE_RATE)
    frames = math.ceil(plan.duration * plan.fps - 1e-6) if plan.tiles else 0
    with contextlib.ExitStack() as stack, av.open(str(out), "w", format="webm") as output:
        canvas = _Canvas(plan, stack) if plan.tiles else None
        feeds = [stack.enter_context(_AudioFeed(s.path, s.start - plan.origin))
                 for s in plan.sources if s.audio]
        vstream = None
        if canvas is not None:
            vstream = output.add_stream("libvpx", rate=plan.fps, options={
                "deadline": "good", "cpu-used": "5", "auto-alt-ref": "0",
                "threads": str(min(4, os.cpu_count() or 1)),
            })
            vstream.width, vstream.height, vstream.pix_fmt = plan.width, plan.height, "yuv420p"
            vstream.bit_rate = max(200_000, int(plan.width * plan.height * plan.fps * 0.08))
            vstream.codec_context.gop_size = plan.fps * 5
        astream = None
        if feeds:
            astream = output.add_stream("libopus", rate=SAMPLE_RATE)
            astream.layout = "mono"
            astream.bit_rate = 64_000
        mixed = 0
        progress(0.0)
        for k in range(frames):
            assert canvas is not None and vstream is not None
            frame = canvas.frame(k / plan.fps)
            frame.pts = k
            frame.time_base = Fraction(1, plan.fps)
            output.mux(vstream.encode(frame))
            if astream is not None:
                until = min(total_samples, round((k + 1) * SAMPLE_RATE / plan.fps))
                mixed = _mix(feeds, astream, output, mixed, until, total_samples)
            progress((k + 1) / frames)
        if astream is not None:
            step = AUDIO_CHUNK * 50
            while mixed < total_samples:
                mixed = _mix(feeds, astream, output, mixed, min(total_samples, mixed + step),
                             total_samples)
                progress(mixed / total_samples)
            output.mux(astream.encode(None))
        if vstream is not None:
            output.mux(vstream.encode(None))
    progress(1.0, done=True)


def _mix(feeds: list[_AudioFeed], stream: av.audio.stream.AudioStream,
         output: av.container.OutputContainer, start: int, until: int, total: int) -> int:
    """Encode the mix in 20 ms frames from sample ``start`` while they end by ``until``;
    return where the next one starts. The timeline's last frame may be shorter."""
    while start + AUDIO_CHUNK <= until or (until == total and start < until):
        length = min(AUDIO_CHUNK, until - start)
        mix = np.zeros(length, np.float32)
        for feed in feeds:
            feed.mix_into(mix, start)
        np.clip(mix, -1.0, 1.0, out=mix)
        frame = AudioFrame.from_ndarray(mix.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = start
        frame.time_base = Fraction(1, SAMPLE_RATE)
        output.mux(stream.encode(frame))
        start += length
    return start


class _Canvas:
    """The output picture: every tile's current frame, scaled and centred, on black."""

    def __init__(self, plan: _Plan, stack: contextlib.ExitStack) -> None:
        self.width, self.height = plan.width, plan.height
        area = self.width * self.height
        self.buffer = np.empty(area * 3 // 2, np.uint8)
        self.y = self.buffer[:area].reshape(self.height, self.width)
        self.u = self.buffer[area:area * 5 // 4].reshape(self.height // 2, self.width // 2)
        self.v = self.buffer[area * 5 // 4:].reshape(self.height // 2, self.width // 2)
        self.y.fill(BLACK_Y)
        self.u.fill(BLACK_UV)
        self.v.fill(BLACK_UV)
        self.tiles = [(tile, [stack.enter_context(_VideoFeed(s.path, s.start - plan.origin,
                                                             s.end - plan.origin))
                              for s in tile.sources])
                      for tile in plan.tiles]
        self.shown: list[VideoFrame | None] = [None] * len(self.tiles)

    def frame(self, t: float) -> VideoFrame:
        for index, (tile, feeds) in enumerate(self.tiles):
            current = None
            for feed in feeds:  # in order of start: a later file wins where they overlap
                visible = feed.at(t)
                if visible is not None:
                    current = visible
            if current is not self.shown[index]:
                self._draw(tile, current)
                self.shown[index] = current
        return VideoFrame.from_ndarray(self.buffer.reshape(-1, self.width), format="yuv420p")

    def _draw(self, tile: _Tile, frame: VideoFrame | None) -> None:
        x0, x1 = tile.x, tile.x + tile.width
        self.y[:, x0:x1] = BLACK_Y
        self.u[:, x0 // 2:x1 // 2] = BLACK_UV
        self.v[:, x0 // 2:x1 // 2] = BLACK_UV
        if frame is None or not frame.width or not frame.height:
            return
        scale = min(tile.width / frame.width, self.height / frame.height)
        w = min(tile.width, _even(frame.width * scale))
        h = min(self.height, _even(frame.height * scale))
        x = x0 + ((tile.width - w) // 4) * 2
        y = ((self.height - h) // 4) * 2
        flat = frame.reformat(width=w, height=h, format="yuv420p").to_ndarray().reshape(-1)
        area = w * h
        self.y[y:y + h, x:x + w] = flat[:area].reshape(h, w)
        self.u[y // 2:(y + h) // 2, x // 2:(x + w) // 2] = \
            flat[area:area * 5 // 4].reshape(h // 2, w // 2)
        self.v[y // 2:(y + h) // 2, x // 2:(x + w) // 2] = \
            flat[area * 5 // 4:].reshape(h // 2, w // 2)


class _VideoFeed:
    """The video of one file, decoded as the timeline reaches it (one frame of look-ahead)."""

    def __init__(self, path: Path, offset: float, end: float) -> None:
        self.path = path
        self.offset = offset
        self.end = end
        self.container = av.open(str(path))
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.frames = self._decode()
        self.current: tuple[float, VideoFrame] | None = None
        self.pending: tuple[float, VideoFrame] | None = None
        self.done = False

    def __enter__(self) -> _VideoFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.frames.close()
        self.container.close()

    def at(self, t: float) -> VideoFrame | None:
        """The frame showing at timeline time ``t``, or None (not started, ended, or no frame
        for longer than FREEZE_S)."""
        while not self.done:
            if self.pending is None:
                self.pending = next(self.frames, None)
                if self.pending is None:
                    self.done = True
                    break
            if self.pending[0] > t:
                break
            self.current, self.pending = self.pending, None
        if self.current is None or t - self.current[0] > FREEZE_S or t > self.end + 0.1:
            return None
        return self.current[1]

    def _decode(self) -> Generator[tuple[float, VideoFrame]]:
        for frame in _decoded(self.container, self.stream, self.path, "video"):
            if frame.pts is not None and frame.time_base is not None:
                yield self.offset + float(frame.pts * frame.time_base), frame


def _decoded(container: Any, stream: Any, path: Path, kind: str) -> Generator[Any]:
    """Every frame of ``stream`` that decodes: a file cut short mid-cluster ends where its data
    does, undecodable packets are skipped (the first one is logged)."""
    errors = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as exc:  # a file cut short mid-cluster
            logger.warning("export: %s ends in damaged data: %s", path.name, exc)
            return
        try:
            decoded = packet.decode()
        except av.FFmpegError as exc:
            errors += 1
            if errors == 1:
                logger.warning("export: %s: undecodable %s skipped: %s", path.name, kind, exc)
            continue
        yield from decoded


@dataclass
class _AudioFeed:
    """The audio of one file, decoded and resampled as the mix reaches it."""

    path: Path
    offset: float
    chunks: deque[tuple[int, npt.NDArray[np.float32]]] = field(default_factory=deque)
    cursor: int | None = None
    done: bool = False

    def __post_init__(self) -> None:
        self.container = av.open(str(self.path))
        self.stream = self.container.streams.audio[0]
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self.frames = self._decode()

    def __enter__(self) -> _AudioFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.frames.close()
        self.container.close()

    def mix_into(self, mix: npt.NDArray[np.float32], start: int) -> None:
        """Add this file's samples from timeline sample ``start`` on into ``mix``."""
        end = start + len(mix)
        while not self.done and (self.cursor is None or self.cursor < end):
            self._pull()
        while self.chunks:
            position, samples = self.chunks[0]
            lo, hi = max(start, position), min(end, position + len(samples))
            if lo < hi:
                mix[lo - start:hi - start] += samples[lo - position:hi - position]
            if position + len(samples) > end:
                break
            self.chunks.popleft()

    def _pull(self) -> None:
        item = next(self.frames, None)
        if item is None:
            self.done = True
            return
        at, resampled = item
        expected = round(at * SAMPLE_RATE)
        for frame in resampled:
            samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            if self.cursor is None or abs(expected - self.cursor) > RESYNC_S * SAMPLE_RATE:
                self.cursor = expected
            self.chunks.append((self.cursor, samples))
            self.cursor += len(samples)
            expected = self.cursor

    def _decode(self) -> Generator[tuple[float, list[AudioFrame]]]:
        last = self.offset
        for frame in _decoded(self.container, self.stream, self.path, "audio"):
            if frame.pts is not None and frame.time_base is not None:
                last = self.offset + float(frame.pts * frame.time_base)
            yield last, self.resampler.resample(frame)
        yield last, self.resampler.resample(None)
