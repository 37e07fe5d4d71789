"""relay.udp_port: every participant's ICE and media on one UDP socket of the embedded relay,
through the real signaling server. Four participants in two consultations decode each other;
a participant reconnecting (new peer connections, new ufrags) or leaving disturbs nobody else
on the socket; a forged binding request takes no address; a port in use stops start-up."""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from pathlib import Path

import pytest
from aioice import stun

from config.settings import load_settings
from relay.config import MediaConfig
from relay.embedded import LocalRelay
from relay.errors import UdpPortsUnavailable
from relay.udp_mux import UdpMux
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from telehealth.startup import SERVICES
from tests.consultation_media import open_consultation, start_media
from tests.media import MediaPeer, check_everyone_sees_everyone, wait_for
from tests.relay.test_ports import HOST, free_udp_ports, relay_candidate_ports
from tests.support import (
    SECRET,
    Server,
    clients,
    run_server,
    start_server_process,
    write_config,
)
from tests.web.browser import (
    FLAGS,
    MEDIA,
    Site,
    audio_bytes_from,
    chromium,
    decoded_from,
    open_page,
    request_and_accept,
    wait_decoding,
)

SELECTED_REMOTE_PORTS = f"""async () => {{
  const media = {MEDIA};
  const ports = {{}};
  for (const name of ['publishPc', 'subscribePc']) {{
    const pc = media[name];
    if (!pc) continue;
    const report = await pc.getStats();
    report.forEach((s) => {{
      if (s.type === 'transport' && s.selectedCandidatePairId) {{
        const pair = report.get(s.selectedCandidatePairId);
        ports[name] = report.get(pair.remoteCandidateId).port;
      }}
    }});
  }}
  return ports;
}}"""
"""JS: the relay's port in the ICE pair each media connection of the page selected."""


def mux_of(server: Server) -> UdpMux:
    assert server.app is not None
    relay = server.app[SERVICES].embedded
    assert relay is not None and isinstance(relay.udp_ports, UdpMux)
    return relay.udp_ports


def frames_from(peer: MediaPeer, participant_id: str) -> int:
    """Video frames this peer decoded from the participant, over all its tracks so far (a
    reconnecting participant's camera comes back on a new track)."""
    return sum(len(r.counters) for r in peer.received.values()
               if r.kind == "video" and r.info.get("participant_id") == participant_id)


async def keeps_decoding(peers: dict[str, MediaPeer], pairs: list[tuple[str, str]],
                         frames: int = 15, timeout: float = 20) -> None:
    """Each (viewer, sender) pair decodes ``frames`` more frames from now on."""
    start = {pair: frames_from(peers[pair[0]], pair[1]) for pair in pairs}
    for viewer, sender in pairs:
        await wait_for(lambda v=viewer, s=sender: frames_from(peers[v], s)
                       >= start[(v, s)] + frames, timeout, f"{viewer} decoding {sender}")


def ice(sdp: str, name: str) -> str:
    match = re.search(rf"a=ice-{name}:(\S+)", sdp)
    assert match is not None, sdp
    return match.group(1)


def binding_request(sdp_relay: str, sdp_client: str, password: str) -> bytes:
    """A Binding request to the relay's connection of ``sdp_relay`` as its client would send
    it (controlling), signed with ``password``."""
    request = stun.Message(message_method=stun.Method.BINDING,
                           message_class=stun.Class.REQUEST)
    request.attributes["USERNAME"] = f"{ice(sdp_relay, 'ufrag')}:{ice(sdp_client, 'ufrag')}"
    request.attributes["PRIORITY"] = 1_000
    request.attributes["ICE-CONTROLLING"] = secrets.randbits(64)
    request.add_message_integrity(password.encode())
    request.add_fingerprint()
    return bytes(request)


class Intruder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)


async def test_four_participants_in_two_consultations_share_one_port(tmp_path: Path) -> None:
    (port, _) = free_udp_ports(1)
    config = write_config(tmp_path, relay={"host_addresses": [HOST], "udp_port": port})
    first, second = ("cardio1", "ref1"), ("cardio2", "ref2")
    async with run_server(config) as server, clients(
            server.url, {n: server.token(n) for n in (*first, *second)}) as c:
        mux = mux_of(server)
        one = await open_consultation(c, host="cardio1", guests=("ref1",))
        two = await open_consultation(c, host="cardio2", guests=("ref2",))
        peers: dict[str, MediaPeer] = {}
        old: list[MediaPeer] = []
        loop = asyncio.get_running_loop()
        intruder_transport, intruder = await loop.create_datagram_endpoint(
            Intruder, local_addr=(HOST, 0))
        try:
            for cid, names in ((one, first), (two, second)):
                for name in names:
                    peers[name] = await start_media(c[name], cid)
            await check_everyone_sees_everyone({n: peers[n] for n in first}, frames=20,
                                               audio_frames=20, timeout=40)
            await check_everyone_sees_everyone({n: peers[n] for n in second}, frames=20,
                                               audio_frames=20, timeout=40)
            for name, peer in peers.items():
                for pc in (peer.publish_pc, peer.subscribe_pc):
                    assert pc is not None and pc.remoteDescription is not None
                    assert set(relay_candidate_ports(pc.remoteDescription.sdp)) == {port}, name
            assert mux.stats()["connections"] == 8  # a publish and a subscribe connection each

            # A binding request for cardio1's publish connection from another address, with
            # the wrong password: not answered, the address bound to nobody, nothing else
            # disturbed. Signed with the right one (the control), it binds the address.
            victim = peers["cardio1"].publish_pc
            assert victim is not None and victim.remoteDescription is not None
            relay_sdp, client_sdp = victim.remoteDescription.sdp, victim.localDescription.sdp
            intruder_address = intruder_transport.get_extra_info("sockname")[:2]
            refused = mux.refused
            intruder_transport.sendto(binding_request(relay_sdp, client_sdp, "x" * 22),
                                      (HOST, port))
            await wait_for(lambda: mux.refused == refused + 1, 5, "the forgery refused")
            dropped = mux.dropped
            intruder_transport.sendto(b"\x80" + bytes(40), (HOST, port))  # RTP-like
            await wait_for(lambda: mux.dropped == dropped + 1, 5, "the intruder's RTP dropped")
            assert mux.owner(intruder_address) is None
            await asyncio.sleep(0.3)
            assert intruder.received == []
            await keeps_decoding(peers, [("ref1", "cardio1"), ("cardio1", "ref1")])
            intruder_transport.sendto(binding_request(relay_sdp, client_sdp,
                                                      ice(relay_sdp, "pwd")), (HOST, port))
            await wait_for(lambda: bool(intruder.received), 5, "the signed request answered")
            assert stun.parse_message(intruder.received[0]).message_class == \
                stun.Class.RESPONSE
            assert mux.owner(intruder_address) == ice(relay_sdp, "ufrag")

            # cardio2 reconnects (new media:join: new peer connections and ufrags): the other
            # consultation on the socket never stops; ref2 and cardio2 see each other again.
            old.append(peers["cardio2"])
            await peers["cardio2"].close()
            peers["cardio2"] = await start_media(c["cardio2"], two)
            await keeps_decoding(peers, [("ref1", "cardio1"), ("cardio1", "ref1"),
                                         ("ref2", "cardio2"), ("cardio2", "ref2")])
            for pc in (peers["cardio2"].publish_pc, peers["cardio2"].subscribe_pc):
                assert pc is not None and pc.remoteDescription is not None
                assert set(relay_candidate_ports(pc.remoteDescription.sdp)) == {port}
            await wait_for(lambda: mux.stats()["connections"] == 8, 10,
                           "cardio2's old connections unregistered")

            # ref1 leaves: its entries go, cardio2 and ref2 go on.
            await c["ref1"].ok("consult:leave", {"consultation_id": one})
            await wait_for(lambda: mux.stats()["connections"] == 6, 10,
                           "ref1's connections unregistered")
            await keeps_decoding(peers, [("ref2", "cardio2"), ("cardio2", "ref2")])
        finally:
            intruder_transport.close()
            for peer in (*peers.values(), *old):
                await peer.close()


async def test_a_port_in_use_stops_start_up_with_the_port_named() -> None:
    (port, _) = free_udp_ports(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, port))
        relay = LocalRelay(config=MediaConfig(host_addresses=[HOST], udp_port=port))
        with pytest.raises(UdpPortsUnavailable,
                           match=rf"relay\.udp_port {port} cannot be bound on {HOST}: .*in use"):
            await relay.start()
    relay = LocalRelay(config=MediaConfig(host_addresses=[HOST], udp_port=port))
    await relay.start()
    await relay.close()


async def test_chromium_pages_meet_on_the_single_port(tmp_path: Path) -> None:
    (port, _) = free_udp_ports(1)
    config = write_config(tmp_path, relay={"host_addresses": [HOST], "udp_port": port},
                          presence={"reconnect_grace_s": 20.0})
    settings = load_settings(config)
    assert settings.directory.file is not None
    tokens = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    server = start_server_process(config)
    try:
        site = Site(server, tokens)
        async with chromium(FLAGS) as browser:
            district = await open_page(browser, site.link("ref1"))
            specialist = await open_page(browser, site.link("cardio1"))
            await request_and_accept(district, specialist)
            await wait_decoding(specialist, "ref1")
            await wait_decoding(district, "cardio1")
            for page, other in ((district, "cardio1"), (specialist, "ref1")):
                frames, sound = await decoded_from(page, other), await audio_bytes_from(page,
                                                                                         other)
                await page.wait_for_timeout(1000)
                assert await decoded_from(page, other) > frames + 5
                assert await audio_bytes_from(page, other) > sound + 1000
                assert await page.evaluate(SELECTED_REMOTE_PORTS) == {
                    "publishPc": port, "subscribePc": port}
    finally:
        server.process.terminate()
        server.process.wait(timeout=15)
