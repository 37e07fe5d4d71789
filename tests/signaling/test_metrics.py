"""/metrics shows connected sites, queue length by priority and the pairing latency."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from tests.support import Server, clients


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


async def scrape(server: Server) -> str:
    headers = {"Authorization": "Bearer " + server.token("admin")}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/metrics", headers=headers) as response:
            assert response.status == 200
            return await response.text()


async def test_metrics_follow_connections_queue_and_pairing(server: Server) -> None:
    names = ("ref1", "ref2", "cardio1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        for who, priority in (("ref1", "stat"), ("ref2", "stat"), ("ref2", "routine")):
            await c[who].ok("consult:request", {"specialty": "cardiology",
                                                "priority": priority, "reason": "x"})
        text = await scrape(server)
        assert sample(text, "telehealth_connected_sites") == 3  # d1, d2, c1
        assert sample(text, 'telehealth_queue_length{priority="stat"}') == 2
        assert sample(text, 'telehealth_queue_length{priority="routine"}') == 1
        queue = (await c["cardio1"].ok("queue:get", {}))["queue"]
        await c["cardio1"].ok("consult:accept", {"request_id": queue[0]["id"]})
        await c["cardio1"].call("consult:accept", {"request_id": queue[0]["id"]})
        text = await scrape(server)
        assert sample(text, 'telehealth_queue_length{priority="stat"}') == 1
        assert sample(text, "telehealth_pairing_seconds_count") == 1
        assert 0 < sample(text, "telehealth_pairing_seconds_sum") < 1
        assert sample(text, "telehealth_live_consultations") == 1
        assert sample(
            text, 'telehealth_rejected_events_total{code="already_taken",event="consult:accept"}'
        ) == 1
    for _ in range(40):  # the server sees the disconnects shortly after the clients leave
        if sample(await scrape(server), "telehealth_connected_sites") == 0:
            break
        await asyncio.sleep(0.05)
    assert sample(await scrape(server), "telehealth_connected_sites") == 0
