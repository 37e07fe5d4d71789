"""The fleet: what several `serve` processes on one Redis tell each other, and which of them
runs the timers.

``LocalFleet`` is one process (the default, and every deployment whose records are not
shared): it always leads the timers and its messages go nowhere. ``RedisFleet`` is one member
of a fleet (``live.backend = "redis"`` with ``storage.backend = "postgresql"``):

- a bus: every message is one PUBLISH on ``<prefix>fleet``, JSON ``{"sender", "kind",
  "data"}``, checked with pydantic on receipt (a malformed one is logged and dropped); a
  member never hears its own. Redis pub/sub is at-most-once (a member away from Redis misses
  what was said meanwhile), so whatever rides on the bus also heals by itself: the hooks
  given to ``on_resync`` run every ``RESYNC_S`` and as soon as the bus is back after a loss;
- the timers' lease: the key ``<prefix>timers`` holds the instance id of the member that runs
  the timers (escalation, expiry, queue positions, reconnect grace), taken with SET NX PX and
  renewed by a compare-and-renew script at each tick; a member that stops releases it (the
  next member takes it at its next tick), one that dies loses it after ``live.timers_lease_s``.
  Redis away: nobody leads (the store's conditional writes keep a late tick of a former
  leader harmless: an escalation or expiry is written once whoever tries)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

import redis.asyncio as aioredis
import socketio
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from config.settings import Settings

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]
"""What a subscriber runs for each message of its kind: ``data``, already parsed."""
Hook = Callable[[], Awaitable[Any]]

CHANNEL = "fleet"
"""After ``live.key_prefix``: the bus's pub/sub channel."""
LEASE_KEY = "timers"
"""After ``live.key_prefix``: the timers' lease (the leader's instance id)."""
RESYNC_S = 10.0
"""How often every member heals what the bus may have lost (``on_resync`` hooks)."""
OUTBOX = 10_000
"""Messages waiting to be published at most; beyond, new ones are dropped (and healed)."""
CONNECT_TIMEOUT_S = 2.0
"""A connection to Redis that does not open within this time has failed."""
COMMAND_TIMEOUT_S = 5.0
"""A command Redis does not answer within this time has failed (a frozen Redis)."""
LISTEN_POLL_S = 1.0
"""The listener's read timeout: it wakes this often while the bus is quiet."""
BACKOFF_S = (0.1, 5.0)
"""The listener's first and longest wait before it dials Redis again after a loss."""
RETRIES = 1
"""A command failing on a dead connection is tried once more, on a new one."""


def retry_once() -> Retry:
    """For every Redis client of the process: a command that fails on a connection that died
    (Redis restarted; each pooled connection is such a one once) is tried once more on a new
    one. redis-py 8 retries none by default: a chat sent just after Redis came back was
    refused ``internal`` so."""
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES)
START_TIMEOUT_S = 10.0
"""``start`` waits this long at most for the bus's subscription."""
STOP_FLUSH_S = 1.0
"""``stop`` gives messages still waiting this long to leave."""

# KEYS: the lease. ARGV: this instance, the lease in ms. 1 when this instance holds it (renewed).
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lease. ARGV: this instance. 1 when this instance held it (now free).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Kind = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if this task was cancelled while it waited for Redis.

    redis-py 8.1 sometimes loses a task's cancellation that arrives during a command (the
    command completes, the task runs on, ``Task.cancelling()`` stays 1; 15-56 in 200 cancels
    here, the class of redis/redis-py#2028): a loop that awaits Redis would then never stop,
    and neither would the stop that awaits it. Every such loop calls this after each round."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class FleetMessage(BaseModel):
    """One message on the bus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sender: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    kind: Kind
    data: dict[str, Any]


def describe(error: ValidationError) -> str:
    """Where a payload failed its schema, without its values (they may name a patient)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['type']}"
                     for e in error.errors(include_input=False, include_url=False))


class Fleet(Protocol):
    """The members of one deployment, as one of them sees them."""

    instance_id: str

    async def start(self) -> None:
        """Join: the bus listens (messages published from now on are heard)."""

    async def stop(self) -> None:
        """Leave: the lease released, the bus closed."""

    async def leads_timers(self) -> bool:
        """Take or renew the timers' lease: True while this member runs the timers."""

    async def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Tell every other member; never raises for Redis (what is lost heals by resync)."""

    def subscribe(self, kind: str, handler: Handler) -> None:
        """Run ``handler`` for every message of ``kind`` from another member, in order."""

    def on_resync(self, hook: Hook) -> None:
        """Run ``hook`` every ``RESYNC_S`` and when the bus is back after a loss."""

    def on_bus_back(self, hook: Hook) -> None:
        """Run ``hook`` when the bus is back after a loss (after the resync hooks): what was
        said meanwhile between the members, socket.io's emits included, is lost."""


class LocalFleet:
    """One process: it leads the timers, and there is nobody to tell."""

    def __init__(self, instance_id: str = "local") -> None:
        self.instance_id = instance_id

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def leads_timers(self) -> bool:
        return True

    async def publish(self, kind: str, data: dict[str, Any]) -> None:
        pass

    def subscribe(self, kind: str, handler: Handler) -> None:
        pass

    def on_resync(self, hook: Hook) -> None:
        pass

    def on_bus_back(self, hook: Hook) -> None:
        pass


class RedisFleet:
    """One member of a fleet on one Redis (see the module's docstring)."""

    def __init__(self, url: str, *, prefix: str, instance_id: str, lease_s: float,
                 resync_s: float = RESYNC_S) -> None:
        self.instance_id = instance_id
        self._url = url
        self._channel = prefix + CHANNEL
        self._lease_key = prefix + LEASE_KEY
        self._lease_ms = max(1, round(lease_s * 1000))
        self._resync_s = resync_s
        # A command that fails on a connection that died (Redis restarted) is tried once more
        # on a new one: redis-py 8 retries none by default.
        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S,
            retry=retry_once())
        self._renew = self._redis.register_script(RENEW)
        self._release = self._redis.register_script(RELEASE)
        self._handlers: dict[str, list[Handler]] = {}
        self._hooks: list[Hook] = []
        self._back_hooks: list[Hook] = []
        self._outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._leading = False
        self._lease_failing = False
        self._publish_failing = False
        self.received = 0
        """Messages of other members delivered to handlers (tests, logs)."""
        self.dropped = 0
        """Malformed messages dropped."""
        self.reconnects = 0
        """Times the bus came back after a loss."""

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Fails (and says why) when Redis does not answer, as the live state does."""
        try:
            await self._redis.ping()
        except RedisError as exc:
            logger.error("fleet: Redis (live.redis_url) does not answer: %s; serve cannot "
                         "start as a member of a fleet", exc)
            await self._redis.aclose()
            raise
        self._tasks = [asyncio.create_task(self._listen(), name="fleet-bus"),
                       asyncio.create_task(self._send(), name="fleet-outbox"),
                       asyncio.create_task(self._resync_forever(), name="fleet-resync")]
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await self._subscribed.wait()
        except TimeoutError:
            await self._cancel_tasks()
            await self._redis.aclose()
            raise RuntimeError(f"fleet: no subscription to {self._channel} within "
                               f"{START_TIMEOUT_S:.0f} s") from None
        logger.info("fleet: instance %s on %s (timers' lease %.1f s)", self.instance_id,
                    self._channel, self._lease_ms / 1000)

    async def stop(self) -> None:
        """Let waiting messages leave (``STOP_FLUSH_S`` at most), release the lease so that
        another member takes the timers at its next tick, close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_FLUSH_S):
                await self._outbox.join()
        await self._cancel_tasks()
        if self._leading:
            try:
                await self._release(keys=[self._lease_key], args=[self.instance_id])
                logger.info("fleet: timers' lease released")
            except RedisError as exc:
                logger.warning("fleet: the timers' lease could not be released (%s); another "
                               "member takes it within %.1f s", exc, self._lease_ms / 1000)
            self._leading = False
        await self._redis.aclose()

    async def _cancel_tasks(self) -> None:
        """Cancel and await the tasks, each bounded (see ``raise_if_cancelled``)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_FLUSH_S)
            for task in stuck:
                logger.warning("fleet: task %s did not stop within %.1f s; left behind",
                               task.get_name(), STOP_FLUSH_S)
        self._tasks = []

    # -- the lease -------------------------------------------------------------------------
    async def leads_timers(self) -> bool:
        try:
            leading = bool(await self._renew(keys=[self._lease_key],
                                             args=[self.instance_id, self._lease_ms]))
            if not leading:
                leading = bool(await self._redis.set(self._lease_key, self.instance_id,
                                                     nx=True, px=self._lease_ms))
        except RedisError as exc:
            if not self._lease_failing:
                logger.warning("fleet: the timers' lease cannot be read (%s): this member "
                               "runs no timers until Redis answers", exc)
            self._lease_failing = True
            leading = False
        else:
            if self._lease_failing:
                logger.info("fleet: Redis answers the timers' lease again")
            self._lease_failing = False
        if leading != self._leading:
            logger.info("fleet: this member %s the timers", "runs" if leading else "no longer runs")
        self._leading = leading
        return leading

    # -- the bus ---------------------------------------------------------------------------
    async def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Queued for the one sender (messages leave in the order they were published; the
        caller never waits for Redis)."""
        message = FleetMessage(sender=self.instance_id, kind=kind, data=data)
        try:
            self._outbox.put_nowait(message.model_dump_json())
        except asyncio.QueueFull:
            logger.warning("fleet: %d messages wait for Redis; a %s message is dropped (the "
                           "others heal it at their next resync)", OUTBOX, kind)

    async def _send(self) -> None:
        while True:
            raw = await self._outbox.get()
            try:
                await self._redis.publish(self._channel, raw)
            except RedisError as exc:
                if not self._publish_failing:
                    logger.warning("fleet: publishing failed (%s); the other members heal "
                                   "what they miss at their next resync", exc)
                self._publish_failing = True
            else:
                self._publish_failing = False
            finally:
                self._outbox.task_done()
            raise_if_cancelled()

    def subscribe(self, kind: str, handler: Handler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def on_resync(self, hook: Hook) -> None:
        self._hooks.append(hook)

    def on_bus_back(self, hook: Hook) -> None:
        self._back_hooks.append(hook)

    async def _listen(self) -> None:
        """Read the bus for ever. Each subscription Redis confirms after the first (redis-py
        may dial again and resubscribe by itself) and each one after a loss of Redis (retried
        here with a doubling back-off) runs the resync hooks: what was said meanwhile is
        lost."""
        backoff = BACKOFF_S[0]
        lost_at: float | None = None
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_POLL_S)
                    raise_if_cancelled()
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind in (b"message", "message"):
                        await self._deliver(message["data"])
                    elif kind in (b"subscribe", "subscribe"):
                        backoff = BACKOFF_S[0]
                        if self._subscribed.is_set():
                            self.reconnects += 1
                            away = 0.0 if lost_at is None else time.monotonic() - lost_at
                            lost_at = None
                            logger.info("fleet: the bus is back (%.1f s away); "
                                        "resynchronising", away)
                            await self._resync()
                            await self._run_hooks(self._back_hooks)
                        self._subscribed.set()
            except (RedisError, OSError) as exc:
                if lost_at is None:
                    lost_at = time.monotonic()
                    logger.warning("fleet: the bus lost Redis (%s); dialling again", exc)
            except Exception:
                # Never the end of the bus: whatever broke, it dials again.
                if lost_at is None:
                    lost_at = time.monotonic()
                logger.exception("fleet: the bus failed; dialling again")
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])

    async def _deliver(self, raw: Any) -> None:
        try:
            message = FleetMessage.model_validate(json.loads(raw))
        except (ValueError, TypeError) as exc:
            self.dropped += 1
            reason = describe(exc) if isinstance(exc, ValidationError) else "not JSON"
            logger.warning("fleet: a malformed message dropped (%s)", reason)
            return
        if message.sender == self.instance_id:
            return
        handlers = self._handlers.get(message.kind, [])
        if handlers:
            self.received += 1
        for handler in handlers:
            try:
                await handler(message.data)
            except Exception:
                logger.exception("fleet: the %s message of %s failed in its handler",
                                 message.kind, message.sender)

    async def _resync(self) -> None:
        await self._run_hooks(self._hooks)

    async def _run_hooks(self, hooks: list[Hook]) -> None:
        for hook in hooks:
            try:
                await hook()
            except Exception:
                logger.exception("fleet: a resync failed; again in %.0f s", self._resync_s)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._resync_s)
            await self._resync()
            raise_if_cancelled()


class BatchedRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """python-socketio's ``AsyncRedisManager`` whose PUBLISHes leave in batches: what was
    published while one batch was on its way leaves together in the next, as one pipeline
    over one connection.

    The plain manager sends each emit's PUBLISH by itself and awaits Redis's answer before the
    emit returns; over one connection (``single_connection_client``, so that a node's emits
    reach the other nodes in the order they were made) that is one round trip at a time,
    and every round trip waits for the node's event loop to read the answer. On the fleet
    bench (2 nodes, 4,000 sites, 50 requests/s: ~250 emits a second per node, relay commands
    and their answers included) a loop slowed by other work on the machine (20-35 ms a
    turn) fell behind: PUBLISH took p50 390 ms, p90 2.5 s, and every queue update, consult:
    ready and relay command waited in that line. Batched, the order is the same (one sender,
    batches in order, a pipeline runs its commands in order), each emit still returns once
    its message is on Redis, and a slow loop sends more per round trip instead of falling
    behind.

    Errors as the plain manager: a batch that fails is tried once more on a new connection,
    then dropped with an error logged (its emits return; pub/sub is at-most-once and what
    rides on it heals by resync).

    The other nodes' emits are delivered the same way round: the plain manager's listener
    delivers each one to this node's sockets and waits for those sends before it reads the
    next message, one message per turn of a busy loop (A's ``queue:update`` reached B's
    specialists p90 385 ms after it was published, under the same disturbance). Here each is
    delivered by a task of its own, started in the order the messages came (a task computes
    its recipients and queues its packets before it first waits, so packets keep that order),
    and what must not overtake them (a room entered, left or closed, a client disconnected)
    waits until the emits before it are delivered."""

    connected: bool
    """The base class's: whether ``redis`` is connected (else ``_redis_connect`` first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._delivering: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Pipelines sent (tests, logs)."""

    async def _publish(self, data: Any) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((self.json.dumps(data), done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="socketio-publish")
        # Shielded: an emit cancelled meanwhile leaves its message in the batch.
        await asyncio.shield(done)

    async def _handle_emit(self, message: Any) -> None:
        if message.get("host_id") == self.host_id:
            await super()._handle_emit(message)  # this node's emit: delivered before it returns
            return
        task = asyncio.create_task(self._deliver(message), name="socketio-deliver")
        self._delivering.add(task)
        task.add_done_callback(self._delivering.discard)

    async def _deliver(self, message: Any) -> None:
        try:
            await super()._handle_emit(message)
        except Exception:
            logger.exception("socket.io: an emit of another node could not be delivered")

    async def _delivered(self) -> None:
        """Return once the other nodes' emits received so far are delivered."""
        if self._delivering:
            await asyncio.wait(set(self._delivering))

    async def _handle_disconnect(self, message: Any) -> None:
        await self._delivered()
        await super()._handle_disconnect(message)

    async def _handle_enter_room(self, message: Any) -> None:
        await self._delivered()
        await super()._handle_enter_room(message)

    async def _handle_leave_room(self, message: Any) -> None:
        await self._delivered()
        await super()._handle_leave_room(message)

    async def _handle_close_room(self, message: Any) -> None:
        await self._delivered()
        await super()._handle_close_room(message)

    async def _send(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._pipeline([payload for payload, _ in batch])
            finally:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _pipeline(self, payloads: list[str]) -> None:
        for attempt in (1, 2):
            try:
                if not self.connected:
                    self._redis_connect()
                async with self.redis.pipeline(transaction=False) as pipe:
                    for payload in payloads:
                        pipe.publish(self.channel, payload)
                    await pipe.execute()
                self.batches += 1
                return
            except Exception as exc:  # as the plain manager: any failure, a new connection
                self.connected = False
                if attempt == 2:
                    logger.error("socket.io: %d messages could not be published to Redis "
                                 "(%s); dropped", len(payloads), exc)


def fleet_for(settings: Settings, instance_id: str) -> Fleet:
    """A ``RedisFleet`` when the records are shared (``storage.backend = "postgresql"``) and
    the live state is in Redis; else ``LocalFleet``: a process with records of its own
    (SQLite) runs its own timers over them, as one process always did."""
    if settings.live.backend == "redis" and settings.storage.backend == "postgresql":
        return RedisFleet(settings.live.redis_url, prefix=settings.live.key_prefix,
                          instance_id=instance_id, lease_s=settings.live.timers_lease_s)
    return LocalFleet(instance_id)
