"""Every permission refusal: wrong role, wrong specialty, not a participant, expired token,
forged signature, token for another site."""

from __future__ import annotations

import time

import aiohttp
import jwt
import pytest
import socketio

from tests.support import SECRET, Client, Server, clients, http_get


async def connect_refusal(server: Server, auth: dict | None) -> dict:
    sio = socketio.AsyncClient(reconnection=False)
    reasons: list[object] = []
    sio.on("connect_error", reasons.append)
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await sio.connect(server.url, auth=auth, transports=["websocket"], wait_timeout=5)
    finally:
        await sio.disconnect()
    [reason] = reasons
    assert isinstance(reason, dict), reason
    assert reason["message"] == reason["data"]["message"]
    return reason["data"]


def forge(claims: dict, secret: str = SECRET) -> str:
    base = {"iss": "telehealth-bridge", "iat": int(time.time()), "exp": int(time.time()) + 600}
    return jwt.encode({**base, **claims}, secret, algorithm="HS256")


async def test_a_connection_without_a_token_is_refused(server: Server) -> None:
    assert (await connect_refusal(server, None))["code"] == "token_missing"
    assert (await connect_refusal(server, {"token": ""}))["code"] == "token_missing"


async def test_an_expired_token_is_refused(server: Server) -> None:
    old = server.tokens.issue("ref1", ttl_s=60, now=time.time() - 3600)
    reason = await connect_refusal(server, {"token": old})
    assert reason["code"] == "token_expired" and "expired" in reason["message"]


async def test_a_forged_signature_is_refused(server: Server) -> None:
    token = forge({"sub": "coord", "site": "c1", "roles": ["coordinator"]},
                  secret="another-secret-that-is-long-enough-000000")
    assert (await connect_refusal(server, {"token": token}))["code"] == "token_invalid"
    garbage = {"token": "not.a.jwt"}
    assert (await connect_refusal(server, garbage))["code"] == "token_invalid"


async def test_a_token_for_another_site_is_refused(server: Server) -> None:
    token = forge({"sub": "ref1", "site": "c1", "roles": ["referring"]})
    reason = await connect_refusal(server, {"token": token})
    assert reason["code"] == "site_mismatch" and "d1" in reason["message"]


async def test_a_token_for_an_unknown_clinician_is_refused(server: Server) -> None:
    token = forge({"sub": "nobody", "site": "c1", "roles": ["admin"]})
    assert (await connect_refusal(server, {"token": token}))["code"] == "unknown_clinician"


async def test_a_token_cannot_grant_roles_the_directory_does_not_give(server: Server) -> None:
    # A validly signed token claiming the coordinator role for a referring doctor.
    token = forge({"sub": "ref1", "site": "d1", "roles": ["referring", "coordinator"]})
    async with clients(server.url, {"ref1": token, "ref2": server.token("ref2")}) as c:
        asked = await c["ref2"].ok("consult:request", {
            "specialty": "cardiology", "priority": "routine", "reason": "x"})
        await c["ref1"].refused("consult:accept", {"request_id": asked["request"]["id"]},
                                "forbidden")
        assert (await c["ref1"].ok("queue:get", {}))["queue"] == []


async def test_roles_are_enforced_on_every_event(server: Server) -> None:
    names = ("ref1", "ref2", "cardio1", "cardio2", "infect1", "distspec", "coord", "admin")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        # Only referring clinicians request.
        for who in ("cardio1", "coord", "admin"):
            await c[who].refused("consult:request", {
                "specialty": "cardiology", "priority": "urgent", "reason": "x"}, "forbidden")
        asked = await c["ref1"].ok("consult:request", {
            "specialty": "cardiology", "priority": "urgent", "reason": "syncope"})
        rid = asked["request"]["id"]
        # Wrong specialty, not central, wrong role: refused.
        await c["infect1"].refused("consult:accept", {"request_id": rid}, "forbidden")
        await c["distspec"].refused("consult:accept", {"request_id": rid}, "forbidden")
        await c["ref2"].refused("consult:accept", {"request_id": rid}, "forbidden")
        await c["admin"].refused("consult:accept", {"request_id": rid}, "forbidden")
        # Only the requester (or a coordinator) cancels.
        await c["ref2"].refused("consult:cancel", {"request_id": rid}, "forbidden")
        await c["cardio1"].refused("consult:cancel", {"request_id": rid}, "forbidden")
        # A district specialist is not in the central queue.
        assert (await c["distspec"].ok("queue:get", {}))["queue"] == []

        accepted = await c["cardio1"].ok("consult:accept", {"request_id": rid})
        cid = accepted["consultation"]["id"]
        # Only participants join; others learn nothing but a refusal.
        for who in ("ref2", "cardio2", "infect1", "admin"):
            await c[who].refused("consult:join", {"consultation_id": cid}, "forbidden")
            await c[who].refused("chat:send", {"consultation_id": cid, "text": "hi"},
                                 "forbidden")
        # Only the host or a coordinator invites and ends.
        await c["ref1"].ok("consult:join", {"consultation_id": cid})
        await c["ref1"].refused("consult:invite", {"consultation_id": cid, "site_id": "d3"},
                                "forbidden")
        await c["ref1"].refused("consult:end", {"consultation_id": cid, "conclusion": "x"},
                                "forbidden")
        await c["cardio2"].refused("consult:end", {"consultation_id": cid, "conclusion": "x"},
                                   "forbidden")
        # Chat needs a join first, even for someone allowed to join.
        await c["cardio1"].refused("chat:send", {"consultation_id": cid, "text": "hi"},
                                   "invalid_state")
        # A coordinator may join, invite and end.
        await c["coord"].ok("consult:join", {"consultation_id": cid})
        await c["coord"].ok("consult:invite", {"consultation_id": cid, "site_id": "d3"})
        await c["coord"].ok("consult:end", {"consultation_id": cid, "conclusion": "Closed."})


async def test_a_consultation_is_read_only_by_those_who_belong_to_it(server: Server) -> None:
    names = ("ref1", "ref2", "ref3", "cardio1", "coord", "admin")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        asked = await c["ref1"].ok("consult:request", {
            "specialty": "cardiology", "priority": "urgent", "reason": "x"})
        accepted = await c["cardio1"].ok("consult:accept",
                                         {"request_id": asked["request"]["id"]})
        cid = accepted["consultation"]["id"]
        await c["cardio1"].ok("consult:invite", {"consultation_id": cid, "site_id": "d3"})
        url = f"{server.url}/api/consultations/{cid}"

        async def status(who: str) -> int:
            return (await http_get(url, server.token(who)))[0]

        # Named on it (requester, host) and admins read it.
        for who in ("ref1", "cardio1", "admin"):
            assert await status(who) == 200, who
        # Allowed to join is not belonging: a clinician of the invited site and a coordinator
        # read it once they have joined, and still after they left; a stranger never.
        for who in ("ref3", "coord", "ref2"):
            assert await status(who) == 403, who
        for who in ("ref3", "coord"):
            await c[who].ok("consult:join", {"consultation_id": cid})
            await c[who].ok("consult:leave", {"consultation_id": cid})
            assert await status(who) == 200, who
        assert await status("ref2") == 403


async def test_http_refuses_without_a_valid_token(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        for headers, code in (
            ({}, "token_missing"),
            ({"Authorization": "Basic abc"}, "token_missing"),
            ({"Authorization": "Bearer not.a.jwt"}, "token_invalid"),
            ({"Authorization": "Bearer " + server.tokens.issue(
                "ref1", ttl_s=1, now=time.time() - 100)}, "token_expired"),
        ):
            async with session.get(f"{server.url}/api/consultations", headers=headers) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == code
        async with session.get(f"{server.url}/healthz") as r:
            assert r.status == 200 and (await r.json()) == {"status": "ok"}
        # Metrics need an admin or coordinator.
        ref = {"Authorization": "Bearer " + server.token("ref1")}
        async with session.get(f"{server.url}/metrics", headers=ref) as r:
            assert r.status == 403
        admin = {"Authorization": "Bearer " + server.token("admin")}
        async with session.get(f"{server.url}/metrics", headers=admin) as r:
            assert r.status == 200
            assert "telehealth_queue_length" in await r.text()
        async with session.get(f"{server.url}/api/nothing-here", headers=admin) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "http_404"


async def test_a_token_that_expires_while_connected_logs_the_session_off(server: Server) -> None:
    short = server.tokens.issue("ref1", ttl_s=1)
    client = await Client(server.url, short).connect()
    try:
        await client.ok("queue:get", {})
        deadline = time.time() + 5
        while time.time() < deadline:
            if not client.sio.connected:  # the server closed it at expiry, after telling it
                assert (await client.next("token_expired"))["code"] == "token_expired"
                break
            try:
                answer = await client.call("queue:get", {})
            except socketio.exceptions.SocketIOError:  # closed while the event was on its way
                continue
            if "error" in answer:
                assert answer["error"]["code"] == "token_expired"
                break
            await __import__("asyncio").sleep(0.2)
        else:
            pytest.fail("the expired token was still accepted")
    finally:
        await client.close()
