"""Relays and placements shared by the processes of a fleet (``live.backend = "redis"``).

Each ``serve`` process knows only the standalone relay nodes connected to it; this module
puts them, and where every consultation is placed, into Redis, so that any process places a
consultation on any relay of the fleet and reaches it: a relay connected to another process
is driven through ``relay.remote.RemoteRelay`` with the node's sid, since python-socketio's
``AsyncRedisManager`` carries an emit to a sid on any process and brings its ack back
(tests/signaling/test_fleet_relays.py proves it with two servers on one redis-server).

Layout, every key under ``live.key_prefix`` (``P``; the live store's ``P instances`` says which
processes are alive):

- ``P relays``: hash, relay id -> ``RelayEntry`` (JSON): info and load, the owning process's
  instance id and the node's sid there, when it connected, ``seen_at`` (Redis time of the
  owner's last refresh, every ``relay.heartbeat_s / 2``), draining. An entry whose owner is
  not alive or whose ``seen_at`` is older than ``STALE_S`` is not placed on;
- ``P placements``: hash, consultation id -> ``PlacementRecord`` (JSON): the relay, or how it
  waits for one, and a version ``v`` that every change bumps: each change is a compare-and-set
  (one Lua script), so that a move, an adoption or the placing of a waiting consultation
  happens once across the processes;
- ``P on:<relay>``: set of the consultations placed on the relay; ``P waiting``: set of those
  waiting.

The owner of a node keeps its lifecycle (heartbeat, loss, drain, hello), and moves every
consultation placed on it when it is lost, whoever placed them. A node whose process died
dials another (through the proxy) within its back-off and says hello there: its Rooms are
adopted as they are. One that does not within ``relay.adopt_wait_s`` is an orphan: any
process moves its consultations (each claimed once).

An embedded relay stays private to its process: the Rooms placed on it are recorded with
the process's instance id, and other processes answer ``relay_waiting`` for them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
import socketio
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from relay.api import Relay, RelayInfo
from relay.errors import RelayError
from signaling.fleet import retry_once
from signaling.placement import (
    MoveReason,
    NodeRelay,
    RelayDirectory,
    Superseded,
    Waiting,
)

logger = logging.getLogger(__name__)

STALE_S = 10.0
"""A relay entry not refreshed for this long is not placed on (its process froze or lost
Redis; a live owner refreshes every ``relay.heartbeat_s / 2``)."""
CLAIM_S = 10.0
"""How long a process's claim on a waiting consultation keeps the others off it: longer than
a placement's ``open_room`` tries; the claimer renews it on each try."""
MISS_REFRESH_S = 0.2
"""``locate`` of a Room on a relay this process has not heard of reads the registry again, at
most this often."""
LISTEN_WAIT_S = 5.0
"""How long a start waits for the socket.io Redis listener's subscription."""
POOL_SIZE = 16
POOL_WAIT_S = 10.0


class RelayEntry(BaseModel):
    """A standalone relay node as the fleet sees it."""

    id: str
    region: str
    public_address: str
    capacity: int
    load: int = 0
    owner: str
    """The instance id (signaling/live_redis.py) of the process it is connected to."""
    sid: str
    """Its connection there (``relay.api.NODE_NAMESPACE``)."""
    connected_at: float
    """When that connection was made (the owner's clock): of two processes that both think
    they hold the node, the later connection wins."""
    seen_at: float = 0.0
    """Redis time of the owner's last refresh."""
    draining: bool = False

    def info(self) -> RelayInfo:
        return RelayInfo(id=self.id, region=self.region, public_address=self.public_address,
                         capacity=self.capacity, load=self.load)


class WaitingRecord(BaseModel):
    since: float
    reason: MoveReason
    relay_id: str | None = None
    until: float = 0.0
    claim: str | None = None
    claim_until: float = 0.0


class PlacementRecord(BaseModel):
    """Where one consultation's Room is, for every process."""

    relay_id: str | None = None
    region: str = ""
    private: str | None = None
    """Placed on the embedded relay of this instance (reachable from that process only)."""
    waiting: WaitingRecord | None = None
    v: int = 0

    def to_waiting(self) -> Waiting | None:
        w = self.waiting
        if w is None:
            return None
        return Waiting(self.region, w.since, w.reason, w.relay_id, w.until, version=self.v,
                       claim=w.claim, claim_until=w.claim_until)


def _waiting_record(waiting: Waiting, claim: str | None, claim_until: float) -> WaitingRecord:
    return WaitingRecord(since=waiting.since, reason=waiting.reason, relay_id=waiting.relay_id,
                         until=waiting.until, claim=claim, claim_until=claim_until)


_NOW = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function index(p, record)
  if type(record['relay_id']) ~= 'string' then return p .. 'waiting' end
  if type(record['private']) == 'string' then
    return p .. 'on:' .. record['private'] .. '/' .. record['relay_id']
  end
  return p .. 'on:' .. record['relay_id']
end
"""

# ARGV: prefix, room, expected version (-1: any; 0: absent), record JSON ('' deletes).
# Returns {1, new version} or {0, current version}.
PUT_PLACEMENT = _NOW + """
local p, room, expected = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = p .. 'placements'
local raw = redis.call('HGET', key, room)
local v = 0
if raw then
  local old = cjson.decode(raw)
  v = tonumber(old['v']) or 0
  if expected >= 0 and expected ~= v then return {0, v} end
  redis.call('SREM', index(p, old), room)
elseif expected > 0 then
  return {0, 0}
end
if ARGV[4] == '' then
  redis.call('HDEL', key, room)
  return {1, 0}
end
local record = cjson.decode(ARGV[4])
record['v'] = v + 1
redis.call('SADD', index(p, record), room)
redis.call('HSET', key, room, cjson.encode(record))
return {1, v + 1}
"""

# ARGV: prefix, set key suffix ('waiting' or 'on:<relay>'). Returns {room, record JSON, ...}.
MEMBERS = """
local p, set = ARGV[1], ARGV[1] .. ARGV[2]
local found = {}
for _, room in ipairs(redis.call('SMEMBERS', set)) do
  local raw = redis.call('HGET', p .. 'placements', room)
  if raw then
    table.insert(found, room)
    table.insert(found, raw)
  else
    redis.call('SREM', set, room)
  end
end
return found
"""

# ARGV: prefix, owner, entries JSON (a list). Each entry is written with seen_at = now, unless
# another owner holds a later connection of the node. Returns the entries skipped.
WRITE_RELAYS = _NOW + """
local p, me = ARGV[1], ARGV[2]
local t = now()
local skipped = {}
for _, entry in ipairs(cjson.decode(ARGV[3])) do
  local raw = redis.call('HGET', p .. 'relays', entry['id'])
  local keep = true
  if raw then
    local old = cjson.decode(raw)
    local alive = redis.call('ZSCORE', p .. 'instances', old['owner'])
    if old['owner'] ~= me and alive and tonumber(alive) >= t
        and tonumber(old['connected_at']) > tonumber(entry['connected_at']) then
      keep = false
    end
  end
  if keep then
    entry['owner'] = me
    entry['seen_at'] = t
    redis.call('HSET', p .. 'relays', entry['id'], cjson.encode(entry))
  else
    table.insert(skipped, entry['id'])
  end
end
return skipped
"""

# ARGV: prefix, relay, owner, connected_at. Returns 1 if the entry was this connection's (or
# there was none), 0 if another connection holds the node now.
REMOVE_RELAY = """
local p, relay, me = ARGV[1], ARGV[2], ARGV[3]
local raw = redis.call('HGET', p .. 'relays', relay)
if not raw then return 1 end
local old = cjson.decode(raw)
if old['owner'] ~= me or math.abs(tonumber(old['connected_at']) - tonumber(ARGV[4])) > 0.001 then
  return 0
end
redis.call('HDEL', p .. 'relays', relay)
return 1
"""

# ARGV: prefix, stale_s. Returns {now, entry JSON, alive (1/0), rooms on it, ...}.
READ_RELAYS = _NOW + """
local p, stale = ARGV[1], tonumber(ARGV[2])
local t = now()
local found = {tostring(t)}
local entries = redis.call('HGETALL', p .. 'relays')
for i = 1, #entries, 2 do
  local entry = cjson.decode(entries[i + 1])
  local score = redis.call('ZSCORE', p .. 'instances', entry['owner'])
  local alive = score and tonumber(score) >= t and tonumber(entry['seen_at']) >= t - stale
  table.insert(found, entries[i + 1])
  table.insert(found, alive and 1 or 0)
  table.insert(found, redis.call('SCARD', p .. 'on:' .. entries[i]))
end
return found
"""

# ARGV: prefix, relay, seen_at. The orphan's entry goes, unless refreshed since.
FORGET_ORPHAN = """
local p, relay = ARGV[1], ARGV[2]
local raw = redis.call('HGET', p .. 'relays', relay)
if raw and math.abs(tonumber(cjson.decode(raw)['seen_at']) - tonumber(ARGV[3])) < 0.001 then
  redis.call('HDEL', p .. 'relays', relay)
  return 1
end
return 0
"""


def client_name(prefix: str, instance_id: str) -> str:
    """The Redis client name of a process's registry connections (no spaces allowed)."""
    return "".join(c if c.isprintable() and not c.isspace() else "_"
                   for c in f"{prefix}{instance_id}")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RelayRegistry:
    """The Redis side: relay entries and placement records (see the module's docstring)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, instance_id: str,
                 stale_s: float = STALE_S) -> None:
        self._redis = client
        self._prefix = prefix
        self.instance_id = instance_id
        self.stale_s = stale_s
        self._put = client.register_script(PUT_PLACEMENT)
        self._members = client.register_script(MEMBERS)
        self._write = client.register_script(WRITE_RELAYS)
        self._remove = client.register_script(REMOVE_RELAY)
        self._read = client.register_script(READ_RELAYS)
        self._forget = client.register_script(FORGET_ORPHAN)

    @classmethod
    def from_url(cls, url: str, *, prefix: str, instance_id: str,
                 **kwargs: Any) -> RelayRegistry:
        """Its connections carry the process's name (``CLIENT SETNAME <prefix><instance>``):
        Redis drops them the moment the process dies, which ``alive`` reads."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, decode_responses=True,
            retry=retry_once(),
            client_name=client_name(prefix, instance_id))
        return cls(aioredis.Redis.from_pool(pool), prefix=prefix, instance_id=instance_id,
                   **kwargs)

    async def close(self) -> None:
        await self._redis.aclose()

    @property
    def client(self) -> aioredis.Redis:
        """The registry's Redis client (the fleet's recording shares it)."""
        return self._redis

    @property
    def prefix(self) -> str:
        return self._prefix

    async def media_owner(self, room_id: str) -> str | None:
        """The process the consultation's media reaches: the instance the relay it is placed
        on is connected to (or whose embedded relay carries it). None: waiting, or its relay
        is not in the registry (gone)."""
        record = await self.get(room_id)
        if record is None or record.relay_id is None:
            return None
        if record.private is not None:
            return record.private
        raw = await self._redis.hget(self._prefix + "relays", record.relay_id)
        if raw is None:
            return None
        return RelayEntry.model_validate_json(raw).owner

    async def alive(self, instance_id: str) -> bool:
        """The process heartbeats (``P instances``, the live store's) and its registry's
        connections are open. The heartbeat alone would call a killed process alive for up
        to ``signaling.live_redis.INSTANCE_TTL_S`` (15 s); its connections close when it
        dies (a machine cut off keeps them until TCP gives up: the heartbeat ends first)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zscore(self._prefix + "instances", instance_id)
            (seconds, micros), until = await pipe.execute()
        if until is None or float(until) < int(seconds) + int(micros) / 1e6:
            return False
        name = client_name(self._prefix, instance_id)
        return any(c.get("name") == name for c in await self._redis.client_list())

    # -- relays ----------------------------------------------------------------------------
    async def write_relays(self, entries: list[RelayEntry]) -> list[str]:
        """Write this process's nodes (owner and ``seen_at`` set by Redis); the ids skipped
        (a later connection of the node is held by another live process)."""
        if not entries:
            return []
        payload = "[" + ",".join(e.model_dump_json() for e in entries) + "]"
        skipped = await self._write(args=[self._prefix, self.instance_id, payload])
        return [_text(s) for s in skipped or []]

    async def remove_relay(self, relay_id: str, connected_at: float) -> bool:
        """This process's connection of the node is gone: its entry goes; False when another
        connection (another process) holds the node now."""
        removed = await self._remove(args=[self._prefix, relay_id, self.instance_id,
                                           repr(connected_at)])
        return bool(removed)

    async def read_relays(self) -> tuple[float, list[tuple[RelayEntry, bool, int]]]:
        """Redis's time, and every entry with whether it is alive and how many rooms are
        placed on it."""
        found = await self._read(args=[self._prefix, repr(self.stale_s)])
        now = float(found[0])
        entries = []
        for i in range(1, len(found), 3):
            try:
                entry = RelayEntry.model_validate_json(found[i])
            except ValidationError:
                logger.warning("relay registry: an invalid relay entry skipped")
                continue
            entries.append((entry, bool(int(found[i + 1])), int(found[i + 2])))
        return now, entries

    async def subscribers(self, channel: str) -> int:
        """Subscriptions to a pub/sub channel, over every process."""
        counts = await self._redis.pubsub_numsub(channel)
        return int(counts[0][1]) if counts else 0

    async def forget_orphan(self, relay_id: str, seen_at: float) -> None:
        await self._forget(args=[self._prefix, relay_id, repr(seen_at)])

    # -- placements ------------------------------------------------------------------------
    async def get(self, room_id: str) -> PlacementRecord | None:
        raw = await self._redis.hget(self._prefix + "placements", room_id)
        return None if raw is None else PlacementRecord.model_validate_json(raw)

    async def put(self, room_id: str, record: PlacementRecord | None, expected: int) -> int:
        """Write (None: delete) the record if its version is ``expected`` (-1: whatever it
        is; 0: none yet); its new version. Superseded otherwise."""
        payload = "" if record is None else record.model_dump_json(exclude={"v"})
        written, version = await self._put(args=[self._prefix, room_id, str(expected),
                                                 payload])
        if not int(written):
            raise Superseded(f"the placement of {room_id!r} changed meanwhile (version "
                             f"{int(version)}, not {expected})")
        return int(version)

    async def _set(self, suffix: str) -> dict[str, PlacementRecord]:
        found = await self._members(args=[self._prefix, suffix])
        return {_text(found[i]): PlacementRecord.model_validate_json(found[i + 1])
                for i in range(0, len(found), 2)}

    async def on(self, relay_key: str) -> dict[str, PlacementRecord]:
        """The placements on a relay (``id``; a private one: ``instance/id``)."""
        return await self._set("on:" + relay_key)

    async def waiting(self) -> dict[str, PlacementRecord]:
        return await self._set("waiting")


async def start_listening(sio: socketio.AsyncServer, registry: RelayRegistry) -> None:
    """python-socketio starts its Redis manager's listener at the first connection: a process
    that drives a relay of another one before any client connected to it (the restore at
    start) would never hear the acks. Started now, and waited for until Redis counts its
    subscription (at most ``LISTEN_WAIT_S``)."""
    if getattr(sio, "manager_initialized", True):
        return
    channel = str(getattr(sio.manager, "channel", ""))
    before = await registry.subscribers(channel)
    sio.manager_initialized = True
    sio.manager.initialize()
    deadline = time.monotonic() + LISTEN_WAIT_S
    while time.monotonic() < deadline:
        if await registry.subscribers(channel) > before:
            return
        await asyncio.sleep(0.01)
    logger.warning("relay registry: the socket.io Redis listener did not subscribe within "
                   "%.0f s; acks of relays at other processes may be missed until it does",
                   LISTEN_WAIT_S)


RemoteFactory = Callable[[RelayInfo, str], NodeRelay]
"""Builds the ``Relay`` of a node connected to another process, from its info and sid there
(``RemoteRelay(info, sid, sio)``: the Redis manager routes the commands)."""


class FleetRelayDirectory(RelayDirectory):
    """``RelayDirectory`` over the fleet's registry: places on any registered relay (region
    first, then least load; reservations stay local, as the accepts they protect are), finds
    any consultation's relay (``locate``), and shares each change of placement as a
    compare-and-set. ``for_room`` stays this process's own view (its last ``locate``):
    the recorder uses it, and recording stays with the process that placed the Room."""

    def __init__(self, registry: RelayRegistry, remote: RemoteFactory, *,
                 open_room_timeout_s: float = 1.0, adopt_wait_s: float = 15.0) -> None:
        super().__init__(open_room_timeout_s=open_room_timeout_s, adopt_wait_s=adopt_wait_s)
        self._registry = registry
        self.instance_id = registry.instance_id
        self._make_remote = remote
        self._shared: dict[str, tuple[Relay, float]] = {}
        """This process's nodes in the registry: relay id -> (relay, when it connected)."""
        self._remote: dict[str, tuple[RelayEntry, NodeRelay]] = {}
        """Live relays connected to other processes."""
        self._counts: dict[str, int] = {}
        """Rooms placed on each shared relay, fleet-wide, at the last refresh."""
        self._fresh: dict[str, int] = {}
        """Rooms this process placed on each relay since that refresh."""
        self._orphans: dict[str, float] = {}
        """Relays whose owner died, with rooms on them -> last seen (Redis time)."""
        self._shared_waiting: dict[str, Waiting] = {}
        self._claims: dict[str, int] = {}
        """Room -> the version of this process's claim (the next change's compare-and-set)."""
        self._now = 0.0
        self._last_refresh = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def registry(self) -> RelayRegistry:
        return self._registry

    # -- which relays ----------------------------------------------------------------------
    def _all(self) -> Iterable[Relay]:
        yield from self._relays.values()
        for relay_id, (_, relay) in self._remote.items():
            if relay_id not in self._relays:
                yield relay

    def get(self, relay_id: str) -> Relay | None:
        local = self._relays.get(relay_id)
        if local is not None:
            return local
        remote = self._remote.get(relay_id)
        return remote[1] if remote is not None else None

    def relays(self) -> list[Relay]:
        return list(self._all())

    def _free(self, relay: Relay) -> bool:
        remote = self._remote.get(relay.info.id)
        if remote is not None and remote[0].draining and relay.info.id not in self._relays:
            return False
        return super()._free(relay)

    def _placed_on(self, relay_id: str) -> int:
        if relay_id in self._relays and relay_id not in self._shared:
            return super()._placed_on(relay_id)  # private (the embedded relay)
        return self._counts.get(relay_id, 0) + self._fresh.get(relay_id, 0)

    def _key(self, relay_id: str) -> str:
        """The registry's name of a relay's placements."""
        if relay_id in self._relays and relay_id not in self._shared:
            return f"{self.instance_id}/{relay_id}"
        return relay_id

    def _private(self, relay: Relay) -> str | None:
        shared = relay.info.id in self._shared or (relay.info.id in self._remote
                                                   and relay.info.id not in self._relays)
        return None if shared else self.instance_id

    def _resolve(self, record: PlacementRecord) -> Relay | None:
        if record.relay_id is None:
            return None
        if record.private is not None:
            return self._relays.get(record.relay_id) \
                if record.private == self.instance_id else None
        return self.get(record.relay_id)

    # -- this process's nodes --------------------------------------------------------------
    async def announce(self, relay: Relay) -> None:
        sid = getattr(relay, "sid", None)
        if not isinstance(sid, str):
            return  # not a node (the embedded relay): private
        known = self._shared.get(relay.info.id)
        connected_at = known[1] if known is not None and known[0] is relay else time.time()
        self._shared[relay.info.id] = (relay, connected_at)
        replaced = self._remote.pop(relay.info.id, None)
        if replaced is not None and replaced[1] is not relay:
            # The node redialled here (its process died): calls still waiting on the way
            # through the old process fail now, not at the command timeout (15 s).
            replaced[1].abandon()
        await self._registry.write_relays([self._entry(relay, connected_at)])

    def _entry(self, relay: Relay, connected_at: float) -> RelayEntry:
        info = relay.info
        return RelayEntry(id=info.id, region=info.region, public_address=info.public_address,
                          capacity=info.capacity, load=info.load, owner=self.instance_id,
                          sid=str(getattr(relay, "sid", "")), connected_at=connected_at,
                          draining=info.id in self._draining)

    def holds(self, relay_id: str) -> bool:
        """The node is connected to this process (and shared from here)."""
        return relay_id in self._shared and relay_id in self._relays

    async def withdraw(self, relay_id: str) -> bool:
        known = self._shared.pop(relay_id, None)
        if known is None:
            return True
        return await self._registry.remove_relay(relay_id, known[1])

    async def refresh(self) -> None:
        """Write this process's nodes (load, draining, ``seen_at``), read every process's:
        the relays placed on, their rooms, the waiting consultations. Never raises: on a
        Redis failure the last view stays."""
        try:
            entries = [self._entry(relay, at) for relay, at in self._shared.values()
                       if self._relays.get(relay.info.id) is relay]
            skipped = await self._registry.write_relays(entries)
            for relay_id in skipped:
                logger.info("relay node %s: a later connection of it is held by another "
                            "signaling process", relay_id)
            now, found = await self._registry.read_relays()
            waiting = await self._registry.waiting()
        except RedisError as exc:
            logger.warning("relay registry: Redis failed (%s); placing on what was read "
                           "last", exc)
            return
        self._apply(now, found, waiting)

    def _apply(self, now: float, found: list[tuple[RelayEntry, bool, int]],
               waiting: dict[str, PlacementRecord]) -> None:
        self._now = now
        self._last_refresh = time.monotonic()
        remote: dict[str, tuple[RelayEntry, NodeRelay]] = {}
        counts: dict[str, int] = {}
        orphans: dict[str, float] = {}
        for entry, alive, rooms in found:
            counts[entry.id] = rooms
            if not alive:
                if rooms and entry.id not in self._relays:
                    orphans[entry.id] = entry.seen_at
                continue
            if entry.owner == self.instance_id or entry.id in self._relays:
                continue
            known = self._remote.get(entry.id)
            if known is not None and known[0].sid == entry.sid \
                    and known[0].owner == entry.owner \
                    and known[1].info.capacity == entry.capacity \
                    and known[1].info.region == entry.region:
                known[1].info.load = entry.load
                remote[entry.id] = (entry, known[1])
            else:
                remote[entry.id] = (entry, self._make_remote(entry.info(), entry.sid))
        for relay_id, (_, relay) in self._remote.items():
            if remote.get(relay_id, (None, None))[1] is not relay:
                relay.abandon()  # gone, or another connection: its commands fail now
        changed = set(remote) - set(self._remote)
        self._remote = remote
        self._counts = counts
        self._fresh = {}
        self._orphans = orphans
        self._shared_waiting = {room: w for room, record in waiting.items()
                                if (w := record.to_waiting()) is not None}
        for room, record in waiting.items():
            self._regions[room] = record.region
            self._placements.pop(room, None)
        if changed:
            self.changed.set()

    async def orphans(self) -> list[tuple[str, float]]:
        return [(relay_id, seen_at) for relay_id, seen_at in self._orphans.items()
                if self._now - seen_at >= self._adopt_wait_s]

    async def forget_orphan(self, relay_id: str, seen_at: float) -> None:
        self._orphans.pop(relay_id, None)
        await self._registry.forget_orphan(relay_id, seen_at)

    # -- placements ------------------------------------------------------------------------
    async def locate(self, room_id: str) -> Relay | None:
        record = await self._registry.get(room_id)
        if record is None or record.relay_id is None:
            self._placements.pop(room_id, None)
            return None
        relay = self._resolve(record)
        if relay is None and record.private is None \
                and time.monotonic() - self._last_refresh >= MISS_REFRESH_S:
            await self.refresh()  # a relay that connected to another process just now
            relay = self._resolve(record)
        self._regions[room_id] = record.region
        if relay is None:
            self._placements.pop(room_id, None)
        else:
            self._placements[room_id] = relay.info.id
        return relay

    async def placement(self, room_id: str) -> tuple[str | None, Waiting | None]:
        record = await self._registry.get(room_id)
        if record is None:
            return None, None
        self._regions[room_id] = record.region
        if record.relay_id is not None and record.private not in (None, self.instance_id):
            return f"{record.private}/{record.relay_id}", None
        return record.relay_id, record.to_waiting()

    async def placements_of(self, relay_id: str) -> list[tuple[str, str]]:
        placed = await self._registry.on(self._key(relay_id))
        for room, record in placed.items():
            self._regions[room] = record.region
        return [(room, record.region) for room, record in placed.items()]

    async def record(self, room_id: str, relay: Relay, region: str) -> None:
        expected = self._claims.pop(room_id, -1)
        await self._registry.put(room_id, PlacementRecord(
            relay_id=relay.info.id, region=region, private=self._private(relay)), expected)
        self._settle(room_id, relay, region)
        self._shared_waiting.pop(room_id, None)
        self._fresh[relay.info.id] = self._fresh.get(relay.info.id, 0) + 1

    async def open(self, room_id: str, relay: Relay, region: str = "", *,
                   reserved: bool = False) -> Relay:
        try:
            return await super().open(room_id, relay, region, reserved=reserved)
        except Superseded:
            # Opened here, placed elsewhere by another process meanwhile: not ours to keep
            # (unless that other placement is this very relay: the Room is theirs then).
            with contextlib.suppress(RelayError, TimeoutError, RedisError):
                record = await self._registry.get(room_id)
                if record is None or record.relay_id != relay.info.id:
                    async with asyncio.timeout(self._open_timeout_s):
                        await relay.close_room(room_id)
            raise

    async def claim(self, room_id: str, relay_id: str, *, reason: MoveReason,
                    since: float) -> bool:
        record = await self._registry.get(room_id)
        if record is None or record.relay_id != relay_id \
                or record.private not in (None, self.instance_id):
            return False
        try:
            self._claims[room_id] = await self._registry.put(room_id, PlacementRecord(
                region=record.region, waiting=WaitingRecord(
                    since=since, reason=reason, claim=self.instance_id,
                    claim_until=time.time() + CLAIM_S)), record.v)
        except Superseded:
            return False
        self._placements.pop(room_id, None)
        self._regions[room_id] = record.region
        return True

    async def claim_waiting(self, room_id: str, waiting: Waiting) -> bool:
        now = time.time()
        if waiting.claim not in (None, self.instance_id) and waiting.claim_until > now:
            return False  # another process is placing it
        try:
            version = await self._registry.put(room_id, PlacementRecord(
                region=waiting.region,
                waiting=_waiting_record(waiting, self.instance_id, now + CLAIM_S)),
                waiting.version)
        except Superseded:
            return False
        waiting.version = version
        waiting.claim, waiting.claim_until = self.instance_id, now + CLAIM_S
        self._claims[room_id] = version
        return True

    async def set_waiting(self, room_id: str, region: str, *, reason: MoveReason, since: float,
                          relay_id: str | None = None, until: float = 0.0) -> Waiting:
        waiting = Waiting(region, since, reason, relay_id, until)
        expected = self._claims.pop(room_id, -1)
        waiting.version = await self._registry.put(room_id, PlacementRecord(
            region=region, waiting=_waiting_record(waiting, None, 0.0)), expected)
        self._placements.pop(room_id, None)
        self._regions[room_id] = region
        self._shared_waiting[room_id] = waiting
        return waiting

    def wait(self, room_id: str, region: str, *, reason: MoveReason, since: float,
             relay_id: str | None = None, until: float = 0.0) -> Waiting:
        """For a caller that cannot wait for Redis (Consultations.restore after a failure):
        shared at once in the background."""
        waiting = super().wait(room_id, region, reason=reason, since=since, relay_id=relay_id,
                               until=until)
        self._waiting.pop(room_id, None)
        self._shared_waiting[room_id] = waiting

        async def share() -> None:
            try:
                await self.set_waiting(room_id, region, reason=reason, since=since,
                                       relay_id=relay_id, until=until)
            except (RedisError, Superseded) as exc:
                logger.warning("consultation %s: sharing that it waits failed (%s)", room_id,
                               exc)

        task = asyncio.get_running_loop().create_task(share(), name=f"wait-{room_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return waiting

    async def update_waiting(self, room_id: str, waiting: Waiting) -> None:
        expected = self._claims.pop(room_id, waiting.version)
        waiting.version = await self._registry.put(room_id, PlacementRecord(
            region=waiting.region, waiting=_waiting_record(waiting, None, 0.0)), expected)
        waiting.claim, waiting.claim_until = None, 0.0

    def waiting(self, room_id: str) -> Waiting | None:
        return self._shared_waiting.get(room_id)

    def waiting_rooms(self) -> dict[str, Waiting]:
        return dict(self._shared_waiting)

    def is_known(self, room_id: str) -> bool:
        return room_id in self._placements or room_id in self._shared_waiting

    async def restore(self, room_id: str, relay_id: str, region: str) -> Relay | None:
        """A starting process's open consultation, from the registry: one placed on a live
        relay (by any process) or waiting stays as it is; one placed on a relay no process
        holds waits ``adopt_wait_s`` for that node's hello (at any process); one the registry
        does not know (the fleet's first start) as in one process."""
        record = await self._registry.get(room_id)
        if record is None:
            return await super().restore(room_id, relay_id, region)
        self._regions[room_id] = record.region
        if record.relay_id is None:
            waiting = record.to_waiting()
            if waiting is not None:
                self._shared_waiting[room_id] = waiting
            return None
        relay = self._resolve(record)
        if relay is not None:
            self._settle(room_id, relay, record.region)
            return relay
        if record.private is not None and record.private != self.instance_id:
            return None  # on another process's embedded relay: that process's to restore
        now = time.time()
        self._claims[room_id] = record.v
        try:
            await self.set_waiting(room_id, record.region, reason="signaling_restart",
                                   since=now, relay_id=record.relay_id,
                                   until=now + self._adopt_wait_s)
        except Superseded:
            return await self.locate(room_id)
        return None

    async def release(self, room_id: str) -> None:
        record = await self._registry.get(room_id)
        await self._registry.put(room_id, None, -1)
        self._shared_waiting.pop(room_id, None)
        self._placements.pop(room_id, None)
        if record is not None and record.relay_id is not None:
            relay = self._resolve(record)
            if relay is not None:
                self._placements[room_id] = relay.info.id
        await super().release(room_id)

    async def listen(self, sio: socketio.AsyncServer) -> None:
        """``start_listening`` with this directory's registry."""
        await start_listening(sio, self._registry)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for relay in self._remote.values():
            relay[1].abandon()
        await self._registry.close()
