"""The whole happy path through the real server: request, accept, ready, chat, invite a third
site, end with minutes, minutes readable over HTTP after a restart."""

from __future__ import annotations

from pathlib import Path

from tests.support import Client, Server, clients, http_get, run_server


async def test_a_district_request_is_paired_consulted_and_closed_with_minutes(
    server: Server, config_path: Path
) -> None:
    tokens = {n: server.token(n) for n in ("ref1", "cardio1", "infect1", "ref3", "coord")}
    async with clients(server.url, tokens) as c:
        ref1, cardio1, infect1, ref3 = c["ref1"], c["cardio1"], c["infect1"], c["ref3"]

        asked = await ref1.ok("consult:request", {
            "specialty": "cardiology", "priority": "urgent",
            "reason": "Chest pain, ST elevation", "patient_pseudonym": "P-0042",
        })
        request = asked["request"]
        assert request["status"] == "waiting" and asked["position"] == 1

        update = await cardio1.next("queue:update")
        assert update["action"] == "added" and update["request"]["id"] == request["id"]
        assert (await c["coord"].next("queue:update"))["request"]["id"] == request["id"]
        assert infect1.drain("queue:update") == []  # another specialty hears nothing

        queue = (await cardio1.ok("queue:get", {}))["queue"]
        assert [r["id"] for r in queue] == [request["id"]]

        accepted = await cardio1.ok("consult:accept", {"request_id": request["id"]})
        consultation = accepted["consultation"]
        assert consultation["host_id"] == "cardio1"
        assert consultation["site_ids"] == ["d1", "c1"]
        for side in (ref1, cardio1):
            ready = await side.next("consult:ready")
            assert ready["consultation"]["id"] == consultation["id"]
            assert ready["request"]["status"] == "accepted"

        cid = consultation["id"]
        joined = await ref1.ok("consult:join", {"consultation_id": cid})
        assert [p["clinician_id"] for p in joined["participants"]] == ["ref1"]
        await cardio1.ok("consult:join", {"consultation_id": cid})
        seen = await ref1.next_matching(
            "consult:participant", lambda e: e["participant"]["clinician_id"] == "cardio1")
        assert seen["event"] == "joined"
        live = await ref1.next("consult:updated")
        assert live["consultation"]["state"] == "live"

        sent = await ref1.ok("chat:send", {"consultation_id": cid, "text": "ECG attached"})
        for side in (ref1, cardio1):
            message = (await side.next("chat:message"))["message"]
            assert message["text"] == "ECG attached" and message["sender_id"] == "ref1"
            assert message["id"] == sent["message"]["id"]

        # A third site joins: multi-site consultation.
        invited = await cardio1.ok("consult:invite", {"consultation_id": cid, "site_id": "d3"})
        assert "d3" in invited["consultation"]["site_ids"]
        note = await ref3.next("consult:invited")
        assert note["consultation"]["id"] == cid and note["invited_by"] == "cardio1"
        third = await ref3.ok("consult:join", {"consultation_id": cid})
        assert [m["text"] for m in third["chat"]] == ["ECG attached"]
        await ref3.ok("chat:send", {"consultation_id": cid, "text": "We saw a similar case"})
        for side in (ref1, cardio1, ref3):
            got = await side.next_matching("chat:message",
                                           lambda m: m["message"]["sender_id"] == "ref3")
            assert got["message"]["text"] == "We saw a similar case"

        ended = await cardio1.ok("consult:end", {
            "consultation_id": cid, "conclusion": "Transfer for PCI within 2 hours.",
        })
        assert ended["consultation"]["state"] == "ended"
        assert ended["consultation"]["minutes"]["conclusion"] == "Transfer for PCI within 2 hours."
        for side in (ref1, cardio1, ref3):
            done = await side.next("consult:ended")
            assert done["consultation"]["minutes"]["signed_by"] == "cardio1"

        await ref1.refused("chat:send", {"consultation_id": cid, "text": "late"}, "invalid_state")
        await cardio1.refused("consult:end", {"consultation_id": cid, "conclusion": "again"},
                              "invalid_state")

    # Restart the server on the same data directory: the record is all there.
    assert server.app is not None
    await server.app.shutdown()
    async with run_server(config_path) as again:
        status, listing = await http_get(f"{again.url}/api/consultations", again.token("ref1"))
        assert status == 200
        [record] = listing["consultations"]
        assert record["id"] == cid and record["state"] == "ended"
        assert record["minutes"]["conclusion"] == "Transfer for PCI within 2 hours."
        status, full = await http_get(f"{again.url}/api/consultations/{cid}",
                                      again.token("ref3"))
        assert status == 200
        assert [m["text"] for m in full["chat"]] == ["ECG attached", "We saw a similar case"]
        assert {a["clinician_id"] for a in full["attendance"]} == {"ref1", "cardio1", "ref3"}
        assert all(a["left_at"] is not None for a in full["attendance"])
        # Someone not on it sees nothing.
        status, body = await http_get(f"{again.url}/api/consultations/{cid}",
                                      again.token("ref2"))
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, listing = await http_get(f"{again.url}/api/consultations", again.token("ref2"))
        assert listing["consultations"] == []


async def test_the_requester_sees_its_queue_position_move_up(server: Server) -> None:
    tokens = {n: server.token(n) for n in ("ref1", "ref2", "cardio1")}
    async with clients(server.url, tokens) as c:
        first = await c["ref1"].ok("consult:request", {
            "specialty": "cardiology", "priority": "routine", "reason": "follow-up"})
        second = await c["ref2"].ok("consult:request", {
            "specialty": "cardiology", "priority": "routine", "reason": "palpitations"})
        assert second["position"] == 2
        # A stat request jumps ahead of both.
        stat = await c["ref2"].ok("consult:request", {
            "specialty": "cardiology", "priority": "stat", "reason": "cardiac arrest"})
        assert stat["position"] == 1
        moved = await c["ref1"].next_matching(
            "request:update", lambda u: u["request"]["id"] == first["request"]["id"])
        assert moved["position"] == 2
        queue = (await c["cardio1"].ok("queue:get", {}))["queue"]
        assert [r["priority"] for r in queue] == ["stat", "routine", "routine"]
        assert [r["position"] for r in queue] == [1, 2, 3]

        await c["cardio1"].ok("consult:accept", {"request_id": stat["request"]["id"]})
        moved = await c["ref1"].next_matching(
            "request:update",
            lambda u: u["request"]["id"] == first["request"]["id"] and u["position"] == 1)
        assert moved["request"]["status"] == "waiting"

        cancelled = await c["ref2"].ok("consult:cancel",
                                       {"request_id": second["request"]["id"]})
        assert cancelled["request"]["status"] == "cancelled"
        removed = await c["cardio1"].next_matching(
            "queue:update", lambda u: u["action"] == "removed"
            and u["request"]["id"] == second["request"]["id"])
        assert removed["request"]["status"] == "cancelled"
        mine = (await c["ref2"].ok("queue:get", {}))["mine"]
        assert {r["status"] for r in mine} == {"accepted", "cancelled"}


async def test_a_participant_who_reconnects_within_the_grace_period_keeps_their_place(
    server: Server,
) -> None:
    tokens = {n: server.token(n) for n in ("ref1", "cardio1")}
    async with clients(server.url, tokens) as c:
        asked = await c["ref1"].ok("consult:request", {
            "specialty": "cardiology", "priority": "asap", "reason": "arrhythmia"})
        accepted = await c["cardio1"].ok("consult:accept",
                                         {"request_id": asked["request"]["id"]})
        cid = accepted["consultation"]["id"]
        await c["ref1"].ok("consult:join", {"consultation_id": cid})
        await c["cardio1"].ok("consult:join", {"consultation_id": cid})

        await c["ref1"].close()
        away = await c["cardio1"].next_matching(
            "consult:participant", lambda e: e["event"] == "reconnecting")
        assert away["participant"]["clinician_id"] == "ref1"

        back = await Client(server.url, tokens["ref1"]).connect()
        try:
            returned = await c["cardio1"].next_matching(
                "consult:participant", lambda e: e["event"] == "returned")
            assert returned["participant"]["clinician_id"] == "ref1"
            # Without a new join the returning connection is in the room again.
            await c["cardio1"].ok("chat:send", {"consultation_id": cid, "text": "still there?"})
            assert (await back.next("chat:message"))["message"]["text"] == "still there?"
            await back.ok("chat:send", {"consultation_id": cid, "text": "yes"})
        finally:
            await back.close()

        # This time nobody comes back: after the grace period the participant has left.
        await c["cardio1"].next_matching("consult:participant",
                                         lambda e: e["event"] == "reconnecting")
        gone = await c["cardio1"].next_matching(
            "consult:participant", lambda e: e["event"] == "left", timeout=5)
        assert gone["participant"]["clinician_id"] == "ref1"
