"""Media signaling: the SDP/ICE exchange between a participant's browser and the relay that
hosts the consultation's Room. Signaling checks who may do what; the relay (embedded or a
remote node, behind ``relay.api.Relay``) does the media.

Which connection carries a participant's media (``media:join`` binds it) is kept in the live
store (``Participant.media_sid``), not in this process: with ``live.backend = "redis"`` the
process that hears the relay's offer may not be the one the client is connected to, and an
emit to a sid reaches it on whichever process it lives (socket.io's Redis manager)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from config.settings import TurnSettings
from relay.api import Relay
from relay.errors import RelayError
from signaling import permissions
from signaling.errors import Forbidden, InvalidState, NotFound, RelayWaiting, SignalingError
from signaling.live import LiveStore, Participant
from signaling.notify import Notifier, consultation_audience
from signaling.placement import RelayDirectory
from signaling.store import RecordStore
from signaling.tokens import Principal
from signaling.turn import TurnIssuer

logger = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 5.0
"""How long a participant's leave waits for the relay's answer."""


class MediaRefused(SignalingError):
    """A relay refused a media step; carries the relay's code (bad_sdp, already_published...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Media:
    def __init__(self, *, relays: RelayDirectory, live: LiveStore, notifier: Notifier,
                 client_ice_servers: list[dict[str, str]], turn: TurnSettings | None = None,
                 store: RecordStore | None = None) -> None:
        """``turn``: the ``[turn]`` settings; default none (no TURN credentials handed out,
        every client's policy ``all``). ``store``: the records a ``media:probe`` checks its
        sender against; without it probes are refused (``invalid_state``)."""
        self._relays = relays
        self._live = live
        self._notifier = notifier
        self._client_ice_servers = client_ice_servers
        self.turn = TurnIssuer(turn)
        self._store = store

    async def _relay_for(self, principal: Principal,
                         consultation_id: str) -> tuple[Relay, Participant]:
        participant = await self._live.get_participant(consultation_id, principal.id)
        if participant is None or not permissions.is_in(principal, participant):
            raise Forbidden(f"clinician {principal.id!r} is not in consultation "
                            f"{consultation_id!r}: consult:join it before its media")
        if participant.state != "present":
            raise InvalidState(f"clinician {principal.id!r} is reconnecting to "
                               f"{consultation_id!r}")
        return await self._placed(consultation_id), participant

    async def _placed(self, consultation_id: str) -> Relay:
        """The relay of an open consultation; ``relay_waiting`` while it has none (lost and
        not yet moved, or waiting for a relay: ``media:moved`` follows)."""
        relay = await self._relays.locate(consultation_id)
        if relay is None:
            raise RelayWaiting(f"consultation {consultation_id!r} is waiting for a media "
                               "server; wait for media:moved (or retry in a few seconds)")
        return relay

    async def _call(self, what: str, consultation_id: str, step: Any) -> Any:
        try:
            return await step
        except RelayError as exc:
            logger.info("media %s in %s refused by the relay: %s", what, consultation_id,
                        exc.code)
            raise MediaRefused(exc.code, exc.message) from None

    # -- client steps ----------------------------------------------------------------------
    async def join(self, principal: Principal, sid: str, consultation_id: str, *,
                   resume: bool = False) -> dict[str, Any]:
        """Bind the participant's media to connection ``sid``. With ``resume`` the relay is
        asked first whether it still carries this participant's media (a signaling
        reconnect, a restarted signaling, the same relay found again): if so the client keeps
        its peer connections (``resumed: true``); else, and without ``resume``, the media
        starts afresh on the relay (``resumed: false``: the client builds new ones)."""
        relay, participant = await self._relay_for(principal, consultation_id)
        before = participant.media_sid
        # Bound before the relay is asked: a resumed participant's unanswered subscribe offer
        # is sent again while ``resume`` runs, and must reach this connection.
        await self._live.set_media_sid(consultation_id, principal.id, sid)
        try:
            resumed = False
            if resume:
                try:
                    resumed = bool(await self._call(
                        "resume", consultation_id, relay.resume(consultation_id, principal.id)))
                except MediaRefused as exc:
                    if exc.code != "relay_unreachable":
                        raise
                    # Its node's signaling process died and the node redialled another one
                    # meanwhile: ask once more where the relay is now.
                    again, _ = await self._relay_for(principal, consultation_id)
                    if again is relay:
                        raise
                    relay = again
                    resumed = bool(await self._call(
                        "resume", consultation_id, relay.resume(consultation_id, principal.id)))
            if not resumed:
                await self._call("join", consultation_id,
                                 relay.join(consultation_id, principal.id))
        except BaseException:
            # Back to the connection bound before, unless another join bound one meanwhile.
            await self._live.set_media_sid(consultation_id, principal.id, before, expected=sid)
            raise
        logger.info("media of %s %s %s on relay %s", principal.id,
                    "resumed in" if resumed else "joined", consultation_id, relay.info.id)
        return {"resumed": resumed, "relay": relay.info.to_wire(), **self._ice(principal)}

    def _ice(self, principal: Principal) -> dict[str, Any]:
        """How the client's peer connections reach the relay: the configured ICE servers,
        the TURN server with credentials fresh for this join, and the transport policy."""
        servers: list[dict[str, Any]] = [dict(s) for s in self._client_ice_servers]
        credentials = self.turn.issue(principal.id)
        if credentials is not None:
            servers.append(credentials.ice_server())
        return {"ice_servers": servers, "ice_transport_policy": self.turn.policy(principal),
                "turn_expires_at": credentials.expires_at if credentials else None}

    async def _before_join(self, principal: Principal, consultation_id: str) -> Relay:
        """The consultation's relay, for a clinician who may join it (not necessarily joined
        yet: the pre-call check runs before ``consult:join``)."""
        if self._store is None:
            raise InvalidState("the pre-call network check is not available on this server")
        consultation = await self._store.get_consultation(consultation_id)
        if consultation is None:
            raise NotFound(f"no consultation {consultation_id!r}")
        if not permissions.may_join(principal, consultation):
            raise Forbidden(f"clinician {principal.id!r} may not join consultation "
                            f"{consultation_id!r}")
        if consultation.state == "ended":
            raise InvalidState(f"consultation {consultation_id!r} has ended")
        return await self._placed(consultation_id)

    async def ice_servers(self, principal: Principal, consultation_id: str) -> dict[str, Any]:
        """What ``media:join`` would hand out, for the pre-call check's probe connection:
        ICE servers with fresh TURN credentials and the transport policy."""
        await self._before_join(principal, consultation_id)
        return self._ice(principal)

    async def probe(self, principal: Principal, consultation_id: str,
                    sdp: str) -> dict[str, Any]:
        """The pre-call check's network probe: the client's data-channel-only offer answered
        by the consultation's relay (relay/probe.py)."""
        relay = await self._before_join(principal, consultation_id)
        answer: dict[str, Any] = await self._call(
            "probe", consultation_id, relay.probe(consultation_id, principal.id, sdp))
        logger.info("network probe of %s answered by relay %s for %s", principal.id,
                    relay.info.id, consultation_id)
        return answer

    async def _session_relay(self, principal: Principal, sid: str,
                             consultation_id: str) -> Relay:
        relay, participant = await self._relay_for(principal, consultation_id)
        if participant.media_sid != sid:
            raise InvalidState(f"send media:join for {consultation_id!r} on this connection "
                               "first")
        return relay

    async def publish(self, principal: Principal, sid: str, consultation_id: str, sdp: str,
                      sources: dict[str, str]) -> dict[str, Any]:
        relay = await self._session_relay(principal, sid, consultation_id)
        result: dict[str, Any] = await self._call(
            "publish", consultation_id,
            relay.publish(consultation_id, principal.id, sdp, sources))
        return result

    async def unpublish(self, principal: Principal, sid: str, consultation_id: str,
                        source: str) -> dict[str, Any]:
        relay = await self._session_relay(principal, sid, consultation_id)
        await self._call("unpublish", consultation_id,
                         relay.unpublish(consultation_id, principal.id, source))
        return {}

    async def subscribe(self, principal: Principal, sid: str,
                        consultation_id: str) -> dict[str, Any]:
        relay = await self._session_relay(principal, sid, consultation_id)
        result: dict[str, Any] = await self._call(
            "subscribe", consultation_id, relay.subscribe(consultation_id, principal.id))
        return result

    async def answer(self, principal: Principal, sid: str, consultation_id: str,
                     transport_id: str, sdp: str) -> dict[str, Any]:
        relay = await self._session_relay(principal, sid, consultation_id)
        await self._call("answer", consultation_id,
                         relay.answer(consultation_id, principal.id, transport_id, sdp))
        return {}

    async def ice(self, principal: Principal, sid: str, consultation_id: str,
                  transport_id: str, candidate: dict[str, Any]) -> dict[str, Any]:
        relay = await self._session_relay(principal, sid, consultation_id)
        await self._call("ice", consultation_id, relay.add_ice_candidate(
            consultation_id, principal.id, transport_id, candidate))
        return {}

    async def mode(self, principal: Principal, sid: str, consultation_id: str,
                   audio_only: bool) -> dict[str, Any]:
        relay = await self._session_relay(principal, sid, consultation_id)
        await self._call("mode", consultation_id,
                         relay.set_audio_only(consultation_id, principal.id, audio_only))
        return {"audio_only": audio_only}

    async def leave(self, consultation_id: str, clinician_id: str) -> None:
        """The participant left the consultation (or its grace period ran out): their media
        session went with them from the live store."""
        try:
            relay = await self._relays.locate(consultation_id)
        except Exception as exc:
            # A fleet's registry away (Redis): the relay drops the participant at the Room's
            # close; the grace timer that calls this must go on.
            logger.warning("media leave of %s in %s: the consultation's relay could not be "
                           "read (%s)", clinician_id, consultation_id, type(exc).__name__)
            return
        if relay is not None:
            try:
                # Bounded: a relay node that went silent must not hold up the timers that
                # call this (the reconnect grace); the sweep takes such a node out.
                async with asyncio.timeout(LEAVE_TIMEOUT_S):
                    await relay.leave(consultation_id, clinician_id)
            except (RelayError, TimeoutError) as exc:
                logger.info("media leave of %s in %s: %s", clinician_id, consultation_id,
                            getattr(exc, "code", "timeout"))

    async def session_of(self, consultation_id: str, clinician_id: str) -> str | None:
        """The connection that carries the participant's media, on any process."""
        participant = await self._live.get_participant(consultation_id, clinician_id)
        return None if participant is None else participant.media_sid

    async def unbind(self, consultation_id: str) -> None:
        """The consultation's media sessions end (its relay changed, or it ended): each
        participant sends ``media:join`` again before any other media step."""
        for participant in await self._live.participants(consultation_id):
            if participant.media_sid is not None:
                await self._live.set_media_sid(consultation_id, participant.clinician_id,
                                               None, expected=participant.media_sid)


class MediaEvents:
    """RelayEvents that pass what relays say on to the clients."""

    def __init__(self, media: Media, notifier: Notifier) -> None:
        self._media = media
        self._notifier = notifier

    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        sid = await self._media.session_of(room_id, participant_id)
        if sid is not None:
            await self._notifier.emit("media:offer", {"consultation_id": room_id, **offer}, sid)

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        await self._notifier.emit(
            "media:publication",
            {"consultation_id": room_id, "event": event, "publication": publication},
            consultation_audience(room_id),
        )

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        sid = await self._media.session_of(room_id, participant_id)
        if sid is not None:
            await self._notifier.emit("media:notice", {"consultation_id": room_id, **notice},
                                      sid)
