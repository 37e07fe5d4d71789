"""The per-clinician limits counted over a fleet (signaling/limits_redis.py), on a real
redis-server: a clinician's chat and open connections are limited once over every process,
not once per process. First the counts themselves (two processes' ``RedisClinicianLimits`` on
one Redis: exact under a concurrent burst, a dead process's connections stop counting, Redis
away refuses ``limits_unavailable``), then two real `serve` apps on one Redis and one
PostgreSQL: a burst of connects split over both nodes admits exactly the limit, and a
clinician's chat from tabs on both nodes gets one allowance."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import socketio

from config.settings import LimitsSettings
from signaling.limits import LimitsUnavailable
from signaling.limits_redis import RedisClinicianLimits
from signaling.live_redis import RedisLiveStore
from tests.consultation_media import open_consultation
from tests.redis_server import REDIS_SERVER, RedisServer, _free_port
from tests.signaling.test_fleet_queue import node
from tests.support import Client, clients, run_server, write_config

PREFIXES = iter(range(1_000_000))


def prefix() -> str:
    return f"lim{next(PREFIXES)}:"


@asynccontextmanager
async def processes(url: str, key_prefix: str, settings: LimitsSettings, count: int = 2, *,
                    heartbeat_s: float = 5.0, ttl_s: float = 15.0,
                    ) -> AsyncIterator[list[tuple[RedisLiveStore, RedisClinicianLimits]]]:
    """``count`` processes' live stores (started: registered, heartbeating) and limits."""
    made: list[tuple[RedisLiveStore, RedisClinicianLimits]] = []
    async with AsyncExitStack() as stack:
        for index in range(count):
            live = RedisLiveStore.from_url(url, prefix=key_prefix, instance_id=f"p{index}",
                                           heartbeat_s=heartbeat_s, ttl_s=ttl_s)
            await live.start()
            stack.push_async_callback(live.close)
            limits = RedisClinicianLimits.from_url(url, prefix=key_prefix, live=live,
                                                   settings=settings)
            stack.push_async_callback(limits.close)
            made.append((live, limits))
        yield made


async def test_a_chat_burst_over_two_processes_is_admitted_once(
        redis_server: RedisServer) -> None:
    key_prefix = prefix()
    async with processes(redis_server.url, key_prefix,
                         LimitsSettings(chat_per_minute=10)) as [(_, a), (_, b)]:
        started = time.perf_counter()
        answers = await asyncio.gather(*(
            (a if i % 2 else b).admit_chat("ref1") for i in range(40)))
        took = time.perf_counter() - started
        assert answers.count(True) == 10, answers
        assert await a.admit_chat("ref2") and await b.admit_chat("ref2")
        probe = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            # Bounded and expiring: one key per clinician who chatted, gone once refilled.
            keys = sorted(await probe.keys(key_prefix + "limits:chat:*"))
            assert keys == [key_prefix + "limits:chat:ref1", key_prefix + "limits:chat:ref2"]
            ttl_ms = await probe.pttl(key_prefix + "limits:chat:ref1")
            assert 55_000 < ttl_ms <= 60_001, ttl_ms
            assert 0 < await probe.pttl(key_prefix + "limits:chat:ref2") <= 12_001
        finally:
            await probe.aclose()
        print(f"40 chat admissions over 2 processes: 10 admitted in {took * 1000:.1f} ms")


async def test_the_chat_allowance_refills_at_its_rate(redis_server: RedisServer) -> None:
    """600 a minute: 600 at once, then 10 a second (the bucket of ChatLimits)."""
    async with processes(redis_server.url, prefix(),
                         LimitsSettings(chat_per_minute=600)) as [(_, a), (_, b)]:
        started = time.monotonic()
        answers = await asyncio.gather(*(a.admit_chat("ref1") for _ in range(601)))
        emptied = time.monotonic()
        # The bucket refills while the 601 calls run (10 a second): a loaded machine that
        # takes 0.2 s over them admits 602.
        assert 600 <= answers.count(True) <= 600 + (emptied - started) * 10 + 1, \
            (answers.count(True), emptied - started)
        await asyncio.sleep(0.35)
        refilled = 0
        for _ in range(20):
            refilled += await b.admit_chat("ref1")
        elapsed = time.monotonic() - emptied
        assert 1 <= refilled <= elapsed * 10 + 1, (refilled, elapsed)


async def test_a_connect_burst_over_two_processes_admits_exactly_the_limit(
        redis_server: RedisServer) -> None:
    key_prefix = prefix()
    async with processes(redis_server.url, key_prefix,
                         LimitsSettings(connections_per_clinician=3)) as [(_, a), (_, b)]:
        answers = await asyncio.gather(*(
            (a if i % 2 else b).admit_connection("ref1", f"sid{i}", 0) for i in range(30)))
        admitted = [f"sid{i}" for i, (ok, _) in enumerate(answers) if ok]
        assert len(admitted) == 3, answers
        assert max(count for _, count in answers) == 3
        # Admitting one again (a retried connect) does not count it twice.
        assert await a.admit_connection("ref1", admitted[0], 0) == (True, 3)
        assert (await b.admit_connection("ref2", "other", 0))[0]
        # A released place is taken on the other process.
        await a.release_connection("ref1", admitted[0])
        assert await b.admit_connection("ref1", "again", 0) == (True, 3)
        assert await a.admit_connection("ref1", "over", 0) == (False, 3)


async def test_a_dead_process_connections_stop_counting(redis_server: RedisServer) -> None:
    """A process that stops heartbeating (killed, frozen): its clinicians' places are free
    once its instance runs out, and its sweep takes them out of Redis."""
    key_prefix = prefix()
    settings = LimitsSettings(connections_per_clinician=2)
    async with processes(redis_server.url, key_prefix, settings, heartbeat_s=0.2,
                         ttl_s=0.6) as [(live_a, a), (_, b)]:
        assert (await a.admit_connection("ref1", "a1", 0))[0]
        assert (await a.admit_connection("ref1", "a2", 0))[0]
        assert await b.admit_connection("ref1", "b1", 0) == (False, 2)
        await live_a.close()  # its heartbeat stops; what it wrote stays in Redis
        stopped = time.monotonic()
        while not (await b.admit_connection("ref1", "b1", 0))[0]:
            assert time.monotonic() - stopped < 5, "the dead process's places still count"
            await asyncio.sleep(0.05)
        print(f"a dead process's connections stopped counting after "
              f"{time.monotonic() - stopped:.2f} s (instance TTL 0.6 s)")
        probe = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            assert await probe.hgetall(key_prefix + "clinician-connections:ref1") == {
                "b1": "p1"}
            for _ in range(100):  # b's next heartbeat sweeps a's index of places
                if not await probe.exists(key_prefix + "admitted:p0"):
                    break
                await asyncio.sleep(0.05)
            assert await probe.smembers(key_prefix + "admitted:p1") == {"ref1"}
            assert not await probe.exists(key_prefix + "admitted:p0")
        finally:
            await probe.aclose()


async def test_a_restarted_process_frees_the_places_its_previous_run_held(
        redis_server: RedisServer) -> None:
    """Killed holding places (one it never recorded as a connection, one whose release never
    reached Redis): the same instance starting again sweeps them, at once."""
    key_prefix = prefix()
    settings = LimitsSettings(connections_per_clinician=2)
    async with processes(redis_server.url, key_prefix, settings, count=1) as [(_, a)]:
        assert (await a.admit_connection("ref1", "a1", 0))[0]
        assert (await a.admit_connection("ref1", "a2", 0))[0]
        assert not (await a.admit_connection("ref1", "a3", 0))[0]
    async with processes(redis_server.url, key_prefix, settings, count=1) as [(_, again)]:
        assert await again.admit_connection("ref1", "a3", 0) == (True, 1)


def redis_with_aof(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """redis-server on ``port`` writing every command to its AOF, so a restart finds them."""
    return subprocess.Popen(
        [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
         "--save", "", "--appendonly", "yes", "--appendfsync", "always",
         "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def answers(url: str) -> None:
    probe = aioredis.Redis.from_url(url)
    try:
        for _ in range(100):
            try:
                await probe.ping()
                return
            except (OSError, aioredis.ConnectionError):
                await asyncio.sleep(0.05)
        raise AssertionError(f"redis-server at {url} did not answer in 5 s")
    finally:
        await probe.aclose()


async def test_with_redis_away_chat_and_connections_are_refused_then_carry_on(
        tmp_path: Path) -> None:
    """Redis killed: a chat message and a connection are refused ``limits_unavailable`` at
    once, never admitted uncounted; a release that failed meanwhile is done with the next
    call once Redis is back (from its AOF), so the closed connection's place is free."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = redis_with_aof(port, tmp_path)
    try:
        await answers(url)
        async with processes(url, prefix(), LimitsSettings(connections_per_clinician=1,
                                                           chat_per_minute=5),
                             count=1) as [(_, a)]:
            assert (await a.admit_connection("ref1", "s1", 0))[0]
            assert await a.admit_chat("ref1")
            server.kill()
            server.wait(timeout=10)
            started = time.perf_counter()
            with pytest.raises(LimitsUnavailable) as refused:
                await a.admit_chat("ref1")
            assert refused.value.code == "limits_unavailable"
            with pytest.raises(LimitsUnavailable):
                await a.admit_connection("ref1", "s2", 0)
            took = time.perf_counter() - started
            await a.release_connection("ref1", "s1")  # logged, kept for later
            server = redis_with_aof(port, tmp_path)
            await answers(url)
            assert await a.admit_connection("ref1", "s2", 0) == (True, 1), \
                "s1's release was retried"
            assert await a.admit_chat("ref1")
            print(f"Redis away: chat and a connection refused in {took * 1000:.1f} ms")
    finally:
        server.kill()
        server.wait(timeout=10)


# -- two real `serve` apps on one Redis and one PostgreSQL --------------------------------
async def connect(url: str, token: str) -> Client | str:
    """A connected client, or the code it was refused with."""
    client = Client(url, token)
    reasons: list[Any] = []
    client.sio.on("connect_error", reasons.append)
    try:
        return await client.connect()
    except socketio.exceptions.ConnectionError:
        await client.close()
        return str(reasons[0]["data"]["code"]) if reasons else "no reason"


async def test_a_clinician_connections_over_two_nodes_are_limited_once(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    key_prefix = prefix()
    limits = {"connections_per_clinician": 3}
    async with node(tmp_path, "a", redis_server, postgres_dsn, key_prefix,
                    limits=limits) as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, key_prefix, limits=limits) as b:
        token = a.token("ref1")
        started = time.perf_counter()
        made = await asyncio.gather(*(connect((a, b)[i % 2].url, token) for i in range(10)))
        took = time.perf_counter() - started
        open_ones = [c for c in made if isinstance(c, Client)]
        refused = [c for c in made if isinstance(c, str)]
        try:
            assert len(open_ones) == 3, made
            assert refused == ["too_many_connections"] * 7
            print(f"10 concurrent connects of one clinician over 2 nodes: 3 admitted, "
                  f"7 refused in {took:.2f} s")
            # Another clinician is not affected; a place freed on one node is taken on the
            # other.
            async with clients(b.url, {"ref2": b.token("ref2")}) as other:
                await other["ref2"].ok("queue:get", {})
            await open_ones.pop().close()
            freed = time.monotonic()
            again: Client | str = "not tried"
            for _ in range(50):
                again = await connect(b.url, token)
                if isinstance(again, Client):
                    break
                assert again == "too_many_connections"
                await asyncio.sleep(0.05)
            assert isinstance(again, Client), "the closed connection's place was not freed"
            print(f"a place freed on one node taken on the other "
                  f"{time.monotonic() - freed:.2f} s after the close")
            open_ones.append(again)
            assert await connect(a.url, token) == "too_many_connections"
        finally:
            for client in open_ones:
                await client.close()


async def test_a_clinician_chat_from_tabs_on_two_nodes_gets_one_allowance(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    key_prefix = prefix()
    limits = {"chat_per_minute": 4}
    async with node(tmp_path, "a", redis_server, postgres_dsn, key_prefix,
                    limits=limits) as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, key_prefix, limits=limits) as b, \
            clients(a.url, {"ref1": a.token("ref1"), "cardio1": a.token("cardio1")}) as c, \
            clients(b.url, {"ref1": b.token("ref1")}) as on_b:
        cid = await open_consultation(c)
        await on_b["ref1"].ok("consult:join", {"consultation_id": cid})
        sent = await asyncio.gather(*(
            (c if i % 2 else on_b)["ref1"].call("chat:send", {"consultation_id": cid,
                                                              "text": f"m{i}"})
            for i in range(10)))
        accepted = [s for s in sent if s.get("ok")]
        refused = {s["error"]["code"] for s in sent if "error" in s}
        assert len(accepted) == 4 and refused == {"rate_limited"}, sent
        # The specialist got exactly those 4.
        for _ in range(4):
            await c["cardio1"].next("chat:message")
        await asyncio.sleep(0.2)
        assert c["cardio1"].drain("chat:message") == []
        # Another participant's allowance is their own.
        await c["cardio1"].ok("chat:send", {"consultation_id": cid, "text": "reply"})


async def test_a_node_with_redis_away_refuses_connects_and_chat_with_limits_unavailable(
        tmp_path: Path) -> None:
    """The codes a client sees (a connect's ``connect_error``, a chat's ack) while the
    fleet's Redis is away, and the node admitting again once it is back (from its AOF, as
    docs/fleet.md sets Redis up: the participants are still there)."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = redis_with_aof(port, tmp_path)
    home = tmp_path / "node"
    home.mkdir()
    config = write_config(home, live={"backend": "redis", "redis_url": url,
                                      "key_prefix": prefix()})
    try:
        await answers(url)
        async with run_server(config) as node_a, \
                clients(node_a.url, {"ref1": node_a.token("ref1"),
                                     "cardio1": node_a.token("cardio1")}) as c:
            cid = await open_consultation(c)
            await c["ref1"].ok("chat:send", {"consultation_id": cid, "text": "before"})
            server.kill()
            server.wait(timeout=10)
            started = time.perf_counter()
            assert await connect(node_a.url, node_a.token("ref2")) == "limits_unavailable"
            await c["ref1"].refused("chat:send", {"consultation_id": cid, "text": "away"},
                                    "limits_unavailable")
            took = time.perf_counter() - started
            server = redis_with_aof(port, tmp_path)
            await answers(url)
            back = await connect(node_a.url, node_a.token("ref2"))
            assert isinstance(back, Client), back
            await back.close()
            await c["ref1"].ok("chat:send", {"consultation_id": cid, "text": "after"})
            print(f"Redis away: a connect and a chat refused limits_unavailable in "
                  f"{took * 1000:.0f} ms; both admitted again once it answered")
    finally:
        server.kill()
        server.wait(timeout=10)
