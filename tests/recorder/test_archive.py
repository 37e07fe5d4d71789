"""recorder/archive.py: verify the archive against its manifests, prune what has expired;
and `telehealth archive verify|prune`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from recorder import manifest
from recorder.archive import prune, verify_archive
from recorder.audit import AuditLog
from telehealth.cli import main
from tests.recorder.recordings import T0, file_entry, write_manifest
from tests.support import write_config

YEAR = manifest.SECONDS_PER_YEAR
DAY = 86400.0


def consultation(archive: Path, cid: str, copy_clip: Any, *, started_at: float = T0,
                 ended_at: float | None = None, status: str = "stopped",
                 participants: tuple[str, ...] = ("cardio1",), recording: bool = False,
                 expires_at: float | None = None) -> Path:
    directory = archive / cid
    files = []
    for n, participant in enumerate(participants):
        name = f"{participant}-camera-1.webm"
        tracks = copy_clip(directory / name)
        files.append(file_entry(directory, name, participant, started_at=started_at + n,
                                seconds=1.0, tracks=tracks))
    data = write_manifest(archive, cid, files, started_at=started_at, ended_at=ended_at,
                          status=status)
    if expires_at is not None:
        data.retention.expires_at = expires_at
        manifest.write_atomic(directory / manifest.MANIFEST, data)
    if recording:
        (directory / manifest.RECORDING_MARKER).touch()
    return directory


def test_verify_passes_an_intact_archive(tmp_path: Path, copy_clip: Any) -> None:
    archive = tmp_path / "archive"
    consultation(archive, "c-1", copy_clip, ended_at=T0 + 60, participants=("a", "b"))
    consultation(archive, "c-2", copy_clip, ended_at=T0 + 60)
    AuditLog(archive / "audit.log").append("cli", "archive.export", "c-1")
    report = verify_archive(archive)
    assert report.problems == []
    assert report.ok
    assert (report.consultations, report.files_checked, report.audit_entries) == (2, 3, 1)
    assert report.bytes_checked == 3 * (archive / "c-2" / "cardio1-camera-1.webm").stat().st_size


def test_verify_of_an_archive_not_yet_created_is_empty(tmp_path: Path) -> None:
    report = verify_archive(tmp_path / "nothing")
    assert report.ok and report.consultations == 0


def test_verify_catches_a_flipped_byte_and_a_missing_file(tmp_path: Path, copy_clip: Any) -> None:
    archive = tmp_path / "archive"
    directory = consultation(archive, "c-1", copy_clip, ended_at=T0 + 60, participants=("a", "b"))
    tampered = directory / "a-camera-1.webm"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    (directory / "b-camera-1.webm").unlink()
    problems = verify_archive(archive).problems
    assert len(problems) == 2
    assert problems[0].startswith("c-1/a-camera-1.webm: sha256 ")
    assert "does not match" in problems[0]
    assert problems[1] == "c-1/b-camera-1.webm: missing (manifest status 'complete')"


def test_verify_reports_unlisted_files_resized_files_and_unreadable_manifests(
    tmp_path: Path, copy_clip: Any,
) -> None:
    archive = tmp_path / "archive"
    directory = consultation(archive, "c-1", copy_clip, ended_at=T0 + 60)
    (directory / "copy.webm").write_bytes(b"not listed")
    with open(directory / "cardio1-camera-1.webm", "ab") as f:
        f.write(b"\0")
    broken = archive / "c-2"
    broken.mkdir()
    (broken / manifest.MANIFEST).write_text("{not json", encoding="utf-8")
    (archive / "c-3").mkdir()
    (archive / "c-3" / "orphan.webm").write_bytes(b"x")
    problems = verify_archive(archive).problems
    size = (directory / "cardio1-camera-1.webm").stat().st_size
    assert problems[0] == "c-3: no manifest.json"
    assert f"c-1/cardio1-camera-1.webm: {size} bytes, manifest says {size - 1}" in problems
    assert "c-1/copy.webm: not listed in the manifest" in problems
    assert any(p.startswith("c-2/manifest.json: cannot be read") for p in problems)
    assert len(problems) == 4


def test_verify_reports_a_broken_audit_chain(tmp_path: Path, copy_clip: Any) -> None:
    archive = tmp_path / "archive"
    consultation(archive, "c-1", copy_clip, ended_at=T0 + 60)
    log = AuditLog(archive / "audit.log")
    log.append("cli", "archive.export", "c-1")
    log.append("cli", "archive.export", "c-1")
    entry = json.loads(log.path.read_text(encoding="utf-8").splitlines()[0])
    entry["actor"] = "someone"
    rest = log.path.read_text(encoding="utf-8").splitlines(keepends=True)[1:]
    log.path.write_text(json.dumps(entry) + "\n" + "".join(rest), encoding="utf-8")
    assert verify_archive(archive).problems == [
        "audit.log: line 1: hash does not match its content (edited)"]


def test_verify_leaves_the_files_being_recorded_alone(tmp_path: Path, copy_clip: Any) -> None:
    archive = tmp_path / "archive"
    directory = consultation(archive, "c-1", copy_clip, status="recording", recording=True)
    data = manifest.load(directory / manifest.MANIFEST)
    data.files.append(manifest.FileEntry(name="neuro2-camera-1.webm", participant_id="neuro2",
                                         status="recording", started_at=T0 + 5))
    manifest.write_atomic(directory / manifest.MANIFEST, data)
    copy_clip(directory / "neuro2-camera-1.webm")
    copy_clip(directory / "neuro2-screen-1.webm")  # opened, not yet in the manifest
    report = verify_archive(archive)
    assert report.problems == []
    assert report.files_checked == 1


@pytest.fixture
def aged(tmp_path: Path, copy_clip: Any) -> Path:
    """An archive at T0 whose consultations are of every age and state."""
    archive = tmp_path / "archive"
    old = T0 - 11 * YEAR
    consultation(archive, "old-ended", copy_clip, started_at=old, ended_at=old + 1800)
    consultation(archive, "old-never-recorded", copy_clip, started_at=old, status="off")
    consultation(archive, "old-still-live", copy_clip, started_at=old, status="recording")
    consultation(archive, "old-being-recorded", copy_clip, started_at=old, ended_at=old + 1800,
                 recording=True)
    consultation(archive, "old-held-longer", copy_clip, started_at=old, ended_at=old + 1800,
                 expires_at=T0 + YEAR)
    consultation(archive, "recent", copy_clip, started_at=T0 - DAY, ended_at=T0 - DAY + 1800)
    return archive


def test_prune_removes_only_expired_consultations_that_have_ended(aged: Path) -> None:
    log = AuditLog(aged / "audit.log")
    pruned = prune(aged, now=T0, retention_years=10, audit=log)
    assert pruned == ["old-ended", "old-never-recorded"]
    remaining = sorted(p.name for p in aged.iterdir() if p.is_dir())
    assert remaining == ["old-being-recorded", "old-held-longer", "old-still-live", "recent"]
    entries = list(log.entries())
    assert [(e["actor"], e["action"], e["consultation_id"]) for e in entries] == [
        ("cli", "archive.prune", "old-ended"), ("cli", "archive.prune", "old-never-recorded")]
    assert entries[0]["detail"]["files"] == ["cardio1-camera-1.webm", "manifest.json"]
    assert verify_archive(aged).problems == []


def test_prune_keeps_what_a_longer_retention_still_holds(aged: Path) -> None:
    log = AuditLog(aged / "audit.log")
    assert prune(aged, now=T0, retention_years=12, audit=log) == []
    assert prune(aged, now=T0 + 2 * YEAR, retention_years=10, audit=log) == [
        "old-ended", "old-held-longer", "old-never-recorded"]


def test_prune_dry_run_removes_and_logs_nothing(aged: Path) -> None:
    before = sorted(p.name for p in aged.iterdir())
    log = AuditLog(aged / "audit.log")
    assert prune(aged, now=T0, retention_years=10, audit=log, dry_run=True) == [
        "old-ended", "old-never-recorded"]
    assert sorted(p.name for p in aged.iterdir()) == before
    assert not log.path.exists()


def test_prune_finishes_a_removal_that_was_interrupted(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    leftover = archive / ".pruning-c-7"
    leftover.mkdir(parents=True)
    (leftover / "a-camera-1.webm").write_bytes(b"x")
    log = AuditLog(archive / "audit.log")
    assert prune(archive, now=T0, retention_years=10, audit=log) == []
    assert not leftover.exists()
    assert [(e["consultation_id"], e["detail"]) for e in log.entries()] == [
        ("c-7", {"resumed": True})]


def test_cli_verify_exits_0_then_1_once_a_file_is_tampered_with(
    tmp_path: Path, copy_clip: Any,
) -> None:
    archive = tmp_path / "archive"
    directory = consultation(archive, "c-1", copy_clip, ended_at=T0 + 60)
    config = write_config(tmp_path, recording={"archive_dir": str(archive)})
    command = [sys.executable, "-m", "telehealth.cli", "--config", str(config), "archive",
               "verify"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("archive OK: 1 consultations, 1 files")
    media = directory / "cardio1-camera-1.webm"
    data = bytearray(media.read_bytes())
    data[100] ^= 0xFF
    media.write_bytes(bytes(data))
    (directory / "extra.webm").write_bytes(b"x")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("c-1/cardio1-camera-1.webm: sha256 ")
    assert done.stdout.splitlines()[1:] == ["c-1/extra.webm: not listed in the manifest"]
    assert "2 problems" in done.stderr


def test_cli_prune_with_dry_run_then_for_real(
    tmp_path: Path, copy_clip: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    archive = tmp_path / "archive"
    now = time.time()
    consultation(archive, "gone", copy_clip, started_at=now - 11 * YEAR,
                 ended_at=now - 11 * YEAR + 600)
    consultation(archive, "kept", copy_clip, started_at=now - 9 * YEAR,
                 ended_at=now - 9 * YEAR + 600)
    config = str(write_config(tmp_path, recording={"archive_dir": str(archive)}))
    assert main(["--config", config, "archive", "prune", "--dry-run"]) == 0
    assert capsys.readouterr().out == "would remove gone\n"
    assert (archive / "gone").is_dir()
    assert main(["--config", config, "archive", "prune"]) == 0
    assert capsys.readouterr().out == "removed gone\n"
    assert sorted(p.name for p in archive.iterdir()) == ["audit.log", "kept"]
    config_9y = str(write_config(tmp_path, recording={"archive_dir": str(archive),
                                                      "retention_years": 8}))
    assert main(["--config", config_9y, "archive", "prune"]) == 0
    assert capsys.readouterr().out == "removed kept\n"
    assert [e["consultation_id"] for e in AuditLog(archive / "audit.log").entries()] == [
        "gone", "kept"]


def test_prune_keeps_a_consultation_that_is_a_symbolic_link(
    tmp_path: Path, copy_clip: Any,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    old = T0 - 11 * YEAR
    consultation(elsewhere, "c-1", copy_clip, started_at=old, ended_at=old + 60)
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "c-1").symlink_to(elsewhere / "c-1")
    assert prune(archive, now=T0, retention_years=10, audit=AuditLog(archive / "a.log")) == []
    assert (elsewhere / "c-1" / "manifest.json").exists()
