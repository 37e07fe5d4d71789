"""Hostile socket.io events: reserved and odd event names are never dispatched, an expired
token's connection is closed by the server, and inputs a library would refuse are refused
before they reach it (never ``internal``)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import engineio
import pytest
import socketio

from signaling.socket_server import SOCKETIO_VERSION, SignalingServer
from tests.consultation_media import open_consultation
from tests.support import Client, Server, clients, run_server, write_config

ODD_NAMES: list[Any] = [42, 1.5, None, True, False, [1, "chat:send"], {"event": "chat:send"},
                        "*", "connect_error", "disconnecting", "newListener"]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def nothing_for(client: Client, event: str, seconds: float = 0.3) -> list[Any]:
    await asyncio.sleep(seconds)
    return client.drain(event)


async def test_reserved_and_odd_event_names_are_refused_and_never_dispatched(
    server: Server, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    names = ("ref1", "cardio1", "coord")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        c["cardio1"].drain("consult:participant")
        # `disconnect` from the client: refused, the participant has not left.
        answer = await c["ref1"].call("disconnect", {}, timeout=2)
        assert answer["error"]["code"] == "invalid_event", answer
        assert "reserved" in answer["error"]["message"]
        # Without an ack id: dropped the same way.
        await c["ref1"].sio.emit("disconnect")
        assert await nothing_for(c["cardio1"], "consult:participant") == []
        sites = {s["id"]: s for s in (await c["coord"].ok("presence:list", {}))["sites"]}
        assert sites["d1"]["online"] is True
        await c["cardio1"].ok("chat:send", {"consultation_id": cid, "text": "still there?"})
        assert (await c["ref1"].next("chat:message"))["message"]["text"] == "still there?"
        c["cardio1"].drain("chat:message")

        # `connect` signs nobody in again, with a good token or a bad one.
        for auth in ({"token": server.token("coord")}, {"token": "forged"}, None):
            answer = await c["ref1"].call("connect", auth, timeout=2)
            assert answer["error"]["code"] == "invalid_event", answer
        # Names that are not strings, and the catch-all's name: an error ack each.
        for name in ODD_NAMES:
            answer = await c["ref1"].sio.call(name, {"consultation_id": cid}, timeout=2)
            assert answer["error"]["code"] == "invalid_event", (name, answer)
        # The connection still works and nobody saw anything of it.
        await c["ref1"].ok("chat:send", {"consultation_id": cid, "text": "and still here"})
        assert (await c["cardio1"].next("chat:message"))["message"]["text"] == "and still here"
        assert c["cardio1"].drain("consult:participant") == []
        assert c["ref1"].sio.connected
    refused = [r for r in caplog.records if "invalid_event" in r.getMessage()]
    assert refused and all(r.levelno == logging.INFO for r in refused)
    no_tracebacks(caplog)


async def test_a_packet_that_does_not_decode_closes_only_its_connection(
    server: Server, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with clients(server.url, {n: server.token(n) for n in ("ref1", "coord")}) as c:
        for raw in ('2["chat:send", {', "9", "4{}", "5-1000000[\"x\",{}]", '5["x",{}]',
                    '51-["x",{"_placeholder":true,"num":0}]'):
            client = await Client(server.url, server.token("ref1")).connect()
            await client.sio.eio.send(raw)
            await client.sio.eio.send('2["queue:get",{}]')
            for _ in range(50):
                if not client.sio.connected:
                    break
                await asyncio.sleep(0.05)
            assert not client.sio.connected, raw
            await client.close()
        await c["ref1"].ok("queue:get", {})
        await c["coord"].ok("presence:list", {})
    no_tracebacks(caplog)


async def test_a_connection_is_closed_when_its_token_expires_even_if_silent(
    server: Server,
) -> None:
    tokens = {"ref1": server.token("ref1", ttl_s=2), "cardio1": server.token("cardio1")}
    async with clients(server.url, tokens) as c:
        cid = await open_consultation(c)
        expired = await c["ref1"].next("token_expired", timeout=5)
        assert expired["code"] == "token_expired" and expired["message"]
        for _ in range(50):
            if not c["ref1"].sio.connected:
                break
            await asyncio.sleep(0.05)
        assert not c["ref1"].sio.connected
        await c["cardio1"].ok("chat:send", {"consultation_id": cid, "text": "after expiry"})
        assert await nothing_for(c["ref1"], "chat:message") == []


async def test_a_refreshed_token_extends_the_connection(server: Server) -> None:
    async with clients(server.url, {"ref1": server.token("ref1", ttl_s=2)}) as c:
        sio = c["ref1"].sio
        gateway = _gateway(server)
        assert gateway.extend(sio.get_sid(), time.time() + 60)
        with pytest.raises(asyncio.TimeoutError):
            await c["ref1"].next("token_expired", timeout=3)
        assert sio.connected
        assert not gateway.extend("no-such-sid", 10**10)


def _gateway(server: Server) -> Any:
    """The running app's SocketGateway: the owner of the connect handler of the socket.io
    server whose engine.io server serves /socket.io/."""
    assert server.app is not None
    for route in server.app.router.routes():
        eio = getattr(route.handler, "__self__", None)
        if isinstance(eio, engineio.AsyncServer):
            sio = eio.handlers["message"].__self__
            assert isinstance(sio, SignalingServer)
            return sio.handlers["/"]["connect"].__self__
    raise AssertionError("no engine.io route")


async def test_inputs_a_library_would_refuse_are_refused_before_it_never_internal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with run_server(write_config(tmp_path)) as server:
        names = ("ref1", "cardio1")
        async with clients(server.url, {n: server.token(n) for n in names}) as c:
            cid = await open_consultation(c)
            await c["ref1"].ok("media:join", {"consultation_id": cid})
            offer = await c["ref1"].ok("media:subscribe", {"consultation_id": cid})
            # A second subscribe while the offer waits for its answer.
            await c["ref1"].refused("media:subscribe", {"consultation_id": cid},
                                    "invalid_state")
            ice = {"consultation_id": cid, "transport_id": offer["transport_id"]}
            line = "candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host"
            # Neither sdpMid nor sdpMLineIndex: aiortc cannot place it.
            answer = await c["ref1"].refused("media:ice", {**ice, "candidate": {
                "candidate": line}}, "invalid_payload")
            assert "sdpMid" in answer["error"]["message"]
            await c["ref1"].refused("media:ice", {**ice, "candidate": {
                "candidate": "candidate:garbage", "sdpMid": "0"}}, "bad_sdp")
            await c["ref1"].ok("media:ice", {**ice, "candidate": {
                "candidate": line, "sdpMLineIndex": 0}})
            await c["ref1"].ok("media:ice", {**ice, "candidate": {"candidate": ""}})
            await c["ref1"].ok("media:ice", {**ice, "candidate": {
                "candidate": line, "sdpMid": "0"}})
    assert not [r for r in caplog.records if "internal" in r.getMessage()]
    no_tracebacks(caplog)


def test_the_python_socketio_internals_overridden_are_where_they_were() -> None:
    """signaling/socket_server.py overrides python-socketio internals: this fails when an
    upgrade moves them (read the new sources, then update the module and this version)."""
    assert version("python-socketio").startswith(SOCKETIO_VERSION + "."), version(
        "python-socketio")
    base = socketio.AsyncServer
    expected = {
        "_handle_eio_message": ["self", "eio_sid", "data"],
        "_handle_event": ["self", "eio_sid", "namespace", "id", "data"],
        "_handle_disconnect": ["self", "eio_sid", "namespace", "reason"],
        "_engineio_server_class": ["self"],
        "_handle_connect": ["self", "eio_sid", "namespace", "data"],
        "_handle_ack": ["self", "eio_sid", "namespace", "id", "data"],
        "_send_packet": ["self", "eio_sid", "pkt"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(base, name)).parameters) == parameters, name
    assert base.reserved_events == ["connect", "disconnect"]
    source = inspect.getsource(base._handle_eio_message)
    assert "self._binary_packet" in source and "add_attachment" in source
    pkt = socketio.packet.Packet(encoded_packet='51-0["x",{"_placeholder":true,"num":0}]')
    assert pkt.attachment_count == 1 and pkt.id == 0
