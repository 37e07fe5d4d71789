"""recorder/manifest.py: the manifest as types, one reader and one writer, format 1 unchanged.

``manifests_f014c75/`` holds manifests the recorder wrote as of commit f014c75 (when the
manifest was a nested dict): recorded by tests/recorder/test_recording.py (stopped and started
again; one decline; killed with -9 and marked interrupted on restart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recorder import manifest as mf

BEFORE = Path(__file__).parent / "manifests_f014c75"
SAMPLES = sorted(BEFORE.glob("*.json"))


def test_the_samples_are_there() -> None:
    assert [p.name for p in SAMPLES] == ["declined.json", "interrupted.json",
                                         "stopped_and_started.json"]


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_a_manifest_written_before_the_types_reads_and_writes_back_equal(
    sample: Path, tmp_path: Path,
) -> None:
    data = mf.load(sample)
    assert isinstance(data, mf.Manifest)
    path = tmp_path / mf.MANIFEST
    mf.write_atomic(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(
        sample.read_text(encoding="utf-8"))
    assert mf.load(path) == data


def test_the_types_read_what_the_recorder_wrote() -> None:
    data = mf.load(BEFORE / "stopped_and_started.json")
    assert data.consultation.id == "con_e72fdf9b1727450ba305"
    assert data.consultation.ended_at is not None
    assert data.recording.status == "complete"
    assert [e.event for e in data.recording.events] == [
        "started", "stopped", "requested", "started", "stopped"]
    entry = data.file("cardio1-camera-2.webm")
    assert entry is not None
    assert (entry.participant_id, entry.site_id, entry.source) == ("cardio1", "c1", "camera")
    assert entry.video_size() == (320, 240)
    assert [t.kind for t in entry.tracks] == ["video", "audio"]
    assert entry.frames == [16, 52]
    declined = mf.load(BEFORE / "declined.json")
    assert [(a.clinician_id, a.answer) for a in declined.consent] == [
        ("cardio1", "agreed"), ("ref1", "declined")]
    interrupted = mf.load(BEFORE / "interrupted.json")
    assert {f.status for f in interrupted.files} == {"interrupted"}


def test_a_new_manifest_has_the_format_1_layout(tmp_path: Path) -> None:
    path = tmp_path / mf.MANIFEST
    mf.write_atomic(path, mf.new_manifest("c-1"))
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "format": 1,
        "consultation": {"id": "c-1", "started_at": None, "ended_at": None},
        "request": None, "sites": [], "clinicians": [], "attendance": [],
        "recording": {"policy": None, "status": "off", "started_at": None,
                      "stopped_at": None, "error": None, "events": []},
        "consent": [], "minutes": None, "files": [],
        "retention": {"years": None, "expires_at": None},
        "updated_at": None,
    }
    assert [p.name for p in tmp_path.iterdir()] == [mf.MANIFEST]  # no temp file left


def test_an_unknown_format_or_a_bad_entry_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / mf.MANIFEST
    document = json.loads((BEFORE / "declined.json").read_text(encoding="utf-8"))
    path.write_text(json.dumps({**document, "format": 2}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown manifest format 2"):
        mf.load(path)
    document["files"] = [{"name": "../escape.webm", "participant_id": "x", "started_at": 1.0}]
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValueError, match=r"files\.0\.name: .*not a plain file name"):
        mf.load(path)


def test_the_archive_expires_years_after_the_consultation_ended() -> None:
    data = mf.new_manifest("c-1")
    assert data.expiry(10) is None
    data.consultation.started_at = 1000.0
    assert data.expiry(1) == 1000.0 + mf.SECONDS_PER_YEAR
    data.consultation.ended_at = 2000.0
    assert data.expiry(1) == 2000.0 + mf.SECONDS_PER_YEAR
    data.retention = mf.Retention(years=2, expires_at=None)
    assert data.expiry(1) == 2000.0 + 2 * mf.SECONDS_PER_YEAR
    data.retention.expires_at = 9e12
    assert data.expiry(1) == 9e12
