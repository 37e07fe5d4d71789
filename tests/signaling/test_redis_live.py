"""A real server with ``live.backend = "redis"`` (a real redis-server, started by the test):
presence and the consultations' participants outlive a restart of `serve`. After a stop (in
process, twice on the same data directory and Redis) and after a kill -9 of the `serve`
process, the restarted server knows who was in the consultation (reconnecting: the reconnect
grace applies), the one who comes back returns with ``consult:join`` keeping their place, the
one who does not leaves after the grace, and no site stays online for a dead connection. The
same restart with the memory default forgets the participants (the contrast this slice
changes)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import socketio
from redis.exceptions import ConnectionError as RedisConnectionError

from config.settings import load_settings
from signaling.directory import Directory
from signaling.live_redis import RedisLiveStore
from signaling.notify import clinician_audience
from signaling.tokens import TokenAuthority
from telehealth.startup import SERVICES
from tests.redis_server import RedisServer
from tests.support import (
    SECRET,
    Client,
    clients,
    http_get,
    run_server,
    start_server_process,
    write_config,
)

GRACE_S = 6.0
"""The reconnect grace of these servers: long enough for an in-process restart, short enough
to watch a participant who never comes back leave."""



def config_for(tmp_path: Path, redis: RedisServer | None) -> Path:
    live: dict[str, Any] = {"backend": "memory"} if redis is None else {
        "backend": "redis", "redis_url": redis.url,
        "key_prefix": f"test-{secrets.token_hex(4)}:"}
    return write_config(tmp_path, live=live, presence={
        "reconnect_grace_s": GRACE_S, "ping_interval_s": 5, "ping_timeout_s": 5})


async def start_consultation(c: dict[str, Client]) -> str:
    """ref1 asks, cardio1 accepts, both join: the consultation's id."""
    asked = await c["ref1"].ok("consult:request", {
        "specialty": "cardiology", "priority": "urgent", "reason": "Chest pain"})
    accepted = await c["cardio1"].ok("consult:accept", {"request_id": asked["request"]["id"]})
    cid: str = accepted["consultation"]["id"]
    await c["ref1"].ok("consult:join", {"consultation_id": cid})
    await c["cardio1"].ok("consult:join", {"consultation_id": cid})
    return cid


async def participants(url: str, token: str, cid: str) -> dict[str, dict[str, Any]]:
    status, body = await http_get(f"{url}/api/consultations/{cid}", token)
    assert status == 200, body
    return {p["clinician_id"]: p for p in body["participants"]}


async def online(client: Client) -> dict[str, int]:
    sites = (await client.ok("presence:list", {}))["sites"]
    return {s["id"]: s["connections"] for s in sites if s["online"]}


async def test_a_restarted_server_knows_the_participants(tmp_path: Path,
                                                         redis_server: RedisServer) -> None:
    config = config_for(tmp_path, redis_server)
    async with run_server(config) as server:
        assert isinstance(server.app and server.app[SERVICES].live, RedisLiveStore)
        tokens = {n: server.token(n) for n in ("ref1", "cardio1", "coord")}
        async with clients(server.url, tokens) as c:
            cid = await start_consultation(c)
            before = await participants(server.url, tokens["cardio1"], cid)
            assert {p["state"] for p in before.values()} == {"present"}
            assert {"d1", "c1"} <= set(await online(c["coord"]))
        stopping = time.monotonic()

    async with run_server(config) as server:
        restarted = time.monotonic() - stopping
        print(f"stop and start took {restarted:.2f} s (grace {GRACE_S} s)")
        after = await participants(server.url, tokens["cardio1"], cid)
        assert set(after) == {"ref1", "cardio1"}
        assert {p["state"] for p in after.values()} == {"reconnecting"}
        async with clients(server.url, {"coord": tokens["coord"]}) as watch:
            assert await online(watch["coord"]) == {"c1": 1}  # coord's own connection only
            ref1 = await Client(server.url, tokens["ref1"]).connect()
            try:
                went_online = await watch["coord"].next_matching(
                    "presence:update", lambda u: u["site_id"] == "d1")
                assert went_online["online"] is True
                joined = await ref1.ok("consult:join", {"consultation_id": cid})
                people = {p["clinician_id"]: p for p in joined["participants"]}
                assert people["ref1"]["state"] == "present"
                assert people["ref1"]["joined_at"] == before["ref1"]["joined_at"]
                assert people["cardio1"]["state"] == "reconnecting"
                # cardio1 never comes back: the grace runs out and they leave.
                left = await ref1.next_matching(
                    "consult:participant",
                    lambda e: e["event"] == "left"
                    and e["participant"]["clinician_id"] == "cardio1",
                    timeout=GRACE_S + 5)
                assert left["consultation_id"] == cid
                status, record = await http_get(f"{server.url}/api/consultations/{cid}",
                                                tokens["ref1"])
                assert status == 200
                # ref1 kept their place: one attendance row, still open.
                mine = [a for a in record["attendance"] if a["clinician_id"] == "ref1"]
                assert len(mine) == 1 and mine[0]["left_at"] is None, mine
            finally:
                await ref1.close()


async def test_with_memory_a_restart_forgets_them(tmp_path: Path) -> None:
    """The embedded default, for contrast: the same restart, nobody is known."""
    config = config_for(tmp_path, None)
    async with run_server(config) as server:
        tokens = {n: server.token(n) for n in ("ref1", "cardio1", "coord")}
        async with clients(server.url, tokens) as c:
            cid = await start_consultation(c)
    async with run_server(config) as server:
        assert await participants(server.url, tokens["cardio1"], cid) == {}


async def test_after_a_kill_the_restart_sweeps_its_dead_connections(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """kill -9 of `serve`: nothing was cleaned, the dead process's connections and sids are
    still in Redis. The next start on the same data directory sweeps them at once (no TTL to
    wait for): no site online without a connection, the participants reconnecting."""
    config = config_for(tmp_path, redis_server)
    settings = load_settings(config)
    assert settings.directory.file is not None
    authority = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    tokens = {n: authority.issue(n) for n in ("ref1", "cardio1", "coord")}
    first = await asyncio.to_thread(start_server_process, config)
    try:
        async with clients(first.url, tokens) as c:
            cid = await start_consultation(c)
            assert {"d1", "c1"} <= set(await online(c["coord"]))
            await asyncio.to_thread(first.kill)
    finally:
        if first.process.poll() is None:
            await asyncio.to_thread(first.kill)

    async with run_server(config) as server:
        after = await participants(server.url, tokens["cardio1"], cid)
        assert {k: p["state"] for k, p in after.items()} \
            == {"ref1": "reconnecting", "cardio1": "reconnecting"}
        async with clients(server.url, {"coord": tokens["coord"]}) as watch:
            assert await online(watch["coord"]) == {"c1": 1}  # coord's own connection only
            cardio1 = await Client(server.url, tokens["cardio1"]).connect()
            try:
                joined = await cardio1.ok("consult:join", {"consultation_id": cid})
                people = {p["clinician_id"]: p["state"] for p in joined["participants"]}
                assert people == {"cardio1": "present", "ref1": "reconnecting"}
                assert await online(watch["coord"]) == {"c1": 2}
            finally:
                await cardio1.close()


async def test_an_emit_published_on_redis_reaches_a_client(tmp_path: Path,
                                                           redis_server: RedisServer) -> None:
    """python-socketio's AsyncRedisManager: what another process publishes on the deployment's
    channel (here a write-only manager, as a second node's emit would be) reaches this
    server's socket. One node only: several acting as one needs more than this."""
    config = config_for(tmp_path, redis_server)
    prefix = load_settings(config).live.key_prefix
    async with run_server(config) as server:
        ref1 = await Client(server.url, server.token("ref1")).connect()
        other = socketio.AsyncRedisManager(redis_server.url, channel=prefix + "socketio",
                                           write_only=True)
        probe = aioredis.Redis.from_url(redis_server.url)
        try:
            # The server subscribes at its first connection: wait for it, bounded.
            for _ in range(100):
                [(_, subscribers)] = await probe.pubsub_numsub(prefix + "socketio")
                if subscribers:
                    break
                await asyncio.sleep(0.05)
            assert subscribers == 1
            started = time.monotonic()
            await other.emit("chat:message", {"message": {"text": "from another node"}},
                             room=clinician_audience("ref1"))
            got = await ref1.next("chat:message")
            print(f"published emit delivered in {1000 * (time.monotonic() - started):.1f} ms")
            assert got == {"message": {"text": "from another node"}}
            # Not to everyone: another clinician's socket hears nothing.
            await other.emit("chat:message", {"message": {"text": "not yours"}},
                             room=clinician_audience("cardio1"))
            await other.emit("chat:message", {"message": {"text": "second"}},
                             room=clinician_audience("ref1"))
            assert (await ref1.next("chat:message"))["message"]["text"] == "second"
        finally:
            await ref1.close()
            await probe.aclose()
            if other.redis is not None:
                await other.redis.aclose()


async def test_serve_does_not_start_without_its_redis(tmp_path: Path) -> None:
    """live.backend = "redis" and nothing listening at live.redis_url: the start fails with
    Redis's error (and a log line), it does not run on without its live state."""
    config = write_config(tmp_path, live={"backend": "redis",
                                          "redis_url": f"redis://127.0.0.1:{_closed_port()}/0"})
    with pytest.raises(RedisConnectionError):
        async with asyncio.timeout(30):
            async with run_server(config):
                pass


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: nothing listens there


async def test_two_tabs_of_one_clinician_joining_and_closing_at_once_keep_the_right_sockets(
        tmp_path: Path, redis_server: RedisServer) -> None:
    # From Redis each caller reads its own copy of the participant: without the clinician's
    # lock in Consultations, the last write of two joins at once drops the other's socket.
    config = config_for(tmp_path, redis_server)
    async with run_server(config) as server:
        services = server.app[SERVICES] if server.app is not None else None
        assert services is not None
        tokens = {n: server.token(n) for n in ("ref1", "cardio1")}
        async with clients(server.url, tokens) as c:
            cid = await start_consultation(c)
            # Four tabs beside ref1's first connection (limits.connections_per_clinician 5).
            tabs = [await Client(server.url, tokens["ref1"]).connect() for _ in range(4)]
            try:
                await asyncio.gather(*(tab.ok("consult:join", {"consultation_id": cid})
                                       for tab in tabs))
                joined = await services.live.get_participant(cid, "ref1")
                assert joined is not None
                tab_sids = {tab.sio.get_sid() for tab in tabs}
                assert tab_sids <= joined.sids, (len(tab_sids - joined.sids), "sockets lost")
                await asyncio.gather(*(tab.close() for tab in tabs[:2]))

                async def three_left() -> bool:
                    left = await services.live.get_participant(cid, "ref1")
                    return left is not None and len(left.sids & tab_sids) == 2

                deadline = time.monotonic() + 10
                while not await three_left():
                    assert time.monotonic() < deadline, "the closed tabs' sockets stayed"
                    await asyncio.sleep(0.05)
                left = await services.live.get_participant(cid, "ref1")
                assert left is not None and left.state == "present"
                assert left.sids & tab_sids == {tab.sio.get_sid() for tab in tabs[2:]}
            finally:
                await asyncio.gather(*(tab.close() for tab in tabs))
