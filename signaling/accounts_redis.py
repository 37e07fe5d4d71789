"""The strikes of client addresses and unknown identifiers shared through Redis
(``live.backend = "redis"``): a fleet counts failed sign-ins from one address together,
whichever node nginx sends each to, so its lockout comes after
``accounts.address_lockout_failures`` in all, not that many per node.

Layout under ``live.key_prefix`` (``P``), for each kind (``address``, ``unknown``):
- ``P strikes:<kind>:<key>``: a hash (failures, lockouts, locked_until, last_failure_at),
  expiring once nothing about it matters any more (an hour after its last failure, or when its
  lockout ends if later);
- ``P strikes:<kind>``: a sorted set of the keys by their last failure, which bounds them: past
  ``accounts.tracked_addresses`` keys, the least recently struck are forgotten first (as the
  in-memory ``StrikeTable`` does), and keys an hour quiet leave it.

An unknown identifier may be a password typed into the wrong field: it is never written to
Redis (whose append-only file is on disk) as typed, only as an HMAC-SHA256 keyed with the
fleet's ``security.token_secret`` (``key``), the same on every node, so the nodes still count
it together. Addresses are kept as they are (the audit log names them too).

A strike is one Lua script (read, count as ``Strikes.strike`` does, write, index, trim): Redis
runs it alone, so failures arriving at several nodes at once are all counted. Times are the
nodes' clocks (time.time(), as the accounts' own lockouts in PostgreSQL): keep them in sync.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from signaling.accounts import FORGET_LOCKOUTS_AFTER_S, UNKNOWN, AccountsUnavailable, Strikes
from signaling.fleet import retry_once

logger = logging.getLogger(__name__)

POOL_SIZE = 20
POOL_WAIT_S = 5.0
TIMEOUT_S = 5.0
"""Bound on connecting to Redis and on each answer (a hung Redis fails the sign-in with
``accounts_unavailable`` instead of holding it)."""

# ARGV: prefix, kind, key, now, threshold, base_s, max_s, forget_s, size.
# Returns {failures, lockouts, locked_until, last_failure_at, locked} as strings (Lua numbers
# would come back as integers).
STRIKE = """
local hash = ARGV[1] .. 'strikes:' .. ARGV[2] .. ':' .. ARGV[3]
local index = ARGV[1] .. 'strikes:' .. ARGV[2]
local now, threshold = tonumber(ARGV[4]), tonumber(ARGV[5])
local base, cap, forget, size = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
    tonumber(ARGV[9])
local f = redis.call('HMGET', hash, 'failures', 'lockouts', 'locked_until', 'last_failure_at')
local failures, lockouts = tonumber(f[1]) or 0, tonumber(f[2]) or 0
local locked_until, last = tonumber(f[3]) or 0, tonumber(f[4]) or 0
if now - last > forget then
    failures, lockouts = 0, 0
end
last = now
failures = failures + 1
local locked = 0
if failures >= threshold then
    locked_until = now + math.min(cap, base * 2 ^ math.min(lockouts, 30))
    lockouts = lockouts + 1
    failures = 0
    locked = 1
end
local values = {tostring(failures), tostring(lockouts), string.format('%.6f', locked_until),
                string.format('%.6f', last)}
redis.call('HSET', hash, 'failures', values[1], 'lockouts', values[2],
           'locked_until', values[3], 'last_failure_at', values[4])
redis.call('PEXPIRE', hash, math.ceil(math.max(forget, locked_until - now) * 1000))
redis.call('ZADD', index, now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. string.format('%.6f', now - forget))
local over = redis.call('ZCARD', index) - size
if over > 0 then
    local oldest = redis.call('ZPOPMIN', index, over)
    for i = 1, #oldest, 2 do
        redis.call('DEL', ARGV[1] .. 'strikes:' .. ARGV[2] .. ':' .. oldest[i])
    end
end
values[5] = tostring(locked)
return values
"""

# ARGV: prefix, kind, key. Failures back to 0 (a success from there), lockouts kept.
FORGIVE = """
local hash = ARGV[1] .. 'strikes:' .. ARGV[2] .. ':' .. ARGV[3]
if redis.call('EXISTS', hash) == 1 then
    redis.call('HSET', hash, 'failures', '0')
end
return 0
"""


class RedisStrikes:
    """``signaling.accounts.StrikeStore`` in the Redis at ``url``, keys under ``prefix``, at
    most ``size`` keys of each kind; unknown identifiers named by their HMAC with ``key``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, size: int, key: bytes) -> None:
        self._redis = client
        self._prefix = prefix
        self._size = size
        self._key = key
        self._strike = client.register_script(STRIKE)
        self._forgive = client.register_script(FORGIVE)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStrikes:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, decode_responses=True,
            retry=retry_once(),
            socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        return cls(aioredis.Redis.from_pool(pool), **kwargs)

    async def open(self) -> None:
        # No round trip here: `serve` has already reached Redis for its live state, and a
        # CLI command that only issues an activation code needs no Redis at all.
        logger.info("accounts: strikes of addresses and unknown identifiers in Redis (%d "
                    "keys of each at most)", self._size)

    async def close(self) -> None:
        await self._redis.aclose()

    def _name(self, kind: str, key: str) -> str:
        """How ``key`` is named in Redis."""
        if kind != UNKNOWN:
            return key
        return hmac.new(self._key, key.encode("utf-8"), hashlib.sha256).hexdigest()

    def _hash(self, kind: str, key: str) -> str:
        return f"{self._prefix}strikes:{kind}:{self._name(kind, key)}"

    async def get(self, kind: str, key: str) -> Strikes:
        with _answering():
            values = await self._redis.hmget(self._hash(kind, key), "failures", "lockouts",
                                             "locked_until", "last_failure_at")
        if any(v is None for v in values):
            return Strikes()
        failures, lockouts, locked_until, last = (str(v) for v in values)
        return Strikes(int(failures), int(lockouts), float(locked_until), float(last))

    async def strike(self, kind: str, key: str, now: float, threshold: int, base_s: float,
                     max_s: float) -> tuple[Strikes, bool]:
        with _answering():
            values = await self._strike(args=[
                self._prefix, kind, self._name(kind, key), repr(now), threshold, repr(base_s),
                repr(max_s), repr(FORGET_LOCKOUTS_AFTER_S), self._size])
        return (Strikes(int(values[0]), int(values[1]), float(values[2]), float(values[3])),
                values[4] == "1")

    async def forgive(self, kind: str, key: str) -> None:
        with _answering():
            await self._forgive(args=[self._prefix, kind, self._name(kind, key)])


@contextmanager
def _answering() -> Iterator[None]:
    """Redis away (``live.redis_url``): a sign-in is answered ``accounts_unavailable``
    (503), never decided without its strikes counted."""
    try:
        yield
    except RedisError as exc:
        logger.warning("accounts: Redis does not answer: %s: %s", type(exc).__name__, exc)
        raise AccountsUnavailable("Redis") from exc
