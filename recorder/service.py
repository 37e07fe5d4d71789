"""Recorder: carries out the consent and recording decisions of each consultation.

Signaling tells it who is present, who consents and when the consultation ends; the pure state
machine (:mod:`recorder.consent`) decides, and the recorder does the I/O: it attaches a
``RoomRecording`` (a MediaSink) to the consultation's room on the relay while recording is on,
and keeps ``<archive>/<consultation>/manifest.json`` (:mod:`recorder.manifest`) up to date
(atomically) as files open and close. It knows clinicians by id only; who may do what is
signaling's business.

A recording goes on across a move of the consultation to another relay (``relay_changed``)
and across a restart of the server (``close`` on a stop, ``restore`` after a kill, then the
participants' ``joined``): the session of the old media ends, a new one writes new files as
soon as the media is back, and the manifest lists the break as a gap (``recording.gaps``, see
:mod:`recorder.manifest`). A recording the host stopped, or that a decline stopped, never
resumes by itself: the consent machine's rules hold across the break.

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

RESUME_RETRY_S = 1.0
RESUME_RETRIES = 900
"""A recording waiting for its media to come back (no relay yet: a restarted server waits for
the node to dial in again, a consultation waits for a relay with room) tries again every
second, for at most 15 minutes; a ``relay_changed`` or a participant's join tries at once."""


@dataclass
class _State:
    consultation_id: str
    machine: ConsentMachine
    manifest: mf.Manifest
    session: RoomRecording | None = None
    relay: Relay | None = None
    """The relay ``session`` is attached to."""
    gap: mf.Gap | None = None
    """The gap (in ``manifest.recording.gaps``) that the next file written closes."""
    retry: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Manifest writes one at a time, in order: an older snapshot never replaces a newer."""


Describe = Callable[[str], Awaitable[mf.Description | None]]
Notify = Callable[[str, dict[str, Any]], Awaitable[None]]


class Recorder:
    def __init__(self, archive: Path, *, relay_for: Callable[[str], Relay | None],
                 describe: Describe, notify: Notify, retention_years: float = 10,
                 hold_s: float = 1.5, cluster_ms: int = 500, fsync_interval_s: float = 1.0,
                 audit: AuditLog | None = None, instance: str = "") -> None:
        self.archive = archive
        self.instance = instance
        """This process's name in the archive's markers: a fleet's processes share one archive
        and each takes back only what it was writing (empty: a lone process)."""
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
        self._closing = asyncio.Event()

    # -- start-up --------------------------------------------------------------------------
    async def restore(self) -> list[str]:
        """Recordings a previous process was writing when it died: mark them ``interrupted``
        in their manifests, with the checksum of what reached the disk, and open their gap
        (from where the last file ends): each resumes when its participants join again."""
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
            if _marker_owner(marker) not in ("", self.instance):
                continue  # another process of the fleet writes there (or died: see adopt)
            if _interrupt_directory(marker.parent):
                marked.append(marker.parent.name)
        return marked

    # -- what signaling tells ----------------------------------------------------------------
    async def _state(self, consultation_id: str, policy: str | None = None) -> _State:
        state = self._states.get(consultation_id)
        if state is None:
            directory = mf.consultation_dir(self.archive, consultation_id)
            path = directory / mf.MANIFEST
            data = (await asyncio.to_thread(mf.load, path) if path.exists()
                    else mf.new_manifest(consultation_id))
            # Another event of the consultation may have loaded it meanwhile (both
            # participants rejoining a restarted server at once): there is one state.
            state = self._states.get(consultation_id)
        if state is None:
            machine = ConsentMachine(policy or "with_consent")
            for answer in data.consent:
                machine.answers[answer.clinician_id] = (answer.answer, answer.at)
            recording = data.recording
            machine.wanted = not recording.host_stopped
            if recording.status == "failed":
                machine.error = recording.error
            state = self._states[consultation_id] = _State(consultation_id, machine, data)
            if recording.resumes():
                # The server stopped or died while this was recording: it goes on as it was
                # (the consents given still hold; a host's stop or a decline still stops it).
                machine.resume_after_restart(host_stopped=recording.host_stopped,
                                             error=machine.error)
                state.gap = recording.open_gap()
                logger.info("recording %s: was on when the server stopped; resumes when the "
                            "participants are back", consultation_id)
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
            state.manifest.recording.host_stopped = False
            await self._carry_out(state, decision, by=by)
            await self._write(state)
        return self.state(consultation_id)

    async def stop(self, consultation_id: str, by: str) -> dict[str, Any]:
        state = await self._state(consultation_id)
        async with state.lock:
            # On disk before the ack: a restarted server must not start it again.
            state.manifest.recording.host_stopped = True
            await self._carry_out(state, state.machine.host_stop(), by=by)
            await self._write(state)
        return self.state(consultation_id)

    async def ended(self, consultation_id: str) -> None:
        """The consultation ended: finish the files and write the final manifest (with the
        minutes) — for every consultation, recorded or not."""
        state = await self._state(consultation_id)
        async with state.lock:
            if state.machine.ended().stop:
                await self._stop_session(state, by="system")
            elif state.gap is not None:
                await self._gap_stays_open(state, by="system")
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

    async def adopt(self, consultation_id: str, policy: str,
                    present: dict[str, str]) -> dict[str, Any]:
        """A fleet: this process takes the recording over (the consultation's media now
        reaches it: its relay is connected here). What the previous holder wrote is on disk
        (the archive is shared); ``present`` (clinician -> site) is who is in the
        consultation. A recording that was on resumes in new files as soon as the media is
        there; one whose holder died mid-write is marked interrupted first, as ``restore``
        would have."""
        if consultation_id not in self._states:
            directory = mf.consultation_dir(self.archive, consultation_id)
            marker = directory / mf.RECORDING_MARKER
            owner = await asyncio.to_thread(_marker_owner, marker)
            if owner is not None and owner != self.instance \
                    and await asyncio.to_thread(_interrupt_directory, directory):
                logger.warning("recording of consultation %s was interrupted (the process "
                               "writing it died); it resumes here", consultation_id)
                await self.audit.append_async("system", "recording.interrupted",
                                              consultation_id)
        state = await self._state(consultation_id, policy)
        async with state.lock:
            await self._carry_out(state, state.machine.present_again(present), by="system")
            await self._write(state)
        return self.state(consultation_id)

    async def media_here(self, consultation_id: str) -> None:
        """A relay node says it carries the consultation (its ``relay:hello``). One process
        holds every recording already (a restarted one resumes at the participants' joins):
        nothing to take over. A fleet's ``FleetRecorder`` takes it over there."""

    async def release(self, consultation_id: str, *, reason: mf.GapReason,
                      at: float | None = None) -> None:
        """A fleet: another process takes the recording over (the media moved to a relay
        connected there, ``reason``). The files written here end; the manifest says the
        recording goes on (an open gap and a ``handed_over`` event, when it was on) and this
        process forgets the consultation, so that nothing here writes its manifest again."""
        state = self._states.get(consultation_id)
        if state is None:
            return
        async with state.lock:
            session, state.session = state.session, None
            relay, state.relay = state.relay, None
            if session is not None:
                if relay is not None:
                    await _detach(relay, consultation_id, session)
                await session.close()
                state.machine.suspend()
            if state.machine.suspended:
                self._open_gap(state, (session.last_arrival if session else None)
                               or (time.time() if at is None else at), reason)
                self._event(state, "handed_over", "system")
            await self._write(state)
            directory = mf.consultation_dir(self.archive, consultation_id)
            await asyncio.to_thread(_remove_marker, directory)
            self._states.pop(consultation_id, None)
        logger.info("recording %s handed over (%s)", consultation_id, reason)

    async def relay_changed(self, consultation_id: str, *, lost_at: float | None = None,
                            reason: mf.GapReason = "relay_lost") -> None:
        """The consultation's media moved (its relay died, went silent or was drained; a
        restarted server placed or adopted it): the files of the old relay end there, and
        recording goes on from the new one in new files. The break is a gap from the last
        packet written (else ``lost_at``, default now) to the first one written from the new
        relay. Also the signal that a recording waiting for its media can start now."""
        state = self._states.get(consultation_id)
        if state is None:
            return
        noticed = time.time() if lost_at is None else lost_at
        async with state.lock:
            relay = self._relay_for(consultation_id)
            if state.session is not None and relay is not None and relay is state.relay:
                return  # the same relay, still streaming to this session: nothing moved
            session, state.session = state.session, None
            old, state.relay = state.relay, None
            if session is not None:
                if reason == "relay_drained" and old is not None and old is not relay:
                    # A drained relay still forwards until its participants have left it.
                    await _detach(old, consultation_id, session)
                await session.close()
                state.machine.suspend()
                self._event(state, "relay_changed", "system")
                self._open_gap(state, session.last_arrival or noticed, reason)
                logger.info("recording %s: relay changed (%s); the gap starts at %.3f",
                            consultation_id, reason, state.gap.from_ if state.gap else noticed)
            await self._carry_out(state, state.machine.decide(), by="system")
            await self._write(state)

    async def close(self) -> None:
        """The process stops: finish every file (``complete``). A recording that was on is
        marked ``interrupted`` (an event and an open gap): a restarted server resumes it
        when the participants are back."""
        self._closing.set()
        for state in list(self._states.values()):
            async with state.lock:
                await self._interrupt(state)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _interrupt(self, state: _State) -> None:
        session, state.session = state.session, None
        relay, state.relay = state.relay, None
        if session is None and not state.machine.suspended:
            return
        now = time.time()
        if session is not None:
            if relay is not None:
                await _detach(relay, state.consultation_id, session)
            await session.close()
            state.machine.suspend()
        self._open_gap(state, (session.last_arrival if session else None) or now,
                       "signaling_restart")
        recording = state.manifest.recording
        recording.stopped_at = now
        if recording.status == "recording":
            recording.status = "stopped"
        self._event(state, "interrupted", "system")
        await self._write(state)
        directory = mf.consultation_dir(self.archive, state.consultation_id)
        await asyncio.to_thread(_remove_marker, directory)
        await self.audit.append_async("system", "recording.interrupted", state.consultation_id)
        logger.info("recording %s interrupted by the server's stop; it resumes after the "
                    "restart", state.consultation_id)

    # -- gaps ------------------------------------------------------------------------------
    def _open_gap(self, state: _State, start: float, reason: mf.GapReason) -> None:
        """A break begins (unless one is open already: a second break before the media came
        back is the same gap)."""
        if state.gap is not None:
            return
        state.gap = mf.Gap.starting(start, reason)
        state.manifest.recording.gaps.append(state.gap)

    async def _gap_stays_open(self, state: _State, *, by: str) -> None:
        """Recording will not resume (the consultation ended, the host stopped it, a decline):
        the open gap keeps ``to`` = None, and the recording is over."""
        gap, state.gap = state.gap, None
        if gap is None:
            return
        recording = state.manifest.recording
        if recording.status == "recording":
            recording.status = "stopped"
            recording.stopped_at = time.time()
            self._event(state, "stopped", by)
        logger.info("recording %s: did not resume after the %s gap (from %.3f)",
                    state.consultation_id, gap.reason, gap.from_)
        await self._write(state)
        directory = mf.consultation_dir(self.archive, state.consultation_id)
        await asyncio.to_thread(_remove_marker, directory)

    def _retry_later(self, state: _State) -> None:
        if state.retry is not None and not state.retry.done():
            return
        state.retry = asyncio.ensure_future(self._retry(state))
        self._tasks.add(state.retry)
        state.retry.add_done_callback(self._tasks.discard)

    async def _retry(self, state: _State) -> None:
        # Never cancelled (a start cut off half-way would leave a session open): it ends by
        # itself once recording resumed, will not, or the recorder closes.
        for _ in range(RESUME_RETRIES):
            try:
                await asyncio.wait_for(self._closing.wait(), RESUME_RETRY_S)
                return
            except TimeoutError:
                pass
            if self._states.get(state.consultation_id) is not state:
                return
            async with state.lock:
                if (not state.machine.suspended or state.session is not None
                        or self._closing.is_set()):
                    return
                await self._carry_out(state, state.machine.decide(), by="system")
                if state.session is not None:
                    return
        logger.warning("recording %s: its media did not come back within %.0f s; it resumes "
                       "at the next join or relay change", state.consultation_id,
                       RESUME_RETRY_S * RESUME_RETRIES)

    # -- carrying out the state machine's decisions ----------------------------------------
    async def _carry_out(self, state: _State, decision: Decision, *, by: str) -> None:
        """Do what the state machine decided (the caller holds ``state.lock``), then show
        everyone the new state."""
        before = state.machine.status()
        if decision.start:
            await self._start_session(state, by, decision.allow)
        if decision.stop:
            await self._stop_session(state, by=by)
        if decision.allow is not None and state.session is not None:
            state.session.allow(set(decision.allow))
        if state.gap is not None and state.session is None and not state.machine.suspended:
            await self._gap_stays_open(state, by=by)
        await self._publish(state)
        after = state.machine.status()
        if after != before:
            logger.info("recording %s: %s -> %s", state.consultation_id, before, after)

    async def _start_session(self, state: _State, by: str,
                             allow: frozenset[str] | None = None) -> None:
        relay = self._relay_for(state.consultation_id)
        if relay is None:
            if state.machine.suspended:
                # Its media is away (a move under way, a restarted server waiting for the
                # node): not a failure; it starts once the media is back.
                logger.info("recording %s: waiting for the consultation's relay to resume",
                            state.consultation_id)
                self._retry_later(state)
                return
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
            await asyncio.to_thread(_make_marker, directory, self.instance)
            if allow is not None:
                # Before the relay's first packet: none of those allowed is lost.
                session.allow(set(allow))
            await relay.attach_sink(state.consultation_id, session)
        except (OSError, RelayError) as exc:
            await session.close()
            message = exc.message if isinstance(exc, RelayError) else \
                f"cannot write the archive: {exc.strerror or exc}"
            if isinstance(exc, RelayError) and state.machine.suspended:
                logger.info("recording %s: the relay cannot take the recorder yet (%s); "
                            "trying again", state.consultation_id, exc.code)
                self._retry_later(state)
                return
            state.machine.start_failed(message)
            logger.error("recording %s cannot start: %s", state.consultation_id, message)
            return
        state.session = session
        state.relay = relay
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
        relay, state.relay = state.relay, None
        if session is None:
            return
        if relay is not None:
            await _detach(relay, state.consultation_id, session)
        await session.close()
        state.machine.session_stopped()
        recording = state.manifest.recording
        recording.stopped_at = time.time()
        if recording.status == "recording":
            recording.status = "failed" if state.machine.error else "stopped"
        self._event(state, "stopped", by)
        if state.gap is not None:
            # Stopped before anything was written after the break: the gap stays open.
            logger.info("recording %s: stopped before it resumed after the %s gap",
                        state.consultation_id, state.gap.reason)
            state.gap = None
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
        gap, state.gap = state.gap, None
        if gap is not None:
            # A file's time 0 is the arrival of its first frame: the first packet written
            # since the break.
            gap.to = entry.started_at
            logger.info("recording %s resumed after a %s gap of %.2f s", state.consultation_id,
                        gap.reason, gap.to - gap.from_)
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

    def consultations(self) -> list[str]:
        """The consultations whose recording state this recorder holds."""
        return list(self._states)

    def manifest_path(self, consultation_id: str) -> Path:
        return mf.consultation_dir(self.archive, consultation_id) / mf.MANIFEST

    def manifest_of(self, consultation_id: str) -> mf.Manifest | None:
        """The manifest as it is now (in memory while live, else from disk)."""
        state = self._states.get(consultation_id)
        if state is not None:
            return state.manifest.model_copy(deep=True)
        path = self.manifest_path(consultation_id)
        return mf.load(path) if path.exists() else None


async def _detach(relay: Relay, consultation_id: str, session: RoomRecording) -> None:
    try:
        await asyncio.wait_for(relay.detach_sink(consultation_id, session), DETACH_TIMEOUT_S)
    except RelayError as exc:
        logger.info("recording %s: detach: %s", consultation_id, exc.code)
    except TimeoutError:
        logger.info("recording %s: detach: no answer within %.0f s", consultation_id,
                    DETACH_TIMEOUT_S)


DETACH_TIMEOUT_S = 2.0
"""A relay that does not answer a detach (a node gone silent) does not hold the recording."""


def _make_marker(directory: Path, instance: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / mf.RECORDING_MARKER).write_text(instance, encoding="utf-8")
    mf.fsync_dir(directory)


def _marker_owner(marker: Path) -> str | None:
    """Who was writing (None: nobody, no marker; "": a lone process, or a marker of before
    the fleet)."""
    try:
        return marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def _interrupt_directory(directory: Path) -> bool:
    """The process writing this consultation died: its files as they reached the disk
    (described, ``interrupted``), the recording ``interrupted`` with a gap from where the last
    file ends, the marker gone. False: the manifest is unreadable (left as it is)."""
    path = directory / mf.MANIFEST
    try:
        data = mf.load(path) if path.exists() else mf.new_manifest(directory.name)
    except (OSError, ValueError) as exc:
        logger.error("archive %s: manifest unreadable (%s); left as it is", directory.name, exc)
        return False
    now = time.time()
    for entry in data.files:
        if entry.status == "recording":
            _describe_file(directory / entry.name, entry)
            entry.status = "interrupted"
    if data.recording.open_gap() is None:
        # What reached the disk ends where the last file ends; recording resumes once the
        # participants are back (``joined``).
        ends = [f.ended_at for f in data.files if f.ended_at is not None]
        data.recording.gaps.append(mf.Gap.starting(
            max(ends) if ends else (data.updated_at or now), "signaling_restart"))
    data.recording.status = "interrupted"
    data.recording.stopped_at = now
    data.recording.events.append(mf.RecordingEvent(at=now, event="interrupted", by="system"))
    data.updated_at = now
    mf.write_atomic(path, data)
    (directory / mf.RECORDING_MARKER).unlink(missing_ok=True)
    return True


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
