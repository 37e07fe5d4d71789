"""relay.udp_port_range through the real signaling server and its embedded relay: every
candidate the relay offers and every socket it binds lies in the range, for several
participants; the participant that finds the range full is refused with a clear code while
the others go on; a range with no free port stops start-up. The test's own aiortc peers keep
aioice's random ports (the range is the relay's alone)."""

from __future__ import annotations

import logging
import random
import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from aiortc import RTCPeerConnection

from relay import hooks
from relay.config import MediaConfig
from relay.embedded import LocalRelay
from relay.errors import UdpPortsUnavailable
from telehealth.startup import SERVICES
from tests.consultation_media import media_peer, open_consultation, start_media
from tests.media import MediaPeer, check_everyone_sees_everyone, wait_for
from tests.support import Server, clients, run_server, write_config

HOST = "127.0.0.1"
FIRST, LAST = 20000, 32000
"""Where test ports are taken from: below Linux's ephemeral range (32768-60999), where the
kernel never hands out ports on its own."""


def free_udp_ports(count: int) -> tuple[int, int]:
    """``count`` consecutive UDP ports free on 127.0.0.1 just now: ``(first, last)``."""
    for _ in range(200):
        low = random.randrange(FIRST, LAST - count)
        try:
            with ExitStack() as stack:
                for port in range(low, low + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    sock.bind((HOST, port))
        except OSError:
            continue
        return low, low + count - 1
    raise AssertionError(f"no {count} consecutive free UDP ports in {FIRST}-{LAST}")


@contextmanager
def holding(low: int, high: int) -> Iterator[None]:
    """Every UDP port of ``[low, high]`` on 127.0.0.1 taken by this test."""
    with ExitStack() as stack:
        for port in range(low, high + 1):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((HOST, port))
        yield


def relay_candidate_ports(sdp: str) -> list[int]:
    """The ports of the host candidates in a session description."""
    return [int(port) for port in re.findall(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+) typ host",
                                              sdp)]


def bound_ports(pc: RTCPeerConnection) -> set[int]:
    """The local ports of every ICE socket of a peer connection."""
    ports = set()
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport._connection
        for protocol in connection._protocols:
            ports.add(protocol.transport.get_extra_info("sockname")[1])
    return ports


def relay_ports(server: Server, cid: str) -> set[int]:
    assert server.app is not None
    relay = server.app[SERVICES].embedded
    assert relay is not None
    ports: set[int] = set()
    for participant in relay.rooms[cid].participants.values():
        pcs = list(participant.publish_pcs.values())
        if participant.subscribe_pc is not None:
            pcs.append(participant.subscribe_pc)
        for pc in pcs:
            ports |= bound_ports(pc)
    return ports


def offered_ports(peer: MediaPeer) -> list[int]:
    """The ports of the relay's candidates this peer was given (publish answer, subscribe
    offer)."""
    ports: list[int] = []
    for pc in (peer.publish_pc, peer.subscribe_pc):
        assert pc is not None and pc.remoteDescription is not None
        ports += relay_candidate_ports(pc.remoteDescription.sdp)
    return ports


async def test_every_relay_socket_is_in_the_range_and_a_full_range_refuses_only_the_newcomer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # Three participants take two ports each (publish and subscribe connections, bundled).
    low, high = free_udp_ports(6)
    config = write_config(tmp_path, relay={"host_addresses": [HOST],
                                           "udp_port_range": [low, high]})
    names = ("cardio1", "ref1", "ref2")
    async with run_server(config) as server, clients(
            server.url, {n: server.token(n) for n in (*names, "ref3")}) as c:
        cid = await open_consultation(c, guests=("ref1", "ref2", "ref3"))
        peers = {n: await start_media(c[n], cid) for n in names}
        late: MediaPeer | None = None
        try:
            await check_everyone_sees_everyone(peers, frames=20, audio_frames=20, timeout=40)
            in_range = set(range(low, high + 1))
            for name, peer in peers.items():
                ports = offered_ports(peer)
                assert ports and set(ports) <= in_range, (name, ports, low, high)
                # The test's own peers are not forced into the range.
                assert peer.publish_pc is not None
                assert not bound_ports(peer.publish_pc) & in_range, name
            used = relay_ports(server, cid)
            assert used == in_range, (used, low, high)

            # The fourth participant finds every port taken: refused with a clear code and
            # message, on subscribe and on publish; a line for IT in the log.
            before = {n: peers[n].frames(o) for n in names for o in names if o != n}
            with caplog.at_level(logging.WARNING, logger="relay.udp_mux"):
                await c["ref3"].ok("media:join", {"consultation_id": cid})
                refused = await c["ref3"].refused("media:subscribe", {"consultation_id": cid},
                                                  "media_ports_exhausted")
                assert "relay.udp_port_range" in refused["error"]["message"]
                late = media_peer(c["ref3"], cid)
                with pytest.raises(AssertionError, match="media_ports_exhausted"):
                    await late.publish()
            assert any("relay.udp_port_range" in r.getMessage() and "in use" in r.getMessage()
                       for r in caplog.records), caplog.text
            # The others go on decoding each other.
            for name in names:
                for other in names:
                    if other != name:
                        await wait_for(lambda n=name, o=other, f=before[name]:
                                       peers[n].frames(o) >= f + 15, 20,
                                       f"{name} still decoding {other}")
            assert relay_ports(server, cid) == in_range

            # ref2 leaves: its ports are free again, and ref3 trying again gets them.
            await c["ref2"].ok("consult:leave", {"consultation_id": cid})
            await late.close()
            late = media_peer(c["ref3"], cid)
            await late.subscribe()
            await late.publish()
            await wait_for(lambda: late is not None and late.frames("cardio1") >= 15, 20,
                           "ref3 decoding cardio1")
            await wait_for(lambda: peers["cardio1"].frames("ref3") >= 15, 20,
                           "cardio1 decoding ref3")
            assert relay_ports(server, cid) == in_range
        finally:
            for peer in peers.values():
                await peer.close()
            if late is not None:
                await late.close()


async def test_only_the_relays_own_connections_are_put_in_the_range() -> None:
    low, high = free_udp_ports(2)
    relay = LocalRelay(config=MediaConfig(host_addresses=[HOST], udp_port_range=(low, high)))
    await relay.start()
    pcs = [RTCPeerConnection(), RTCPeerConnection()]
    try:
        for pc in pcs:
            pc.addTransceiver("audio")
        await pcs[0].setLocalDescription(await pcs[0].createOffer())
        with hooks.relay_gathering():
            await pcs[1].setLocalDescription(await pcs[1].createOffer())
        assert not bound_ports(pcs[0]) & {low, high}
        assert bound_ports(pcs[1]) <= {low, high}
    finally:
        for pc in pcs:
            await pc.close()
        await relay.close()
    assert hooks.host_sockets() is None


async def test_a_range_with_no_free_port_stops_start_up_with_the_setting_named(
    tmp_path: Path,
) -> None:
    low, high = free_udp_ports(3)
    with holding(low, high):
        relay = LocalRelay(config=MediaConfig(host_addresses=[HOST],
                                              udp_port_range=(low, high)))
        with pytest.raises(UdpPortsUnavailable,
                           match=rf"relay\.udp_port_range \[{low}, {high}\]: every port is "
                                 rf"in use on {HOST}"):
            await relay.start()
        # `serve` does not come up either.
        config = write_config(tmp_path, relay={"host_addresses": [HOST],
                                               "udp_port_range": [low, high]})
        with pytest.raises(UdpPortsUnavailable, match="every port is in use"):
            async with run_server(config):
                raise AssertionError("the server started on a full port range")
    # One port free is enough to start.
    with holding(low, high - 1):
        relay = LocalRelay(config=MediaConfig(host_addresses=[HOST],
                                              udp_port_range=(low, high)))
        await relay.start()
        await relay.close()


async def test_an_invalid_range_stops_start_up() -> None:
    relay = LocalRelay(config=MediaConfig(host_addresses=[HOST], udp_port_range=(5000, 4000)))
    with pytest.raises(UdpPortsUnavailable, match=r"must be \[min, max\].*\[5000, 4000\]"):
        await relay.start()
