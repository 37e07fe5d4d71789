"""Synthetic VP8 input for the benchmarks, encoded once and cached by the caller."""

from __future__ import annotations

import fractions
from pathlib import Path

import av


def encode_vp8_ivf(path: Path, *, source: str, seconds: int, warmup: int, fps: int,
                   width: int, height: int, bitrate: int, gop: int,
                   key_first: bool = False) -> None:
    """``seconds`` of the lavfi ``source`` as realtime VP8 into an IVF file at ``path``. The
    first ``warmup`` frames are encoded and dropped, so the clip starts in the encoder's
    steady state; ``key_first`` forces its first kept frame to be a keyframe."""
    total = warmup + seconds * fps
    with av.open(source, format="lavfi") as lavfi, \
            av.open(str(path), "w", format="ivf") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bitrate
        stream.codec_context.gop_size = gop
        stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        index = 0
        for frame in lavfi.decode(video=0):
            if index >= total:
                break
            picture = frame.reformat(format="yuv420p")
            picture.pts = index
            picture.time_base = fractions.Fraction(1, fps)
            # lavfi marks every frame as I, and libvpx turns an I picture into a keyframe.
            picture.pict_type = (av.video.frame.PictureType.I if key_first and index == warmup
                                 else av.video.frame.PictureType.NONE)
            for packet in stream.encode(picture):
                if packet.pts is not None and packet.pts >= warmup:
                    out.mux(packet)
            index += 1
        for packet in stream.encode(None):
            if packet.pts is not None and packet.pts >= warmup:
                out.mux(packet)
