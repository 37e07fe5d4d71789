"""The pre-call network probe (relay/probe.py) through the real signaling server: an aiortc
client offers one data channel with `media:probe` before `consult:join`, as the web client
does, and reaches the consultation's relay; who may probe; probes are bounded in number and
in time and closed with their room."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from relay.config import MediaConfig
from relay.embedded import LocalRelay
from relay.probe import ProbeClosed
from relay.remote import RemoteRelay
from telehealth.startup import SERVICES
from tests.consultation_media import open_consultation, start_node, stop_node
from tests.media import wait_for
from tests.support import Client, Server, clients, run_server, write_config

CONNECT_S = 10.0


class ProbeClient:
    """The client's side of a probe: a data channel, the offer with its candidates."""

    def __init__(self, configuration: RTCConfiguration | None = None) -> None:
        self.pc = RTCPeerConnection(configuration or RTCConfiguration(iceServers=[]))
        self.pc.createDataChannel("probe")

    async def offer(self) -> dict[str, Any]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return {"sdp": self.pc.localDescription.sdp, "type": "offer"}

    async def connect(self, answer: dict[str, Any]) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await wait_for(lambda: self.pc.connectionState == "connected", CONNECT_S,
                       "the probe to connect")

    def selected_pair(self) -> tuple[Any, tuple[str, int]]:
        """The nominated pair: (local aioice candidate, remote address). aiortc has no
        getStats() for candidate pairs: read aioice's connection (test-only private use)."""
        sctp = self.pc.sctp
        assert sctp is not None
        pair = sctp.transport.transport._connection._nominated[1]
        return pair.local_candidate, pair.remote_addr

    async def close(self) -> None:
        await self.pc.close()


def embedded(server: Server) -> LocalRelay:
    assert server.app is not None
    relay = server.app[SERVICES].embedded
    assert relay is not None
    return relay


async def probe(client: Client, cid: str, probe_client: ProbeClient) -> dict[str, Any]:
    return await client.ok("media:probe", {"consultation_id": cid,
                                           **await probe_client.offer()})


async def test_a_probe_before_joining_reaches_the_relay_directly(server: Server) -> None:
    names = ("cardio1", "ref1", "coord")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        relay = embedded(server)
        # coord has not joined (coordinators may join any consultation): it probes first.
        assert (cid, "coord") not in relay.probes.open
        client = ProbeClient()
        try:
            answer = await probe(c["coord"], cid, client)
            assert answer["type"] == "answer" and "typ host" in answer["sdp"]
            await client.connect(answer)
            local, remote = client.selected_pair()
            # Host to host on loopback: "reached directly".
            assert local.type == "host" and local.host == "127.0.0.1"
            assert remote[0] == "127.0.0.1"
            assert relay.probes.open[(cid, "coord")].pc.connectionState == "connected"
            # A probe is no participant: the room's media does not know coord.
            assert "coord" not in await relay.stats(cid)
        finally:
            await client.close()


async def test_probes_are_refused_to_outsiders_and_to_offers_with_media(
    server: Server,
) -> None:
    names = ("cardio1", "ref1", "ref2", "cardio2")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        client = ProbeClient()
        try:
            offer = await client.offer()
            for outsider in ("ref2", "cardio2"):  # another district, another specialist
                await c[outsider].refused("media:probe", {"consultation_id": cid, **offer},
                                          "forbidden")
            await c["ref1"].refused("media:probe", {"consultation_id": "nope", **offer},
                                    "not_found")
            # The schema: an answer is not a probe, and the type is required.
            await c["ref1"].refused("media:probe", {"consultation_id": cid,
                                                    "sdp": offer["sdp"], "type": "answer"},
                                    "invalid_payload")
            await c["ref1"].refused("media:probe", {"consultation_id": cid,
                                                    "sdp": offer["sdp"]}, "invalid_payload")
            await c["ref1"].refused("media:probe", {"consultation_id": cid, "type": "offer",
                                                    "sdp": "x" * (64 * 1024 + 1)},
                                    "invalid_payload")
        finally:
            await client.close()
        media = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            media.addTransceiver("audio", direction="sendonly")
            await media.setLocalDescription(await media.createOffer())
            await c["ref1"].refused("media:probe", {
                "consultation_id": cid, "sdp": media.localDescription.sdp, "type": "offer"},
                "bad_sdp")
        finally:
            await media.close()
        assert embedded(server).probes.open == {}


async def test_a_probe_is_replaced_closed_after_its_lifetime_and_closed_with_the_room(
    server: Server,
) -> None:
    names = ("cardio1", "ref1")
    relay = embedded(server)
    relay.probes.lifetime_s = 1.0
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        first, second, third = ProbeClient(), ProbeClient(), ProbeClient()
        try:
            await first.connect(await probe(c["ref1"], cid, first))
            old = relay.probes.open[(cid, "ref1")].pc
            # A new probe of the same participant replaces the old one at once.
            await second.connect(await probe(c["ref1"], cid, second))
            assert old.connectionState == "closed"
            assert len(relay.probes.open) == 1
            # Left alone, it is closed after its lifetime, whatever the client does.
            current = relay.probes.open[(cid, "ref1")].pc
            await wait_for(lambda: not relay.probes.open, 5, "the probe to expire")
            assert current.connectionState == "closed"
            # Closed with the room: the consultation ends while a probe is open.
            await third.connect(await probe(c["cardio1"], cid, third))
            last = relay.probes.open[(cid, "cardio1")].pc
            relay.probes.lifetime_s = 60.0
            await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                  "conclusion": "probe test"})
            await wait_for(lambda: cid not in relay.rooms, 5, "the room to close")
            assert relay.probes.open == {}
            assert last.connectionState == "closed"
            # An ended consultation takes no probe.
            fourth = ProbeClient()
            try:
                await c["ref1"].refused("media:probe", {"consultation_id": cid,
                                                        **await fourth.offer()},
                                        "invalid_state")
            finally:
                await fourth.close()
        finally:
            await asyncio.gather(first.close(), second.close(), third.close())


async def test_probes_are_bounded_per_relay(server: Server) -> None:
    relay = embedded(server)
    relay.probes.max_open = 1
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        first, second, third = ProbeClient(), ProbeClient(), ProbeClient()
        try:
            await probe(c["ref1"], cid, first)
            await c["cardio1"].refused("media:probe", {"consultation_id": cid,
                                                       **await second.offer()},
                                       "too_many_probes")
            # Its own next probe replaces the one it holds: never refused for the bound.
            await probe(c["ref1"], cid, third)
            assert len(relay.probes.open) == 1
        finally:
            await asyncio.gather(first.close(), second.close(), third.close())


async def test_a_standalone_relay_node_answers_probes_too(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    async with run_server(config) as server:
        assert server.app is not None
        services = server.app[SERVICES]
        node = start_node(config, server.url, services.tokens.issue_node("relay-node-probe"),
                          region="11")  # ref1's province: its consultation goes there
        client = ProbeClient()
        try:
            await wait_for(lambda: any(isinstance(r, RemoteRelay)
                                       for r in services.relays.relays()), 20,
                           "the node to register")
            async with clients(server.url, {n: server.token(n)
                                            for n in ("cardio1", "ref1")}) as c:
                cid = await open_consultation(c)
                assert isinstance(services.relays.for_room(cid), RemoteRelay)
                await client.connect(await probe(c["ref1"], cid, client))
                local, remote = client.selected_pair()
                assert local.type == "host" and remote[0] == "127.0.0.1"
        finally:
            await client.close()
            await stop_node(node)


async def test_of_two_probes_at_once_from_one_participant_the_later_one_stays() -> None:
    relay = LocalRelay(config=MediaConfig(host_addresses=["127.0.0.1"]))
    await relay.start()
    await relay.open_room("room-1")
    clients = [ProbeClient(), ProbeClient()]
    try:
        offers = [(await c.offer())["sdp"] for c in clients]
        results = await asyncio.gather(*(relay.probe("room-1", "ref1", sdp) for sdp in offers),
                                       return_exceptions=True)
        # The earlier one was overtaken while it gathered: refused, its connection closed;
        # the later one is answered and is the participant's only probe.
        assert isinstance(results[0], ProbeClosed) and results[0].code == "invalid_state"
        assert isinstance(results[1], dict) and results[1]["type"] == "answer"
        assert list(relay.probes.open) == [("room-1", "ref1")]
        await clients[1].connect(results[1])
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await relay.close()
    assert relay.probes.open == {}
