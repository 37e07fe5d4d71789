"""The consultation lifecycle: join, leave, invite a site, chat, end with the minutes, and
the reconnect grace period that lets a participant keep their place."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from relay.api import Relay
from signaling import permissions
from signaling.directory import Directory
from signaling.errors import Forbidden, InvalidState, NotFound, SignalingError
from signaling.live import LiveStore, Participant
from signaling.media import Media
from signaling.metrics import Metrics
from signaling.models import ChatMessage, Consultation, Minutes
from signaling.notify import (
    Notifier,
    clinician_audience,
    consultation_audience,
    site_audience,
)
from signaling.pairing import new_id
from signaling.placement import MoveReason, RelayDirectory
from signaling.store import RecordStore
from signaling.tokens import Principal

logger = logging.getLogger(__name__)

Rule = Callable[[Principal, Consultation], bool]


class RecordingHooks(Protocol):
    """What the consultation's lifecycle tells the recording (``RecordingControl``): consent
    and recording follow who is present."""

    async def joined(self, consultation: Consultation, principal: Principal) -> dict[str, Any]:
        """The participant's view of the recording state."""

    async def left(self, consultation_id: str, clinician_id: str) -> None: ...

    async def ended(self, consultation_id: str) -> None:
        """Finish the files and write the manifest (with the minutes)."""

    async def relay_changed(self, consultation_id: str, *, lost_at: float,
                            reason: str) -> None:
        """The consultation's Room moved to another relay, lost its relay with none to take
        it yet (called again once one does), or the same relay was found again after a
        signaling restart: the files of the old one end, new ones follow. ``lost_at``
        (Unix time) is when the old relay was lost, ``reason`` one of ``relay_lost``,
        ``relay_drained``, ``signaling_restart`` (the manifest's gap)."""

    async def adopted(self, consultation_id: str) -> None:
        """A relay node connected to this process carries the consultation
        (``relay:hello``): in a fleet, its recording comes here."""


class Consultations:
    def __init__(self, *, store: RecordStore, live: LiveStore, directory: Directory,
                 relays: RelayDirectory, notifier: Notifier, metrics: Metrics,
                 reconnect_grace_s: float, media: Media, recording: RecordingHooks) -> None:
        self._store = store
        self._live = live
        self._directory = directory
        self._relays = relays
        self._notifier = notifier
        self._metrics = metrics
        self._grace_s = reconnect_grace_s
        self._media = media
        self._recording = recording

    def _lock(self, clinician_id: str) -> AbstractAsyncContextManager[object]:
        """A participant is read, changed and written back (its sockets, its state) one step
        at a time. With live state in memory every caller shares one object; from Redis each
        gets a copy, and two tabs joining or closing at once (on one node or two), or a return
        racing the reconnect grace, would otherwise lose a socket or keep a dead one."""
        return self._live.clinician_lock(clinician_id)

    async def restore(self) -> int:
        """After a start: the consultations that had not ended get their relay back
        (``RelayDirectory.restore``: reopened on the embedded relay, or waiting
        ``relay.adopt_wait_s`` for their node's hello, else placed elsewhere or waiting).
        Never raises for a relay: ``serve`` starts whatever the state."""
        active = await self._store.active_consultations()
        for consultation in active:
            site = self._directory.all_sites.get(consultation.site_ids[0]) \
                if consultation.site_ids else None
            region = site.region if site else ""
            try:
                relay = await self._relays.restore(consultation.id, consultation.relay_id,
                                                   region)
            except Exception:
                logger.exception("consultation %s: its relay could not be restored; it waits "
                                 "for one", consultation.id)
                await self._relays.set_waiting(consultation.id, region,
                                               reason="signaling_restart", since=time.time())
                continue
            if relay is None:
                logger.info("consultation %s waits for relay %s", consultation.id,
                            consultation.relay_id)
            elif relay.info.id != consultation.relay_id:
                consultation.relay_id = relay.info.id
                await self._store.save_consultation(consultation)
        self._metrics.live_consultations.set(len(active))
        return len(active)

    async def adopted(self, consultation_id: str, participant_ids: list[str]) -> None:
        """A relay node still carries the consultation's Room (``relay:hello``). Its
        participants whom signaling does not know (a restarted signaling keeps no live
        state) are taken back as ``reconnecting``: the reconnect grace applies, so those
        who never come back leave (and the relay is told)."""
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None or consultation.state == "ended":
            return
        now = time.time()
        for clinician_id in participant_ids:
            clinician = self._directory.all_clinicians.get(clinician_id)
            if clinician is None:
                logger.warning("consultation %s: its relay holds unknown participant %s",
                               consultation_id, clinician_id)
                continue
            async with self._lock(clinician_id):
                if await self._live.get_participant(consultation_id, clinician_id) is not None:
                    continue
                participant = Participant(consultation_id, clinician_id, clinician.site_id,
                                          now, state="reconnecting", away_since=now)
                await self._live.put_participant(participant)
            logger.info("consultation %s: %s taken back from its relay, reconnecting",
                        consultation_id, clinician_id)
        try:
            await self._recording.adopted(consultation_id)
        except SignalingError as exc:
            logger.warning("consultation %s: its recording did not follow its relay here "
                           "(%s); it does at the next event", consultation_id, exc.code)

    async def _get(self, consultation_id: str) -> Consultation:
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None:
            raise NotFound(f"no consultation {consultation_id!r}")
        return consultation

    async def _open_for(self, principal: Principal, consultation_id: str, rule: Rule,
                        refusal: str = "is not a participant of") -> Consultation:
        """The consultation, if ``rule`` lets ``principal`` in (else Forbidden: "clinician
        ... ``refusal`` consultation ...") and it has not ended."""
        consultation = await self._get(consultation_id)
        if not rule(principal, consultation):
            raise Forbidden(f"clinician {principal.id!r} {refusal} consultation "
                            f"{consultation_id!r}")
        if consultation.state == "ended":
            raise InvalidState(f"consultation {consultation_id!r} has ended")
        return consultation

    def _wire(self, participant: Participant) -> dict[str, object]:
        """A participant as clients show it: with name, roles and site name."""
        wire = participant.to_wire()
        clinician = self._directory.all_clinicians.get(participant.clinician_id)
        site = self._directory.all_sites.get(participant.site_id)
        wire["name"] = clinician.name if clinician else participant.clinician_id
        wire["roles"] = sorted(clinician.roles) if clinician else []
        wire["site_name"] = site.name if site else participant.site_id
        return wire

    async def _participants_wire(self, consultation_id: str) -> list[dict[str, object]]:
        people = await self._live.participants(consultation_id)
        return [self._wire(p) for p in sorted(people, key=lambda p: p.joined_at)]

    async def _announce(self, consultation_id: str, event: str, participant: Participant) -> None:
        await self._notifier.emit(
            "consult:participant",
            {"consultation_id": consultation_id, "event": event,
             "participant": self._wire(participant)},
            consultation_audience(consultation_id),
        )

    # -- join / leave ----------------------------------------------------------------------
    async def join(self, principal: Principal, sid: str, consultation_id: str) -> dict[str, Any]:
        consultation = await self._open_for(principal, consultation_id, permissions.may_join)
        now = time.time()
        async with self._lock(principal.id):
            participant = await self._live.get_participant(consultation_id, principal.id)
            fresh = participant is None
            if participant is None:
                participant = Participant(consultation_id, principal.id, principal.site.id,
                                          now)
            returning = participant.state == "reconnecting"
            participant.sids.add(sid)
            participant.state = "present"
            participant.away_since = None
            await self._live.put_participant(participant)
        await self._notifier.enter(sid, consultation_audience(consultation_id))
        if fresh:
            await self._store.record_join(consultation_id, principal.id, principal.site.id, now)
            logger.info("consultation %s: %s joined", consultation_id, principal.id)
        if fresh or returning:
            await self._announce(consultation_id, "returned" if returning else "joined",
                                 participant)
        present = [p for p in await self._live.participants(consultation_id)
                   if p.state == "present"]
        if consultation.state == "open" and len(present) >= 2:
            consultation.state = "live"
            consultation.started_at = now
            await self._store.save_consultation(consultation)
            await self._notifier.emit("consult:updated",
                                      {"consultation": consultation.to_wire()},
                                      consultation_audience(consultation_id))
        chat = await self._store.chat_of(consultation_id)
        recording = await self._recording.joined(consultation, principal)
        return {
            "consultation": consultation.to_wire(),
            "participants": await self._participants_wire(consultation_id),
            "chat": [m.to_wire() for m in chat],
            "recording": recording,
        }

    async def leave(self, principal: Principal, sid: str, consultation_id: str) -> dict[str, Any]:
        async with self._lock(principal.id):
            participant = await self._live.get_participant(consultation_id, principal.id)
            if participant is None:
                raise InvalidState(f"clinician {principal.id!r} is not in consultation "
                                   f"{consultation_id!r}")
            for other_sid in participant.sids | {sid}:
                await self._notifier.leave(other_sid, consultation_audience(consultation_id))
            await self._remove(participant)
        return {"consultation_id": consultation_id}

    async def _remove(self, participant: Participant) -> None:
        await self._live.remove_participant(participant.consultation_id, participant.clinician_id)
        await self._media.leave(participant.consultation_id, participant.clinician_id)
        await self._recording.left(participant.consultation_id, participant.clinician_id)
        await self._store.record_leave(participant.consultation_id, participant.clinician_id,
                                       time.time())
        logger.info("consultation %s: %s left", participant.consultation_id,
                    participant.clinician_id)
        await self._announce(participant.consultation_id, "left", participant)

    # -- connections come and go ----------------------------------------------------------
    async def connection_lost(self, sid: str, clinician_id: str) -> None:
        """A connection closed: its participant waits ``reconnect_grace_s`` for a return."""
        async with self._lock(clinician_id):
            for participant in await self._live.memberships_of(clinician_id):
                if sid not in participant.sids:
                    continue
                participant.sids.discard(sid)
                if participant.sids:
                    await self._live.put_participant(participant)
                    continue
                participant.state = "reconnecting"
                participant.away_since = time.time()
                await self._live.put_participant(participant)
                await self._announce(participant.consultation_id, "reconnecting", participant)

    async def connection_made(self, sid: str, principal: Principal) -> list[str]:
        """A clinician connected: give back the places they held in consultations."""
        restored = []
        async with self._lock(principal.id):
            for participant in await self._live.memberships_of(principal.id):
                if participant.state != "reconnecting":
                    continue
                participant.sids.add(sid)
                participant.state = "present"
                participant.away_since = None
                await self._live.put_participant(participant)
                await self._notifier.enter(sid,
                                           consultation_audience(participant.consultation_id))
                await self._announce(participant.consultation_id, "returned", participant)
                restored.append(participant.consultation_id)
        return restored

    async def tick(self, now: float | None = None) -> None:
        """Participants away longer than the grace period leave. In a fleet only the member
        holding the timers' lease ticks (``telehealth.startup._tick_forever``), over every
        member's reconnecting participants (the live state is in Redis)."""
        now = time.time() if now is None else now
        for seen in await self._live.reconnecting():
            if seen.away_since is None or now - seen.away_since < self._grace_s:
                continue
            async with self._lock(seen.clinician_id):
                # Read again: the clinician may have come back since the list was read.
                participant = await self._live.get_participant(seen.consultation_id,
                                                               seen.clinician_id)
                if participant is not None and participant.state == "reconnecting" and \
                        participant.away_since is not None and \
                        now - participant.away_since >= self._grace_s:
                    await self._remove(participant)

    # -- invite / chat / end --------------------------------------------------------------
    async def invite(self, principal: Principal, consultation_id: str,
                     site_id: str) -> dict[str, Any]:
        consultation = await self._open_for(
            principal, consultation_id, permissions.may_invite,
            "is neither the host nor a coordinator: may not invite sites into")
        site = self._directory.site(site_id)
        if site is None:
            raise NotFound(f"no site {site_id!r} in the directory")
        if site_id in consultation.site_ids:
            raise InvalidState(f"site {site_id!r} already takes part in consultation "
                               f"{consultation_id!r}")
        consultation.site_ids.append(site_id)
        consultation.invited_site_ids.append(site_id)
        await self._store.save_consultation(consultation)
        logger.info("consultation %s: site %s invited by %s", consultation_id, site_id,
                    principal.id)
        wire = consultation.to_wire()
        await self._notifier.emit("consult:invited",
                                  {"consultation": wire, "invited_by": principal.id},
                                  site_audience(site_id))
        await self._notifier.emit("consult:updated", {"consultation": wire},
                                  consultation_audience(consultation_id))
        return {"consultation": wire}

    async def chat(self, principal: Principal, consultation_id: str, text: str) -> dict[str, Any]:
        consultation = await self._open_for(principal, consultation_id, permissions.may_chat)
        participant = await self._live.get_participant(consultation.id, principal.id)
        if participant is None:
            raise InvalidState(f"join consultation {consultation_id!r} before chatting")
        message = ChatMessage(new_id("msg"), consultation.id, principal.id, principal.site.id,
                              text, time.time())
        await self._store.add_chat(message)
        await self._notifier.emit("chat:message", {"message": message.to_wire()},
                                  consultation_audience(consultation.id))
        return {"message": message.to_wire()}

    async def end(self, principal: Principal, consultation_id: str,
                  conclusion: str) -> dict[str, Any]:
        consultation = await self._open_for(
            principal, consultation_id, permissions.may_end,
            "is neither the host nor a coordinator: may not end")
        minutes = Minutes(conclusion, principal.id, time.time())
        await self._store.end_consultation(consultation, minutes)
        consultation.state = "ended"
        consultation.ended_at = minutes.signed_at
        consultation.minutes = minutes
        # The files are finished and the manifest (with the minutes) written before the
        # relay's Room closes.
        await self._recording.ended(consultation.id)
        await self._live.drop_consultation(consultation.id)
        await self._media.unbind(consultation.id)
        await self._relays.release(consultation.id)
        self._metrics.live_consultations.dec()
        logger.info("consultation %s ended by %s", consultation.id, principal.id)
        wire = consultation.to_wire()
        audiences = [consultation_audience(consultation.id)]
        audiences += [clinician_audience(c) for c in consultation.clinician_ids]
        await self._notifier.emit("consult:ended", {"consultation": wire}, audiences)
        await self._notifier.close(consultation_audience(consultation.id))
        return {"consultation": wire}

    async def relay_moved(self, consultation_id: str, relay: Relay | None, *,
                          reason: MoveReason = "relay_lost",
                          lost_at: float | None = None) -> None:
        """The consultation's relay changed (lost, drained, or found again after a restart):
        record the new one and tell the participants (``media:moved``; they ``media:join``
        again, resuming where the relay still has their media). ``relay`` None: it waits for
        one, and a later call brings it."""
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None or consultation.state == "ended":
            return
        await self._media.unbind(consultation_id)
        if relay is not None and consultation.relay_id != relay.info.id:
            consultation.relay_id = relay.info.id
            await self._store.save_consultation(consultation)
        # Also with no relay: the recording's files end at the loss (a gap opens), and the
        # call that brings a relay lets it start again at once.
        await self._recording.relay_changed(
            consultation_id, lost_at=time.time() if lost_at is None else lost_at,
            reason=reason)
        self._metrics.relay_moves.labels(
            reason=reason, outcome="placed" if relay is not None else "waiting").inc()
        logger.info("consultation %s: relay %s (%s); participants told", consultation_id,
                    relay.info.id if relay is not None else "none, waiting", reason)
        await self._notifier.emit(
            "media:moved",
            {"consultation_id": consultation_id,
             "relay": relay.info.to_wire() if relay is not None else None},
            consultation_audience(consultation_id))

    # -- records --------------------------------------------------------------------------
    async def list_for(self, principal: Principal) -> list[dict[str, Any]]:
        found = await self._store.consultations_for(
            principal.id, principal.site.id,
            everything=permissions.lists_every_consultation(principal))
        return [c.to_wire() for c in found]

    async def record(self, principal: Principal, consultation_id: str) -> dict[str, Any]:
        consultation = await self._get(consultation_id)
        attendees = await self._store.attendees_of(consultation_id)
        if not permissions.may_read(principal, consultation, attendees):
            raise Forbidden(f"clinician {principal.id!r} may not read consultation "
                            f"{consultation_id!r}")
        chat = await self._store.chat_of(consultation_id)
        attendance = await self._store.attendance_of(consultation_id)
        return {
            "consultation": consultation.to_wire(),
            "chat": [m.to_wire() for m in chat],
            "attendance": attendance,
            "participants": await self._participants_wire(consultation_id),
        }

