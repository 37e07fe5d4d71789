"""Recording in a fleet: the recorder of the process the consultation's media reaches.

A relay node streams a recorded room's packets up its own socket.io connection
(``relay:media``), so only the ``serve`` process that node is connected to can write the
files. ``FleetRecorder`` is what ``RecordingControl`` talks to in a fleet: every event of a
consultation's recording (a join, a leave, a consent, the host's start or stop, the end, a
relay change) is carried out by that process's ``Recorder``, whichever process heard it:
directly when it is this one, else as a call on the fleet's bus (``recording.call``, answered
by ``recording.reply``).

Who holds a consultation's recording is written in Redis (``P recording:<id>``, the holder's
instance id). Each event, under the consultation's lock (``P lock:recording:<id>``, redis-py's
``Lock``), finds the process its media reaches now (``RelayRegistry.media_owner``; a
consultation without a relay stays with its holder, or comes here when the holder is dead):
when that is not the holder, the holder hands the recording over first (``release``: its
files end, the manifest says the recording goes on) and the new one takes it (``adopt``: the
manifest read back, who is present told from the live store) before the event. The manifest is
the recording's whole memory between processes, so the fleet's processes share one archive
directory (``recording.archive_dir`` on a network filesystem; docs/fleet.md). A holder that
died mid-write leaves its marker: the taker marks those files interrupted, as a restart would.

A call that gets no answer within ``CALL_TIMEOUT_S`` (the holder froze, Redis is away) is
refused ``recording_unavailable`` (503): the client asks again; nothing is recorded without
its consent meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.exceptions import LockError, RedisError

from recorder import manifest as mf
from recorder.audit import AuditLog
from recorder.manifest import GAP_REASONS
from recorder.service import Recorder
from signaling.errors import SignalingError
from signaling.fleet import Fleet, describe
from signaling.live import LiveStore
from signaling.relay_registry import FleetRelayDirectory, RelayRegistry

logger = logging.getLogger(__name__)

CALL = "recording.call"
REPLY = "recording.reply"
CALL_TIMEOUT_S = 8.0
"""A call another process does not answer within this is refused (``recording_unavailable``).
Above a start's worst case: the relay's ``record_start`` (its command timeout) and the
manifest's first write."""
RELEASE_TIMEOUT_S = 3.0
"""A holder that does not hand over within this (killed a moment ago: Redis counts it alive
for ``signaling.live_redis.INSTANCE_TTL_S`` more) is passed over; a live one answers in
tens of ms (its files closed, one manifest write)."""
LOCK_TTL_S = 30.0
"""The consultation's lock expires after this should its holder die holding it."""
LOCK_WAIT_S = 20.0
"""An event waits this long at most for the consultation's lock (a hand-over under way)."""

# KEYS: a holder key. ARGV: this instance. The key goes only when this instance holds it.
FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Op = Literal["joined", "left", "consent", "start", "stop", "ended", "relay_changed", "here"]
PolicyOf = Callable[[str], Awaitable[str]]
"""The consultation's recording policy (the strictest of its sites')."""


class RecordingUnavailable(SignalingError):
    """The process holding the recording did not answer (frozen, or Redis away)."""

    code = "recording_unavailable"
    http_status = 503


class Handover(BaseModel):
    """Take the recording over before the event: ``release`` tells the former holder (when
    alive) why, ``present`` who is in the consultation (clinician -> site)."""

    model_config = ConfigDict(extra="forbid")

    policy: str
    present: dict[str, str]


class Call(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str
    sender: str
    id: str
    consultation_id: str
    op: Literal["joined", "left", "consent", "start", "stop", "ended", "relay_changed", "here",
                "release"]
    args: dict[str, Any]
    handover: Handover | None = None


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str
    id: str
    result: dict[str, Any] | None = None
    error: str | None = None


class FleetRecorder:
    """``RecordingControl``'s recorder in a fleet (see the module's docstring)."""

    def __init__(self, recorder: Recorder, *, fleet: Fleet, registry: RelayRegistry,
                 relays: FleetRelayDirectory, live: LiveStore, policy_of: PolicyOf) -> None:
        self.recorder = recorder
        self.audit: AuditLog = recorder.audit
        self.instance_id = fleet.instance_id
        self._fleet = fleet
        self._registry = registry
        self._redis = registry.client
        self._prefix = registry.prefix
        self._relays = relays
        self._live = live
        self._policy_of = policy_of
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._forget = self._redis.register_script(FORGET)
        fleet.subscribe(CALL, self._on_call)
        fleet.subscribe(REPLY, self._on_reply)

    # -- what RecordingControl asks ----------------------------------------------------------
    async def joined(self, consultation_id: str, policy: str, clinician_id: str,
                     site_id: str) -> dict[str, Any]:
        return await self._event(consultation_id, "joined", {
            "policy": policy, "clinician_id": clinician_id, "site_id": site_id})

    async def left(self, consultation_id: str, clinician_id: str) -> None:
        await self._event(consultation_id, "left", {"clinician_id": clinician_id})

    async def consent(self, consultation_id: str, clinician_id: str,
                      agree: bool) -> dict[str, Any]:
        return await self._event(consultation_id, "consent",
                                 {"clinician_id": clinician_id, "agree": agree})

    async def start(self, consultation_id: str, by: str) -> dict[str, Any]:
        return await self._event(consultation_id, "start", {"by": by})

    async def stop(self, consultation_id: str, by: str) -> dict[str, Any]:
        return await self._event(consultation_id, "stop", {"by": by})

    async def ended(self, consultation_id: str) -> None:
        await self._event(consultation_id, "ended", {})
        with contextlib.suppress(RedisError):
            await self._redis.delete(self._holder_key(consultation_id))

    async def relay_changed(self, consultation_id: str, *, lost_at: float | None = None,
                            reason: mf.GapReason = "relay_lost") -> None:
        await self._event(consultation_id, "relay_changed",
                          {"lost_at": lost_at, "reason": reason})

    async def media_here(self, consultation_id: str) -> None:
        """A relay node connected here says it carries the consultation (``relay:hello``
        after its former process died): the recording comes here, in a task of its own (the
        hello is answered under placement's lock, which a hand-over must not hold up)."""
        self._spawn(self._here(consultation_id))

    async def _here(self, consultation_id: str) -> None:
        try:
            await self._event(consultation_id, "here", {})
        except SignalingError as exc:
            logger.warning("recording %s: did not follow its relay here (%s); it does at "
                           "its next event", consultation_id, exc.code)

    def manifest_of(self, consultation_id: str) -> mf.Manifest | None:
        """From the shared archive: whoever holds the recording wrote it there."""
        path = self.manifest_path(consultation_id)
        return mf.load(path) if path.exists() else None

    def manifest_path(self, consultation_id: str) -> Path:
        return self.recorder.manifest_path(consultation_id)

    # -- routing -------------------------------------------------------------------------------
    def _holder_key(self, consultation_id: str) -> str:
        return f"{self._prefix}recording:{consultation_id}"

    @contextlib.asynccontextmanager
    async def _locked(self, consultation_id: str) -> AsyncIterator[None]:
        """This process's lock first (its own events queue without asking Redis), then the
        fleet's."""
        local = self._locks.setdefault(consultation_id, asyncio.Lock())
        try:
            async with local:
                lock = self._redis.lock(f"{self._prefix}lock:recording:{consultation_id}",
                                        timeout=LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S)
                try:
                    acquired = await lock.acquire()
                except (RedisError, OSError) as exc:
                    raise RecordingUnavailable(
                        f"the recording of {consultation_id!r} cannot be reached now "
                        f"({type(exc).__name__}); try again") from exc
                if not acquired:
                    raise RecordingUnavailable(
                        f"the recording of {consultation_id!r} is busy (a hand-over between "
                        "signaling processes); try again")
                try:
                    yield
                finally:
                    with contextlib.suppress(LockError, RedisError, OSError):
                        await lock.release()
        finally:
            if not local.locked() and self._locks.get(consultation_id) is local:
                del self._locks[consultation_id]

    async def _event(self, consultation_id: str, op: Op,
                     args: dict[str, Any]) -> dict[str, Any]:
        async with self._locked(consultation_id):
            try:
                owner = await self._registry.media_owner(consultation_id)
                if owner is not None and owner != self.instance_id \
                        and not await self._registry.alive(owner):
                    owner = None  # its relay's process died: the relay redials elsewhere
                raw = await self._redis.get(self._holder_key(consultation_id))
                holder = raw.decode() if isinstance(raw, bytes) else raw
                holder_alive = holder is not None and (
                    holder == self.instance_id or holder == owner
                    or await self._registry.alive(holder))
            except (RedisError, OSError) as exc:
                raise RecordingUnavailable(
                    f"the recording of {consultation_id!r} cannot be reached now "
                    f"({type(exc).__name__}); try again") from exc
            target = owner or (holder if holder_alive and holder else self.instance_id)
            handover: Handover | None = None
            if holder != target:
                if holder is not None and holder_alive:
                    reason = str(args.get("reason") or "relay_lost")
                    try:
                        await self._call(holder, consultation_id, "release",
                                         {"reason": reason, "at": args.get("lost_at")},
                                         wait_s=RELEASE_TIMEOUT_S)
                    except RecordingUnavailable:
                        # Killed a moment ago (it heartbeats for ``INSTANCE_TTL_S`` more in
                        # Redis's eyes): the media reaches it no more anyway; its marker
                        # tells the taker what it left.
                        logger.warning("recording %s: %s did not hand it over; taken "
                                       "without", consultation_id, holder)
                present = {p.clinician_id: p.site_id
                           for p in await self._live.participants(consultation_id)}
                handover = Handover(policy=await self._policy_of(consultation_id),
                                    present=present)
                await self._redis.set(self._holder_key(consultation_id), target)
                logger.info("recording %s: held by %s from now (was %s)", consultation_id,
                            target, holder or "nobody")
            return await self._call(target, consultation_id, op, args, handover)

    async def _call(self, target: str, consultation_id: str, op: str, args: dict[str, Any],
                    handover: Handover | None = None, *,
                    wait_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        if target == self.instance_id:
            return await self._carry_out(consultation_id, op, args, handover)
        call = Call(to=target, sender=self.instance_id, id=uuid.uuid4().hex,
                    consultation_id=consultation_id, op=op,  # type: ignore[arg-type]
                    args=args, handover=handover)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[call.id] = future
        try:
            await self._fleet.publish(CALL, call.model_dump(mode="json"))
            reply = await asyncio.wait_for(future, wait_s)
        except TimeoutError as exc:
            logger.warning("recording %s: %s at %s got no answer within %.0f s",
                           consultation_id, op, target, wait_s)
            raise RecordingUnavailable(
                f"the signaling process recording {consultation_id!r} did not answer; "
                "try again") from exc
        finally:
            self._waiting.pop(call.id, None)
        if reply.error is not None:
            raise RecordingUnavailable(f"the recording of {consultation_id!r}: {reply.error}")
        return reply.result or {}

    # -- carrying out, here ---------------------------------------------------------------------
    async def _carry_out(self, consultation_id: str, op: str, args: dict[str, Any],
                         handover: Handover | None) -> dict[str, Any]:
        recorder = self.recorder
        if op == "release":
            await recorder.release(consultation_id, reason=_gap_reason(args.get("reason")),
                                   at=args.get("at"))
            return {}
        # The recorder finds the consultation's relay in this process's view.
        await self._relays.locate(consultation_id)
        if handover is not None:
            state = await recorder.adopt(consultation_id, handover.policy, handover.present)
            if op == "here":
                return state
        if op == "joined":
            return await recorder.joined(consultation_id, str(args["policy"]),
                                         str(args["clinician_id"]), str(args["site_id"]))
        if op == "left":
            await recorder.left(consultation_id, str(args["clinician_id"]))
        elif op == "consent":
            return await recorder.consent(consultation_id, str(args["clinician_id"]),
                                          bool(args["agree"]))
        elif op == "start":
            return await recorder.start(consultation_id, str(args["by"]))
        elif op == "stop":
            return await recorder.stop(consultation_id, str(args["by"]))
        elif op == "ended":
            await recorder.ended(consultation_id)
        elif op == "relay_changed":
            lost_at = args.get("lost_at")
            await recorder.relay_changed(
                consultation_id, lost_at=float(lost_at) if lost_at is not None else None,
                reason=_gap_reason(args.get("reason")))
        return recorder.state(consultation_id)

    async def _on_call(self, data: dict[str, Any]) -> None:
        if data.get("to") != self.instance_id:
            return
        try:
            call = Call.model_validate(data)
        except ValidationError as exc:
            logger.warning("recording: a malformed call dropped (%s)", describe(exc))
            return
        # Its own task: the bus goes on delivering (replies to this process's own calls too).
        self._spawn(self._answer(call))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """A task of this recorder's, awaited (bounded) at ``close``."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, call: Call) -> None:
        reply = Reply(to=call.sender, id=call.id)
        try:
            reply.result = await self._carry_out(call.consultation_id, call.op, call.args,
                                                 call.handover)
        except Exception as exc:
            logger.exception("recording %s: %s for %s failed", call.consultation_id, call.op,
                             call.sender)
            reply.error = f"{type(exc).__name__} at {self.instance_id}"
        await self._fleet.publish(REPLY, reply.model_dump(mode="json"))

    async def _on_reply(self, data: dict[str, Any]) -> None:
        if data.get("to") != self.instance_id:
            return
        try:
            reply = Reply.model_validate(data)
        except ValidationError as exc:
            logger.warning("recording: a malformed reply dropped (%s)", describe(exc))
            return
        future = self._waiting.get(reply.id)
        if future is not None and not future.done():
            future.set_result(reply)

    async def close(self) -> None:
        """The process stops: calls being answered finish, the recorder closes (each
        recording it held marked ``interrupted`` in its manifest), then this process lets go
        of them in Redis, so that the process their relay dials next takes them at once
        rather than asking this one."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CALL_TIMEOUT_S)
        held = self.recorder.consultations()
        await self.recorder.close()
        for consultation_id in held:
            with contextlib.suppress(RedisError, OSError):
                await self._forget(keys=[self._holder_key(consultation_id)],
                                   args=[self.instance_id])


def _gap_reason(value: object) -> mf.GapReason:
    return next((r for r in GAP_REASONS if r == value), "relay_lost")
