"""Consult requests and pairing: request, cancel, accept (atomic claim), escalation, expiry.

In a fleet (signaling/fleet.py) every member keeps its own index of the waiting requests
(``ConsultQueue``): after each write to the shared store, the member that wrote says so on
the bus (``queue`` {action: added | removed | escalated, request}); the others apply it to
their index, and ``resync`` (every ``fleet.RESYNC_S`` and when the bus is back) heals what the
bus lost. Clients are told by the member that wrote (socket.io's Redis manager carries its
emits to every member's sockets), never again by the members that apply. The store decides
every race (a claim, a finish, an escalation is written once), and only the member leading
the timers runs ``tick``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from config.settings import QueueSettings
from signaling import permissions
from signaling.directory import Directory
from signaling.errors import (
    AlreadyTaken,
    Forbidden,
    InvalidPayload,
    InvalidState,
    NotFound,
    TooManyRequests,
)
from signaling.fleet import Fleet, LocalFleet, describe
from signaling.metrics import Metrics
from signaling.models import Consultation, ConsultRequest, Priority, RequestStatus
from signaling.notify import (
    CENTRAL_SPECIALISTS,
    COORDINATORS,
    Notifier,
    clinician_audience,
    specialty_audience,
)
from signaling.placement import RelayDirectory
from signaling.queue import ConsultQueue
from signaling.store import RecordStore
from signaling.tokens import Principal

logger = logging.getLogger(__name__)

EXPIRED_MESSAGE = (
    "No specialist accepted this request in time; it has expired. Please call the "
    "coordination desk or send a new request."
)


QUEUE_MESSAGE = "queue"
"""The fleet's message kind for changes of the waiting requests."""
GONE_REMEMBERED = 4096
"""Requests that left the queue remembered (newest last), with the status they left in when
known: a late ``added`` about one of them (sent by another member before it was accepted here)
is ignored, and a late accept of one is answered without reading the store."""
LEFT_FOR_GOOD = ("accepted", "closed", "cancelled", "expired")
"""Statuses a request never leaves for ``waiting`` again (the store only moves it forward)."""
BUS_BACK_TELL_S = 5.0
"""After the fleet's bus is back, clients are told to read the queue again this much later:
python-socketio's Redis listener redials on its own back-off (1 s, then doubling), and emits
of other members until it is back are lost too (about 2 s after a 1 s Redis restart in
tests/signaling/test_fleet_nodes.py)."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RequestWire(BaseModel):
    """``ConsultRequest.to_wire()`` as another member sent it. Fields a newer member adds are
    ignored (members of two versions meet during a rolling upgrade)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    site_id: str
    requester_id: str
    specialty: str
    priority: Priority
    reason: str
    patient_pseudonym: str | None
    status: RequestStatus
    created_at: float
    escalated: bool
    accepted_by: str | None = None
    accepted_at: float | None = None
    consultation_id: str | None = None
    closed_at: float | None = None


class QueueChange(BaseModel):
    """The ``queue`` message: what a member wrote to the store about one request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["added", "removed", "escalated"]
    request: RequestWire
    escalated_at: float | None = None
    """The wire says only whether; the index keeps when."""
    position: int | None = None
    """``added``: the position its requester was told in the ack."""

    def to_request(self) -> ConsultRequest:
        wire = self.request
        escalated_at = self.escalated_at
        if escalated_at is None and wire.escalated:
            escalated_at = wire.created_at
        return ConsultRequest(
            id=wire.id, site_id=wire.site_id, requester_id=wire.requester_id,
            specialty=wire.specialty, priority=wire.priority, reason=wire.reason,
            patient_pseudonym=wire.patient_pseudonym, status=wire.status,
            created_at=wire.created_at, escalated_at=escalated_at,
            accepted_by=wire.accepted_by, accepted_at=wire.accepted_at,
            consultation_id=wire.consultation_id, closed_at=wire.closed_at)


class Pairing:
    def __init__(self, *, store: RecordStore, queue: ConsultQueue, directory: Directory,
                 relays: RelayDirectory, notifier: Notifier, metrics: Metrics,
                 settings: QueueSettings, fleet: Fleet | None = None) -> None:
        self._store = store
        self._queue = queue
        self._directory = directory
        self._relays = relays
        self._notifier = notifier
        self._metrics = metrics
        self._settings = settings
        self._creating: dict[str, int] = {}
        """Requests of each clinician being written to the store now."""
        self._claims: dict[str, asyncio.Future[None]] = {}
        """Claims under way in this process, by request: later accepts wait for the first."""
        self._moved: set[str] = set()
        """Specialties whose lane changed since the last tick: positions to tell."""
        self._told: dict[str, int] = {}
        """The position last told to each waiting request's requester."""
        self._gone: OrderedDict[str, str | None] = OrderedDict()
        """Requests that left the queue lately (``GONE_REMEMBERED`` at most): the status
        they left in, None when not known (the store said only "not waiting")."""
        self._touched: set[str] | None = None
        """While ``resync`` reads the store: the requests changed meanwhile (left alone)."""
        self._resyncing = asyncio.Lock()
        self._next_resync: asyncio.Future[int] | None = None
        """The resync the callers of ``fresh`` arriving now share (it starts after them)."""
        self._fleet: Fleet = fleet if fleet is not None else LocalFleet()
        self._fleet.subscribe(QUEUE_MESSAGE, self._apply)
        self._fleet.on_resync(self.resync)
        self._fleet.on_bus_back(self.bus_back)
        self._bus_back: asyncio.Task[None] | None = None

    async def restore(self) -> int:
        """Rebuild the queue from the store after a start or restart."""
        for request in await self._store.waiting_requests():
            self._queue.add(request)
        self._metrics.set_queue(self._queue.counts_by_priority())
        return len(self._queue)

    # -- audiences -----------------------------------------------------------------------
    def _audience(self, request: ConsultRequest) -> list[str]:
        audiences = [specialty_audience(request.specialty), COORDINATORS]
        if request.escalated_at is not None:
            audiences.append(CENTRAL_SPECIALISTS)
        return audiences

    async def _queue_changed(self, action: str, request: ConsultRequest) -> None:
        await self._notifier.emit(
            "queue:update", {"action": action, "request": request.to_wire()},
            self._audience(request),
        )
        self._metrics.set_queue(self._queue.counts_by_priority())

    async def _tell_requester(self, request: ConsultRequest, **extra: Any) -> None:
        position = self._queue.position(request.id)
        if position is None:
            self._told.pop(request.id, None)
        else:
            self._told[request.id] = position
        payload = {"request": request.to_wire(), "position": position}
        payload.update(extra)
        await self._notifier.emit("request:update", payload,
                                  clinician_audience(request.requester_id))

    def _lane_moved(self, request: ConsultRequest) -> None:
        """``request`` arrived in or left its lane: the positions behind it moved. They are
        told at the next tick (``tell_positions``), at most once per request per tick."""
        self._moved.add(request.specialty)

    # -- the index: this member's writes, the other members' messages, resync -------------
    def _index(self, request: ConsultRequest) -> None:
        if request.id in self._gone:
            return  # Left the queue already (accepted on another member meanwhile).
        if self._touched is not None:
            self._touched.add(request.id)
        self._queue.add(request)

    def _forget(self, request_id: str, status: str | None = None) -> ConsultRequest | None:
        """``request_id`` left the queue (here or on another member), in ``status`` when
        known."""
        if self._touched is not None:
            self._touched.add(request_id)
        self._gone[request_id] = status if status in LEFT_FOR_GOOD else None
        self._gone.move_to_end(request_id)
        while len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)
        self._told.pop(request_id, None)
        removed = self._queue.remove(request_id)
        if removed is not None:
            self._lane_moved(removed)
        return removed

    async def _say(self, action: str, request: ConsultRequest, **extra: Any) -> None:
        """Tell the other members what this one just wrote to the store."""
        await self._fleet.publish(QUEUE_MESSAGE, {
            "action": action, "request": request.to_wire(),
            "escalated_at": request.escalated_at, **extra})

    async def _apply(self, data: dict[str, Any]) -> None:
        """Another member's ``queue`` message: this member's index follows (nobody is told
        here: the member that wrote told the clients)."""
        try:
            change = QueueChange.model_validate(data)
        except ValidationError as exc:
            logger.warning("fleet: a malformed queue message dropped (%s)", describe(exc))
            return
        request = change.to_request()
        if change.action == "removed":
            self._forget(request.id, request.status)
        elif request.id in self._gone:
            pass  # It left here first (this member accepted it, or heard so before).
        elif change.action == "added":
            if request.id not in self._queue:
                self._index(request)
                self._lane_moved(request)
            if change.position is not None:
                # What its writer told in the ack, even when a resync here read the request
                # from the store before this message came (else the leader's next tick tells
                # the requester the same place again). A place this member told since stays.
                self._told.setdefault(request.id, change.position)
        else:  # escalated
            known = self._queue.get(request.id)
            if known is None:
                self._index(request)
                self._lane_moved(request)
            elif known.escalated_at is None:
                known.escalated_at = request.escalated_at
        self._metrics.set_queue(self._queue.counts_by_priority())

    async def resync(self) -> int:
        """Make the index what the store says is waiting: the requests missing are added,
        those no longer waiting dropped, escalations copied; a request changed while the store
        was read is left as it is now. Returns how many were corrected."""
        async with self._resyncing:
            return await self._resync_locked()

    async def bus_back(self) -> None:
        """The fleet's bus is back after a loss of Redis: socket.io's Redis manager lost the
        other members' emits too (its listener dials again on its own back-off), so this
        process's specialists and coordinators may have missed queue changes. Once that
        listener is surely back (``BUS_BACK_TELL_S``), the queue is read again and they are
        told to read theirs (``queue:update {action: "resync"}``, to this process's
        connections only: every member tells its own)."""
        if self._bus_back is None or self._bus_back.done():
            self._bus_back = asyncio.ensure_future(self._tell_after_bus_back())

    async def _tell_after_bus_back(self) -> None:
        await asyncio.sleep(BUS_BACK_TELL_S)
        try:
            await self.resync()
            audiences = [COORDINATORS, CENTRAL_SPECIALISTS,
                         *(specialty_audience(s) for s in sorted(self._directory.specialties()))]
            await self._notifier.emit_here("queue:update", {"action": "resync"}, audiences)
        except Exception:
            logger.exception("queue: telling clients after the bus came back failed")

    async def _resync_locked(self) -> int:
        """``resync``'s work, the lock held."""
        before = self._queue.ids()
        self._touched = set()
        try:
            stored = await self._store.waiting_requests()
        finally:
            touched, self._touched = self._touched, None
        corrected = 0
        waiting = {r.id for r in stored}
        for request in stored:
            if request.id in touched:
                continue
            known = self._queue.get(request.id)
            if known is None:
                self._queue.add(request)
                self._lane_moved(request)
                corrected += 1
            elif known.escalated_at is None and request.escalated_at is not None:
                known.escalated_at = request.escalated_at
                corrected += 1
        for request_id in before - waiting - touched:
            if self._forget(request_id) is not None:
                corrected += 1
        if corrected:
            logger.info("queue resync: %d requests corrected from the store", corrected)
            self._metrics.set_queue(self._queue.counts_by_priority())
        return corrected

    async def tell_positions(self) -> int:
        """Tell each waiting requester whose position changed since they were last told
        (one ``request:update`` per request per tick, however many changes came between);
        returns how many were told."""
        moved, self._moved = self._moved, set()
        told = 0
        for specialty in sorted(moved):
            for position, request in enumerate(self._queue.lane(specialty), start=1):
                if self._told.get(request.id) != position:
                    await self._tell_requester(request)
                    told += 1
        return told

    # -- request / cancel ----------------------------------------------------------------
    async def request(self, principal: Principal, *, specialty: str, priority: Priority,
                      reason: str, patient_pseudonym: str | None,
                      max_waiting: int | None = None) -> dict[str, Any]:
        """A new waiting request; refused ``too_many_requests`` when the clinician already
        holds ``max_waiting`` waiting ones."""
        if not permissions.may_request(principal):
            raise Forbidden(f"clinician {principal.id!r} has no 'referring' role: only "
                            "referring doctors request consultations")
        # Requests being written count too: concurrent requests must not all pass the check.
        waiting = self._queue.waiting_of(principal.id) + self._creating.get(principal.id, 0)
        if max_waiting is not None and waiting >= max_waiting:
            raise TooManyRequests(
                f"clinician {principal.id!r} already has {waiting} waiting requests; at most "
                f"{max_waiting}: cancel one or wait until one is accepted")
        offered = self._directory.specialties()
        if specialty not in offered:
            raise InvalidPayload(
                f"specialty {specialty!r} is not offered by any specialist; "
                f"known: {', '.join(sorted(offered))}"
            )
        request = ConsultRequest(
            id=new_id("req"), site_id=principal.site.id, requester_id=principal.id,
            specialty=specialty, priority=priority, reason=reason,
            patient_pseudonym=patient_pseudonym, status="waiting", created_at=time.time(),
        )
        self._creating[principal.id] = self._creating.get(principal.id, 0) + 1
        try:
            await self._store.add_request(request)
            self._index(request)
        finally:
            left = self._creating.pop(principal.id) - 1
            if left:
                self._creating[principal.id] = left
        self._metrics.requests.labels(outcome="created").inc()
        logger.info("request %s created by %s (%s, %s)", request.id, principal.id,
                    request.specialty, request.priority)
        position = self._queue.position(request.id)
        if position is not None:
            self._told[request.id] = position
        await self._say("added", request, position=position)
        await self._queue_changed("added", request)
        self._lane_moved(request)
        return {"request": request.to_wire(), "position": position}

    async def cancel(self, principal: Principal, request_id: str) -> dict[str, Any]:
        request = await self._waiting(request_id)
        if not permissions.may_cancel(principal, request):
            raise Forbidden(f"only the requester or a coordinator may cancel {request_id!r}")
        await self._finish(request, "cancelled")
        logger.info("request %s cancelled by %s", request.id, principal.id)
        return {"request": request.to_wire()}

    async def _waiting(self, request_id: str) -> ConsultRequest:
        request = self._queue.get(request_id)
        if request is not None:
            return request
        # Left the queue in a known status (the accepts that lost a race here, those that
        # heard of another member's accept): the answer the store would give, without its
        # round trip (the bench's races: 3 losers a request on a fleet, 7 on one node).
        left = self._gone.get(request_id)
        if left is not None:
            if left in ("accepted", "closed"):
                raise AlreadyTaken(f"consult request {request_id!r} was already taken")
            raise InvalidState(f"consult request {request_id!r} is {left}, not waiting")
        stored = await self._store.get_request(request_id)
        if stored is None:
            raise NotFound(f"no consult request {request_id!r}")
        if stored.status in ("accepted", "closed"):
            raise AlreadyTaken(f"consult request {request_id!r} was already taken")
        if stored.status == "waiting" and stored.id not in self._gone:
            # Made on another member, whose message has not arrived (or was lost).
            self._index(stored)
            self._lane_moved(stored)
            return stored
        raise InvalidState(f"consult request {request_id!r} is {stored.status}, not waiting")

    async def _finish(self, request: ConsultRequest, status: str, **extra: Any) -> None:
        now = time.time()
        if not await self._store.finish_request(request.id, status, now):
            # Claimed or finished meanwhile (another member): the store decides.
            self._forget(request.id)
            raise InvalidState(f"consult request {request.id!r} is no longer waiting")
        self._forget(request.id, status)
        self._lane_moved(request)
        request.status = status  # type: ignore[assignment]
        request.closed_at = now
        await self._say("removed", request)
        self._metrics.requests.labels(outcome=status).inc()
        await self._queue_changed("removed", request)
        await self._tell_requester(request, **extra)

    # -- accept --------------------------------------------------------------------------
    async def accept(self, principal: Principal, request_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        # Another accept of this request being written: wait for its outcome instead of
        # racing it to the database (the store still decides across processes).
        while (under_way := self._claims.get(request_id)) is not None:
            await asyncio.wait([under_way])
        request = await self._waiting(request_id)
        if not permissions.may_accept(principal, request):
            raise Forbidden(
                f"clinician {principal.id!r} may not accept a {request.specialty!r} request: "
                "a central specialist of that specialty or a coordinator may"
            )
        requester_site = self._directory.site(request.site_id)
        region = requester_site.region if requester_site else ""
        relay = self._relays.reserve(region)
        now = time.time()
        site_ids = [request.site_id]
        if principal.site.id not in site_ids:
            site_ids.append(principal.site.id)
        consultation = Consultation(
            id=new_id("con"), request_id=request.id, host_id=principal.id,
            relay_id=relay.info.id, state="open", created_at=now, site_ids=site_ids,
            clinician_ids=[request.requester_id, principal.id],
        )
        claim = asyncio.get_running_loop().create_future()
        self._claims[request.id] = claim
        try:
            await self._store.claim(request.id, principal.id, consultation, now)
        except BaseException:
            self._relays.unreserve(relay)
            raise
        finally:
            if self._claims.get(request.id) is claim:
                del self._claims[request.id]
            claim.set_result(None)
        self._forget(request.id, "accepted")
        self._lane_moved(request)
        request.status = "accepted"
        request.accepted_by = principal.id
        request.accepted_at = now
        request.consultation_id = consultation.id
        await self._say("removed", request)
        await self._relays.open(consultation.id, relay, region, reserved=True)
        self._metrics.requests.labels(outcome="accepted").inc()
        self._metrics.wait_seconds.labels(priority=request.priority).observe(
            now - request.created_at
        )
        self._metrics.live_consultations.inc()
        logger.info("request %s accepted by %s: consultation %s on relay %s",
                    request.id, principal.id, consultation.id, relay.info.id)
        ready = {"consultation": consultation.to_wire(), "request": request.to_wire()}
        await self._notifier.emit(
            "consult:ready", ready,
            [clinician_audience(request.requester_id), clinician_audience(principal.id)],
        )
        await self._queue_changed("removed", request)
        self._metrics.pairing_seconds.observe(time.perf_counter() - started)
        return ready

    # -- timers --------------------------------------------------------------------------
    async def tick(self, now: float | None = None) -> None:
        """Escalate and expire waiting requests whose time has come; tell the requesters
        whose positions moved. In a fleet only the member leading the timers ticks; the store
        writes each escalation and expiry once, and only the member whose write it was tells
        (a former leader's late tick says nothing twice)."""
        now = time.time() if now is None else now
        for request in self._queue.all():
            age = now - request.created_at
            if age >= self._settings.expire_after_s[request.priority]:
                try:
                    await self._finish(request, "expired", message=EXPIRED_MESSAGE)
                except InvalidState:
                    continue
                logger.info("request %s expired after %.0f s", request.id, age)
            elif (request.escalated_at is None
                  and age >= self._settings.escalate_after_s[request.priority]):
                if not await self._store.mark_escalated(request.id, now):
                    # Escalated by another member (a former leader's late tick): it told.
                    stored = await self._store.get_request(request.id)
                    request.escalated_at = now if stored is None or \
                        stored.escalated_at is None else stored.escalated_at
                    continue
                request.escalated_at = now
                logger.info("request %s escalated after %.0f s", request.id, age)
                await self._say("escalated", request)
                await self._notifier.emit(
                    "queue:escalated", {"request": request.to_wire(), "waited_s": age},
                    COORDINATORS,
                )
                await self._queue_changed("escalated", request)
                await self._tell_requester(request)
        await self.tell_positions()

    def visible_queue(self, principal: Principal) -> list[dict[str, Any]]:
        """What the clinician may accept: nothing unless a central specialist or coordinator."""
        if not permissions.may_see_queue(principal):
            return []
        requests = self._queue.visible_to(
            principal.specialties,
            everything=permissions.sees_every_request(principal),
            escalated=permissions.sees_escalated_requests(principal),
        )
        return [{**r.to_wire(), "position": self._queue.position(r.id)} for r in requests]

    async def my_requests(self, principal: Principal) -> list[dict[str, Any]]:
        """The clinician's own requests (none unless they may request)."""
        if not permissions.has_own_requests(principal):
            return []
        return [
            {**r.to_wire(), "position": self._queue.position(r.id)}
            for r in await self._store.requests_of(principal.id)
        ]

    async def queue_view(self, principal: Principal) -> dict[str, Any]:
        """``{queue, mine}``: what the clinician may accept and what they asked for. In a
        fleet the index is read again from the store first (``fresh``): the ``queue:update``
        that made the client ask may have come from another member, over another Redis
        channel than the bus message that updates this member's index."""
        if not isinstance(self._fleet, LocalFleet):
            await self.fresh()
        return {"queue": self.visible_queue(principal),
                "mine": await self.my_requests(principal)}

    async def fresh(self) -> None:
        """Return once the index holds everything written to the store before this call: a
        resync that starts after it. Callers arriving while a resync runs share the next one
        (one store read however many clients ask at once)."""
        if self._next_resync is None:
            async def run() -> int:
                async with self._resyncing:  # the running one (if any) finishes first
                    self._next_resync = None  # callers from now on need a later read
                    return await self._resync_locked()

            self._next_resync = asyncio.ensure_future(run())
        await asyncio.shield(self._next_resync)
