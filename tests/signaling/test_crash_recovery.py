"""kill -9 the real `telehealth serve` process with requests waiting and a consultation live,
start it again: every acknowledged request is still waiting, consultations and minutes are
there, and clients carry on."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from config.settings import load_settings
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.support import SECRET, Client, clients, start_server_process, write_config


async def test_acknowledged_records_survive_a_sigkill(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    settings = load_settings(config)
    assert settings.directory.file is not None
    tokens = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    token = {n: tokens.issue(n) for n in ("ref1", "ref2", "cardio1", "coord")}

    first = start_server_process(config)
    try:
        async with clients(first.url, token) as c:
            waiting = []
            for i in range(5):
                who = c["ref1"] if i % 2 else c["ref2"]
                asked = await who.ok("consult:request", {
                    "specialty": "cardiology", "priority": ("stat", "routine")[i % 2],
                    "reason": f"case {i}"})
                waiting.append(asked["request"]["id"])
            taken = waiting.pop(0)
            accepted = await c["cardio1"].ok("consult:accept", {"request_id": taken})
            live_id = accepted["consultation"]["id"]
            await c["ref2"].ok("consult:join", {"consultation_id": live_id})
            await c["cardio1"].ok("consult:join", {"consultation_id": live_id})
            await c["ref2"].ok("chat:send", {"consultation_id": live_id, "text": "lab results"})

            asked = await c["ref1"].ok("consult:request", {
                "specialty": "cardiology", "priority": "urgent", "reason": "to be closed"})
            other = await c["cardio1"].ok("consult:accept",
                                          {"request_id": asked["request"]["id"]})
            ended_id = other["consultation"]["id"]
            await c["cardio1"].ok("consult:end", {"consultation_id": ended_id,
                                                  "conclusion": "Treat locally."})
            # The last ack has arrived: kill -9 right now, mid-session.
            first.kill()
    finally:
        if first.process.poll() is None:
            first.kill()

    second = start_server_process(config)
    try:
        ref1 = await Client(second.url, token["ref1"]).connect()
        cardio1 = await Client(second.url, token["cardio1"]).connect()
        try:
            queue = (await cardio1.ok("queue:get", {}))["queue"]
            assert sorted(r["id"] for r in queue) == sorted(waiting)
            assert all(r["status"] == "waiting" for r in queue)
            assert [r["priority"] for r in queue] == ["stat", "stat", "routine", "routine"]
            # The live consultation is still open to its participants, with its chat.
            joined = await cardio1.ok("consult:join", {"consultation_id": live_id})
            assert joined["consultation"]["state"] == "live"
            assert [m["text"] for m in joined["chat"]] == ["lab results"]
            # And the queue works on: accept one of the survivors.
            accepted = await cardio1.ok("consult:accept", {"request_id": waiting[0]})
            assert accepted["request"]["status"] == "accepted"
        finally:
            await ref1.close()
            await cardio1.close()
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token['ref1']}"}
            async with session.get(f"{second.url}/api/consultations/{ended_id}",
                                   headers=headers) as response:
                assert response.status == 200
                record = await response.json()
        assert record["consultation"]["state"] == "ended"
        assert record["consultation"]["minutes"]["conclusion"] == "Treat locally."
    finally:
        second.process.terminate()
        second.process.wait(timeout=10)
