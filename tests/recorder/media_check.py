"""Reading recorded files back with PyAV: the counters stamped in the video, the audio's pitch,
the timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from tests.media import read_counter


@dataclass
class Decoded:
    counters: list[int] = field(default_factory=list)
    video_pts: list[float] = field(default_factory=list)
    keyframes: int = 0
    width: int = 0
    height: int = 0
    codec: str = ""
    audio: list[np.ndarray] = field(default_factory=list)
    audio_start: float | None = None
    audio_end: float = 0.0
    sample_rate: int = 48000
    errors: int = 0

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)

    @property
    def audio_seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def video_seconds(self) -> float:
        return self.video_pts[-1] - self.video_pts[0] if self.video_pts else 0.0


def decode(path: Path) -> Decoded:
    """Every frame of the file (a file cut short by a kill included: up to its last cluster)."""
    out = Decoded()
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size == 0:
                continue
            stream = packet.stream
            if stream.type == "video" and packet.is_keyframe:
                out.keyframes += 1
            try:
                frames = packet.decode()
            except av.FFmpegError:
                out.errors += 1
                continue
            for frame in frames:
                time = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                if isinstance(frame, av.VideoFrame):
                    out.counters.append(read_counter(frame))
                    out.video_pts.append(time)
                    out.width, out.height = frame.width, frame.height
                    out.codec = stream.codec_context.name
                elif isinstance(frame, av.AudioFrame):
                    out.sample_rate = frame.sample_rate
                    pcm = frame.to_ndarray()
                    mono = pcm[0] if pcm.ndim == 2 and frame.format.is_planar else \
                        pcm.reshape(-1, len(frame.layout.channels))[:, 0]
                    out.audio.append(mono.astype(np.float32))
                    if out.audio_start is None:
                        out.audio_start = time
                    out.audio_end = time + frame.samples / frame.sample_rate
    return out


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency of one second of audio from the middle of ``samples``."""
    middle = len(samples) // 2
    window = samples[max(0, middle - rate // 2): middle + rate // 2]
    spectrum = np.abs(np.fft.rfft(window * np.hanning(len(window))))
    return float(np.fft.rfftfreq(len(window), 1 / rate)[int(np.argmax(spectrum))])
