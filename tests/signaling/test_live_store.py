"""The LiveStore contract, run against MemoryLiveStore and RedisLiveStore (a real redis-server
this module starts on 127.0.0.1, an ephemeral port, in a temporary directory, without
persistence, stopped at the end); then what only Redis does: a dead process's connections and
sids swept, a restarted process's own previous run swept at start."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from signaling.live import Connection, LiveStore, MemoryLiveStore, Participant
from signaling.live_redis import RedisLiveStore, instance_id_for
from tests.redis_server import RedisServer


def redis_store(server: RedisServer, prefix: str, instance: str, **kwargs: float
                ) -> RedisLiveStore:
    return RedisLiveStore.from_url(server.url, prefix=prefix, instance_id=instance, **kwargs)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LiveStore]:
    if request.param == "memory":
        yield MemoryLiveStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    live = redis_store(server, f"t{secrets.token_hex(4)}:", "node-a")
    await live.start()
    try:
        yield live
    finally:
        await live.close()


# -- the contract ----------------------------------------------------------------------------
async def test_presence(store: LiveStore) -> None:
    assert await store.add_connection(Connection("s1", "ref1", "d1")) is True
    assert await store.add_connection(Connection("s2", "ref1", "d1")) is False
    assert await store.add_connection(Connection("s3", "cardio1", "c1")) is True
    assert await store.online_sites() == {"d1": 2, "c1": 1}
    assert await store.remove_connection("s1") == (Connection("s1", "ref1", "d1"), False)
    assert await store.remove_connection("s2") == (Connection("s2", "ref1", "d1"), True)
    assert await store.remove_connection("s2") == (None, False)
    assert await store.remove_connection("never") == (None, False)
    assert await store.online_sites() == {"c1": 1}


async def test_a_site_comes_online_and_goes_offline_exactly_once(store: LiveStore) -> None:
    """40 connections of one site arrive at once, then leave at once."""
    firsts = await asyncio.gather(*(store.add_connection(Connection(f"s{i}", "ref1", "d1"))
                                    for i in range(40)))
    assert sum(firsts) == 1
    assert await store.online_sites() == {"d1": 40}
    removed = await asyncio.gather(*(store.remove_connection(f"s{i}") for i in range(40)))
    assert sum(last for _, last in removed) == 1
    assert all(c is not None for c, _ in removed)
    assert await store.online_sites() == {}


async def test_membership(store: LiveStore) -> None:
    joined = 1764745200.123456789
    one = Participant("k1", "ref1", "d1", joined, sids={"s1", "s2"})
    two = Participant("k1", "cardio1", "c1", joined + 1, sids={"s3"})
    other = Participant("k2", "ref1", "d1", joined + 2, sids={"s1"})
    for participant in (one, two, other):
        await store.put_participant(participant)
    assert await store.get_participant("k1", "ref1") == one
    assert await store.get_participant("k1", "nobody") is None
    assert await store.get_participant("none", "ref1") is None
    assert sorted(await store.participants("k1"), key=lambda p: p.joined_at) == [one, two]
    assert await store.participants("none") == []
    assert sorted(await store.memberships_of("ref1"), key=lambda p: p.joined_at) \
        == [one, other]
    assert await store.reconnecting() == []

    two.sids.clear()
    two.state = "reconnecting"
    two.away_since = joined + 5.000001
    await store.put_participant(two)
    assert await store.reconnecting() == [two]
    assert await store.get_participant("k1", "cardio1") == two
    two.sids.add("s4")
    two.state = "present"
    two.away_since = None
    await store.put_participant(two)
    assert await store.reconnecting() == []
    two.sids.clear()
    two.state = "reconnecting"
    two.away_since = joined + 6.5
    await store.put_participant(two)
    assert await store.reconnecting() == [two]

    await store.remove_participant("k1", "ref1")
    await store.remove_participant("k1", "ref1")
    assert await store.memberships_of("ref1") == [other]
    assert await store.participants("k1") == [two]

    assert await store.drop_consultation("k1") == [two]
    assert await store.drop_consultation("k1") == []
    assert await store.memberships_of("cardio1") == []
    assert await store.reconnecting() == []
    assert await store.participants("k2") == [other]


async def test_timings(store: LiveStore) -> None:
    """Not a benchmark: the figures of one run, printed, with a generous bound."""
    started = time.perf_counter()
    await asyncio.gather(*(store.add_connection(Connection(f"s{i}", f"c{i}", f"site{i % 500}"))
                           for i in range(2000)))
    for i in range(2000):
        await store.put_participant(Participant(f"k{i // 4}", f"c{i}", f"site{i % 500}", 1.0,
                                                sids={f"s{i}"},
                                                state="reconnecting" if i % 10 else "present",
                                                away_since=2.0 if i % 10 else None))
    filled = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(10):
        away = await store.reconnecting()
    scan = (time.perf_counter() - started) / 10
    assert len(away) == 1800 and len(await store.online_sites()) == 500
    print(f"{type(store).__name__}: 2000 connections and participants in {filled:.2f} s, "
          f"reconnecting() of 1800 in {1000 * scan:.1f} ms")
    assert filled < 30 and scan < 5


# -- Redis only: processes come and go -------------------------------------------------------
async def test_a_dead_process_is_swept_by_another(redis_server: RedisServer) -> None:
    """Node a stops heartbeating (as if killed): within its TTL node b's heartbeat forgets its
    connections (its sites go offline) and takes its sids out of the participants; one left
    with none is reconnecting, one still connected through b stays present."""
    prefix = f"t{secrets.token_hex(4)}:"
    a = redis_store(redis_server, prefix, "node-a", heartbeat_s=0.2, ttl_s=0.6)
    b = redis_store(redis_server, prefix, "node-b", heartbeat_s=0.2, ttl_s=0.6)
    await a.start()
    await b.start()
    try:
        await a.add_connection(Connection("a1", "ref1", "d1"))
        await a.add_connection(Connection("a2", "cardio1", "c1"))
        assert await b.add_connection(Connection("b1", "cardio1", "c1")) is False
        now = time.time()
        await a.put_participant(Participant("k1", "ref1", "d1", now, sids={"a1"}))
        await a.put_participant(Participant("k1", "cardio1", "c1", now, sids={"a2"}))
        # b puts cardio1 again with its own sid added: a2 stays a's, b1 is b's.
        await b.put_participant(Participant("k1", "cardio1", "c1", now, sids={"a2", "b1"}))
        assert await b.online_sites() == {"d1": 1, "c1": 2}

        await a.close()  # no more heartbeats, nothing cleaned: as a kill -9 leaves it
        started = time.monotonic()
        while await b.online_sites() != {"c1": 1}:
            assert time.monotonic() - started < 5.0, await b.online_sites()
            await asyncio.sleep(0.05)
        print(f"dead instance swept {time.monotonic() - started:.2f} s after its last beat "
              f"(ttl 0.6 s, heartbeat 0.2 s)")
        ref1 = await b.get_participant("k1", "ref1")
        assert ref1 is not None
        assert ref1.state == "reconnecting" and ref1.sids == set()
        assert ref1.away_since is not None and ref1.away_since >= now
        cardio1 = await b.get_participant("k1", "cardio1")
        assert cardio1 is not None
        assert cardio1.state == "present" and cardio1.sids == {"b1"}
        assert await b.reconnecting() == [ref1]
        # a's sids are gone for good: removing one now changes nothing.
        assert await b.remove_connection("a1") == (None, False)
    finally:
        await b.close()


async def test_a_restart_sweeps_its_own_previous_run(redis_server: RedisServer,
                                                     tmp_path: Path) -> None:
    """The same instance id (from the data directory) starting again: its connections are
    forgotten at once (no TTL to wait for), its participants reconnecting from the start."""
    prefix = f"t{secrets.token_hex(4)}:"
    instance = instance_id_for(tmp_path)
    assert instance_id_for(tmp_path) == instance
    first = redis_store(redis_server, prefix, instance)
    await first.start()
    await first.add_connection(Connection("s1", "ref1", "d1"))
    await first.put_participant(Participant("k1", "ref1", "d1", 1.5, sids={"s1"}))
    await first.close()

    before = time.time()
    again = redis_store(redis_server, prefix, instance)
    await again.start()
    try:
        assert await again.online_sites() == {}
        participant = await again.get_participant("k1", "ref1")
        assert participant is not None
        assert (participant.state, participant.sids, participant.joined_at) \
            == ("reconnecting", set(), 1.5)
        assert participant.away_since is not None and participant.away_since >= before
        assert await again.add_connection(Connection("s2", "ref1", "d1")) is True
    finally:
        await again.close()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await client.zscore(prefix + "instances", instance) is not None
    finally:
        await client.aclose()


async def test_media_sid(store: LiveStore) -> None:
    """The connection that carries a participant's media: written only by set_media_sid (a
    put_participant keeps it, so that the lifecycle's read-modify-write of a participant cannot
    undo a media:join that ran meanwhile), compare-and-set with ``expected``, gone with the
    participant."""
    assert await store.set_media_sid("k1", "ref1", "s1") is False  # no such participant
    await store.put_participant(Participant("k1", "ref1", "d1", 1.0, sids={"s1"}))
    stale = await store.get_participant("k1", "ref1")
    assert stale is not None and stale.media_sid is None
    stale = Participant(stale.consultation_id, stale.clinician_id, stale.site_id,
                        stale.joined_at, sids=set(stale.sids))  # a copy, as from Redis
    assert await store.set_media_sid("k1", "ref1", "s1") is True
    found = await store.get_participant("k1", "ref1")
    assert found is not None and found.media_sid == "s1"

    # The copy read before the bind, written back after it (another tab connected): the
    # bind stays.
    stale.sids.add("s2")
    await store.put_participant(stale)
    found = await store.get_participant("k1", "ref1")
    assert found is not None and found.media_sid == "s1" and found.sids == {"s1", "s2"}
    assert [p.media_sid for p in await store.memberships_of("ref1")] == ["s1"]

    assert await store.set_media_sid("k1", "ref1", None, expected="s2") is False
    assert await store.set_media_sid("k1", "ref1", "s2", expected="s1") is True
    assert [p.media_sid for p in await store.participants("k1")] == ["s2"]
    assert await store.set_media_sid("k1", "ref1", None, expected="s2") is True
    found = await store.get_participant("k1", "ref1")
    assert found is not None and found.media_sid is None

    assert await store.set_media_sid("k1", "ref1", "s3") is True
    await store.remove_participant("k1", "ref1")
    await store.put_participant(Participant("k1", "ref1", "d1", 2.0, sids={"s4"}))
    found = await store.get_participant("k1", "ref1")
    assert found is not None and found.media_sid is None
    assert await store.set_media_sid("k1", "ref1", "s4") is True
    dropped = await store.drop_consultation("k1")
    assert [p.media_sid for p in dropped] == ["s4"]
    assert await store.set_media_sid("k1", "ref1", "s5") is False


async def test_a_clinician_lock_is_held_by_one_caller_at_a_time(store: LiveStore) -> None:
    """Callers of one process queue; another clinician's lock is independent."""
    inside: list[str] = []
    most = 0

    async def step(name: str) -> None:
        nonlocal most
        async with store.clinician_lock("cardio1"):
            inside.append(name)
            most = max(most, len(inside))
            await asyncio.sleep(0.01)
            inside.remove(name)

    async with store.clinician_lock("ref1"):
        await asyncio.wait_for(asyncio.gather(*(step(f"s{k}") for k in range(5))), 5)
    assert most == 1


async def test_a_clinician_lock_holds_across_processes(redis_server: RedisServer) -> None:
    """Two processes on one Redis (a return on one node, the reconnect grace on another):
    while one holds the clinician's lock the other waits, and takes it once it is let go."""
    prefix = f"t{secrets.token_hex(4)}:"
    a, b = redis_store(redis_server, prefix, "node-a"), redis_store(redis_server, prefix, "node-b")
    await a.start()
    await b.start()
    try:
        order: list[str] = []
        held = asyncio.Event()

        async def first() -> None:
            async with a.clinician_lock("cardio1"):
                held.set()
                order.append("a in")
                await asyncio.sleep(0.3)
                order.append("a out")

        async def second() -> None:
            await held.wait()
            started = time.monotonic()
            async with b.clinician_lock("cardio1"):
                order.append("b in")
                waited = time.monotonic() - started
            print(f"node b waited {waited:.2f} s for node a's lock")
            assert waited >= 0.2

        await asyncio.wait_for(asyncio.gather(first(), second()), 10)
        assert order == ["a in", "a out", "b in"]
    finally:
        await a.close()
        await b.close()
