"""Recording as signaling sees it: who may consent, start, stop and read recordings; what the
manifest says about the consultation. The recorder itself (``recorder.service.Recorder``) knows
clinicians by id only.

Reading recordings is for the consultation's participants (named on it or attended) and
admins; every access, allowed or refused, goes into the hash-chained audit log."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from config.settings import RecordingSettings
from recorder import manifest as mf
from recorder.audit import AuditLog
from recorder.consent import strictest
from recorder.manifest import GAP_REASONS, Description, Recording
from recorder.service import Notify
from signaling import permissions
from signaling.directory import Directory
from signaling.errors import Forbidden, InvalidState, NotFound, RecordingNotAllowed
from signaling.live import LiveStore
from signaling.models import Consultation
from signaling.notify import Notifier, consultation_audience
from signaling.store import RecordStore
from signaling.tokens import Principal

logger = logging.getLogger(__name__)

CONTENT_TYPES = {".webm": "video/webm", ".mkv": "video/x-matroska"}


class ArchiveDescription:
    """What the manifest says of a consultation (ids, names, times, minutes): the recorder's
    ``describe`` callback, from the records and the directory."""

    def __init__(self, *, store: RecordStore, directory: Directory) -> None:
        self._store = store
        self._directory = directory

    async def describe(self, consultation_id: str) -> Description | None:
        """What the manifest says of the consultation (ids, names, times, minutes)."""
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None:
            return None
        request = await self._store.get_request(consultation.request_id)
        attendance = await self._store.attendance_of(consultation_id)
        clinician_ids = sorted(set(consultation.clinician_ids)
                               | {a["clinician_id"] for a in attendance})
        known = self._directory.all_sites
        sites = [s.to_wire() for s in (known.get(i) for i in consultation.site_ids)
                 if s is not None]
        clinicians = []
        for clinician_id in clinician_ids:
            # A record names who took part, deactivated since or not.
            clinician = self._directory.all_clinicians.get(clinician_id)
            if clinician is not None:
                clinicians.append({"id": clinician.id, "name": clinician.name,
                                   "site_id": clinician.site_id,
                                   "roles": sorted(clinician.roles)})
        wire = consultation.to_wire()
        minutes = wire.pop("minutes")
        return Description.model_validate({
            "consultation": wire,
            "request": request.to_wire() if request is not None else None,
            "sites": sites,
            "clinicians": clinicians,
            "attendance": attendance,
            "minutes": minutes,
        })


def recording_state_notifier(notifier: Notifier) -> Notify:
    """The recorder's ``notify`` callback: every participant sees whether recording is on
    (``recording:state``)."""

    async def notify(consultation_id: str, state: dict[str, Any]) -> None:
        await notifier.emit("recording:state", state, consultation_audience(consultation_id))

    return notify


class RecorderFace(Protocol):
    """What ``RecordingControl`` asks of the recorder: ``recorder.service.Recorder`` in one
    process; in a fleet ``signaling.recording_fleet.FleetRecorder``, which carries each
    event out at the process the consultation's media reaches."""

    audit: AuditLog

    async def joined(self, consultation_id: str, policy: str, clinician_id: str,
                     site_id: str) -> dict[str, Any]: ...

    async def left(self, consultation_id: str, clinician_id: str) -> None: ...

    async def consent(self, consultation_id: str, clinician_id: str,
                      agree: bool) -> dict[str, Any]: ...

    async def start(self, consultation_id: str, by: str) -> dict[str, Any]: ...

    async def stop(self, consultation_id: str, by: str) -> dict[str, Any]: ...

    async def ended(self, consultation_id: str) -> None: ...

    async def relay_changed(self, consultation_id: str, *, lost_at: float | None = None,
                            reason: mf.GapReason = "relay_lost") -> None: ...

    async def media_here(self, consultation_id: str) -> None: ...

    def manifest_of(self, consultation_id: str) -> mf.Manifest | None: ...

    def manifest_path(self, consultation_id: str) -> Path: ...


def policy_for(settings: RecordingSettings, site_ids: Iterable[str]) -> str:
    """The strictest policy among the consultation's sites."""
    return strictest([settings.site_policies.get(s, settings.policy) for s in site_ids]
                     or [settings.policy])


class RecordingControl:
    """The recorder as clients reach it: consent, start, stop, and reading recordings."""

    def __init__(self, *, recorder: RecorderFace, store: RecordStore, live: LiveStore,
                 settings: RecordingSettings) -> None:
        self.recorder = recorder
        self._store = store
        self._live = live
        self._settings = settings

    def policy_for(self, consultation: Consultation) -> str:
        """The strictest policy among the consultation's sites."""
        return policy_for(self._settings, consultation.site_ids)

    # -- from the consultation's lifecycle -------------------------------------------------
    async def joined(self, consultation: Consultation, principal: Principal) -> dict[str, Any]:
        return await self.recorder.joined(consultation.id, self.policy_for(consultation),
                                          principal.id, principal.site.id)

    async def left(self, consultation_id: str, clinician_id: str) -> None:
        await self.recorder.left(consultation_id, clinician_id)

    async def ended(self, consultation_id: str) -> None:
        await self.recorder.ended(consultation_id)

    async def adopted(self, consultation_id: str) -> None:
        """A relay node connected here says it carries the consultation (``relay:hello``): in
        a fleet its recording comes to this process."""
        await self.recorder.media_here(consultation_id)

    async def relay_changed(self, consultation_id: str, *, lost_at: float | None = None,
                            reason: str = "relay_lost") -> None:
        """The consultation's media moved to another relay (``reason``: ``relay_lost``,
        ``relay_drained``, ``signaling_restart``; ``lost_at``: when the old relay was lost,
        default now), or a waiting one got a relay: recording goes on in new files and the
        manifest records the gap."""
        gap_reason = next((r for r in GAP_REASONS if r == reason), None)
        if gap_reason is None:
            logger.warning("recording %s: unknown relay change %r, taken as relay_lost",
                           consultation_id, reason)
            gap_reason = "relay_lost"
        await self.recorder.relay_changed(consultation_id, lost_at=lost_at, reason=gap_reason)

    # -- clients' requests ---------------------------------------------------------------------
    async def _present(self, principal: Principal, consultation_id: str) -> Consultation:
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None:
            raise NotFound(f"no consultation {consultation_id!r}")
        if consultation.state == "ended":
            raise InvalidState(f"consultation {consultation_id!r} has ended")
        participant = await self._live.get_participant(consultation_id, principal.id)
        if not permissions.is_in(principal, participant):
            raise Forbidden(f"clinician {principal.id!r} is not in consultation "
                            f"{consultation_id!r}")
        return consultation

    async def consent(self, principal: Principal, consultation_id: str,
                      agree: bool) -> dict[str, Any]:
        consultation = await self._present(principal, consultation_id)
        if self.policy_for(consultation) != "with_consent":
            raise InvalidState(f"consultation {consultation_id!r} records under the "
                               f"{self.policy_for(consultation)!r} policy: no consent is asked")
        return {"recording": await self.recorder.consent(consultation_id, principal.id, agree)}

    async def start(self, principal: Principal, consultation_id: str) -> dict[str, Any]:
        consultation = await self._present(principal, consultation_id)
        self._check_host(principal, consultation, "start")
        if self.policy_for(consultation) == "never":
            raise RecordingNotAllowed(f"the sites of consultation {consultation_id!r} do not "
                                      "allow recording (policy 'never')")
        return {"recording": await self.recorder.start(consultation_id, principal.id)}

    async def stop(self, principal: Principal, consultation_id: str) -> dict[str, Any]:
        consultation = await self._present(principal, consultation_id)
        self._check_host(principal, consultation, "stop")
        return {"recording": await self.recorder.stop(consultation_id, principal.id)}

    @staticmethod
    def _check_host(principal: Principal, consultation: Consultation, action: str) -> None:
        if not permissions.may_control_recording(principal, consultation):
            raise Forbidden(f"only the host or a coordinator may {action} the recording of "
                            f"consultation {consultation.id!r}")

    # -- reading recordings ----------------------------------------------------------------
    async def _readable(self, principal: Principal, consultation_id: str,
                        what: str) -> Consultation:
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None:
            raise NotFound(f"no consultation {consultation_id!r}")
        attendees = await self._store.attendees_of(consultation_id)
        if not permissions.may_read(principal, consultation, attendees):
            await self.recorder.audit.append_async(principal.id, "recording.denied",
                                                   consultation_id, {"what": what})
            raise Forbidden(f"clinician {principal.id!r} took no part in consultation "
                            f"{consultation_id!r}: its recordings are for its participants "
                            "and admins")
        return consultation

    async def recordings(self, principal: Principal, consultation_id: str) -> dict[str, Any]:
        await self._readable(principal, consultation_id, "list")
        manifest = self.recorder.manifest_of(consultation_id)
        files = [{**entry.model_dump(mode="json", exclude={"frames"}),
                  "url": f"/api/consultations/{consultation_id}/recordings/{entry.name}"}
                 for entry in (manifest.files if manifest is not None else [])]
        await self.recorder.audit.append_async(principal.id, "recording.list", consultation_id,
                                               {"files": len(files)})
        return {
            "consultation_id": consultation_id,
            "recording": _recording_wire(manifest.recording) if manifest else None,
            "retention": manifest.retention.model_dump(mode="json") if manifest else None,
            "files": files,
        }

    async def file(self, principal: Principal, consultation_id: str, name: str) -> Path:
        await self._readable(principal, consultation_id, name)
        manifest = self.recorder.manifest_of(consultation_id)
        if manifest is None or manifest.file(name) is None:
            raise NotFound(f"consultation {consultation_id!r} has no recording {name!r}")
        path = self.recorder.manifest_path(consultation_id).parent / name
        if not path.is_file():
            raise NotFound(f"recording {name!r} of {consultation_id!r} is missing from the "
                           "archive")
        await self.recorder.audit.append_async(principal.id, "recording.download",
                                               consultation_id, {"file": name})
        return path


def _recording_wire(recording: Recording) -> dict[str, Any]:
    """The manifest's recording part as the API shows it: ``gaps`` always listed (the
    manifest leaves an empty list out)."""
    return {**recording.model_dump(mode="json", exclude={"host_stopped"}),
            "gaps": [gap.model_dump(mode="json") for gap in recording.gaps]}
