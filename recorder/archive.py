"""Offline upkeep of the archive directory: verify it against its manifests, prune what has
outlived its retention. Layout and manifest: :mod:`recorder.manifest`."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from recorder import manifest
from recorder.audit import AUDIT_LOG, AuditLog

logger = logging.getLogger(__name__)

PRUNING_PREFIX = ".pruning-"
"""A consultation directory is renamed to ``.pruning-<id>`` before it is deleted, so a crash
mid-way leaves no half-deleted consultation behind; the next prune finishes it."""


class ArchiveError(Exception):
    """The archive, or a consultation in it, cannot be used as asked."""


@dataclass
class VerifyReport:
    archive: Path
    consultations: int = 0
    files_checked: int = 0
    """Files whose SHA-256 was recomputed."""
    bytes_checked: int = 0
    audit_entries: int = 0
    gaps: int = 0
    """Breaks listed in the manifests' ``recording.gaps`` (a relay move, a server restart)."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_archive(archive: Path) -> VerifyReport:
    """Re-hash every recorded file against its manifest and check the audit chain.

    Problems: manifests that cannot be read, listed files that are missing or whose size or
    SHA-256 differ, files in a consultation directory that no manifest lists, directories
    without a manifest, gaps that end before they start, and every break in the audit log's
    chain.
    """
    report = VerifyReport(archive)
    if archive.is_dir():
        for entry in sorted(archive.iterdir()):
            if (entry.is_dir() and manifest.CONSULTATION_ID.match(entry.name)
                    and not (entry / manifest.MANIFEST).exists()):
                report.problems.append(f"{entry.name}: no {manifest.MANIFEST}")
    for path in manifest.manifests(archive):
        report.consultations += 1
        _verify_consultation(path, report)
    audit = AuditLog(archive / AUDIT_LOG)
    report.problems.extend(f"{AUDIT_LOG}: {problem}" for problem in audit.verify())
    report.audit_entries = sum(1 for _ in audit.entries())
    return report


def _verify_consultation(path: Path, report: VerifyReport) -> None:
    directory = path.parent
    cid = directory.name
    try:
        data = manifest.load(path)
    except (OSError, ValueError) as exc:
        report.problems.append(f"{cid}/{manifest.MANIFEST}: cannot be read: {exc}")
        return
    recorded_id = data.consultation.id
    if recorded_id != cid:
        report.problems.append(f"{cid}/{manifest.MANIFEST}: consultation id is {recorded_id!r}, "
                               f"not the directory's {cid!r}")
    for number, gap in enumerate(data.recording.gaps, 1):
        report.gaps += 1
        if gap.to is not None and gap.to < gap.from_:
            report.problems.append(f"{cid}/{manifest.MANIFEST}: recording gap {number} "
                                   f"({gap.reason}) ends before it starts")
    recording = (directory / manifest.RECORDING_MARKER).exists()
    listed: set[str] = set()
    for item in data.files:
        name = item.name
        if name in listed:
            report.problems.append(f"{cid}/{name}: listed twice in the manifest")
            continue
        listed.add(name)
        _verify_file(directory / name, item, recording, report)
    if recording:
        return  # the recorder may be adding a file it has not listed yet
    for entry in sorted(directory.iterdir()):
        if entry.name in listed or entry.name in (manifest.MANIFEST, manifest.RECORDING_MARKER):
            continue
        if entry.name.startswith(".manifest-") and entry.name.endswith(".tmp"):
            continue  # a manifest being replaced right now
        report.problems.append(f"{cid}/{entry.name}: not listed in the manifest")


def _verify_file(path: Path, item: manifest.FileEntry, recording: bool,
                 report: VerifyReport) -> None:
    label = f"{path.parent.name}/{path.name}"
    status, digest, size = item.status, item.sha256, item.bytes
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        if status != "failed" or digest is not None:
            report.problems.append(f"{label}: missing (manifest status {status!r})")
        return
    if size is not None and actual_size != size:
        report.problems.append(f"{label}: {actual_size} bytes, manifest says {size}")
        return
    if digest is None:
        if status == "complete" and not recording:
            report.problems.append(f"{label}: complete but the manifest has no sha256")
        return
    try:
        actual = manifest.sha256_file(path)
    except OSError as exc:
        report.problems.append(f"{label}: cannot be read: {exc}")
        return
    report.files_checked += 1
    report.bytes_checked += actual_size
    if actual != digest:
        report.problems.append(f"{label}: sha256 {actual} does not match the manifest's "
                               f"{digest} (the file changed after it was recorded)")


def prune(archive: Path, *, now: float, retention_years: float, audit: AuditLog,
          dry_run: bool = False) -> list[str]:
    """Remove every consultation whose retention ran out before ``now``; return their ids.

    Only consultations that have ended and are not being recorded (no ``.recording`` marker)
    go; one whose manifest cannot be read stays. Each removal is logged and appended to
    ``audit`` (actor ``cli``, action ``archive.prune``). ``dry_run``: remove and log nothing,
    return what would go.
    """
    if not dry_run:
        _finish_interrupted(archive, audit)
    pruned: list[str] = []
    for path in list(manifest.manifests(archive)):
        directory = path.parent
        cid = directory.name
        if (directory / manifest.RECORDING_MARKER).exists():
            logger.info("prune %s: being recorded, kept", cid)
            continue
        if directory.is_symlink():
            logger.warning("prune %s: a symbolic link, kept (remove it by hand)", cid)
            continue
        try:
            data = manifest.load(path)
        except (OSError, ValueError) as exc:
            logger.warning("prune %s: manifest cannot be read, kept: %s", cid, exc)
            continue
        if not data.has_ended():
            continue
        expires = data.expiry(retention_years)
        if expires is None:
            logger.warning("prune %s: no start or end time in the manifest, kept", cid)
            continue
        if expires >= now:
            continue
        if dry_run:
            logger.info("prune %s: expired at %.0f, would be removed (dry run)", cid, expires)
            pruned.append(cid)
            continue
        names = sorted(entry.name for entry in directory.iterdir())
        size = sum(entry.stat().st_size for entry in directory.iterdir() if entry.is_file())
        trash = archive / f"{PRUNING_PREFIX}{cid}"
        directory.rename(trash)
        manifest.fsync_dir(archive)
        shutil.rmtree(trash)
        logger.info("prune %s: expired at %.0f, removed %d files (%d bytes)", cid, expires,
                    len(names), size)
        audit.append("cli", "archive.prune", cid,
                     {"expires_at": expires, "files": names, "bytes": size})
        pruned.append(cid)
    return pruned


def _finish_interrupted(archive: Path, audit: AuditLog) -> None:
    """Delete what an interrupted prune had renamed but not yet removed."""
    if not archive.is_dir():
        return
    for trash in sorted(archive.glob(f"{PRUNING_PREFIX}*")):
        cid = trash.name.removeprefix(PRUNING_PREFIX)
        if not trash.is_dir() or not manifest.CONSULTATION_ID.match(cid):
            continue
        shutil.rmtree(trash)
        logger.info("prune %s: finished an interrupted removal", cid)
        audit.append("cli", "archive.prune", cid, {"resumed": True})

