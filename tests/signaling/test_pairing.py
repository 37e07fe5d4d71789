"""Pairing under contention, escalation and expiry with shortened timers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support import RACERS, Server, clients, run_server, write_config


async def test_when_twenty_specialists_accept_at_once_exactly_one_wins(server: Server) -> None:
    names = ["ref1"] + [f"racer{i}" for i in range(RACERS)]
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        for round_ in range(3):
            asked = await c["ref1"].ok("consult:request", {
                "specialty": "cardiology", "priority": "stat", "reason": f"round {round_}"})
            rid = asked["request"]["id"]
            answers = await asyncio.gather(*(
                c[f"racer{i}"].call("consult:accept", {"request_id": rid})
                for i in range(RACERS)
            ))
            winners = [a for a in answers if a.get("ok")]
            losers = [a for a in answers if "error" in a]
            assert len(winners) == 1, answers
            assert len(losers) == RACERS - 1
            assert {a["error"]["code"] for a in losers} == {"already_taken"}
            assert all("already taken" in a["error"]["message"] for a in losers)
            ready = await c["ref1"].next("consult:ready")
            assert ready["consultation"]["id"] == winners[0]["consultation"]["id"]
            assert c["ref1"].drain("consult:ready") == []


async def test_a_request_nobody_takes_escalates_then_expires(tmp_path: Path) -> None:
    config = write_config(tmp_path, queue={
        "tick_s": 0.05,
        "escalate_after_s": {"stat": 0.3, "asap": 60, "urgent": 60, "routine": 60},
        "expire_after_s": {"stat": 1.2, "asap": 120, "urgent": 120, "routine": 120},
    })
    async with run_server(config) as server:
        names = ("ref1", "coord", "cardio1", "infect1")
        async with clients(server.url, {n: server.token(n) for n in names}) as c:
            asked = await c["ref1"].ok("consult:request", {
                "specialty": "cardiology", "priority": "stat", "reason": "shock"})
            rid = asked["request"]["id"]
            slow = await c["ref1"].ok("consult:request", {
                "specialty": "cardiology", "priority": "asap", "reason": "stable"})

            alert = await c["coord"].next("queue:escalated", timeout=3)
            assert alert["request"]["id"] == rid and alert["waited_s"] >= 0.3
            # The wider audience: a central specialist of another specialty now sees it...
            widened = await c["infect1"].next_matching(
                "queue:update", lambda u: u["action"] == "escalated", timeout=3)
            assert widened["request"]["id"] == rid
            queue = (await c["infect1"].ok("queue:get", {}))["queue"]
            assert [r["id"] for r in queue] == [rid]
            update = await c["ref1"].next_matching(
                "request:update", lambda u: u["request"]["escalated"], timeout=3)
            assert update["request"]["status"] == "waiting"

            expired = await c["ref1"].next_matching(
                "request:update", lambda u: u["request"]["status"] == "expired", timeout=3)
            assert expired["request"]["id"] == rid
            assert "expired" in expired["message"]
            gone = await c["cardio1"].next_matching(
                "queue:update", lambda u: u["action"] == "removed", timeout=3)
            assert gone["request"]["id"] == rid
            await c["cardio1"].refused("consult:accept", {"request_id": rid}, "invalid_state")
            # The slower request is untouched and now first in line.
            queue = (await c["cardio1"].ok("queue:get", {}))["queue"]
            assert [(r["id"], r["position"]) for r in queue] == [(slow["request"]["id"], 1)]


async def test_an_escalated_request_may_be_accepted_by_any_central_specialist(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, queue={
        "tick_s": 0.05,
        "escalate_after_s": {"stat": 60, "asap": 60, "urgent": 0.2, "routine": 60},
    })
    async with run_server(config) as server:
        async with clients(server.url, {n: server.token(n)
                                        for n in ("ref2", "infect1", "coord")}) as c:
            asked = await c["ref2"].ok("consult:request", {
                "specialty": "cardiology", "priority": "urgent", "reason": "x"})
            rid = asked["request"]["id"]
            await c["infect1"].refused("consult:accept", {"request_id": rid}, "forbidden")
            await c["coord"].next("queue:escalated", timeout=3)
            accepted = await c["infect1"].ok("consult:accept", {"request_id": rid})
            assert accepted["consultation"]["host_id"] == "infect1"
