"""Recorder: carries out the consent and recording decisions of each consultation.

Signaling tells it who is present, who consents and when the consultation ends; the pure state
machine (:mod:`recorder.consent`) decides, and the recorder does the I/O: it attaches a
``RoomRecording`` (a MediaSink) to the consultation's room on the relay while recording is on,
and keeps ``<archive>/<consultation>/manifest.json`` (:mod:`recorder.manifest`) up to date
(atomically) as files open and close. It knows clinicians by id only; who may do what is
signaling's business.

Locks: each consultation's ``lock`` orders its events; a session's failure is an event
(``on_failure``) that takes the lock in a task of the recorder's own, never one that the
session's ``close()`` waits for, so a failing write while the host ends or stops the recording
cannot deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

from recorder import manifest as mf
from recorder.audit import AuditLog
from recorder.consent import ConsentMachine, Decision
from recorder.session import RoomRecording
from relay.api import Relay
from relay.errors import RelayError

logger = logging.getLogger(__name__)


@dataclass
class _State:
    consultation_id: str
    machine: ConsentMachine
    manifest: mf.Manifest
    session: RoomRecording | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Manifest writes one at a time, in order: an older snapshot never replaces a newer."""


Describe = Callable[[str], Awaitable[mf.Description | None]]
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
        self._tasks: set[asyncio.Task[None]] = set()

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
            for entry in data.files:
                if entry.status == "recording":
                    _describe_file(directory / entry.name, entry)
                    entry.status = "interrupted"
            data.recording.status = "interrupted"
            data.recording.stopped_at = now
            data.recording.events.append(
                mf.RecordingEvent(at=now, event="interrupted", by="system"))
            data.updated_at = now
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
            machine = ConsentMachine(policy or "with_consent")
            for answer in data.consent:
                machine.answers[answer.clinician_id] = (answer.answer, answer.at)
            state = self._states[consultation_id] = _State(consultation_id, machine, data)
        if policy is not None:
            state.machine.policy = policy
            state.manifest.recording.policy = policy
        return state

    async def joined(self, consultation_id: str, policy: str, clinician_id: str,
                     site_id: str) -> dict[str, Any]:
        state = await self._state(consultation_id, policy)
        async with state.lock:
            await self._carry_out(state, state.machine.join(clinician_id, site_id),
                                  by=clinician_id)
        return self.state(consultation_id)

    async def left(self, consultation_id: str, clinician_id: str) -> None:
        state = self._states.get(consultation_id)
        if state is None:
            return
        async with state.lock:
            await self._carry_out(state, state.machine.leave(clinician_id), by=clinician_id)

    async def consent(self, consultation_id: str, clinician_id: str, agree: bool) -> dict[str, Any]:
        state = await self._state(consultation_id)
        async with state.lock:
            now = time.time()
            decision = state.machine.answer(clinician_id, agree, now)
            answer = mf.ConsentAnswer(clinician_id=clinician_id,
                                      answer="agreed" if agree else "declined", at=now)
            state.manifest.consent.append(answer)
            logger.info("recording %s: %s %s", consultation_id, clinician_id, answer.answer)
            await self._carry_out(state, decision, by=clinician_id)
            # A clinician's answer is on disk before the ack, like everything a doctor says.
            await self._write(state)
        return self.state(consultation_id)

    async def start(self, consultation_id: str, by: str) -> dict[str, Any]:
        """The host asks for recording (again): everyone who has not agreed is asked."""
        state = await self._state(consultation_id)
        async with state.lock:
            decision = state.machine.host_start()
            self._event(state, "requested", by)
            await self._carry_out(state, decision, by=by)
        return self.state(consultation_id)

    async def stop(self, consultation_id: str, by: str) -> dict[str, Any]:
        state = await self._state(consultation_id)
        async with state.lock:
            await self._carry_out(state, state.machine.host_stop(), by=by)
        return self.state(consultation_id)

    async def ended(self, consultation_id: str) -> None:
        """The consultation ended: finish the files and write the final manifest (with the
        minutes) — for every consultation, recorded or not."""
        state = await self._state(consultation_id)
        async with state.lock:
            if state.machine.ended().stop:
                await self._stop_session(state, by="system")
            data = state.manifest
            description = await self._describe(consultation_id)
            if description is not None:
                data.describe(description)
            years = self._retention_years
            data.retention = mf.Retention(years=years, expires_at=mf.expires_at(
                data.consultation.ended_at, data.consultation.started_at, years))
            data.recording.status = state.machine.archive_status(
                {f.status for f in data.files}, data.recording.status)
            await self._write(state)
            self._states.pop(consultation_id, None)
        logger.info("archive of consultation %s written (%d files, recording %s)",
                    consultation_id, len(data.files), data.recording.status)

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
                state.machine.session_stopped()
                self._event(state, "relay_changed", "system")
            await self._carry_out(state, state.machine.decide(), by="system")

    async def close(self) -> None:
        """The process stops: finish every file (the manifests say ``complete`` for what was
        closed cleanly; the consultation goes on after a restart)."""
        for state in list(self._states.values()):
            async with state.lock:
                await self._stop_session(state, by="system")
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- carrying out the state machine's decisions ----------------------------------------
    async def _carry_out(self, state: _State, decision: Decision, *, by: str) -> None:
        """Do what the state machine decided (the caller holds ``state.lock``), then show
        everyone the new state."""
        before = state.machine.status()
        if decision.start:
            await self._start_session(state, by)
        if decision.stop:
            await self._stop_session(state, by=by)
        if decision.allow is not None and state.session is not None:
            state.session.allow(set(decision.allow))
        await self._publish(state)
        after = state.machine.status()
        if after != before:
            logger.info("recording %s: %s -> %s", state.consultation_id, before, after)

    async def _start_session(self, state: _State, by: str) -> None:
        relay = self._relay_for(state.consultation_id)
        if relay is None:
            state.machine.start_failed("the consultation has no relay")
            return
        directory = mf.consultation_dir(self.archive, state.consultation_id)
        session = RoomRecording(
            state.consultation_id, directory, hold_s=self._hold_s, cluster_ms=self._cluster_ms,
            fsync_interval_s=self._fsync_interval_s,
            on_file_opened=lambda entry: self._file_opened(state, entry),
            on_file_closed=lambda entry: self._file_closed(state, entry),
            on_failure=lambda message: self._failed(state, session, message),
            request_keyframe=lambda pid: relay.request_keyframe(state.consultation_id, pid),
        )
        try:
            await asyncio.to_thread(_make_marker, directory)
            await relay.attach_sink(state.consultation_id, session)
        except (OSError, RelayError) as exc:
            await session.close()
            message = exc.message if isinstance(exc, RelayError) else \
                f"cannot write the archive: {exc.strerror or exc}"
            state.machine.start_failed(message)
            logger.error("recording %s cannot start: %s", state.consultation_id, message)
            return
        state.session = session
        now = time.time()
        state.machine.session_started(now)
        recording = state.manifest.recording
        if not recording.started_at:
            recording.started_at = now
        recording.status = "recording"
        self._event(state, "started", by)
        description = await self._describe(state.consultation_id)
        if description is not None:
            state.manifest.describe(description)
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
        state.machine.session_stopped()
        recording = state.manifest.recording
        recording.stopped_at = time.time()
        if recording.status == "recording":
            recording.status = "failed" if state.machine.error else "stopped"
        self._event(state, "stopped", by)
        await self._write(state)
        directory = mf.consultation_dir(self.archive, state.consultation_id)
        await asyncio.to_thread(_remove_marker, directory)
        await self.audit.append_async(by, "recording.stopped", state.consultation_id)

    def _event(self, state: _State, event: str, by: str) -> None:
        state.manifest.recording.events.append(
            mf.RecordingEvent(at=time.time(), event=event, by=by))

    async def _file_opened(self, state: _State, entry: mf.FileEntry) -> None:
        entry.site_id = state.machine.present.get(entry.participant_id)
        state.manifest.files.append(entry)
        await self._write(state)

    async def _file_closed(self, state: _State, entry: mf.FileEntry) -> None:
        path = mf.consultation_dir(self.archive, state.consultation_id) / entry.name
        try:
            entry.sha256 = await asyncio.to_thread(mf.sha256_file, path)
            entry.bytes = path.stat().st_size
        except OSError as exc:
            entry.status = "failed"
            logger.error("recording %s: %s unreadable: %s", state.consultation_id,
                         entry.name, exc.strerror)
        files = state.manifest.files
        for index, known in enumerate(files):
            if known.name == entry.name:
                files[index] = entry.model_copy(update={"site_id": known.site_id})
        await self._write(state)

    def _failed(self, state: _State, session: RoomRecording, message: str) -> None:
        """A session's failure (a disk error): recorded at once; the session is stopped under
        the lock by a task of the recorder's (never one its ``close()`` waits for)."""
        decision = state.machine.failure(message)
        state.manifest.recording.error = message
        self._event(state, "failed", "system")
        logger.error("recording of consultation %s failed: %s; the consultation goes on",
                     state.consultation_id, message)
        if not decision.stop:
            return
        task = asyncio.ensure_future(self._stop_failed(state, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_failed(self, state: _State, session: RoomRecording) -> None:
        async with state.lock:
            if state.session is not session:
                return  # already stopped (the consultation ended, the host stopped it)
            await self._stop_session(state, by="system")
            await self._publish(state)

    async def _write(self, state: _State) -> None:
        data = state.manifest
        data.updated_at = time.time()
        data.recording.policy = state.machine.policy
        path = mf.consultation_dir(self.archive, state.consultation_id) / mf.MANIFEST
        try:
            async with state.write_lock:
                await asyncio.to_thread(mf.write_atomic, path, data.model_copy(deep=True))
        except OSError as exc:
            message = f"cannot write the manifest: {exc.strerror or exc}"
            if state.machine.write_failed(message):
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
        return {"consultation_id": consultation_id, **state.machine.view()}

    def manifest_path(self, consultation_id: str) -> Path:
        return mf.consultation_dir(self.archive, consultation_id) / mf.MANIFEST

    def manifest_of(self, consultation_id: str) -> mf.Manifest | None:
        """The manifest as it is now (in memory while live, else from disk)."""
        state = self._states.get(consultation_id)
        if state is not None:
            return state.manifest.model_copy(deep=True)
        path = self.manifest_path(consultation_id)
        return mf.load(path) if path.exists() else None


def _make_marker(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / mf.RECORDING_MARKER).touch()
    mf.fsync_dir(directory)


def _remove_marker(directory: Path) -> None:
    marker = directory / mf.RECORDING_MARKER
    if marker.exists():
        marker.unlink()


def _describe_file(path: Path, entry: mf.FileEntry) -> None:
    """Size, checksum and playable duration of a file a dead process left behind."""
    if not path.exists():
        entry.bytes, entry.sha256, entry.duration_s = 0, None, 0.0
        return
    entry.bytes = path.stat().st_size
    entry.sha256 = mf.sha256_file(path)
    last = 0.0
    try:
        with av.open(str(path)) as container:
            for packet in container.demux():
                if packet.pts is not None and packet.time_base is not None:
                    last = max(last, float(packet.pts * packet.time_base))
    except av.FFmpegError:
        pass
    entry.duration_s = round(last, 3)
    entry.ended_at = entry.started_at + last
