"""Recorder: consent, start/stop and the manifest of each consultation's recording.

Signaling tells it who is present, who consents and when the consultation ends; it attaches a
``RoomRecording`` (a MediaSink) to the consultation's room on the relay while recording is on,
and keeps ``<archive>/<consultation>/manifest.json`` up to date (atomically) as files open and
close. It knows clinicians by id only; who may do what is signaling's business.

Policies: ``always`` records from the start; ``with_consent`` asks every participant and
starts only when all present agree, asks later joiners too (their media is written once they
agree), and stops if anyone present declines; ``never`` records nothing. The host may stop and
start again (a new request: those who declined are asked again).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import av

from recorder import manifest as mf
from recorder.audit import AuditLog
from recorder.session import RoomRecording
from relay.api import Relay
from relay.errors import RelayError

logger = logging.getLogger(__name__)

Policy = Literal["always", "with_consent", "never"]
STRICTNESS: dict[str, int] = {"always": 0, "with_consent": 1, "never": 2}
Status = Literal["off", "pending", "on", "declined", "stopped", "failed", "disabled"]


def strictest(policies: list[str]) -> str:
    """The consultation follows the strictest policy among its sites."""
    return max(policies, key=lambda p: STRICTNESS[p]) if policies else "with_consent"


@dataclass
class _State:
    consultation_id: str
    policy: str
    manifest: dict[str, Any]
    present: dict[str, str] = field(default_factory=dict)
    """Clinician -> site of the participants in the consultation now."""
    consent: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    """Clinician -> (``agreed`` | ``declined`` | ``pending``, when answered)."""
    wanted: bool = True
    """Recording is asked for (the default; the host may stop it)."""
    started: bool = False
    """The current request has begun recording (consent was complete)."""
    session: RoomRecording | None = None
    error: str | None = None
    since: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Manifest writes one at a time, in order: an older snapshot never replaces a newer."""


Describe = Callable[[str], Awaitable[dict[str, Any]]]
Notify = Callable[[str, dict[str, Any]], Awaitable[None]]


class Recorder:
    def __init__(self, archive: Path, *, relay_for: Callable[[str], Relay | None],
                 describe: Describe, notify: Notify, retention_years: float = 10,
                 hold_s: float = 1.5, cluster_ms: int = 500, fsync_interval_s: float = 1.0,
                 audit: AuditLog | None = None) -> None:
        self.archive = archive
        self.audit = audit or AuditLog(archive / "audit.log")
        self._relay_for = relay_for
        self._describe = describe
        self._notify = notify
        self._retention_years = retention_years
        self._hold_s = hold_s
        self._cluster_ms = cluster_ms
        self._fsync_interval_s = fsync_interval_s
        self._states: dict[str, _State] = {}

    # -- start-up --------------------------------------------------------------------------
    async def restore(self) -> list[str]:
        """Recordings a previous process was writing when it died: mark them ``interrupted``
        in their manifests, with the checksum of what reached the disk."""
        marked = await asyncio.to_thread(self._mark_interrupted)
        for consultation_id in marked:
            logger.warning("recording of consultation %s was interrupted (the server stopped "
                           "while recording); kept what reached the disk", consultation_id)
            await self.audit.append_async("system", "recording.interrupted", consultation_id)
        return marked

    def _mark_interrupted(self) -> list[str]:
        marked: list[str] = []
        if not self.archive.is_dir():
            return marked
        for marker in sorted(self.archive.glob(f"*/{mf.RECORDING_MARKER}")):
            directory = marker.parent
            path = directory / mf.MANIFEST
            try:
                data = mf.load(path) if path.exists() else mf.new_manifest(directory.name)
            except (OSError, ValueError) as exc:
                logger.error("archive %s: manifest unreadable (%s); left as it is",
                             directory.name, exc)
                continue
            now = time.time()
            for entry in data["files"]:
                if entry.get("status") == "recording":
                    _describe_file(directory / entry["name"], entry)
                    entry["status"] = "interrupted"
            recording = data["recording"]
            recording.update(status="interrupted", stopped_at=now)
            recording["events"].append({"at": now, "event": "interrupted", "by": "system"})
            data["updated_at"] = now
            mf.write_atomic(path, data)
            marker.unlink()
            marked.append(directory.name)
        return marked

    # -- what signaling tells ----------------------------------------------------------------
    async def _state(self, consultation_id: str, policy: str | None = None) -> _State:
        state = self._states.get(consultation_id)
        if state is None:
            directory = mf.consultation_dir(self.archive, consultation_id)
            path = directory / mf.MANIFEST
            data = (await asyncio.to_thread(mf.load, path) if path.exists()
                    else mf.new_manifest(consultation_id))
            state = _State(consultation_id, policy or "with_consent", data)
            for answer in data.get("consent", []):
                state.consent[answer["clinician_id"]] = (answer["answer"], answer.get("at"))
            self._states[consultation_id] = state
        if policy is not None:
            state.policy = policy
            state.manifest["recording"]["policy"] = policy
        return state

    async def joined(self, consultation_id: str, policy: str, clinician_id: str,
                     site_id: str) -> dict[str, Any]:
        state = await self._state(consultation_id, policy)
        async with state.lock:
            state.present[clinician_id] = site_id
            if policy == "with_consent" and clinician_id not in state.consent:
                state.consent[clinician_id] = ("pending", None)
            await self._apply(state, by=clinician_id)
        return self.state(consultation_id)

    async def left(self, consultation_id: str, clinician_id: str) -> None:
        state = self._states.get(consultation_id)
        if state is None:
            return
        async with state.lock:
            state.present.pop(clinician_id, None)
            if state.consent.get(clinician_id, ("", None))[0] == "pending":
                del state.consent[clinician_id]
            await self._apply(state, by=clinician_id)

    async def consent(self, consultation_id: str, clinician_id: str, agree: bool) -> dict[str, Any]:
        state = await self._state(consultation_id)
        async with state.lock:
            answer = "agreed" if agree else "declined"
            now = time.time()
            state.consent[clinician_id] = (answer, now)
            state.manifest["consent"].append({"clinician_id": clinician_id, "answer": answer,
                                              "at": now})
            logger.info("recording %s: %s %s", consultation_id, clinician_id, answer)
            await self._apply(state, by=clinician_id)
            # A clinician's answer is on disk before the ack, like everything a doctor says.
            await self._write(state)
        return self.state(consultation_id)

    async def start(self, consultation_id: str, by: str) -> dict[str, Any]:
        """The host asks for recording (again): everyone who has not agreed is asked."""
        state = await self._state(consultation_id)
        async with state.lock:
            state.wanted = True
            state.error = None
            if state.policy == "with_consent":
                for clinician_id in state.present:
                    if state.consent.get(clinician_id, ("", None))[0] != "agreed":
                        state.consent[clinician_id] = ("pending", None)
            self._event(state, "requested", by)
            await self._apply(state, by=by)
        return self.state(consultation_id)

    async def stop(self, consultation_id: str, by: str) -> dict[str, Any]:
        state = await self._state(consultation_id)
        async with state.lock:
            state.wanted = False
            await self._apply(state, by=by)
        return self.state(consultation_id)

    async def ended(self, consultation_id: str) -> None:
        """The consultation ended: finish the files and write the final manifest (with the
        minutes) — for every consultation, recorded or not."""
        state = await self._state(consultation_id)
        async with state.lock:
            await self._stop_session(state, by="system")
            data = state.manifest
            data.update(await self._describe(consultation_id))
            consultation = data.get("consultation") or {}
            years = self._retention_years
            data["retention"] = {"years": years, "expires_at": mf.expires_at(
                consultation.get("ended_at"), consultation.get("started_at"), years)}
            recording = data["recording"]
            statuses = {f.get("status") for f in data["files"]}
            if state.error or "failed" in statuses:
                recording["status"] = "failed"
            elif "interrupted" in statuses or recording.get("status") == "interrupted":
                recording["status"] = "interrupted"
            elif data["files"]:
                recording["status"] = "complete"
            elif any(a == "declined" for a, _ in state.consent.values()):
                recording["status"] = "declined"
            else:
                recording["status"] = "off"
            await self._write(state)
            self._states.pop(consultation_id, None)
        logger.info("archive of consultation %s written (%d files, recording %s)",
                    consultation_id, len(data["files"]), data["recording"]["status"])

    async def relay_changed(self, consultation_id: str) -> None:
        """The consultation moved to another relay (its relay node died): the files of the old
        one end there, and recording goes on from the new relay in new files."""
        state = self._states.get(consultation_id)
        if state is None:
            return
        async with state.lock:
            session, state.session = state.session, None
            if session is not None:
                await session.close()
                self._event(state, "relay_changed", "system")
            await self._apply(state, by="system")

    async def close(self) -> None:
        """The process stops: finish every file (the manifests say ``complete`` for what was
        closed cleanly; the consultation goes on after a restart)."""
        for state in list(self._states.values()):
            async with state.lock:
                await self._stop_session(state, by="system")

    # -- the state machine -----------------------------------------------------------------
    def _allowed(self, state: _State) -> set[str]:
        if state.policy == "always":
            return set(state.present)
        return {c for c in state.present if state.consent.get(c, ("", None))[0] == "agreed"}

    def _status(self, state: _State) -> Status:
        if state.policy == "never":
            return "disabled"
        if state.error:
            return "failed"
        if not state.wanted:
            return "stopped"
        if state.policy == "with_consent":
            if any(state.consent.get(c, ("", None))[0] == "declined" for c in state.present):
                return "declined"
            if not state.started:
                return "pending" if state.present else "off"
        return "on" if state.session is not None and self._allowed(state) else \
            ("pending" if state.present else "off")

    async def _apply(self, state: _State, *, by: str) -> None:
        before = self._status(state)
        wanted_now = state.wanted and state.policy != "never" and not state.error
        if wanted_now and state.policy == "with_consent":
            declined = any(state.consent.get(c, ("", None))[0] == "declined"
                           for c in state.present)
            everyone = bool(state.present) and all(
                state.consent.get(c, ("", None))[0] == "agreed" for c in state.present)
            if declined:
                wanted_now = False
                state.started = False
            elif not state.started:
                wanted_now = everyone
        allowed = self._allowed(state) if wanted_now else set()
        if wanted_now and allowed:
            if state.session is None:
                await self._start_session(state, by)
            if state.session is not None:
                state.started = True
                state.session.allow(allowed)
        elif state.session is not None and not wanted_now:
            await self._stop_session(state, by=by)
        if not state.wanted:
            state.started = False
        after = self._status(state)
        await self._publish(state)
        if after != before:
            logger.info("recording %s: %s -> %s", state.consultation_id, before, after)

    async def _start_session(self, state: _State, by: str) -> None:
        relay = self._relay_for(state.consultation_id)
        if relay is None:
            state.error = "the consultation has no relay"
            return
        directory = mf.consultation_dir(self.archive, state.consultation_id)
        session = RoomRecording(
            state.consultation_id, directory, hold_s=self._hold_s, cluster_ms=self._cluster_ms,
            fsync_interval_s=self._fsync_interval_s,
            on_file_opened=lambda entry: self._file_opened(state, entry),
            on_file_closed=lambda entry: self._file_closed(state, entry),
            on_failure=lambda message: self._failed(state, message),
            request_keyframe=lambda pid: relay.request_keyframe(state.consultation_id, pid),
        )
        try:
            await asyncio.to_thread(_make_marker, directory)
            await relay.attach_sink(state.consultation_id, session)
        except (OSError, RelayError) as exc:
            await session.close()
            message = exc.message if isinstance(exc, RelayError) else \
                f"cannot write the archive: {exc.strerror or exc}"
            state.error = message
            logger.error("recording %s cannot start: %s", state.consultation_id, message)
            return
        state.session = session
        state.since = time.time()
        if not state.manifest["recording"].get("started_at"):
            state.manifest["recording"]["started_at"] = state.since
        state.manifest["recording"]["status"] = "recording"
        self._event(state, "started", by)
        state.manifest.update(await self._describe(state.consultation_id))
        await self._write(state)
        await self.audit.append_async(by, "recording.started", state.consultation_id)

    async def _stop_session(self, state: _State, *, by: str) -> None:
        session, state.session = state.session, None
        if session is None:
            return
        relay = self._relay_for(state.consultation_id)
        if relay is not None:
            try:
                await relay.detach_sink(state.consultation_id, session)
            except RelayError as exc:
                logger.info("recording %s: detach: %s", state.consultation_id, exc.code)
        await session.close()
        state.since = None
        recording = state.manifest["recording"]
        recording["stopped_at"] = time.time()
        if recording.get("status") == "recording":
            recording["status"] = "failed" if state.error else "stopped"
        self._event(state, "stopped", by)
        await self._write(state)
        directory = mf.consultation_dir(self.archive, state.consultation_id)
        await asyncio.to_thread(_remove_marker, directory)
        await self.audit.append_async(by, "recording.stopped", state.consultation_id)

    def _event(self, state: _State, event: str, by: str) -> None:
        state.manifest["recording"]["events"].append({"at": time.time(), "event": event,
                                                      "by": by})

    async def _file_opened(self, state: _State, entry: dict[str, Any]) -> None:
        entry["site_id"] = state.present.get(entry["participant_id"])
        state.manifest["files"].append(entry)
        await self._write(state)

    async def _file_closed(self, state: _State, entry: dict[str, Any]) -> None:
        path = mf.consultation_dir(self.archive, state.consultation_id) / entry["name"]
        try:
            entry["sha256"] = await asyncio.to_thread(mf.sha256_file, path)
            entry["bytes"] = path.stat().st_size
        except OSError as exc:
            entry["status"] = "failed"
            logger.error("recording %s: %s unreadable: %s", state.consultation_id,
                         entry["name"], exc.strerror)
        for index, known in enumerate(state.manifest["files"]):
            if known["name"] == entry["name"]:
                state.manifest["files"][index] = {**known, **entry,
                                                  "site_id": known.get("site_id")}
        await self._write(state)

    async def _failed(self, state: _State, message: str) -> None:
        state.error = message
        state.manifest["recording"]["error"] = message
        self._event(state, "failed", "system")
        logger.error("recording of consultation %s failed: %s; the consultation goes on",
                     state.consultation_id, message)
        async with state.lock:
            await self._stop_session(state, by="system")
            await self._publish(state)

    async def _write(self, state: _State) -> None:
        state.manifest["updated_at"] = time.time()
        state.manifest["recording"]["policy"] = state.policy
        state.manifest["consultation"].setdefault("id", state.consultation_id)
        path = mf.consultation_dir(self.archive, state.consultation_id) / mf.MANIFEST
        try:
            async with state.write_lock:
                await asyncio.to_thread(mf.write_atomic, path, _copy(state.manifest))
        except OSError as exc:
            message = f"cannot write the manifest: {exc.strerror or exc}"
            if state.error is None:
                state.error = message
                logger.error("recording %s: %s", state.consultation_id, message)

    async def _publish(self, state: _State) -> None:
        await self._notify(state.consultation_id, self.state(state.consultation_id))

    # -- reading --------------------------------------------------------------------------
    def state(self, consultation_id: str) -> dict[str, Any]:
        """The recording state as clients show it (``recording:state``)."""
        state = self._states.get(consultation_id)
        if state is None:
            return {"consultation_id": consultation_id, "status": "off", "policy": None,
                    "consent": [], "since": None, "error": None}
        return {
            "consultation_id": consultation_id,
            "status": self._status(state),
            "policy": state.policy,
            "consent": [{"clinician_id": c, "answer": a} for c, (a, _) in
                        sorted(state.consent.items()) if c in state.present],
            "since": state.since,
            "error": state.error,
        }

    def manifest_path(self, consultation_id: str) -> Path:
        return mf.consultation_dir(self.archive, consultation_id) / mf.MANIFEST

    def manifest_of(self, consultation_id: str) -> dict[str, Any] | None:
        """The manifest as it is now (in memory while live, else from disk)."""
        state = self._states.get(consultation_id)
        if state is not None:
            return _copy(state.manifest)
        path = self.manifest_path(consultation_id)
        return mf.load(path) if path.exists() else None


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(data)


def _make_marker(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / mf.RECORDING_MARKER).touch()
    mf.fsync_dir(directory)


def _remove_marker(directory: Path) -> None:
    marker = directory / mf.RECORDING_MARKER
    if marker.exists():
        marker.unlink()


def _describe_file(path: Path, entry: dict[str, Any]) -> None:
    """Size, checksum and playable duration of a file a dead process left behind."""
    if not path.exists():
        entry.update(bytes=0, sha256=None, duration_s=0.0)
        return
    entry["bytes"] = path.stat().st_size
    entry["sha256"] = mf.sha256_file(path)
    last = 0.0
    try:
        with av.open(str(path)) as container:
            for packet in container.demux():
                if packet.pts is not None and packet.time_base is not None:
                    last = max(last, float(packet.pts * packet.time_base))
    except av.FFmpegError:
        pass
    entry["duration_s"] = round(last, 3)
    entry["ended_at"] = entry.get("started_at", 0.0) + last
