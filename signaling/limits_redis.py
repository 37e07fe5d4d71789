"""The per-clinician limits counted over a fleet (``live.backend = "redis"``): a clinician
with tabs on two nodes gets ``limits.chat_per_minute`` and ``limits.connections_per_clinician``
once in all, not once per node.

- Chat: the same token bucket as ``signaling.limits.ChatLimits`` (``chat_per_minute`` at once,
  then one every ``60 / chat_per_minute`` s), kept in Redis as ``P limits:chat:<clinician>``
  (a hash: tokens, stamp) under ``live.key_prefix`` (``P``), updated by one Lua script per
  message on Redis's clock, so messages arriving at several nodes at once are each counted
  and the nodes' clocks do not matter. The key expires when the bucket would be full again
  (a full bucket and no key are the same): at most one key per clinician who chatted in the
  last minute.
- Connections: the live state's count (``RedisLiveStore.admit_connection``: each admitted
  connection under its process's instance, whose heartbeat says it is alive), one script
  that counts and adds, so two nodes admitting the clinician at once take the last place once.

Redis away: refused ``limits_unavailable`` (a 503-like code the client retries), as a sign-in
is refused ``accounts_unavailable``: a limit is never waived because its count cannot be read,
and a connection could not be recorded in the live state anyway. A release that fails is kept
and tried again with the next call, so a closed connection does not hold a place for ever."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config.settings import LimitsSettings
from signaling.fleet import retry_once
from signaling.limits import LimitsUnavailable
from signaling.live_redis import RedisLiveStore

logger = logging.getLogger(__name__)

POOL_SIZE = 16
POOL_WAIT_S = 5.0
TIMEOUT_S = 5.0
"""Bound on connecting to Redis and on each answer: a hung Redis refuses a chat message
``limits_unavailable`` instead of holding it."""
UNRELEASED_MAX = 10_000
"""Failed releases kept for a retry at most (Redis away for long: the oldest are dropped; the
places they hold go when this process stops heartbeating)."""

# KEYS: none (the key is computed; one Redis server, as signaling.live_redis).
# ARGV: key, rate (tokens/s), burst. Returns 1 if admitted.
CHAT = """
local key, rate, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local f = redis.call('HMGET', key, 'tokens', 'stamp')
local tokens, stamp = tonumber(f[1]), tonumber(f[2])
if not tokens or not stamp then tokens, stamp = burst, now end
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local admitted = 0
if tokens >= 1 then
  tokens = tokens - 1
  admitted = 1
end
redis.call('HSET', key, 'tokens', string.format('%.6f', tokens),
           'stamp', string.format('%.6f', stamp))
redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1)
return admitted
"""


class RedisClinicianLimits:
    """``signaling.limits.ClinicianLimits`` over a fleet: chat in the Redis of ``client``,
    connections in ``live``; keys under ``prefix``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, live: RedisLiveStore,
                 settings: LimitsSettings) -> None:
        self._redis = client
        self._prefix = prefix
        self._live = live
        self._per_minute = settings.chat_per_minute
        self._per_clinician = settings.connections_per_clinician
        self._chat = client.register_script(CHAT)
        self._unreleased: dict[str, str] = {}
        """sid -> clinician id of releases Redis did not take."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisClinicianLimits:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, decode_responses=True,
            retry=retry_once(),
            socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        return cls(aioredis.Redis.from_pool(pool), **kwargs)

    async def admit_chat(self, clinician_id: str) -> bool:
        with _answering("chat"):
            admitted = await self._chat(args=[
                f"{self._prefix}limits:chat:{clinician_id}", repr(self._per_minute / 60.0),
                self._per_minute])
        return bool(admitted)

    async def admit_connection(self, clinician_id: str, sid: str,
                               open_here: int) -> tuple[bool, int]:
        await self._retry_releases()
        with _answering("connections"):
            return await self._live.admit_connection(clinician_id, sid, self._per_clinician)

    async def release_connection(self, clinician_id: str, sid: str) -> None:
        self._unreleased[sid] = clinician_id
        await self._retry_releases()

    async def _retry_releases(self) -> None:
        while len(self._unreleased) > UNRELEASED_MAX:
            del self._unreleased[next(iter(self._unreleased))]
        for sid, clinician_id in list(self._unreleased.items()):
            try:
                await self._live.release_connection(clinician_id, sid)
            except RedisError as exc:
                logger.warning("limits: connection %s of %s still counted: Redis does not "
                               "answer (%s); released with the next connection", sid,
                               clinician_id, exc)
                return
            self._unreleased.pop(sid, None)

    async def close(self) -> None:
        await self._redis.aclose()


@contextmanager
def _answering(what: str) -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        logger.warning("limits: Redis does not answer (%s: %s); %s refused "
                       "limits_unavailable", type(exc).__name__, exc, what)
        raise LimitsUnavailable(
            f"the fleet's count of {what} (Redis, live.redis_url) does not answer; "
            "retry in a few seconds") from exc
