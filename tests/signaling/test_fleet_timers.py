"""The fleet's bus and the timers' lease (signaling/fleet.py) on a real redis-server: one
leader among members, a takeover when it stops or dies, messages between members (never to
their sender, malformed ones dropped), and the bus back after Redis restarts."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from config.settings import load_settings
from signaling.fleet import LocalFleet, RedisFleet, fleet_for, raise_if_cancelled
from tests.redis_server import REDIS_SERVER, RedisServer, start_redis, stop_redis
from tests.support import write_config

PREFIX_COUNT = iter(range(1_000_000))


def prefix() -> str:
    """A prefix of the test's own (one redis-server per module)."""
    return f"t{next(PREFIX_COUNT)}:"


@asynccontextmanager
async def members(url: str, count: int, *, lease_s: float = 1.0, resync_s: float = 10.0,
                  pre: str | None = None) -> AsyncIterator[list[RedisFleet]]:
    pre = prefix() if pre is None else pre
    made = [RedisFleet(url, prefix=pre, instance_id=f"node{i}", lease_s=lease_s,
                       resync_s=resync_s) for i in range(count)]
    started: list[RedisFleet] = []
    try:
        for fleet in made:
            await fleet.start()
            started.append(fleet)
        yield made
    finally:
        for fleet in started:
            await fleet.stop()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.02,
                ) -> float:
    """Seconds until ``check()`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        await asyncio.sleep(step)
    return time.monotonic() - started


async def test_one_of_two_members_leads_and_the_other_takes_over_when_it_stops(
        redis_server: RedisServer) -> None:
    async with members(redis_server.url, 2) as (a, b):
        assert await a.leads_timers()
        for _ in range(5):
            assert not await b.leads_timers()
            assert await a.leads_timers()
        await a.stop()
        started = time.monotonic()
        assert await b.leads_timers(), "the released lease is free at once"
        print(f"takeover after a stop: {time.monotonic() - started:.3f} s")
        assert await b.leads_timers()


async def test_when_the_leader_dies_another_member_takes_over_after_the_lease(
        redis_server: RedisServer) -> None:
    """The leader stops renewing (a killed process never releases): the other member, asking
    every 0.05 s, leads once the 1 s lease has run out, not before."""
    async with members(redis_server.url, 2, lease_s=1.0) as (a, b):
        assert await a.leads_timers()
        died = time.monotonic()
        assert not await b.leads_timers()

        async def b_leads() -> bool:
            return await b.leads_timers()

        waited = await until(b_leads, timeout=5.0, step=0.05)
        took = time.monotonic() - died
        print(f"takeover after the leader died: {took:.3f} s (lease 1.0 s)")
        assert 0.8 <= took <= 2.5
        assert not await a.leads_timers(), "the former leader finds the lease taken"
        assert waited > 0


async def test_members_hear_each_other_never_themselves(redis_server: RedisServer) -> None:
    async with members(redis_server.url, 3) as fleets:
        heard: dict[str, list[dict[str, Any]]] = {f.instance_id: [] for f in fleets}
        for fleet in fleets:
            async def note(data: dict[str, Any], me: str = fleet.instance_id) -> None:
                heard[me].append(data)
            fleet.subscribe("probe", note)
        started = time.monotonic()
        await fleets[0].publish("probe", {"n": 1})
        await fleets[1].publish("probe", {"n": 2})
        await fleets[1].publish("other", {"n": 3})  # nobody subscribed to it

        async def all_heard() -> bool:
            return len(heard["node2"]) == 2 and len(heard["node0"]) == 1 \
                and len(heard["node1"]) == 1

        await until(all_heard, timeout=5.0)
        print(f"bus: 3 members heard 2 messages in {time.monotonic() - started:.3f} s")
        await asyncio.sleep(0.2)  # nothing more arrives
        # Order is kept per sender only: two members publish over their own connections.
        heard["node2"].sort(key=lambda data: data["n"])
        assert heard == {"node0": [{"n": 2}], "node1": [{"n": 1}],
                         "node2": [{"n": 1}, {"n": 2}]}


async def test_a_malformed_message_is_dropped_and_the_bus_goes_on(
        redis_server: RedisServer) -> None:
    pre = prefix()
    async with members(redis_server.url, 1, pre=pre) as (a,):
        heard: list[dict[str, Any]] = []

        async def note(data: dict[str, Any]) -> None:
            heard.append(data)

        async def fails(data: dict[str, Any]) -> None:
            raise RuntimeError("a handler's fault")

        a.subscribe("probe", fails)
        a.subscribe("probe", note)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            for bad in (b"not json", b"[1, 2]", b'{"sender": "x"}',
                        b'{"sender": "x", "kind": "BAD KIND", "data": {}}',
                        b'{"sender": "x", "kind": "probe", "data": [1]}',
                        b'{"sender": "x", "kind": "probe", "data": {}, "extra": 1}',
                        b"\xff\xfe"):
                await raw.publish(pre + "fleet", bad)
            await raw.publish(pre + "fleet", b'{"sender": "x", "kind": "probe", '
                                             b'"data": {"ok": true}}')
        finally:
            await raw.aclose()

        async def heard_it() -> bool:
            return heard == [{"ok": True}]

        await until(heard_it, timeout=5.0)
        assert a.dropped == 7
        assert a.received == 1


async def test_local_fleet_leads_and_says_nothing(tmp_path: Path,
                                                  redis_server: RedisServer) -> None:
    local = LocalFleet()
    await local.start()
    assert await local.leads_timers()
    await local.publish("queue", {"x": 1})
    await local.stop()
    # A fleet only when the records are shared too: Redis with SQLite keeps LocalFleet.
    for name in "abc":
        (tmp_path / name).mkdir()
    redis_only = load_settings(write_config(tmp_path / "a", live={
        "backend": "redis", "redis_url": redis_server.url}))
    assert isinstance(fleet_for(redis_only, "x"), LocalFleet)
    both = load_settings(write_config(tmp_path / "b", live={
        "backend": "redis", "redis_url": redis_server.url},
        storage={"backend": "postgresql", "data_dir": str(tmp_path / "b" / "data")}))
    fleet = fleet_for(both, "node-b")
    assert isinstance(fleet, RedisFleet) and fleet.instance_id == "node-b"
    await fleet.stop()  # never started: closes its client
    assert isinstance(fleet_for(load_settings(write_config(tmp_path / "c")), "y"), LocalFleet)


def redis_on(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """redis-server again on ``port`` (as tests/redis_server.py starts it)."""
    return subprocess.Popen(
        [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--logfile", str(directory / "again.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_after_redis_restarts_the_bus_resyncs_and_carries_again(tmp_path: Path) -> None:
    """Redis killed and started again on its port: each member's listener dials again, runs
    its resync hooks once it is back, and messages and the lease work again."""
    server = start_redis(tmp_path)
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    again: subprocess.Popen[bytes] | None = None
    try:
        async with members(server.url, 2) as (a, b):
            resyncs: list[float] = []

            async def resync() -> None:
                resyncs.append(time.monotonic())

            b.on_resync(resync)
            heard: list[dict[str, Any]] = []

            async def note(data: dict[str, Any]) -> None:
                heard.append(data)

            b.subscribe("probe", note)
            assert await a.leads_timers()
            server.process.kill()
            server.process.wait(timeout=10)
            killed = time.monotonic()
            assert not await a.leads_timers(), "no Redis, no leader"
            await a.publish("probe", {"lost": True})  # dropped: Redis is away
            await asyncio.sleep(0.5)
            again = redis_on(port, tmp_path)

            async def resynced() -> bool:
                return bool(resyncs)

            await until(resynced, timeout=15.0, step=0.05)
            print(f"bus back and resynced {resyncs[0] - killed:.2f} s after the kill "
                  f"(Redis away ~0.5 s)")
            assert b.reconnects >= 1

            # Right after the bus is back, the lease and a message work at the first try.
            assert await a.leads_timers(), "the lease is free again (Redis kept nothing)"
            await a.publish("probe", {"back": True})

            async def carried() -> bool:
                return {"back": True} in heard

            await until(carried, timeout=5.0)
            assert heard == [{"back": True}], "the message said while Redis was away is lost"
            assert not await b.leads_timers()
    finally:
        stop_redis(server)
        if again is not None:
            stop_redis(RedisServer("", again))


async def test_the_periodic_resync_runs_on_every_member(redis_server: RedisServer) -> None:
    async with members(redis_server.url, 2, resync_s=0.2) as (a, b):
        counts = {"node0": 0, "node1": 0}
        for fleet in (a, b):
            async def count(me: str = fleet.instance_id) -> None:
                counts[me] += 1
            fleet.on_resync(count)
        await asyncio.sleep(1.1)
        assert 3 <= counts["node0"] <= 7 and 3 <= counts["node1"] <= 7, counts


async def test_a_loop_over_the_lease_always_stops_when_cancelled(
        redis_server: RedisServer) -> None:
    """redis-py 8.1 may lose a cancellation that arrives during a command; the timers' loop
    checks after each round (``raise_if_cancelled``), so a stop never waits for ever."""
    async with members(redis_server.url, 1) as (a,):
        async def timers() -> None:
            while True:
                await a.leads_timers()
                raise_if_cancelled()

        rng = random.Random(14)
        slowest = 0.0
        for _ in range(100):
            task = asyncio.create_task(timers())
            await asyncio.sleep(rng.random() * 0.003)
            task.cancel()
            started = time.monotonic()
            done, _ = await asyncio.wait([task], timeout=2.0)
            assert done, "the loop ran on after its cancellation"
            slowest = max(slowest, time.monotonic() - started)
        print(f"100 cancellations of a loop over the lease: each stopped, slowest "
              f"{slowest * 1000:.1f} ms")


async def test_a_member_does_not_start_without_its_redis(tmp_path: Path) -> None:
    """Nothing listens at the URL: ``start`` fails at once (serve does not start), saying
    so, as the live state does."""
    server = start_redis(tmp_path)
    url = server.url
    stop_redis(server)
    fleet = RedisFleet(url, prefix=prefix(), instance_id="x", lease_s=1.0)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await fleet.start()
    assert time.monotonic() - started < 5.0
