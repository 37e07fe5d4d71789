"""The manifest of a consultation's archive: ``<archive>/<consultation id>/manifest.json``.

One JSON document per consultation: the consultation and its request, sites, clinicians,
attendance, recording consent and events, the minutes, and every recorded file with its
duration and SHA-256. It is always replaced atomically (temp file, fsync, rename, fsync of the
directory): a reader, or a restart after kill -9, sees the old document or the new one, never a
mix.

Layout of the archive directory::

    <archive>/
        audit.log                    append-only, hash-chained access log (recorder/audit.py)
        <consultation id>/
            manifest.json
            .recording               present while a recording of it is being written
            <clinician>-camera-<n>.webm|mkv   camera + microphone of one participant
            <clinician>-screen-<n>.webm|mkv   their screen share
        .pruning-<consultation id>/  a prune in progress (`telehealth archive prune` finishes
                                     it); everything else ignores it

``consultation.ended_at`` is set in the manifest the recorder writes when the consultation
ends (interrupted recordings included); a manifest without it belongs to a consultation that
has not ended (or a process that died before it did).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST = "manifest.json"
RECORDING_MARKER = ".recording"
"""Present in a consultation's directory while files are being written: a start that finds
it knows the previous process died mid-recording."""

SECONDS_PER_YEAR = 365.25 * 86400
CONSULTATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

FILE_STATUSES = ("recording", "complete", "interrupted", "failed")
"""A file's ``status``: ``recording`` (being written), ``complete``, ``interrupted`` (the
process died while writing; the file holds what reached the disk), ``failed`` (a disk error
stopped it; what reached the disk stays)."""


def consultation_dir(archive: Path, consultation_id: str) -> Path:
    if not CONSULTATION_ID.match(consultation_id):
        raise ValueError(f"not a consultation id: {consultation_id!r}")
    return archive / consultation_id


def new_manifest(consultation_id: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "consultation": {"id": consultation_id},
        "request": None,
        "sites": [],
        "clinicians": [],
        "attendance": [],
        "recording": {"policy": None, "status": "off", "started_at": None,
                      "stopped_at": None, "error": None, "events": []},
        "consent": [],
        "minutes": None,
        "files": [],
        "retention": {"years": None, "expires_at": None},
        "updated_at": None,
    }


def load(path: Path) -> dict[str, Any]:
    """Read a manifest file (``.../manifest.json``)."""
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown manifest format {data.get('format')!r}")
    return data


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifests(archive: Path) -> Iterator[Path]:
    """Every consultation manifest under the archive directory."""
    if not archive.is_dir():
        return
    for entry in sorted(archive.iterdir()):
        candidate = entry / MANIFEST
        if entry.is_dir() and CONSULTATION_ID.match(entry.name) and candidate.is_file():
            yield candidate


def expires_at(ended_at: float | None, started_at: float | None, years: float) -> float | None:
    """When a consultation's archive may be pruned: ``years`` after it ended (or started)."""
    anchor = ended_at if ended_at is not None else started_at
    if anchor is None:
        return None
    return anchor + years * SECONDS_PER_YEAR
