"""Synthetic recordings shaped like the recorder's: WebM (VP8 + Opus) in milliseconds, with a
manifest written the recorder's way (atomically, SHA-256 of each file); and ``Microphone``, a
stand-in for the relay side the recorder attaches to."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from recorder import manifest

WIDTH, HEIGHT, FPS, RATE = 320, 240, 15, 48000
MICROPHONE = {"id": "pub-1", "participant_id": "cardio1", "source": "microphone",
              "kind": "audio", "codec": "audio/opus", "clock_rate": 48000}
T0 = 1_767_225_600.0
"""2026-01-01T00:00:00Z: when the synthetic consultations start."""


def record(path: Path, *, seconds: float, tone_hz: float | None = 440.0,
           video: bool = True, color: tuple[int, int, int] = (200, 60, 60),
           codec: str = "vp8", size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[dict[str, Any]]:
    """Write ``seconds`` of a moving white bar on ``color`` (320x240, 15 fps, VP8; or H.264 in
    Matroska) and a sine at ``tone_hz`` (Opus, 48 kHz); return the file's ``tracks``."""
    tracks: list[dict[str, Any]] = []
    width, height = size
    with av.open(str(path), "w", format="webm" if codec == "vp8" else "matroska") as out:
        vstream = None
        astream = None
        if video:
            if codec == "vp8":
                vstream = out.add_stream("libvpx", rate=FPS,
                                         options={"deadline": "realtime", "cpu-used": "8"})
            else:
                vstream = out.add_stream("libx264", rate=FPS,
                                         options={"preset": "ultrafast", "tune": "zerolatency"})
            vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
            vstream.bit_rate = 300_000
            tracks.append({"kind": "video", "codec": codec, "width": width, "height": height})
        if tone_hz is not None:
            astream = out.add_stream("libopus", rate=RATE)
            astream.layout = "mono"
            astream.bit_rate = 32_000
            tracks.append({"kind": "audio", "codec": "opus", "sample_rate": RATE})
        frames = round(seconds * FPS)
        samples = round(seconds * RATE)
        chunk = 960
        sent = 0
        for n in range(frames):
            if vstream is not None:
                image = np.zeros((height, width, 3), np.uint8)
                image[:, :] = color
                x = (n * 8) % width
                image[:, x:x + 16] = (255, 255, 255)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = n
                frame.time_base = Fraction(1, FPS)
                out.mux(vstream.encode(frame))
            if astream is not None and tone_hz is not None:
                until = min(samples, round((n + 1) * RATE / FPS))
                while sent + chunk <= until:
                    t = (np.arange(chunk) + sent) / RATE
                    pcm = (0.3 * np.sin(2 * math.pi * tone_hz * t)).astype(np.float32)
                    aframe = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt",
                                                        layout="mono")
                    aframe.sample_rate = RATE
                    aframe.pts = sent
                    aframe.time_base = Fraction(1, RATE)
                    out.mux(astream.encode(aframe))
                    sent += chunk
        if vstream is not None:
            out.mux(vstream.encode(None))
        if astream is not None:
            out.mux(astream.encode(None))
    return tracks


def file_entry(directory: Path, name: str, participant: str, *, started_at: float,
               seconds: float, tracks: list[dict[str, Any]], status: str = "complete",
               source: str = "camera") -> manifest.FileEntry:
    path = directory / name
    done = status in ("complete", "interrupted") and path.exists()
    return manifest.FileEntry.model_validate({
        "name": name, "participant_id": participant, "site_id": "c1", "source": source,
        "tracks": tracks, "started_at": started_at,
        "ended_at": started_at + seconds if status == "complete" else None,
        "duration_s": seconds if status == "complete" else None,
        "bytes": path.stat().st_size if done else None,
        "sha256": manifest.sha256_file(path) if done else None,
        "status": status,
    })


def write_manifest(archive: Path, consultation_id: str, files: list[manifest.FileEntry], *,
                   started_at: float = T0, ended_at: float | None = None,
                   status: str = "stopped") -> manifest.Manifest:
    data = manifest.new_manifest(consultation_id)
    data.consultation.started_at = started_at
    data.consultation.ended_at = ended_at
    data.recording.status = status
    data.files = files
    manifest.write_atomic(manifest.consultation_dir(archive, consultation_id) / manifest.MANIFEST,
                          data)
    return data


class Microphone:
    """The sink side of relay.api.Relay with one Opus publication whose packets come when the
    test says: for recorder tests that need no video. ``spacing_s``: each packet arrives that
    much later than the one before (0: every packet arrives now)."""

    def __init__(self, spacing_s: float = 0.0) -> None:
        self.spacing_s = spacing_s
        self.sink: Any = None
        self.seq = 0
        self.attached = 0
        self.on_detach: Callable[[], None] | None = None

    async def attach_sink(self, room_id: str, sink: Any) -> None:
        self.sink = sink
        self.attached += 1
        sink.publication_added(dict(MICROPHONE))

    async def detach_sink(self, room_id: str, sink: Any) -> None:
        await asyncio.sleep(0)
        if self.on_detach is not None:
            self.on_detach()
        self.sink = None

    async def request_keyframe(self, room_id: str, publication_id: str) -> None:
        pass

    def speak(self, packets: int) -> None:
        for _ in range(packets):
            self.seq += 1
            self.sink.packet("pub-1", self.seq & 0xFFFF, self.seq * 960, True,
                             b"\xfc" + bytes(120), time.time() + self.seq * self.spacing_s)
