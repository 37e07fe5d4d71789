"""The directory across a fleet: two `serve` apps in this process on one redis-server and one
PostgreSQL. A change made through node A's directory API reaches node B at once (the fleet's
``directory`` message, then B reads the shared store): a clinician added on A can sign in on
B, one deactivated on A is signed out of B; and a change whose message was lost reaches B at
its next resync."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import aiohttp

from signaling.fleet import RedisFleet
from tests.media import wait_for
from tests.redis_server import RedisServer
from tests.signaling.test_directory_admin import Api, _me
from tests.signaling.test_fleet_queue import node, services
from tests.support import Client


async def test_a_change_on_one_node_takes_effect_on_the_other(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    async with node(tmp_path, "a", redis_server, postgres_dsn, "dir1:") as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, "dir1:") as b, \
            aiohttp.ClientSession() as session:
        admin = Api(a, session, "admin")
        await admin.ok("POST", "/api/directory/clinicians", {
            "id": "bs-nga", "name": "BS. Trần Thị Nga", "site": "d1", "roles": ["referring"],
            "specialties": []})
        on_b = services(b).directory
        started = time.monotonic()
        await wait_for(lambda: on_b.clinician("bs-nga") is not None, 5.0, "bs-nga on node B")
        print(f"a clinician added on node A known to node B after "
              f"{(time.monotonic() - started) * 1000:.0f} ms")
        status, me = await _me(b, b.token("bs-nga"))
        assert (status, me["clinician"]["id"]) == (200, "bs-nga"), me
        # Deactivated on A: their connection on B gets session:ended and is closed.
        token = b.token("ref1")
        ref1 = await Client(b.url, token).connect()
        try:
            started = time.monotonic()
            await admin.ok("POST", "/api/directory/clinicians/ref1/deactivate")
            ended = await ref1.next("session:ended", timeout=5.0)
            print(f"deactivated on node A, signed out of node B after "
                  f"{(time.monotonic() - started) * 1000:.0f} ms")
            assert ended["code"] == "clinician_inactive"
            await wait_for(lambda: not ref1.sio.connected, 5.0, "ref1's socket closed")
        finally:
            await ref1.close()
        status, body = await _me(b, token)
        assert (status, body["error"]["code"]) == (401, "unknown_clinician")


async def test_a_lost_message_is_healed_by_the_next_resync(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    async with node(tmp_path, "a", redis_server, postgres_dsn, "dir2:") as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, "dir2:") as b:
        # Node A's admin writes to the store without telling anyone (as if the bus lost it).
        admin_a = services(a)
        store = admin_a.store
        clinician = admin_a.directory.clinician("ref2")
        assert clinician is not None
        await store.save_directory((), [replace(clinician, name="BS. Đổi Tên")])
        on_b = services(b).directory
        assert on_b.clinician("ref2").name != "BS. Đổi Tên"  # type: ignore[union-attr]
        # B's resync (every 10 s; called here rather than waited for) reads it.
        fleet = services(b).fleet
        assert isinstance(fleet, RedisFleet)
        await fleet._resync()  # the fleet's own periodic step, called rather than waited for
        assert on_b.clinician("ref2").name == "BS. Đổi Tên"  # type: ignore[union-attr]
