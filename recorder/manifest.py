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

The document is the typed :class:`Manifest` (its parts: :class:`Consultation`,
:class:`Recording`, :class:`ConsentAnswer`, :class:`FileEntry`, :class:`Retention`); ``load``
is its one reader and ``write_atomic`` its one writer, for the recorder, archive
verify/prune/export and signaling alike. The JSON layout is format 1, unchanged since the
manifest was a plain dict: every manifest written since still reads. Keys added since are
optional and written only when they say something (``recording.gaps``,
``recording.host_stopped``), so a manifest without them reads and writes back as it was.

Gaps (``recording.gaps: [{from, to, reason}]``): a recording in progress goes on across a move
of the consultation to another relay and across a restart of the server, in new files; each
such break is one gap. ``from`` is the arrival wall-clock of the last packet written before the
break (else the time it was noticed), ``to`` the arrival of the first packet written after it,
``reason`` ``relay_lost`` (the relay died or went silent), ``relay_drained`` (the relay was
stopped for maintenance and handed its consultations over) or ``signaling_restart`` (the
server stopped or died while recording). ``to`` is ``null`` when recording never resumed (the
consultation ended, the host stopped recording or a participant declined before the media
came back): nothing was recorded from ``from`` on.
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
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

FORMAT: Literal[1] = 1
MANIFEST = "manifest.json"
RECORDING_MARKER = ".recording"
"""Present in a consultation's directory while files are being written: a start that finds
it knows the previous process died mid-recording. It holds the writing process's instance id
(a fleet's processes share one archive: each takes back only its own, or an empty one)."""
RESUMING_EVENTS = frozenset({"interrupted", "handed_over"})
"""The last recording events after which a recording resumes by itself (its gap open)."""

SECONDS_PER_YEAR = 365.25 * 86400
CONSULTATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

FileStatus = Literal["recording", "complete", "interrupted", "failed"]
"""A file's ``status``: ``recording`` (being written), ``complete``, ``interrupted`` (the
process died while writing; the file holds what reached the disk), ``failed`` (a disk error
stopped it; what reached the disk stays)."""

Wire = dict[str, Any]
"""A part signaling describes in its own wire form (request, site, clinician, attendance,
minutes): the recorder stores it as given."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Consultation(BaseModel):
    """The consultation as signaling describes it; the recorder reads only these fields and
    keeps the others as they are."""

    model_config = ConfigDict(extra="allow")

    id: str
    started_at: float | None = None
    ended_at: float | None = None


class VideoTrack(_Part):
    kind: Literal["video"] = "video"
    codec: str
    width: int
    height: int


class AudioTrack(_Part):
    kind: Literal["audio"] = "audio"
    codec: str
    sample_rate: int


Track = Annotated[VideoTrack | AudioTrack, Field(discriminator="kind")]


class FileEntry(_Part):
    """One recorded file of the consultation's directory."""

    name: str
    """A plain file name in the consultation's directory."""
    participant_id: str
    site_id: str | None = None
    source: Literal["camera", "screen"] = "camera"
    """``camera`` (camera + microphone) or ``screen``."""
    tracks: list[Track] = Field(default_factory=list)
    started_at: float
    """Wall-clock of the file's time 0."""
    ended_at: float | None = None
    duration_s: float | None = None
    bytes: int | None = None
    sha256: str | None = None
    status: FileStatus = "recording"
    frames: list[int] | None = None
    """Frames written per track, once the file is finished."""

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"not a plain file name: {name!r}")
        return name

    def video_size(self) -> tuple[int, int] | None:
        """The declared dimensions of its video track, if it has one."""
        for track in self.tracks:
            if isinstance(track, VideoTrack) and track.width > 0 and track.height > 0:
                return track.width, track.height
        return None


class RecordingEvent(_Part):
    at: float
    event: str
    """``started``, ``stopped``, ``requested``, ``failed``, ``relay_changed``,
    ``interrupted`` (the server stopped or died while recording: recording resumes once the
    participants are back; the next ``started`` is that resumption, the gap's ``to`` its first
    packet), ``handed_over`` (a fleet: the media moved to a relay connected to another
    signaling process, which goes on with the recording in new files, like after
    ``interrupted``)."""
    by: str


GapReason = Literal["relay_lost", "relay_drained", "signaling_restart"]
GAP_REASONS: tuple[GapReason, ...] = ("relay_lost", "relay_drained", "signaling_restart")


class Gap(_Part):
    """A break in a recording that went on in new files (the module's docstring)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    from_: float = Field(alias="from")
    """Arrival of the last packet written before the break (else when it was noticed)."""
    to: float | None = None
    """Arrival of the first packet written after it; None: recording did not resume."""
    reason: GapReason

    @classmethod
    def starting(cls, at: float, reason: GapReason) -> Gap:
        """A gap open since ``at``."""
        return cls.model_validate({"from": at, "to": None, "reason": reason})


class Recording(_Part):
    policy: str | None = None
    status: str = "off"
    """``off``, ``recording``, ``stopped``, ``failed``, ``interrupted``, ``complete``,
    ``declined``."""
    started_at: float | None = None
    stopped_at: float | None = None
    error: str | None = None
    events: list[RecordingEvent] = Field(default_factory=list)
    gaps: list[Gap] = Field(default_factory=list)
    host_stopped: bool = False
    """The host (or a coordinator) stopped recording and has not started it again: a
    restarted server must not start it by itself."""

    @model_serializer(mode="wrap")
    def _only_what_is_said(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The keys added after format 1 are left out when they say nothing: a manifest
        # without them writes back exactly as it was read.
        data: dict[str, Any] = handler(self)
        if not data.get("gaps"):
            data.pop("gaps", None)
        if not data.get("host_stopped"):
            data.pop("host_stopped", None)
        return data

    def open_gap(self) -> Gap | None:
        """The last gap, if recording has not resumed since."""
        last = self.gaps[-1] if self.gaps else None
        return last if last is not None and last.to is None else None

    def resumes(self) -> bool:
        """The server stopped or died while recording (the last event says so, and the gap
        it opened is still open): recording goes on when the participants are back."""
        return (self.open_gap() is not None and bool(self.events)
                and self.events[-1].event in RESUMING_EVENTS)


class ConsentAnswer(_Part):
    clinician_id: str
    answer: Literal["agreed", "declined"]
    at: float | None = None


class Retention(_Part):
    years: int | float | None = None
    expires_at: float | None = None


class Description(_Part):
    """What signaling says of a consultation (``Recorder``'s ``describe``)."""

    consultation: Consultation
    request: Wire | None = None
    sites: list[Wire] = Field(default_factory=list)
    clinicians: list[Wire] = Field(default_factory=list)
    attendance: list[Wire] = Field(default_factory=list)
    minutes: Wire | None = None


class Manifest(_Part):
    format: Literal[1] = FORMAT
    consultation: Consultation
    request: Wire | None = None
    sites: list[Wire] = Field(default_factory=list)
    clinicians: list[Wire] = Field(default_factory=list)
    attendance: list[Wire] = Field(default_factory=list)
    recording: Recording = Field(default_factory=Recording)
    consent: list[ConsentAnswer] = Field(default_factory=list)
    minutes: Wire | None = None
    files: list[FileEntry] = Field(default_factory=list)
    retention: Retention = Field(default_factory=Retention)
    updated_at: float | None = None

    def describe(self, description: Description) -> None:
        """Take what signaling says of the consultation now."""
        for name in Description.model_fields:
            setattr(self, name, getattr(description, name))

    def file(self, name: str) -> FileEntry | None:
        return next((f for f in self.files if f.name == name), None)

    def has_ended(self) -> bool:
        return self.consultation.ended_at is not None or self.recording.status != "recording"

    def expiry(self, retention_years: float) -> float | None:
        """When the consultation's archive may go: ``retention_years`` (or the manifest's own,
        if longer) after it ended, or the manifest's ``retention.expires_at`` if that is
        later."""
        years = retention_years
        if self.retention.years is not None:
            years = max(years, self.retention.years)
        computed = expires_at(self.consultation.ended_at, self.consultation.started_at, years)
        recorded = self.retention.expires_at
        if computed is None:
            return recorded
        return computed if recorded is None else max(computed, recorded)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (format 1)."""
        return self.model_dump(mode="json")


def consultation_dir(archive: Path, consultation_id: str) -> Path:
    if not CONSULTATION_ID.match(consultation_id):
        raise ValueError(f"not a consultation id: {consultation_id!r}")
    return archive / consultation_id


def new_manifest(consultation_id: str) -> Manifest:
    return Manifest(consultation=Consultation(id=consultation_id))


def load(path: Path) -> Manifest:
    """Read a manifest file (``.../manifest.json``). Raises OSError, or ValueError naming
    what is wrong in it."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    found = data.get("format") if isinstance(data, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path}: unknown manifest format {found!r}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise ValueError(f"{path}: {problems}") from None


def write_atomic(path: Path, manifest: Manifest) -> None:
    """Replace ``path`` with the manifest as JSON: temp file, fsync, rename, fsync the
    directory."""
    data = manifest.to_json()
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
