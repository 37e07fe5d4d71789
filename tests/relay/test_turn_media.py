"""Media through TURN: a real coturn (tests/turn_server.py) between an aiortc client told to
use TURN only and the relay, with the credentials the real signaling server hands out in the
media:join ack; and coturn refusing expired and forged credentials."""

from __future__ import annotations

import asyncio
import ssl
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme
from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

from config.settings import TurnSettings
from signaling.turn import TurnIssuer
from tests.consultation_media import media_peer, open_consultation, start_media
from tests.media import MediaPeer, check_stream, wait_for
from tests.support import Client, clients, run_server, write_config
from tests.turn_server import TURN_PRESENT, TurnServer, rest_credentials, run_turn_server

pytestmark = pytest.mark.skipif(not TURN_PRESENT,
                                reason="coturn (/usr/bin/turnserver) is not installed")

FRAMES = 30


def configuration(ack: dict[str, Any]) -> RTCConfiguration:
    """The client's RTCConfiguration from a media:join ack, as the web client builds it."""
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in ack["ice_servers"]]
    return RTCConfiguration(iceServers=servers, bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
                            iceTransportPolicy=RTCIceTransportPolicy(ack["ice_transport_policy"]))


class TurnPeer(MediaPeer):
    """A MediaPeer whose subscribe connection uses the ack's ICE servers and policy."""

    def __init__(self, peer: MediaPeer, config: RTCConfiguration) -> None:
        super().__init__(peer.name, peer.call)
        self.config = config

    async def subscribe(self, configuration: RTCConfiguration | None = None) -> None:
        await super().subscribe(configuration or self.config)

    def local_candidate_types(self) -> set[str]:
        assert self.subscribe_pc is not None
        transport = self.subscribe_pc.getTransceivers()[0].receiver.transport.transport
        return {c.type for c in transport.iceGatherer.getLocalCandidates()}


async def turn_subscriber(client: Client, cid: str) -> tuple[TurnPeer, dict[str, Any]]:
    ack = await client.ok("media:join", {"consultation_id": cid})
    peer = TurnPeer(media_peer(client, cid), configuration(ack))

    async def on_offer(data: dict[str, Any]) -> None:
        await peer.answer_offer(data)

    client.sio.on("media:offer", on_offer)  # replaces media_peer's handler: answer here
    await peer.subscribe()
    return peer, ack


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_relay_only_client_gets_video_through_coturn(tmp_path: Path,
                                                             transport: str) -> None:
    async with run_turn_server(tmp_path) as coturn:
        urls = [u for u in coturn.urls if u.endswith(f"transport={transport}")]
        # ref1's site (d1) lets nothing but TURN through: the server says "relay".
        config = write_config(tmp_path, turn={"secret": coturn.secret, "urls": urls,
                                              "relay_only_sites": ["d1"]})
        async with run_server(config) as server, clients(
                server.url, {n: server.token(n) for n in ("cardio1", "ref1")}) as c:
            cid = await open_consultation(c)
            publisher = await start_media(c["cardio1"], cid)
            subscriber, ack = await turn_subscriber(c["ref1"], cid)
            [turn] = [s for s in ack["ice_servers"] if "username" in s]
            try:
                assert ack["ice_transport_policy"] == "relay"
                await wait_for(lambda: subscriber.frames("cardio1") >= FRAMES, 30,
                               f"ref1 decoding cardio1 through coturn over {transport}")
                video = subscriber.video_from("cardio1")
                assert video is not None
                check_stream(video, at_least=FRAMES)
                # Its only candidates are coturn's relayed addresses, and coturn says it
                # allocated for the credential signaling issued.
                assert subscriber.local_candidate_types() == {"relay"}
                assert coturn.allocated(turn["username"])
            finally:
                await subscriber.close()
                await publisher.close()
            # The video crossed coturn: what it relayed to ref1 (logged as the allocation
            # ends) is at least what ref1 decoded, ~1 KB a frame here.
            await wait_for(lambda: coturn.relayed_bytes(turn["username"]) > FRAMES * 500, 10,
                           "coturn's usage line for ref1")


async def test_coturn_refuses_expired_and_forged_credentials(tmp_path: Path) -> None:
    async with run_turn_server(tmp_path) as coturn:
        expired = rest_credentials(coturn.secret, "ref1", time.time() - 60)
        username = f"{int(time.time()) + 600}:ref1"
        forged = (username, rest_credentials("not-the-secret-0123456789", "ref1",
                                             int(time.time()) + 600)[1])
        for name, (user, password) in {"expired": expired, "forged": forged}.items():
            assert await relay_candidates(coturn, user, password) == [], name
            await wait_for(partial(coturn.refused, user), 5,
                           f"coturn logging the {name} credential's 401")
        # The same server allocates for a valid credential: the refusals are the credentials'.
        assert len(await relay_candidates(coturn, *coturn.credentials("ref1"))) == 1


async def test_an_allocation_outlives_its_credential_while_it_is_refreshed(
    tmp_path: Path,
) -> None:
    """A consultation longer than turn.credential_ttl_s keeps its TURN path: coturn checks
    the expiry when the allocation is made, not when it is refreshed (coturn 4.6.1)."""
    async with run_turn_server(tmp_path) as coturn:
        username, password = rest_credentials(coturn.secret, "ref1", time.time() + 2)
        endpoint, _ = await create_turn_endpoint(
            asyncio.DatagramProtocol, server_addr=(coturn.host, coturn.port),
            username=username, password=password)
        try:
            await asyncio.sleep(3)
            # aioice refreshes on its own only near the allocation's lifetime (10 min): ask
            # now, through its client protocol (test-only private use).
            protocol = endpoint._TurnTransport__inner_protocol  # type: ignore[attr-defined]
            refresh = stun.Message(message_method=stun.Method.REFRESH,
                                   message_class=stun.Class.REQUEST)
            refresh.attributes["LIFETIME"] = 600
            await protocol.request_with_retry(refresh)
        finally:
            endpoint.close()
        # A new allocation with the expired credential is refused.
        assert await relay_candidates(coturn, username, password) == []


FIREWALL_DOC = Path(__file__).resolve().parents[2] / "docs" / "firewall.md"
TEST_OWN = ("listening-ip", "relay-ip", "external-ip", "listening-port", "tls-listening-port",
            "min-port", "max-port", "static-auth-secret", "realm", "cert", "pkey", "syslog")
"""Options of the documented configuration that the test sets itself (loopback addresses,
free ports, its secret and certificate, a log file)."""


def documented_coturn_options() -> list[str]:
    """The production coturn configuration of docs/firewall.md, without the options above."""
    text = FIREWALL_DOC.read_text(encoding="utf-8")
    block = text.split("<!-- coturn-config: begin -->")[1].split("<!-- coturn-config: end -->")[0]
    lines = [line.strip() for line in block.strip().strip("`").removeprefix("ini").splitlines()]
    options = [line for line in lines if line and not line.startswith("#")]
    assert "use-auth-secret" in options and any(o.startswith("denied-peer-ip=") for o in options)
    return [o for o in options if o.split("=")[0] not in TEST_OWN]


async def test_the_documented_coturn_configuration_accepts_issued_credentials(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    async with run_turn_server(tmp_path, tls=ca, options=documented_coturn_options()) as coturn:
        log = coturn.log_text()
        assert "Bad configuration format" not in log and "ERROR" not in log, log[-2000:]
        issued = TurnIssuer(TurnSettings(secret=coturn.secret, urls=coturn.urls)).issue("ref1")
        assert issued is not None
        context = ssl.create_default_context()
        ca.configure_trust(context)
        # TURN over UDP, over TCP, and over TLS (turns:, the port that passes firewalls).
        for transport, port, tls in (("udp", coturn.port, None), ("tcp", coturn.port, None),
                                     ("tcp", coturn.tls_port, context)):
            assert port is not None
            endpoint, _ = await asyncio.wait_for(create_turn_endpoint(
                asyncio.DatagramProtocol, server_addr=(coturn.host, port),
                username=issued.username, password=issued.credential,
                transport=transport, ssl=tls), 10)
            endpoint.close()
        assert coturn.allocated(issued.username)


async def relay_candidates(coturn: TurnServer, username: str, password: str) -> list[str]:
    """The relay candidates an aiortc client with TURN only gathers with these credentials."""
    server = RTCIceServer(urls=coturn.urls[0], username=username, credential=password)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[server],
                                            iceTransportPolicy=RTCIceTransportPolicy.RELAY))
    try:
        pc.createDataChannel("check")
        await asyncio.wait_for(pc.setLocalDescription(await pc.createOffer()), 15)
        return [line for line in pc.localDescription.sdp.splitlines()
                if line.startswith("a=candidate:") and "typ relay" in line]
    finally:
        await pc.close()
