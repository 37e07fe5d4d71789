"""recorder/export.py: one WebM of a consultation, participants side by side, audio mixed;
and `telehealth archive export`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest

from recorder import manifest
from recorder.archive import ArchiveError
from recorder.audit import AuditLog
from recorder.export import export
from telehealth.cli import main
from tests.recorder.recordings import RATE, T0, file_entry, record, write_manifest
from tests.support import write_config

TILE = 240
RED, BLUE = (200, 60, 60), (60, 60, 200)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cardio1 from 0 to 3 s (440 Hz, red), neuro2 from 1 to 4 s (660 Hz, blue)."""
    directory = tmp_path_factory.mktemp("recordings")
    record(directory / "cardio1-camera-1.webm", seconds=3, tone_hz=440, color=RED)
    record(directory / "neuro2-camera-1.webm", seconds=3, tone_hz=660, color=BLUE)
    return directory


@pytest.fixture
def archive(tmp_path: Path, recordings: Path) -> Path:
    """Consultation c-1: the two cameras, a screen share that failed and a camera whose file
    is gone."""
    archive = tmp_path / "archive"
    directory = archive / "c-1"
    shutil.copytree(recordings, directory)
    tracks = [{"kind": "video", "codec": "vp8", "width": 320, "height": 240},
              {"kind": "audio", "codec": "opus", "sample_rate": RATE}]
    files = [
        file_entry(directory, "cardio1-camera-1.webm", "cardio1", started_at=T0, seconds=3,
                   tracks=tracks),
        file_entry(directory, "neuro2-camera-1.webm", "neuro2", started_at=T0 + 1, seconds=3,
                   tracks=tracks),
        file_entry(directory, "neuro2-screen-1.webm", "neuro2", started_at=T0 + 2, seconds=1,
                   tracks=tracks[:1], status="failed", source="screen"),
        file_entry(directory, "cardio1-camera-2.webm", "cardio1", started_at=T0 + 3.5,
                   seconds=1, tracks=tracks),
    ]
    write_manifest(archive, "c-1", files, ended_at=T0 + 4)
    return archive


def luma(frame: av.VideoFrame, x0: int, x1: int) -> float:
    return float(frame.to_ndarray()[:frame.height, x0:x1].mean())


def frames_at(path: Path, times: list[float]) -> dict[float, av.VideoFrame]:
    found = {}
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            for t in times:
                if abs(frame.time - t) < 0.5 / 15:
                    found[t] = frame
    return found


def audio_of(path: Path) -> npt.NDArray[np.float32]:
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "opus"
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])


def tones(samples: npt.NDArray[np.float32], start: float, end: float) -> set[int]:
    """Which of 440, 550, 660 Hz sound between ``start`` and ``end`` seconds."""
    segment = samples[int(start * RATE):int(end * RATE)]
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    freqs = np.fft.rfftfreq(len(segment), 1 / RATE)
    peak = spectrum.max()
    return {f for f in (440, 550, 660)
            if spectrum[(freqs > f - 10) & (freqs < f + 10)].max() > 0.2 * peak}


def test_export_places_each_participant_in_a_tile_on_one_timeline(
    archive: Path, tmp_path: Path,
) -> None:
    out = export(archive, "c-1", tmp_path / "c-1.webm", tile_height=TILE)
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "vp8"
        assert (video.codec_context.width, video.codec_context.height) == (2 * 320, TILE)
        assert container.duration is not None
        assert abs(container.duration / 1e6 - 4.0) < 0.5
        last = max(frame.time for frame in container.decode(video=0))
        assert abs(last + 1 / 15 - 4.0) < 0.5
    shots = frames_at(out, [0.5, 2.0, 3.6])
    left, right = (0, 320), (320, 640)
    assert luma(shots[0.5], *left) > 60 and luma(shots[0.5], *right) < 20  # neuro2 not yet
    assert luma(shots[2.0], *left) > 60 and luma(shots[2.0], *right) > 40
    assert luma(shots[3.6], *left) < 20 and luma(shots[3.6], *right) > 40  # cardio1 left


def test_export_mixes_everyone_s_audio_at_48_khz(archive: Path, tmp_path: Path) -> None:
    samples = audio_of(export(archive, "c-1", tmp_path / "c-1.webm", tile_height=TILE))
    assert abs(len(samples) / RATE - 4.0) < 0.5
    assert tones(samples, 0.2, 0.9) == {440}
    assert tones(samples, 1.2, 2.8) == {440, 660}
    assert tones(samples, 3.2, 3.9) == {660}
    assert float(np.abs(samples).max()) <= 1.0


def test_export_reports_progress_up_to_1(archive: Path, tmp_path: Path) -> None:
    seen: list[float] = []
    export(archive, "c-1", tmp_path / "c-1.webm", tile_height=TILE, progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert seen == sorted(seen) and len(seen) > 10


def test_failed_and_missing_files_are_skipped_with_a_warning(
    archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="recorder.export"):
        export(archive, "c-1", tmp_path / "c-1.webm", tile_height=TILE)
    messages = [r.getMessage() for r in caplog.records]
    assert "export c-1: neuro2-screen-1.webm failed while recording, skipped" in messages
    assert "export c-1: cardio1-camera-2.webm is missing, skipped" in messages


def test_an_interrupted_file_gives_what_it_holds(archive: Path, tmp_path: Path) -> None:
    directory = archive / "c-1"
    data = manifest.load(directory / manifest.MANIFEST)
    cut = directory / "cardio1-camera-1.webm"
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size * 2 // 3])  # killed mid-file
    data.files = [data.files[0].model_copy(update=dict(
        status="interrupted", ended_at=None, duration_s=None, sha256=None, bytes=None))]
    manifest.write_atomic(directory / manifest.MANIFEST, data)
    out = export(archive, "c-1", tmp_path / "c-1.webm", tile_height=TILE)
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.width == 320
        assert container.duration is not None
        assert 1.0 < container.duration / 1e6 < 2.8
    samples = audio_of(out)
    assert tones(samples, 0.2, 1.0) == {440}


def test_h264_in_matroska_and_a_wide_screen_share_get_their_own_tiles(
    tmp_path: Path, recordings: Path,
) -> None:
    archive = tmp_path / "archive"
    directory = archive / "c-2"
    directory.mkdir(parents=True)
    shutil.copyfile(recordings / "cardio1-camera-1.webm", directory / "cardio1-camera-1.webm")
    screen = record(directory / "cardio1-screen-1.mkv", seconds=2, tone_hz=None,
                    codec="h264", size=(640, 360))
    camera = [{"kind": "video", "codec": "vp8", "width": 320, "height": 240}]
    write_manifest(archive, "c-2", [
        file_entry(directory, "cardio1-camera-1.webm", "cardio1", started_at=T0, seconds=3,
                   tracks=camera),
        file_entry(directory, "cardio1-screen-1.mkv", "cardio1", started_at=T0 + 0.5,
                   seconds=2, tracks=screen, source="screen"),
    ])
    out = export(archive, "c-2", tmp_path / "c-2.webm", tile_height=TILE)
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.width == 320 + 426  # 640x360 at 240
    shot = frames_at(out, [1.5])[1.5]
    assert luma(shot, 0, 320) > 60 and luma(shot, 320, 746) > 40


def test_a_consultation_without_video_exports_its_audio_alone(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    directory = archive / "c-3"
    directory.mkdir(parents=True)
    tracks = record(directory / "cardio1-camera-1.webm", seconds=1.5, tone_hz=550, video=False)
    write_manifest(archive, "c-3", [file_entry(directory, "cardio1-camera-1.webm", "cardio1",
                                               started_at=T0, seconds=1.5, tracks=tracks)])
    seen: list[float] = []
    out = export(archive, "c-3", tmp_path / "c-3.webm", progress=seen.append)
    with av.open(str(out)) as container:
        assert not container.streams.video
    samples = audio_of(out)
    assert abs(len(samples) / RATE - 1.5) < 0.1
    assert tones(samples, 0.2, 1.3) == {550}
    assert seen[-1] == 1.0


def test_export_of_an_unknown_consultation_raises(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="'c-9'"):
        export(archive, "c-9", tmp_path / "out.webm")
    with pytest.raises(ArchiveError, match="not a consultation id"):
        export(archive, "../c-1", tmp_path / "out.webm")
    assert not list(tmp_path.glob("*.webm"))


def test_cli_export_shows_progress_writes_the_file_and_audits_it(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = str(write_config(tmp_path, recording={"archive_dir": str(archive)}))
    out = tmp_path / "exports" / "c-1.webm"
    assert main(["--config", config, "archive", "export", "c-1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "\r[" in captured.err and "] 100%" in captured.err
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.width == 2 * 480  # default 360 high
    entries = list(AuditLog(archive / "audit.log").entries())
    assert [(e["actor"], e["action"], e["consultation_id"]) for e in entries] == [
        ("cli", "archive.export", "c-1")]
    assert entries[0]["detail"]["out"] == "c-1.webm"
    assert not list(out.parent.glob(".*.part"))

    assert main(["--config", config, "archive", "export", "c-9"]) == 2
    assert "no consultation 'c-9'" in capsys.readouterr().err
