"""Malformed payloads of every event: a clear error ack, nothing changes, the server goes on
serving everyone else."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Server, clients

LONG = "x" * 5000

BAD: dict[str, list[Any]] = {
    "consult:request": [
        None, "text", 42, [], {},
        {"specialty": "cardiology", "priority": "whenever", "reason": "x"},
        {"specialty": "cardiology", "priority": "stat"},
        {"specialty": "cardiology", "priority": "stat", "reason": "   "},
        {"specialty": "Cardiology!", "priority": "stat", "reason": "x"},
        {"specialty": "cardiology", "priority": "stat", "reason": LONG},
        {"specialty": "cardiology", "priority": "stat", "reason": "x", "extra": 1},
        {"specialty": "cardiology", "priority": "stat", "reason": "x",
         "patient_pseudonym": "Nguyễn Văn A 1970"},
        {"specialty": ["cardiology"], "priority": "stat", "reason": "x"},
    ],
    "consult:cancel": [None, {}, {"request_id": ""}, {"request_id": "../../etc"},
                       {"request_id": 7}],
    "consult:accept": [None, {}, {"request_id": None}, {"request_id": "a" * 65}],
    "queue:get": ["text", {"all": True}],
    "consult:join": [None, {}, {"consultation_id": {"$ne": 1}}],
    "consult:leave": [{}, {"consultation_id": "bad id"}],
    "consult:invite": [{}, {"consultation_id": "c"}, {"consultation_id": "c", "site_id": ""}],
    "chat:send": [{}, {"consultation_id": "c"}, {"consultation_id": "c", "text": ""},
                  {"consultation_id": "c", "text": LONG}],
    "consult:end": [{}, {"consultation_id": "c", "conclusion": ""},
                    {"consultation_id": "c", "conclusion": 3}],
    "presence:list": [[1, 2], {"x": 1}],
}


@pytest.mark.parametrize("event", sorted(BAD))
async def test_a_malformed_payload_gets_a_clear_error_and_changes_nothing(
    server: Server, event: str
) -> None:
    names = ("ref1", "cardio1", "coord")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        who = c["ref1"] if event in ("consult:request", "consult:cancel") else c["coord"]
        before = (await c["coord"].ok("queue:get", {}))["queue"]
        for payload in BAD[event]:
            answer = await who.call(event, payload)
            assert "error" in answer, (event, payload, answer)
            assert answer["error"]["code"] == "invalid_payload", (event, payload, answer)
            assert answer["error"]["message"]
            # The refusal never echoes what was sent (it may be patient data).
            assert "Nguyễn" not in answer["error"]["message"]
            assert LONG not in answer["error"]["message"]
        assert (await c["coord"].ok("queue:get", {}))["queue"] == before
        # The server still serves: a proper request goes through for another clinician.
        asked = await c["ref1"].ok("consult:request", {
            "specialty": "cardiology", "priority": "routine", "reason": "still fine"})
        assert asked["request"]["status"] == "waiting"
        assert (await c["cardio1"].next("queue:update"))["action"] == "added"


async def test_an_unknown_event_or_extra_arguments_are_refused(server: Server) -> None:
    async with clients(server.url, {"ref1": server.token("ref1")}) as c:
        answer = await c["ref1"].call("consult:explode", {"x": 1})
        assert answer["error"]["code"] == "unknown_event"
        answer = await c["ref1"].sio.call("queue:get", ({}, {}), timeout=5)
        assert answer["error"]["code"] == "invalid_payload"
        await c["ref1"].ok("queue:get", {})


async def test_references_to_missing_things_are_not_found(server: Server) -> None:
    async with clients(server.url, {n: server.token(n) for n in ("ref1", "coord")}) as c:
        await c["coord"].refused("consult:accept", {"request_id": "req_missing"}, "not_found")
        await c["coord"].refused("consult:join", {"consultation_id": "con_missing"},
                                 "not_found")
        await c["ref1"].refused("consult:cancel", {"request_id": "req_missing"}, "not_found")
        await c["coord"].refused("consult:invite", {"consultation_id": "con_missing",
                                                    "site_id": "d3"}, "not_found")
        # A specialty nobody offers would wait forever: refused with the known ones.
        answer = await c["ref1"].call("consult:request", {
            "specialty": "dermatology", "priority": "routine", "reason": "rash"})
        assert answer["error"]["code"] == "invalid_payload"
        assert "dermatology" in answer["error"]["message"]
        assert "cardiology" in answer["error"]["message"]
