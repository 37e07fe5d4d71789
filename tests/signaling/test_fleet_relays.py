"""Relays shared by a fleet (signaling/relay_registry.py): two (or three) real `serve` apps in
this process on one real redis-server and one PostgreSQL, ``relay.embedded = false``, real
relay nodes (``relay.node.RelayNode``) dialling one of them through a ``TcpLink``, real aiortc
participants where media is checked.

What it shows: a relay connected to node A is in the registry (owner, sid) and node B places
on it and drives it, the commands and their acks carried across by python-socketio's Redis
manager; the relay's offers, heard by A, reach the participants connected to B; a relay lost
at A moves every consultation placed on it, by A and by B, once; a node that starts leaves
the rooms of a live node alone; a relay whose node stopped says hello to the other node and
its rooms are adopted there."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from relay.remote import RemoteRelay
from signaling.relay_registry import (
    STALE_S,
    FleetRelayDirectory,
    PlacementRecord,
    RelayEntry,
)
from telehealth.startup import SERVICES, Services
from tests.consultation_media import open_consultation
from tests.media import wait_for
from tests.redis_server import RedisServer
from tests.signaling.test_failover_signaling import NAMES, media_of, port_of, relay_node
from tests.support import Client, Server, clients, run_server, write_config

PREFIXES = itertools.count()


@asynccontextmanager
async def node(tmp_path: Path, name: str, redis: RedisServer, dsn: str, prefix: str,
               recording: dict[str, Any] | None = None) -> AsyncIterator[Server]:
    """One `serve` app of a fleet, in this process, with its own data directory (and the
    ``recording`` settings given: a shared archive)."""
    home = tmp_path / name
    home.mkdir()
    config = write_config(home, live={"backend": "redis", "redis_url": redis.url,
                                      "key_prefix": prefix, "timers_lease_s": 2.0},
                          storage={"backend": "postgresql", "postgresql_dsn": dsn,
                                   "data_dir": str(home / "data")},
                          relay={"embedded": False, "adopt_wait_s": 2.0},
                          **({"recording": recording} if recording else {}))
    async with run_server(config) as server:
        yield server


def services(server: Server) -> Services:
    assert server.app is not None
    return server.app[SERVICES]


def fleet_of(server: Server) -> FleetRelayDirectory:
    relays = services(server).relays
    assert isinstance(relays, FleetRelayDirectory)
    return relays


@asynccontextmanager
async def redis_client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def placed(redis: aioredis.Redis, prefix: str, cid: str) -> PlacementRecord:
    raw = await redis.hget(prefix + "placements", cid)
    assert raw is not None, f"no placement of {cid} in the registry"
    return PlacementRecord.model_validate_json(raw)


async def entry_of(redis: aioredis.Redis, prefix: str, relay_id: str) -> RelayEntry:
    raw = await redis.hget(prefix + "relays", relay_id)
    assert raw is not None, f"no entry of {relay_id} in the registry"
    return RelayEntry.model_validate_json(raw)


async def sees(server: Server, relay_id: str) -> None:
    await wait_for(lambda: fleet_of(server).get(relay_id) is not None, 10,
                   f"{relay_id} in the view of {server.url}")


async def _command_ms(relay: RemoteRelay, cid: str) -> float:
    """Median time of 20 ``stats`` commands to the relay, in ms."""
    times = []
    for _ in range(20):
        started = time.perf_counter()
        await relay.stats(cid)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def moves(server: Server) -> float:
    """Consultations this node moved off a lost relay onto another."""
    counter = services(server).metrics.relay_moves.labels(reason="relay_lost",
                                                          outcome="placed")
    return float(counter._value.get())


async def test_node_b_places_on_a_relay_connected_to_node_a_and_media_flows(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    prefix = f"r{next(PREFIXES)}:"
    async with node(tmp_path, "a", redis_server, postgres_dsn, prefix) as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, prefix) as b, \
            redis_client(redis_server) as redis, \
            relay_node(a, "relay-a", "01") as relay:
        await sees(b, "relay-a")
        here, there = fleet_of(a).get("relay-a"), fleet_of(b).get("relay-a")
        assert isinstance(here, RemoteRelay) and isinstance(there, RemoteRelay)
        assert there is not here and there.sid == here.sid
        entry = await entry_of(redis, prefix, "relay-a")
        assert (entry.owner, entry.sid, entry.region, entry.capacity) \
            == (fleet_of(a).instance_id, here.sid, "01", relay.node.settings.relay.capacity)
        assert entry.owner != fleet_of(b).instance_id

        async with clients(b.url, {n: b.token(n) for n in NAMES}) as c:
            started = time.monotonic()
            cid = await open_consultation(c)
            opened = time.monotonic() - started
            record = await placed(redis, prefix, cid)
            assert (record.relay_id, record.private, record.waiting) == ("relay-a", None, None)
            assert await redis.smembers(prefix + "on:relay-a") == {cid}
            assert cid in relay.rooms  # opened by node B, through node A
            local_ms = await _command_ms(here, cid)
            remote_ms = await _command_ms(there, cid)

            # Every media step from B's clients crosses to A; the relay's offers (heard by
            # A) reach the participants on B: without them nobody would receive video.
            async with media_of(c, cid):
                started = time.monotonic()
                again = await c["ref1"].ok("media:join", {"consultation_id": cid,
                                                         "resume": True})
                resumed = time.monotonic() - started
                assert again["resumed"] is True and again["relay"]["id"] == "relay-a"
            print(f"request+accept+joins on B with the relay on A: {opened * 1000:.0f} ms; "
                  f"media:join resume across nodes {resumed * 1000:.1f} ms; a command "
                  f"(stats, median of 20) from A {local_ms:.1f} ms, from B {remote_ms:.1f} ms")

            await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                  "conclusion": "fine"})
            await wait_for(lambda: cid not in relay.rooms, 10, "the room closed by node B")
            assert await redis.hget(prefix + "placements", cid) is None
            assert await redis.smembers(prefix + "on:relay-a") == set()


async def test_a_lost_relay_moves_every_node_s_consultations_once(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    """relay-1 (at node A) carries a consultation placed by A and one placed by B; relay-2
    connects to B; relay-1 dies: A moves both to relay-2, each participant is told once, B
    moves nothing."""
    prefix = f"r{next(PREFIXES)}:"
    async with node(tmp_path, "a", redis_server, postgres_dsn, prefix) as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, prefix) as b, \
            redis_client(redis_server) as redis, \
            relay_node(a, "relay-1", "01") as one, \
            clients(a.url, {n: a.token(n) for n in NAMES}) as on_a, \
            clients(b.url, {n: b.token(n) for n in NAMES}) as on_b:
        await sees(b, "relay-1")
        x = await open_consultation(on_a)
        y = await open_consultation(on_b)
        assert {x, y} <= set(one.rooms)
        assert (await placed(redis, prefix, y)).relay_id == "relay-1"
        async with relay_node(b, "relay-2", "01") as two:
            await sees(a, "relay-2")
            before = {name: moves(name_server) for name, name_server in (("a", a), ("b", b))}
            started = time.monotonic()
            one.link.drop()  # relay-1's process dies
            told: dict[str, list[Any]] = {}
            for who, c, cid in (("a", on_a, x), ("b", on_b, y)):
                for name in NAMES:
                    data = await c[name].next_matching(
                        "media:moved", lambda d, cid=cid: d["consultation_id"] == cid, 10)
                    told.setdefault(who, []).append(data["relay"]["id"])
            took = time.monotonic() - started
            assert told == {"a": ["relay-2", "relay-2"], "b": ["relay-2", "relay-2"]}
            await wait_for(lambda: {x, y} <= set(two.rooms), 10, "both rooms on relay-2")
            for cid in (x, y):
                record = await placed(redis, prefix, cid)
                assert (record.relay_id, record.waiting) == ("relay-2", None)
            assert await redis.smembers(prefix + "on:relay-1") == set()
            await wait_for(lambda: moves(a) - before["a"] == 2, 5, "A's two moves counted")
            await _quiet(on_a, on_b, 1.5)
            assert moves(a) - before["a"] == 2 and moves(b) - before["b"] == 0
            assert await redis.hget(prefix + "relays", "relay-1") is None
            print(f"relay-1 lost at A: both consultations (placed by A and by B) on relay-2, "
                  f"every participant told once, within {took:.2f} s")


async def _quiet(on_a: dict[str, Client], on_b: dict[str, Client], seconds: float) -> None:
    """No (further) media:moved arrives: a move made twice would tell twice."""
    time_up = time.monotonic() + seconds
    while time.monotonic() < time_up:
        for c in (on_a, on_b):
            for name in NAMES:
                assert c[name].drain("media:moved") == [], f"{name} told of a move again"
        await asyncio.sleep(0.1)


async def test_a_starting_node_leaves_a_live_node_s_rooms_alone(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    """Node C starts while A carries a consultation on relay-1: C's restore finds it placed
    on a live relay and changes nothing (no move, no close, the record's version as it
    was); C reaches the relay through A."""
    prefix = f"r{next(PREFIXES)}:"
    async with node(tmp_path, "a", redis_server, postgres_dsn, prefix) as a, \
            redis_client(redis_server) as redis, \
            relay_node(a, "relay-1", "01") as one, \
            clients(a.url, {n: a.token(n) for n in NAMES}) as on_a:
        cid = await open_consultation(on_a)
        await on_a["cardio1"].ok("media:join", {"consultation_id": cid})
        before = await placed(redis, prefix, cid)
        async with node(tmp_path, "c", redis_server, postgres_dsn, prefix) as c:
            relay = await fleet_of(c).locate(cid)
            assert isinstance(relay, RemoteRelay) and relay.info.id == "relay-1"
            assert fleet_of(c).waiting(cid) is None
            stats = await relay.stats(cid)  # a command from C, answered through A
            assert set(stats) == {"cardio1"}
            await _quiet(on_a, on_a, 1.5)
            assert await placed(redis, prefix, cid) == before
            assert cid in one.rooms


async def test_a_relay_whose_node_stopped_is_adopted_by_the_other_node(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    """relay-1 carries a consultation placed by A; A stops (nothing moves), relay-1 redials
    (through its link, now pointing at B, as nginx would) and says hello to B: B adopts the
    room as it is, and a participant on B drives it through B's own connection."""
    prefix = f"r{next(PREFIXES)}:"
    async with node(tmp_path, "b", redis_server, postgres_dsn, prefix) as b, \
            redis_client(redis_server) as redis, AsyncExitStack() as relays:
        async with node(tmp_path, "a", redis_server, postgres_dsn, prefix) as a:
            one = await relays.enter_async_context(relay_node(a, "relay-1", "01"))
            async with clients(a.url, {n: a.token(n) for n in NAMES}) as on_a:
                cid = await open_consultation(on_a)
            await sees(b, "relay-1")
            one.link.point_at(port_of(b))
            started = time.monotonic()
        # A has stopped.
        await wait_for(lambda: fleet_of(b).holds("relay-1"), 20, "relay-1's hello at B")
        adopted = time.monotonic() - started
        entry = await entry_of(redis, prefix, "relay-1")
        assert entry.owner == fleet_of(b).instance_id
        record = await placed(redis, prefix, cid)
        assert (record.relay_id, record.waiting) == ("relay-1", None)
        assert cid in one.rooms
        assert moves(a) == 0 and services(a).metrics.relay_moves.labels(
            reason="relay_lost", outcome="waiting")._value.get() == 0  # A moved nothing
        async with clients(b.url, {"ref1": b.token("ref1")}) as on_b:
            await on_b["ref1"].ok("consult:join", {"consultation_id": cid})
            joined = await on_b["ref1"].ok("media:join", {"consultation_id": cid,
                                                          "resume": True})
            assert joined["relay"]["id"] == "relay-1"
        print(f"relay-1 adopted by B {adopted:.2f} s after A's stop began")


async def test_an_orphaned_relay_s_consultations_move_once(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    """relay-1 carries a consultation placed by B; its node A stops and relay-1 dials nobody
    else (its link still points at A): once its entry is stale (STALE_S) and
    ``relay.adopt_wait_s`` has passed, B or C moves the consultation to relay-2 (at C),
    exactly one of them, and B's participants are told once."""
    prefix = f"r{next(PREFIXES)}:"
    async with node(tmp_path, "b", redis_server, postgres_dsn, prefix) as b, \
            node(tmp_path, "c", redis_server, postgres_dsn, prefix) as c, \
            redis_client(redis_server) as redis, AsyncExitStack() as relays, \
            clients(b.url, {n: b.token(n) for n in NAMES}) as on_b:
        async with node(tmp_path, "a", redis_server, postgres_dsn, prefix) as a:
            one = await relays.enter_async_context(relay_node(a, "relay-1", "01"))
            await sees(b, "relay-1")
            cid = await open_consultation(on_b)
            assert (await placed(redis, prefix, cid)).relay_id == "relay-1"
            two = await relays.enter_async_context(relay_node(c, "relay-2", "01"))
            await sees(b, "relay-2")
            stopped = time.monotonic()
        # A has stopped; relay-1 redials A's port in vain and keeps its room meanwhile.
        assert cid in one.rooms
        told = [(await on_b[name].next_matching(
            "media:moved", lambda d: d["consultation_id"] == cid, 40))["relay"]["id"]
            for name in NAMES]
        took = time.monotonic() - stopped
        assert told == ["relay-2", "relay-2"]
        await wait_for(lambda: cid in two.rooms, 10, "the room on relay-2")
        await _quiet(on_b, on_b, 1.5)
        assert moves(b) + moves(c) == 1
        record = await placed(redis, prefix, cid)
        assert (record.relay_id, record.waiting) == ("relay-2", None)
        assert await redis.hget(prefix + "relays", "relay-1") is None
        print(f"relay-1 orphaned when A stopped: its consultation moved once "
              f"({'B' if moves(b) else 'C'}) {took:.1f} s later (entry stale after "
              f"{STALE_S:.0f} s, adopt_wait_s 2)")


async def test_a_waiting_consultation_is_placed_once_when_a_relay_comes(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    """relay-1 (at A) dies with no other relay: B's consultation on it waits (every node's
    gauge counts it); relay-2 connects to B: A and B both try the waiting, one places it,
    and the participants (on B) are told once."""
    prefix = f"r{next(PREFIXES)}:"
    async with node(tmp_path, "a", redis_server, postgres_dsn, prefix) as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, prefix) as b, \
            redis_client(redis_server) as redis, \
            clients(b.url, {n: b.token(n) for n in NAMES}) as on_b:
        async with relay_node(a, "relay-1", "01") as one:
            await sees(b, "relay-1")
            cid = await open_consultation(on_b)
            one.link.drop()
            for name in NAMES:
                data = await on_b[name].next_matching(
                    "media:moved", lambda d: d["consultation_id"] == cid, 10)
                assert data["relay"] is None
            record = await placed(redis, prefix, cid)
            assert record.relay_id is None and record.waiting is not None
            await wait_for(lambda: all(fleet_of(s).waiting(cid) is not None for s in (a, b)),
                           5, "both nodes to see it waiting")
        async with relay_node(b, "relay-2", "01") as two:
            started = time.monotonic()
            for name in NAMES:
                data = await on_b[name].next_matching(
                    "media:moved", lambda d: d["consultation_id"] == cid, 10)
                assert data["relay"]["id"] == "relay-2"
            took = time.monotonic() - started
            await wait_for(lambda: cid in two.rooms, 10, "the room on relay-2")
            await _quiet(on_b, on_b, 1.5)
            record = await placed(redis, prefix, cid)
            assert (record.relay_id, record.waiting) == ("relay-2", None)
            placed_by = [services(s).metrics.relay_moves.labels(
                reason="relay_lost", outcome="placed")._value.get() for s in (a, b)]
            assert sorted(placed_by) == [0, 1], placed_by
            await wait_for(lambda: all(not fleet_of(s).waiting_rooms() for s in (a, b)), 5,
                           "no node to count it waiting")
            print(f"waiting consultation placed once ({'A' if placed_by[0] else 'B'}) "
                  f"{took:.2f} s after relay-2 connected")
