"""LiveStore in Redis (``live.backend = "redis"``): presence and membership outlive a restart
of ``serve``, so a restarted process finds its consultations' participants instead of an empty
memory.

Layout, every key under ``live.key_prefix`` (``P``):

- ``P instances``: sorted set, instance id -> the Redis server time (s) its heartbeat runs out;
- ``P connections:<instance>``: hash, socket.io sid -> ``{"clinician_id", "site_id"}``. A sid
  belongs to one process, so its connections are kept under that process's instance id;
- ``P sites``: hash, site id -> connections at that site over every live instance;
- ``P consultation:<id>``: hash, clinician id -> the participant (JSON; ``sids`` maps each
  sid to its instance, ``media_sid`` is the connection its media is bound to, on any
  instance; times are strings, so that Lua never rounds them);
- ``P clinician-connections:<clinician>``: hash, sid -> instance, the clinician's connections
  admitted under ``limits.connections_per_clinician`` (``admit_connection``), over every
  process; ``P admitted:<instance>``: set of the clinicians an instance admitted, so that
  its sweep takes its places back. A dead instance's places stop counting at once (checked
  against ``P instances``), and a restarted one's are swept with its previous run, even
  those whose release or connection record never reached Redis;
- ``P memberships:<clinician>``: set of consultation ids; ``P consultations``: set of the
  consultation ids with at least one participant; ``P reconnecting``: set of the
  ``[consultation, clinician]`` pairs (JSON) whose participant is reconnecting, so that the
  grace timer's ``reconnecting()`` reads only those.

Every read-modify-write that two connections (or two processes) may race is one Lua script,
so Redis runs it alone: a site comes online (or goes offline) exactly once. A process whose
heartbeat runs out (killed, frozen, cut from Redis) is swept by any other: its connections stop
counting and its sids leave the participants, who are then ``reconnecting`` (the reconnect
grace applies). A process sweeps its own previous run at start, so its instance id is kept in
the data directory (``INSTANCE_FILE``). The scripts name keys they compute from the prefix:
one Redis server (or a primary with replicas), not Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from signaling.fleet import raise_if_cancelled, retry_once
from signaling.live import ClinicianLocks, Connection, Participant

logger = logging.getLogger(__name__)

STOP_WAIT_S = 1.0
"""How long ``close`` waits for the heartbeat task to stop."""
LOCK_TTL_S = 10.0
"""A clinician's lock expires after this if its holder died (what it guards takes well under
a second: a few Redis writes, an emit, a bounded media leave)."""
LOCK_WAIT_S = 10.0
"""How long a caller waits for a clinician's lock before its step fails (redis-py's
``LockError``)."""
"""How long ``close`` waits for the heartbeat task to stop."""

INSTANCE_FILE = "live-instance"
"""In the data directory: this process's instance id, the same on every restart."""
HEARTBEAT_S = 5.0
"""How often a process renews its instance and sweeps dead ones."""
INSTANCE_TTL_S = 15.0
"""How long an instance counts as alive after its last heartbeat: a killed process's
connections stop counting (and its participants become reconnecting) within this time plus
one heartbeat of another process."""

POOL_SIZE = 32
"""Connections to Redis at most: it runs one command at a time anyway."""
POOL_WAIT_S = 10.0
"""How long a command waits for a free connection before it fails."""

# Helpers shared by the scripts: ``sweep(P, instance, away_since)`` forgets one instance's
# connections (returning the sites that went offline) and takes its sids out of every
# participant; one left with none becomes reconnecting.
_SWEEP = """
local function sweep(p, instance, away_since)
  local offline = {}
  local conns = redis.call('HGETALL', p .. 'connections:' .. instance)
  for i = 1, #conns, 2 do
    local site = cjson.decode(conns[i + 1])['site_id']
    local left = redis.call('HINCRBY', p .. 'sites', site, -1)
    if left <= 0 then
      redis.call('HDEL', p .. 'sites', site)
      table.insert(offline, site)
    end
  end
  redis.call('DEL', p .. 'connections:' .. instance)
  for _, clinician in ipairs(redis.call('SMEMBERS', p .. 'admitted:' .. instance)) do
    local key = p .. 'clinician-connections:' .. clinician
    local slots = redis.call('HGETALL', key)
    for i = 1, #slots, 2 do
      if slots[i + 1] == instance then redis.call('HDEL', key, slots[i]) end
    end
  end
  redis.call('DEL', p .. 'admitted:' .. instance)
  redis.call('ZREM', p .. 'instances', instance)
  local changed = 0
  for _, cid in ipairs(redis.call('SMEMBERS', p .. 'consultations')) do
    local key = p .. 'consultation:' .. cid
    local members = redis.call('HGETALL', key)
    for i = 1, #members, 2 do
      local participant = cjson.decode(members[i + 1])
      local touched = false
      local left = 0
      for sid, owner in pairs(participant['sids']) do
        if owner == instance then
          participant['sids'][sid] = nil
          touched = true
        else
          left = left + 1
        end
      end
      if touched then
        if left == 0 and participant['state'] == 'present' then
          participant['state'] = 'reconnecting'
          participant['away_since'] = away_since
          redis.call('SADD', p .. 'reconnecting', cjson.encode({cid, members[i]}))
        end
        redis.call('HSET', key, members[i], cjson.encode(participant))
        changed = changed + 1
      end
    end
  end
  return {offline, changed}
end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""

# ARGV: prefix, instance, ttl_s, away_since. Renews the instance, sweeps expired ones.
HEARTBEAT = _SWEEP + """
local p, me = ARGV[1], ARGV[2]
local t = now()
redis.call('ZADD', p .. 'instances', t + tonumber(ARGV[3]), me)
local swept, offline, changed = {}, {}, 0
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', p .. 'instances', '-inf', t)) do
  if dead ~= me then
    local result = sweep(p, dead, ARGV[4])
    table.insert(swept, dead)
    for _, site in ipairs(result[1]) do table.insert(offline, site) end
    changed = changed + result[2]
  end
end
return {swept, offline, changed}
"""

# ARGV: prefix, instance, ttl_s, away_since. This instance's previous run, swept at start.
RESTART = _SWEEP + """
local p, me = ARGV[1], ARGV[2]
local result = sweep(p, me, ARGV[4])
redis.call('ZADD', p .. 'instances', now() + tonumber(ARGV[3]), me)
return result
"""

# ARGV: prefix, instance, sid, connection JSON, site. Returns 1 if the site just came online.
ADD_CONNECTION = """
local p, me, sid, site = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local key = p .. 'connections:' .. me
local old = redis.call('HGET', key, sid)
if old then
  local old_site = cjson.decode(old)['site_id']
  if old_site == site then
    redis.call('HSET', key, sid, ARGV[4])
    return tonumber(redis.call('HGET', p .. 'sites', site)) == 1 and 1 or 0
  end
  if redis.call('HINCRBY', p .. 'sites', old_site, -1) <= 0 then
    redis.call('HDEL', p .. 'sites', old_site)
  end
end
redis.call('HSET', key, sid, ARGV[4])
return redis.call('HINCRBY', p .. 'sites', site, 1) == 1 and 1 or 0
"""

# ARGV: prefix, instance, clinician, sid, limit. Returns {1 if admitted else 0, the clinician's
# connections open over every live instance (with this one if admitted)}. A slot whose
# instance stopped heartbeating (killed, frozen) is dropped here rather than counted.
ADMIT_CONNECTION = """
local p, me, clinician, sid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit = tonumber(ARGV[5])
local key = p .. 'clinician-connections:' .. clinician
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local open = 0
local slots = redis.call('HGETALL', key)
for i = 1, #slots, 2 do
  local until_ = redis.call('ZSCORE', p .. 'instances', slots[i + 1])
  if not until_ or tonumber(until_) <= now then
    redis.call('HDEL', key, slots[i])
  elseif slots[i] ~= sid then
    open = open + 1
  end
end
if open >= limit then return {0, open} end
redis.call('HSET', key, sid, me)
redis.call('SADD', p .. 'admitted:' .. me, clinician)
return {1, open + 1}
"""

# ARGV: prefix, instance, sid. Returns {connection JSON or false, 1 if its site went offline}.
REMOVE_CONNECTION = """
local p, me, sid = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'connections:' .. me
local old = redis.call('HGET', key, sid)
if not old then return {false, 0} end
redis.call('HDEL', key, sid)
local site = cjson.decode(old)['site_id']
if redis.call('HINCRBY', p .. 'sites', site, -1) <= 0 then
  redis.call('HDEL', p .. 'sites', site)
  return {old, 1}
end
return {old, 0}
"""

# ARGV: prefix, instance, consultation, clinician, participant JSON (sids as a list). Each sid
# keeps the instance it is already known under; a new one is this instance's. The media sid
# stays what it is (SET_MEDIA_SID writes it).
PUT_PARTICIPANT = """
local p, me, cid, clinician = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = p .. 'consultation:' .. cid
local known = {}
local media = nil
local old = redis.call('HGET', key, clinician)
if old then
  local decoded = cjson.decode(old)
  known = decoded['sids']
  media = decoded['media_sid']
end
local participant = cjson.decode(ARGV[5])
participant['media_sid'] = media
local sids = {}
for _, sid in ipairs(participant['sids']) do sids[sid] = known[sid] or me end
participant['sids'] = sids
redis.call('HSET', key, clinician, cjson.encode(participant))
if participant['state'] == 'reconnecting' then
  redis.call('SADD', p .. 'reconnecting', cjson.encode({cid, clinician}))
else
  redis.call('SREM', p .. 'reconnecting', cjson.encode({cid, clinician}))
end
redis.call('SADD', p .. 'memberships:' .. clinician, cid)
redis.call('SADD', p .. 'consultations', cid)
return 1
"""

# ARGV: prefix, consultation, clinician, sid ('' for none), expected ('' for any). Returns 1
# if written.
SET_MEDIA_SID = """
local p, cid, clinician, sid, expected = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = p .. 'consultation:' .. cid
local raw = redis.call('HGET', key, clinician)
if not raw then return 0 end
local participant = cjson.decode(raw)
local bound = participant['media_sid']
if bound == cjson.null then bound = nil end
if expected ~= '' and bound ~= expected then return 0 end
if sid == '' then participant['media_sid'] = nil else participant['media_sid'] = sid end
redis.call('HSET', key, clinician, cjson.encode(participant))
return 1
"""

# ARGV: prefix, consultation, clinician.
REMOVE_PARTICIPANT = """
local p, cid, clinician = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'consultation:' .. cid
redis.call('HDEL', key, clinician)
redis.call('SREM', p .. 'reconnecting', cjson.encode({cid, clinician}))
if redis.call('EXISTS', key) == 0 then redis.call('SREM', p .. 'consultations', cid) end
redis.call('SREM', p .. 'memberships:' .. clinician, cid)
return 1
"""

# ARGV: prefix, clinician. Returns {consultation, participant JSON, ...}.
MEMBERSHIPS_OF = """
local p, clinician = ARGV[1], ARGV[2]
local found = {}
for _, cid in ipairs(redis.call('SMEMBERS', p .. 'memberships:' .. clinician)) do
  local raw = redis.call('HGET', p .. 'consultation:' .. cid, clinician)
  if raw then
    table.insert(found, cid)
    table.insert(found, raw)
  end
end
return found
"""

# ARGV: prefix, consultation. Returns {clinician, participant JSON, ...} of what it dropped.
DROP_CONSULTATION = """
local p, cid = ARGV[1], ARGV[2]
local key = p .. 'consultation:' .. cid
local members = redis.call('HGETALL', key)
for i = 1, #members, 2 do
  redis.call('SREM', p .. 'memberships:' .. members[i], cid)
  redis.call('SREM', p .. 'reconnecting', cjson.encode({cid, members[i]}))
end
redis.call('DEL', key)
redis.call('SREM', p .. 'consultations', cid)
return members
"""

# ARGV: prefix. Returns {consultation, clinician, participant JSON, ...} of every reconnecting.
RECONNECTING = """
local p = ARGV[1]
local found = {}
for _, pair in ipairs(redis.call('SMEMBERS', p .. 'reconnecting')) do
  local ids = cjson.decode(pair)
  local raw = redis.call('HGET', p .. 'consultation:' .. ids[1], ids[2])
  if raw and cjson.decode(raw)['state'] == 'reconnecting' then
    table.insert(found, ids[1])
    table.insert(found, ids[2])
    table.insert(found, raw)
  else
    redis.call('SREM', p .. 'reconnecting', pair)
  end
end
return found
"""


def instance_id_for(data_dir: Path) -> str:
    """This process's instance id, kept in ``data_dir`` so that a restart finds (and sweeps)
    what its previous run left in Redis. Two processes never share a data directory (the
    SQLite records would not allow it either)."""
    path = data_dir / INSTANCE_FILE
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text(encoding="ascii").strip()
        if found:
            return found
    instance = f"serve-{secrets.token_hex(8)}"
    path.write_text(instance + "\n", encoding="ascii")
    return instance


def _encode(participant: Participant) -> str:
    return json.dumps({
        "site_id": participant.site_id,
        "joined_at": repr(participant.joined_at),
        "state": participant.state,
        "away_since": None if participant.away_since is None else repr(participant.away_since),
        "sids": sorted(participant.sids),
    })


def _decode(consultation_id: str, clinician_id: str, raw: str | bytes) -> Participant:
    data = json.loads(raw)
    away = data.get("away_since")
    # An empty Lua table is encoded as {} by Redis's cjson: a dict or a list, both iterate.
    return Participant(consultation_id, clinician_id, data["site_id"],
                       float(data["joined_at"]), sids=set(data.get("sids") or ()),
                       state=data["state"], away_since=None if away is None else float(away),
                       media_sid=data.get("media_sid") or None)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLiveStore:
    """LiveStore in Redis, for ``live.backend = "redis"``. ``start()`` before use (it sweeps
    this instance's previous run and starts the heartbeat), ``close()`` at the end."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, instance_id: str,
                 heartbeat_s: float = HEARTBEAT_S, ttl_s: float = INSTANCE_TTL_S) -> None:
        if ttl_s <= heartbeat_s:
            raise ValueError("the instance's TTL must outlast its heartbeat")
        self._redis = client
        self._prefix = prefix
        self.instance_id = instance_id
        self._heartbeat_s = heartbeat_s
        self._ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None
        self._heartbeat = client.register_script(HEARTBEAT)
        self._restart = client.register_script(RESTART)
        self._add = client.register_script(ADD_CONNECTION)
        self._remove = client.register_script(REMOVE_CONNECTION)
        self._put = client.register_script(PUT_PARTICIPANT)
        self._remove_participant = client.register_script(REMOVE_PARTICIPANT)
        self._memberships = client.register_script(MEMBERSHIPS_OF)
        self._drop = client.register_script(DROP_CONSULTATION)
        self._reconnecting = client.register_script(RECONNECTING)
        self._set_media = client.register_script(SET_MEDIA_SID)
        self._admit = client.register_script(ADMIT_CONNECTION)
        self._locks = ClinicianLocks()

    @contextlib.asynccontextmanager
    async def clinician_lock(self, clinician_id: str) -> AsyncIterator[object]:
        """This process's lock first (its own callers queue without asking Redis), then
        redis-py's ``Lock`` (a token, released only by its holder; it expires after
        ``LOCK_TTL_S`` should this process die holding it)."""
        async with self._locks.get(clinician_id):
            lock = self._redis.lock(f"{self._prefix}lock:clinician:{clinician_id}",
                                    timeout=LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S)
            async with lock:
                yield lock

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisLiveStore:
        """A client whose pool waits for a free connection (``POOL_WAIT_S`` at most) when
        ``POOL_SIZE`` are busy: redis-py's default pool raises at its 101st concurrent command,
        which a burst of reconnecting clients reaches."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, decode_responses=True,
            retry=retry_once())
        return cls(aioredis.Redis.from_pool(pool), **kwargs)

    def _args(self, *values: object) -> list[str]:
        return [self._prefix, self.instance_id, *(str(v) for v in values)]

    async def start(self) -> None:
        """Sweep what this instance's previous run left (its connections are gone, its
        participants reconnecting from now), then heartbeat until ``close()``."""
        try:
            offline, changed = await self._restart(
                args=self._args(self._ttl_s, repr(time.time())))
        except RedisError as exc:
            logger.error("live state: Redis (live.redis_url) does not answer: %s; "
                         "serve cannot start with live.backend = \"redis\"", exc)
            raise
        logger.info("live state in Redis (instance %s): the previous run's connections "
                    "forgotten (%d sites offline), %d participants reconnecting",
                    self.instance_id, len(offline), changed)
        await self.beat()
        self._task = asyncio.create_task(self._beat_forever(), name="live-heartbeat")

    async def beat(self) -> list[str]:
        """Renew this instance and sweep the expired ones; their ids."""
        swept, offline, changed = await self._heartbeat(
            args=self._args(self._ttl_s, repr(time.time())))
        if swept:
            logger.warning("live state: instances %s stopped heartbeating; their connections "
                           "forgotten (%d sites offline), %d participants reconnecting",
                           ", ".join(swept), len(offline), changed)
        return [_text(s) for s in swept]

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self.beat()
            except RedisError as exc:
                # Once per beat while Redis is away: one line each, no traceback.
                logger.warning("live state: heartbeat to Redis failed (%s); again in %.1f s",
                               exc, self._heartbeat_s)
            except Exception:
                logger.exception("live state: heartbeat failed; again in %.1f s",
                                 self._heartbeat_s)
            raise_if_cancelled()

    async def close(self) -> None:
        """Stop heartbeating. The instance's keys stay: the next run of this process sweeps
        them at once, another process when the TTL runs out."""
        if self._task is not None:
            self._task.cancel()
            # Bounded: redis-py may lose a cancellation (signaling.fleet.raise_if_cancelled).
            await asyncio.wait([self._task], timeout=STOP_WAIT_S)
            self._task = None
        await self._redis.aclose()

    # -- presence --------------------------------------------------------------------------
    async def add_connection(self, connection: Connection) -> bool:
        raw = json.dumps({"clinician_id": connection.clinician_id,
                          "site_id": connection.site_id})
        first = await self._add(args=self._args(connection.sid, raw, connection.site_id))
        return bool(first)

    async def remove_connection(self, sid: str) -> tuple[Connection | None, bool]:
        raw, last = await self._remove(args=self._args(sid))
        if not raw:
            return None, False
        data = json.loads(raw)
        return Connection(sid, data["clinician_id"], data["site_id"]), bool(last)

    async def admit_connection(self, clinician_id: str, sid: str,
                               limit: int) -> tuple[bool, int]:
        """Count ``sid`` among the clinician's connections over every live process if fewer
        than ``limit`` are open: (admitted, how many are open with it, or when refused). One
        script, so two processes admitting the clinician at once cannot both take the last
        place. Kept until ``release_connection``, or until this process stops heartbeating."""
        admitted, count = await self._admit(args=self._args(clinician_id, sid, limit))
        return bool(admitted), int(count)

    async def release_connection(self, clinician_id: str, sid: str) -> None:
        await self._redis.hdel(f"{self._prefix}clinician-connections:{clinician_id}", sid)

    async def online_sites(self) -> dict[str, int]:
        counts = await self._redis.hgetall(self._prefix + "sites")
        return {_text(site): int(n) for site, n in counts.items() if int(n) > 0}

    # -- membership ------------------------------------------------------------------------
    async def put_participant(self, participant: Participant) -> None:
        await self._put(args=self._args(participant.consultation_id, participant.clinician_id,
                                        _encode(participant)))

    async def get_participant(self, consultation_id: str,
                              clinician_id: str) -> Participant | None:
        raw = await self._redis.hget(self._prefix + "consultation:" + consultation_id,
                                     clinician_id)
        return None if raw is None else _decode(consultation_id, clinician_id, raw)

    async def participants(self, consultation_id: str) -> list[Participant]:
        members = await self._redis.hgetall(self._prefix + "consultation:" + consultation_id)
        return [_decode(consultation_id, _text(c), raw) for c, raw in members.items()]

    async def set_media_sid(self, consultation_id: str, clinician_id: str, sid: str | None, *,
                            expected: str | None = None) -> bool:
        # Socket.io sids are never empty: '' stands for "none" / "any" in the script.
        written = await self._set_media(args=[self._prefix, consultation_id, clinician_id,
                                              sid or "", expected or ""])
        return bool(written)

    async def remove_participant(self, consultation_id: str, clinician_id: str) -> None:
        await self._remove_participant(args=[self._prefix, consultation_id, clinician_id])

    async def memberships_of(self, clinician_id: str) -> list[Participant]:
        found = await self._memberships(args=[self._prefix, clinician_id])
        return [_decode(_text(found[i]), clinician_id, found[i + 1])
                for i in range(0, len(found), 2)]

    async def drop_consultation(self, consultation_id: str) -> list[Participant]:
        members = await self._drop(args=[self._prefix, consultation_id])
        return [_decode(consultation_id, _text(members[i]), members[i + 1])
                for i in range(0, len(members), 2)]

    async def reconnecting(self) -> list[Participant]:
        found = await self._reconnecting(args=[self._prefix])
        return [_decode(_text(found[i]), _text(found[i + 1]), found[i + 2])
                for i in range(0, len(found), 3)]
