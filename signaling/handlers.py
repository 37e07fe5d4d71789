"""The socket.io face of signaling: authenticate connections, validate each event's payload,
call the domain, answer with an ack. Thin by design: no domain logic lives here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import socketio

from signaling import permissions
from signaling.consultations import Consultations
from signaling.errors import (
    Forbidden,
    InvalidPayload,
    RateLimited,
    SignalingError,
    Unauthenticated,
)
from signaling.limits import (
    ClinicianLimits,
    ExpiryTimers,
    LimitsUnavailable,
    LocalClinicianLimits,
)
from signaling.media import Media
from signaling.metrics import Metrics
from signaling.notify import (
    CENTRAL_SPECIALISTS,
    COORDINATORS,
    clinician_audience,
    site_audience,
    specialty_audience,
)
from signaling.pairing import Pairing
from signaling.presence import Presence
from signaling.recording import RecordingControl
from signaling.schemas import (
    Answer,
    Chat,
    Consent,
    ConsultationRef,
    Empty,
    End,
    Ice,
    Invite,
    MediaJoin,
    MediaRef,
    Mode,
    Payload,
    Probe,
    Publish,
    RequestConsult,
    RequestRef,
    TokenRefresh,
    Unpublish,
    parse,
)
from signaling.socket_server import SignalingServer
from signaling.tokens import Principal, TokenAuthority

logger = logging.getLogger(__name__)

LOG_OFF_DELAY_S = 0.2
"""How long after refusing an event for an expired token the connection is closed."""

TOKEN_EXPIRED = "token_expired"
"""The event (and its code) sent to a connection just before it is closed at its token's
expiry."""
TOO_MANY_CONNECTIONS = "too_many_connections"
SESSION_ENDED = "session:ended"
"""The event a connection gets before the server closes it for a change of the directory."""

Handler = Callable[[Principal, str, Any], Awaitable[dict[str, Any]]]


class SocketIONotifier:
    """Notifier over a python-socketio AsyncServer: an audience is a socket.io room."""

    def __init__(self, sio: socketio.AsyncServer) -> None:
        self._sio = sio

    async def emit(self, event: str, payload: dict[str, Any], to: str | list[str]) -> None:
        await self._sio.emit(event, payload, to=to)

    async def emit_here(self, event: str, payload: dict[str, Any],
                        to: str | list[str]) -> None:
        await self._sio.emit(event, payload, to=to, ignore_queue=True)

    async def enter(self, sid: str, audience: str) -> None:
        await self._sio.enter_room(sid, audience)

    async def leave(self, sid: str, audience: str) -> None:
        await self._sio.leave_room(sid, audience)

    async def close(self, audience: str) -> None:
        await self._sio.close_room(audience)


class SocketGateway:
    """Binds the domain services to socket.io events (see docs/protocol.md)."""

    def __init__(self, sio: SignalingServer, *, tokens: TokenAuthority,
                 pairing: Pairing, consultations: Consultations, presence: Presence,
                 media: Media, metrics: Metrics, recording: RecordingControl,
                 clinician_limits: ClinicianLimits | None = None) -> None:
        self._sio = sio
        self._tokens = tokens
        self._pairing = pairing
        self._consultations = consultations
        self._presence = presence
        self._media = media
        self._metrics = metrics
        self._recording = recording
        self._principals: dict[str, Principal] = {}
        self._connections: dict[str, set[str]] = {}
        """Clinician id -> their open connections (``limits.connections_per_clinician``)."""
        self._limits = sio.limits
        self._clinician_limits = clinician_limits or LocalClinicianLimits(sio.limits)
        """Chat and connections per clinician: in this process, or over a fleet."""
        self._expiry = ExpiryTimers(self._token_expired)
        self._tasks: set[asyncio.Task[None]] = set()
        sio.on("connect", self._on_connect)
        sio.on("disconnect", self._on_disconnect)
        sio.on("*", self._on_unknown)
        self._route("consult:request", RequestConsult, self._request)
        self._route("consult:cancel", RequestRef, self._cancel)
        self._route("consult:accept", RequestRef, self._accept)
        self._route("queue:get", Empty, self._queue)
        self._route("consult:join", ConsultationRef, self._join)
        self._route("consult:leave", ConsultationRef, self._leave)
        self._route("consult:invite", Invite, self._invite)
        self._route("chat:send", Chat, self._chat)
        self._route("consult:end", End, self._end)
        self._route("presence:list", Empty, self._presence_list)
        self._route("media:join", MediaJoin, self._media_join)
        self._route("media:publish", Publish, self._media_publish)
        self._route("media:unpublish", Unpublish, self._media_unpublish)
        self._route("media:subscribe", MediaRef, self._media_subscribe)
        self._route("media:answer", Answer, self._media_answer)
        self._route("media:ice", Ice, self._media_ice)
        self._route("media:mode", Mode, self._media_mode)
        self._route("media:ice_servers", MediaRef, self._media_ice_servers)
        self._route("media:probe", Probe, self._media_probe)
        self._route("recording:consent", Consent, self._recording_consent)
        self._route("recording:start", ConsultationRef, self._recording_start)
        self._route("recording:stop", ConsultationRef, self._recording_stop)
        self._route("auth:refresh", TokenRefresh, self._auth_refresh)

    # -- connection ------------------------------------------------------------------------
    async def _on_connect(self, sid: str, _environ: dict[str, Any], auth: Any = None) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            principal = self._tokens.verify(token)
        except Unauthenticated as exc:
            logger.info("connection %s refused: %s", sid, exc.code)
            raise socketio.exceptions.ConnectionRefusedError(
                exc.message, {"code": exc.code, "message": exc.message}
            ) from None
        open_here = len(self._connections.get(principal.id, ()))
        try:
            admitted, count = await self._clinician_limits.admit_connection(
                principal.id, sid, open_here)
        except LimitsUnavailable as exc:
            logger.info("connection %s refused: %s (%s)", sid, exc.code, principal.id)
            raise socketio.exceptions.ConnectionRefusedError(
                exc.message, {"code": exc.code, "message": exc.message}) from None
        if not admitted:
            message = (f"clinician {principal.id!r} already has {count} open "
                       f"connections; at most {self._limits.connections_per_clinician}")
            logger.info("connection %s refused: %s (%s)", sid, TOO_MANY_CONNECTIONS,
                        principal.id)
            raise socketio.exceptions.ConnectionRefusedError(
                message, {"code": TOO_MANY_CONNECTIONS, "message": message})
        # Looked up again: a fleet's admission awaited Redis, meanwhile the clinician's
        # last connection here may have closed and taken the set away.
        self._connections.setdefault(principal.id, set()).add(sid)
        self._principals[sid] = principal
        try:
            self._expiry.start(sid, principal.expires_at)
            for audience in self._audiences_of(principal):
                await self._sio.enter_room(sid, audience)
            await self._presence.connected(sid, principal)
            await self._consultations.connection_made(sid, principal)
        except BaseException:
            # Not connected after all (socket.io sends no disconnect for it): its place goes.
            await self._forget_connection(sid, principal)
            raise
        logger.info("connection %s: clinician %s of site %s", sid, principal.id,
                    principal.site.id)

    @staticmethod
    def _audiences_of(principal: Principal) -> list[str]:
        """The audiences a connection joins: its clinician and site, coordinators, and for a
        central specialist the queue lanes it sees (``signaling.permissions``)."""
        audiences = [clinician_audience(principal.id), site_audience(principal.site.id)]
        if principal.has("coordinator"):
            audiences.append(COORDINATORS)
        if permissions.is_central_specialist(principal):
            audiences.append(CENTRAL_SPECIALISTS)
            audiences += [specialty_audience(s) for s in principal.specialties]
        return audiences

    async def _on_disconnect(self, sid: str, reason: Any = None) -> None:
        principal = self._principals.pop(sid, None)
        if principal is None:
            return
        await self._forget_connection(sid, principal)
        try:
            await self._presence.disconnected(sid)
            await self._consultations.connection_lost(sid, principal.id)
        except Exception:
            logger.exception("connection %s: cleanup after disconnect failed", sid)
        logger.info("connection %s closed (%s)", sid, reason)

    async def _forget_connection(self, sid: str, principal: Principal) -> None:
        """``sid`` no longer counts among its clinician's connections."""
        self._principals.pop(sid, None)
        self._expiry.cancel(sid)
        open_ones = self._connections.get(principal.id)
        if open_ones is not None:
            open_ones.discard(sid)
            if not open_ones:
                del self._connections[principal.id]
        try:
            await self._clinician_limits.release_connection(principal.id, sid)
        except Exception:
            logger.exception("connection %s: releasing its place among %s's connections "
                             "failed", sid, principal.id)

    async def end_sessions(self, clinician_ids: Collection[str], code: str,
                           message: str) -> int:
        """Tell every open connection of these clinicians ``session:ended`` ``{code,
        message}`` and close it (the directory no longer lets them in, or changed their
        grants); how many were closed."""
        sids = [sid for cid in clinician_ids for sid in self._connections.get(cid, ())]
        for sid in sids:
            logger.info("connection %s: session ended (%s); closing it", sid, code)
            await self._sio.emit(SESSION_ENDED, {"code": code, "message": message}, to=sid)
            await self._sio.close_connection(sid)
        return len(sids)

    def online(self, clinician_id: str) -> bool:
        return bool(self._connections.get(clinician_id))

    def extend(self, sid: str, expires_at: float) -> bool:
        """A refreshed access token for connection ``sid``: it is closed at ``expires_at``
        instead (Unix seconds). False when ``sid`` is not an open, signed-in connection."""
        principal = self._principals.get(sid)
        if principal is None or not self._expiry.extend(sid, expires_at):
            return False
        self._principals[sid] = dataclasses.replace(principal, expires_at=expires_at)
        logger.info("connection %s: token extended", sid)
        return True

    async def _token_expired(self, sid: str) -> None:
        """The connection's token expired: tell it, then close it (its timer fired)."""
        if sid not in self._principals:
            return
        logger.info("connection %s: token expired; closing it", sid)
        await self._sio.emit(TOKEN_EXPIRED, {
            "code": TOKEN_EXPIRED,
            "message": "the access token has expired; sign in again"}, to=sid)
        await self._sio.close_connection(sid)

    def _log_off_soon(self, sid: str) -> None:
        """Close a connection whose token expired, once the refusal's ack has gone out."""

        async def log_off() -> None:
            await asyncio.sleep(LOG_OFF_DELAY_S)
            await self._sio.close_connection(sid)

        task = asyncio.create_task(log_off(), name=f"log-off-{sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_unknown(self, event: str, sid: str, *args: Any) -> dict[str, Any]:
        logger.info("connection %s: unknown event %r", sid, event[:64])
        self._metrics.rejected_events.labels(event="unknown", code="unknown_event").inc()
        return {"error": {"code": "unknown_event",
                          "message": f"unknown event {event[:64]!r}; see docs/protocol.md"}}

    # -- dispatch ----------------------------------------------------------------------------
    def _route(self, event: str, model: type[Payload],
               handler: Callable[[Principal, str, Any], Awaitable[dict[str, Any]]]) -> None:
        async def dispatch(sid: str, *args: Any) -> dict[str, Any]:
            return await self._dispatch(event, model, handler, sid, args)

        self._sio.on(event, dispatch)

    async def _dispatch(self, event: str, model: type[Payload], handler: Handler, sid: str,
                        args: tuple[Any, ...]) -> dict[str, Any]:
        principal = self._principals.get(sid)
        try:
            if principal is None:
                raise Unauthenticated("this connection is not signed in")
            if principal.expires_at <= time.time():
                self._log_off_soon(sid)
                raise Unauthenticated("the access token has expired; sign in again",
                                      code="token_expired")
            if len(args) > 1:
                raise InvalidPayload(
                    f"event {event!r} takes one payload object, got {len(args)} arguments"
                )
            payload = parse(model, args[0] if args else None)
            result = await handler(principal, sid, payload)
        except SignalingError as exc:
            who = principal.id if principal else "-"
            logger.info("event %s from %s (%s) refused: %s", event, sid, who, exc.code)
            self._metrics.rejected_events.labels(event=event, code=exc.code).inc()
            return exc.to_wire()
        except Exception:
            logger.exception("event %s from %s failed", event, sid)
            self._metrics.rejected_events.labels(event=event, code="internal").inc()
            return {"error": {"code": "internal", "message": "internal error; the event was "
                              "not applied, please retry"}}
        return {"ok": True, **result}

    # -- events --------------------------------------------------------------------------------
    async def _request(self, p: Principal, sid: str, m: RequestConsult) -> dict[str, Any]:
        return await self._pairing.request(
            p, specialty=m.specialty, priority=m.priority, reason=m.reason,
            patient_pseudonym=m.patient_pseudonym,
            max_waiting=self._limits.waiting_requests_per_clinician)

    async def _cancel(self, p: Principal, sid: str, m: RequestRef) -> dict[str, Any]:
        return await self._pairing.cancel(p, m.request_id)

    async def _accept(self, p: Principal, sid: str, m: RequestRef) -> dict[str, Any]:
        return await self._pairing.accept(p, m.request_id)

    async def _queue(self, p: Principal, sid: str, m: Empty) -> dict[str, Any]:
        return await self._pairing.queue_view(p)

    async def _join(self, p: Principal, sid: str, m: ConsultationRef) -> dict[str, Any]:
        return await self._consultations.join(p, sid, m.consultation_id)

    async def _leave(self, p: Principal, sid: str, m: ConsultationRef) -> dict[str, Any]:
        return await self._consultations.leave(p, sid, m.consultation_id)

    async def _invite(self, p: Principal, sid: str, m: Invite) -> dict[str, Any]:
        return await self._consultations.invite(p, m.consultation_id, m.site_id)

    async def _chat(self, p: Principal, sid: str, m: Chat) -> dict[str, Any]:
        if not await self._clinician_limits.admit_chat(p.id):
            what = f"more than {self._limits.chat_per_minute} chat messages a minute"
            self._sio.rate_limited(sid, what)
            raise RateLimited(f"{what}; wait a little before sending more")
        return await self._consultations.chat(p, m.consultation_id, m.text)

    async def _end(self, p: Principal, sid: str, m: End) -> dict[str, Any]:
        return await self._consultations.end(p, m.consultation_id, m.conclusion)

    async def _presence_list(self, p: Principal, sid: str, m: Empty) -> dict[str, Any]:
        return {"sites": await self._presence.snapshot()}

    async def _media_join(self, p: Principal, sid: str, m: MediaJoin) -> dict[str, Any]:
        return await self._media.join(p, sid, m.consultation_id, resume=m.resume)

    async def _media_publish(self, p: Principal, sid: str, m: Publish) -> dict[str, Any]:
        return await self._media.publish(p, sid, m.consultation_id, m.sdp, dict(m.sources))

    async def _media_unpublish(self, p: Principal, sid: str, m: Unpublish) -> dict[str, Any]:
        return await self._media.unpublish(p, sid, m.consultation_id, m.source)

    async def _media_subscribe(self, p: Principal, sid: str, m: MediaRef) -> dict[str, Any]:
        return await self._media.subscribe(p, sid, m.consultation_id)

    async def _media_answer(self, p: Principal, sid: str, m: Answer) -> dict[str, Any]:
        return await self._media.answer(p, sid, m.consultation_id, m.transport_id, m.sdp)

    async def _media_ice(self, p: Principal, sid: str, m: Ice) -> dict[str, Any]:
        candidate = m.candidate.model_dump() if m.candidate is not None else {}
        return await self._media.ice(p, sid, m.consultation_id, m.transport_id, candidate)

    async def _media_mode(self, p: Principal, sid: str, m: Mode) -> dict[str, Any]:
        return await self._media.mode(p, sid, m.consultation_id, m.audio_only)

    async def _media_ice_servers(self, p: Principal, sid: str,
                                 m: MediaRef) -> dict[str, Any]:
        return await self._media.ice_servers(p, m.consultation_id)

    async def _media_probe(self, p: Principal, sid: str, m: Probe) -> dict[str, Any]:
        return await self._media.probe(p, m.consultation_id, m.sdp)

    async def _recording_consent(self, p: Principal, sid: str, m: Consent) -> dict[str, Any]:
        return await self._recording.consent(p, m.consultation_id, m.agree)

    async def _recording_start(self, p: Principal, sid: str,
                               m: ConsultationRef) -> dict[str, Any]:
        return await self._recording.start(p, m.consultation_id)

    async def _recording_stop(self, p: Principal, sid: str,
                              m: ConsultationRef) -> dict[str, Any]:
        return await self._recording.stop(p, m.consultation_id)

    async def _auth_refresh(self, p: Principal, sid: str, m: TokenRefresh) -> dict[str, Any]:
        """A new access token of the same clinician (from ``POST /api/auth/refresh``) keeps
        this connection open past the old one's expiry: a doctor is not logged off
        mid-consultation. It must arrive before the old token expires."""
        fresh = self._tokens.verify(m.token)
        if fresh.id != p.id:
            raise Forbidden(f"the token is for clinician {fresh.id!r}; this connection is "
                            f"{p.id!r}'s")
        if not self.extend(sid, fresh.expires_at):
            raise Unauthenticated("this connection is closing", code="token_expired")
        return {"expires_at": fresh.expires_at}
