"""MediaFile: one Matroska/WebM file muxed from encoded frames with PyAV, never transcoded.

Crash safety: the muxer closes a cluster every ``cluster_ms`` and every write goes straight
through to the file (``flush_packets``), so what was muxed reaches the page cache at once and
survives a kill -9 of the process; the owner calls ``sync()`` (fsync) at intervals from a worker
thread against a power cut. A file cut short that way has no cues and no duration in its
header, and still plays (and decodes with PyAV) up to its last cluster.

Timestamps are milliseconds on the file's timeline (time base 1/1000), strictly increasing per
stream; ``Timeline`` turns RTP timestamps into them, anchored on arrival wall-clock.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from codec.rtp import TimestampUnwrapper, vp8_frame_size

logger = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 1000)
WEBM_CODECS = frozenset({"vp8", "vp9", "opus"})
MAX_INTERLEAVE_US = 300_000
"""The muxer holds a packet at most this long waiting for the other stream's (a silent track
must not hold the other one back, nor keep data from the disk)."""
REANCHOR_S = 1.0
"""A timestamp that strays this far from its arrival time is a discontinuity (the publisher
restarted its stream): the track's clock is anchored again on the arrival wall-clock."""


@dataclass(frozen=True)
class TrackSpec:
    kind: str
    """``video`` or ``audio``."""
    codec: str
    """``vp8``, ``h264`` or ``opus``."""
    width: int = 0
    height: int = 0
    sample_rate: int = 48000
    keyframe: bytes = field(default=b"", repr=False, compare=False)
    """The first keyframe (H.264: Annex-B with SPS/PPS): the stream's parameters come from it."""


def h264_probe(keyframe: bytes) -> tuple[Any, Any]:
    """Parse an Annex-B H.264 keyframe with FFmpeg's raw demuxer: its stream carries the
    dimensions and the SPS/PPS (extradata) that Matroska's header needs. Nothing is decoded
    beyond the parameter sets. Returns (container, stream); close the container after use."""
    probe = av.open(io.BytesIO(keyframe), format="h264")
    return probe, probe.streams.video[0]


def h264_size(keyframe: bytes) -> tuple[int, int] | None:
    try:
        probe, stream = h264_probe(keyframe)
    except (av.FFmpegError, IndexError):
        return None
    with contextlib.closing(probe):
        width, height = stream.codec_context.width, stream.codec_context.height
    return (width, height) if width and height else None


def video_size(codec: str, keyframe: bytes) -> tuple[int, int] | None:
    return vp8_frame_size(keyframe) if codec == "vp8" else h264_size(keyframe)


def extension_for(tracks: list[TrackSpec]) -> str:
    """``.webm`` when every codec is allowed in WebM, else ``.mkv`` (H.264)."""
    return ".webm" if all(t.codec in WEBM_CODECS for t in tracks) else ".mkv"


class Timeline:
    """RTP timestamps of one track -> strictly increasing milliseconds since ``origin``.

    The first frame sits at its arrival wall-clock; later frames keep the spacing of their RTP
    timestamps (smooth, unlike arrival times), unwrapped across 2^32. Each receiver starts its
    timestamps anywhere, so this is what aligns a participant's audio and video."""

    def __init__(self, clock_rate: int, origin: float) -> None:
        self.clock_rate = clock_rate
        self.origin = origin
        self._anchor_wall = 0.0
        self._anchor_ext = 0
        self._timestamps = TimestampUnwrapper()
        self.last_ms = -1
        self.reanchored = 0

    def ms(self, timestamp: int, arrival: float) -> int:
        first = self._timestamps.value is None
        ext = self._timestamps.extend(timestamp)
        if first:
            self._anchor_ext, self._anchor_wall = ext, arrival
        at = self._anchor_wall + (ext - self._anchor_ext) / self.clock_rate
        if abs(at - arrival) > REANCHOR_S:
            self._anchor_ext, self._anchor_wall = ext, arrival
            at = arrival
            self.reanchored += 1
        ms = round((at - self.origin) * 1000)
        if ms <= self.last_ms:
            ms = self.last_ms + 1
        self.last_ms = ms
        return ms


class RecordingError(Exception):
    """Writing a recording failed (disk full, permission denied, file too large...)."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        super().__init__(f"cannot write {path.name}: {reason}")
        self.path = path
        self.cause = cause


class _SyncedFile(io.RawIOBase):
    """The file PyAV writes into: counts bytes and raises the real OSError (ENOSPC, EFBIG,
    EACCES) instead of letting it turn into an opaque muxer error."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "xb", buffering=0)
        self.error: OSError | None = None
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            written = self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        if written is None:
            written = 0
        self.bytes = max(self.bytes, self._f.tell())
        return written

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        super().close()


class MediaFile:
    """One recorded file: its streams are fixed when it opens (a track that appears later
    goes into the next file)."""

    def __init__(self, path: Path, tracks: list[TrackSpec], *, cluster_ms: int = 500) -> None:
        self.path = path
        self.tracks = list(tracks)
        self.frames = [0] * len(tracks)
        self.closed = False
        self.last_ms = 0
        self._lock = threading.Lock()
        self._file = _SyncedFile(path)
        try:
            self._container = av.open(
                self._file, "w", format="webm" if extension_for(tracks) == ".webm"
                else "matroska",
                options={"cluster_time_limit": str(cluster_ms), "flush_packets": "1",
                         "max_interleave_delta": str(MAX_INTERLEAVE_US)},
            )
            self._streams = [self._add(t) for t in tracks]
            self._container.start_encoding()
        except Exception as exc:
            self._abandon()
            raise self._error(exc) from None

    def _add(self, track: TrackSpec) -> Any:
        if track.kind == "video" and track.codec == "h264":
            # Matroska's header needs the SPS/PPS: take the stream from the first keyframe.
            probe, template = h264_probe(track.keyframe)
            with contextlib.closing(probe):
                stream = self._container.add_stream_from_template(template)
        elif track.kind == "video":
            stream = self._container.add_mux_stream(track.codec, width=track.width,
                                                    height=track.height)
        else:
            # A mux-only Opus stream gets no OpusHead; an encoder stream writes a correct one
            # (its encoder is never used for data).
            stream = self._container.add_stream("libopus", rate=track.sample_rate,
                                                layout="stereo")
        stream.time_base = TIME_BASE
        return stream

    def _error(self, exc: BaseException) -> RecordingError:
        return RecordingError(self.path, self._file.error or exc)

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._file.bytes

    def write(self, index: int, data: bytes, ms: int, keyframe: bool) -> None:
        """Mux one encoded frame of track ``index`` at ``ms`` (strictly increasing per track)."""
        if self.closed:
            return
        packet = av.Packet(data)
        packet.stream = self._streams[index]
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = ms
        packet.is_keyframe = keyframe
        try:
            self._container.mux_one(packet)
        except Exception as exc:
            self._abandon()
            raise self._error(exc) from None
        self.frames[index] += 1
        if ms > self.last_ms:
            self.last_ms = ms

    def sync(self) -> None:
        """fsync what was written so far (from a worker thread; the loop keeps writing)."""
        with self._lock:
            if self._file.closed:
                return
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                raise RecordingError(self.path, exc) from None

    def close(self) -> None:
        """Finish the file: cues, duration, fsync."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            try:
                self._container.close()
                os.fsync(self._file.fileno())
            except Exception as exc:
                raise self._error(exc) from None
            finally:
                self._file.close()

    def _abandon(self) -> None:
        """Stop writing after an error; what reached the disk stays."""
        self.closed = True
        container = getattr(self, "_container", None)
        try:
            if container is not None:
                container.close()
        except Exception:
            logger.debug("closing %s after an error failed too", self.path.name, exc_info=True)
        self._file.close()
