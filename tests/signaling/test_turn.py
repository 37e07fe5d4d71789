"""TURN credentials in the media:join ack (signaling/turn.py), from the real signaling server,
checked against the TURN REST API scheme as tests/turn_server.py writes it independently and
against a real coturn that must accept them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aioice.turn import create_turn_endpoint

from config.settings import TurnSettings
from signaling.turn import TurnIssuer
from tests.consultation_media import open_consultation
from tests.support import clients, run_server, write_config
from tests.turn_server import TURN_PRESENT, TurnServer, rest_credentials, run_turn_server

SECRET = "signaling-turn-secret-0123456789"
URLS = ["turn:turn.benhvien.test:3478?transport=udp",
        "turns:turn.benhvien.test:443?transport=tcp"]
STUN = {"urls": "stun:stun.benhvien.test:3478"}
TTL_S = 3600


def turn_server_of(ack: dict[str, Any]) -> dict[str, Any]:
    servers: list[dict[str, Any]] = [s for s in ack["ice_servers"] if "username" in s]
    assert len(servers) == 1, servers
    return servers[0]


def check_scheme(server: dict[str, Any], clinician: str, secret: str, ttl_s: int) -> int:
    """The credential is ``<expiry>:<clinician>`` with the scheme's password, valid ``ttl_s``
    from now; returns the expiry."""
    expiry, _, who = server["username"].partition(":")
    assert who == clinician
    assert abs(int(expiry) - (time.time() + ttl_s)) < 5
    assert (server["username"], server["credential"]) == rest_credentials(
        secret, clinician, int(expiry))
    return int(expiry)


async def test_media_join_hands_out_turn_credentials_that_follow_the_rest_scheme(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, turn={
        "secret": SECRET, "urls": URLS, "credential_ttl_s": TTL_S, "relay_only_sites": ["d1"]},
        relay={"client_ice_servers": [STUN]})
    async with run_server(config) as server, clients(
            server.url, {n: server.token(n) for n in ("cardio1", "ref1")}) as c:
        cid = await open_consultation(c)
        acks = {n: await c[n].ok("media:join", {"consultation_id": cid}) for n in c}
        for name, ack in acks.items():
            # The configured STUN server first, then the TURN server with its credentials.
            assert ack["ice_servers"][0] == STUN
            turn = turn_server_of(ack)
            assert turn["urls"] == URLS
            assert ack["turn_expires_at"] == check_scheme(turn, name, SECRET, TTL_S)
        # ref1's site (d1) is relay-only; cardio1's (c1) is not.
        assert acks["ref1"]["ice_transport_policy"] == "relay"
        assert acks["cardio1"]["ice_transport_policy"] == "all"
        # Two clinicians never share a credential.
        assert turn_server_of(acks["ref1"])["credential"] != turn_server_of(
            acks["cardio1"])["credential"]

        # A second media:join (a reconnect) renews the credential: a later expiry.
        await asyncio.sleep(1.1)
        again = await c["ref1"].ok("media:join", {"consultation_id": cid})
        assert again["turn_expires_at"] > acks["ref1"]["turn_expires_at"]
        assert turn_server_of(again)["username"] != turn_server_of(acks["ref1"])["username"]
        check_scheme(turn_server_of(again), "ref1", SECRET, TTL_S)

        # The pre-call check gets the same, before consult:join, from whoever may join:
        # coord (a coordinator) has not joined; ref2 may not join.
        async with clients(server.url, {n: server.token(n)
                                        for n in ("coord", "ref2")}) as others:
            early = await others["coord"].ok("media:ice_servers", {"consultation_id": cid})
            check_scheme(turn_server_of(early), "coord", SECRET, TTL_S)
            assert early["ice_transport_policy"] == "all"
            await others["ref2"].refused("media:ice_servers", {"consultation_id": cid},
                                         "forbidden")


async def test_without_turn_settings_the_ack_is_as_before(tmp_path: Path) -> None:
    config = write_config(tmp_path, relay={"client_ice_servers": [STUN]},
                          turn={"relay_only_sites": ["d1"]})
    async with run_server(config) as server, clients(
            server.url, {n: server.token(n) for n in ("cardio1", "ref1")}) as c:
        cid = await open_consultation(c)
        ack = await c["ref1"].ok("media:join", {"consultation_id": cid})
        # No TURN server, and no relay-only policy that could never connect.
        assert ack["ice_servers"] == [STUN]
        assert ack["ice_transport_policy"] == "all"
        assert ack["turn_expires_at"] is None


def test_the_issuer_writes_the_expiry_and_the_clinician_into_the_username() -> None:
    settings = TurnSettings(secret=SECRET, urls=URLS, credential_ttl_s=600)
    issued = TurnIssuer(settings, clock=lambda: 1_800_000_000.7).issue("cardio1")
    assert issued is not None
    assert issued.username == "1800000600:cardio1"
    assert issued.expires_at == 1_800_000_600
    # base64(HMAC-SHA1(secret, username)): 20 bytes, 28 characters.
    assert (issued.username, issued.credential) == rest_credentials(
        SECRET, "cardio1", 1_800_000_600)
    assert len(issued.credential) == 28
    assert issued.ice_server() == {"urls": URLS, "username": "1800000600:cardio1",
                                   "credential": issued.credential}
    assert TurnIssuer(TurnSettings()).issue("cardio1") is None  # TURN off


@pytest.mark.skipif(not TURN_PRESENT, reason="coturn (/usr/bin/turnserver) is not installed")
async def test_coturn_accepts_the_issued_credential_and_refuses_altered_ones(
    tmp_path: Path,
) -> None:
    async with run_turn_server(tmp_path, secret=SECRET) as coturn:
        config = write_config(tmp_path, turn={"secret": SECRET, "urls": coturn.urls})
        async with run_server(config) as server, clients(
                server.url, {n: server.token(n) for n in ("cardio1", "ref1")}) as c:
            cid = await open_consultation(c)
            ack = await c["ref1"].ok("media:join", {"consultation_id": cid})
        issued = turn_server_of(ack)
        assert await allocates(coturn, issued["username"], issued["credential"])
        assert coturn.allocated(issued["username"])
        # Another clinician's name with ref1's password, or a later expiry: refused.
        for username in (issued["username"].replace("ref1", "cardio1"),
                         f"{ack['turn_expires_at'] + 3600}:ref1"):
            assert not await allocates(coturn, username, issued["credential"])
            assert coturn.refused(username)


async def allocates(coturn: TurnServer, username: str, password: str) -> bool:
    """Whether a TURN Allocate over UDP with these credentials succeeds."""
    try:
        transport, _ = await asyncio.wait_for(create_turn_endpoint(
            asyncio.DatagramProtocol, server_addr=(coturn.host, coturn.port),
            username=username, password=password), 10)
    except Exception as exc:
        assert "401" in str(exc), exc
        return False
    transport.close()
    return True
