"""tests/link_emulator.py measured against its profiles: rate and tail drop, delay and jitter,
random and bursty loss, outages, the TCP proxy's delay, rate and outages, the command line; and
``relay.announced_port``: an aiortc participant reaches a real relay on its single port through
the emulator, on ``good``, then on ``3g``, decoding all along.

Every figure is printed (``pytest -s``); the tolerances are wide enough for a loaded 2-core
machine and narrow enough that a wrong model fails."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from typing import Any, cast

import pytest
from pydantic import ValidationError

from config.settings import RelaySettings
from relay.config import MediaConfig, from_settings
from relay.errors import UdpPortsUnavailable
from relay.udp_mux import UdpMux, open_ports
from tests.link_emulator import (
    PROFILES,
    GilbertElliott,
    Profile,
    TcpLinkEmulator,
    UdpLinkEmulator,
    client_ufrag,
    hide_client_addresses,
    sdp_ufrags,
)
from tests.media import MediaPeer, wait_for
from tests.relay.peers import relay_room
from tests.relay.test_ports import HOST, free_udp_ports, relay_candidate_ports

VSAT_UP, VSAT_DOWN = PROFILES["vsat"]


class Endpoint(asyncio.DatagramProtocol):
    """A UDP socket of the test: keeps what it receives (with the loop's time); echoes it back
    if asked (the relay's side of an RTT measurement)."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.arrivals: list[tuple[float, bytes]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.arrivals.append((asyncio.get_running_loop().time(), data))
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.get_extra_info("sockname")[1]
        return port

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def endpoint(echo: bool = False) -> Endpoint:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # asyncio reads one datagram per wake-up: room for the bursts the tests send.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((HOST, 0))
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: Endpoint(echo), sock=sock)
    return protocol


def numbered(n: int, size: int) -> bytes:
    """A datagram carrying its number (never taken for STUN: its first byte is 0xff)."""
    return b"\xff" + n.to_bytes(4, "big") + bytes(max(size - 5, 0))


def numbers(arrivals: list[tuple[float, bytes]]) -> list[int]:
    return [int.from_bytes(data[1:5], "big") for _, data in arrivals]


async def send_paced(sender: Endpoint, to: tuple[str, int], count: int, rate_pps: float,
                     size: int = 100) -> None:
    """``count`` numbered datagrams at ``rate_pps`` (bounded: count / rate_pps seconds)."""
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), 0
    while sent < count:
        due = min(count, int((loop.time() - start) * rate_pps) + 1)
        while sent < due:
            sender.sendto(numbered(sent, size), to)
            sent += 1
        await asyncio.sleep(0.002)


async def settled(link: UdpLinkEmulator, seconds: float = 10.0) -> None:
    """Every flow's queues empty: everything that went in came out or was dropped."""

    def done() -> bool:
        for flow in link.flows.values():
            for direction in (flow.up, flow.down):
                s = direction.stats
                if s.packets_in != (s.packets_out + s.dropped_queue + s.dropped_loss
                                    + s.dropped_outage + s.send_errors):
                    return False
        return True

    await wait_for(done, seconds, "the emulator's queues to drain")


# -- the UDP emulator against its profiles ------------------------------------------------------


async def test_a_flood_through_vsat_leaves_at_512_kbps_and_the_excess_is_tail_dropped() -> None:
    target, client = await endpoint(), await endpoint()
    try:
        async with UdpLinkEmulator((HOST, target.port), default="vsat", seed=1) as link:
            # 2 Mbps of 1250-byte datagrams for 3 s: four times what vsat carries.
            await send_paced(client, (HOST, link.port), 600, 200, size=1250)
            await settled(link)
            up = link.stats()[0]["up"]
        first, last = target.arrivals[0][0], target.arrivals[-1][0]
        carried = sum(len(data) for _, data in target.arrivals[1:])
        rate = carried * 8 / (last - first)
        print(f"vsat flood: {rate / 1000:.1f} kbps carried of 2000 offered; "
              f"{up['dropped_queue']} tail-dropped, {up['dropped_loss']} lost, queue peak "
              f"{up['queue_max_bytes']} B of {VSAT_UP.queue_bytes}; "
              f"delay {up['delay_mean_s'] * 1000:.0f} ms mean, {up['delay_max_s'] * 1000:.0f} max")
        assert 0.93 * 512_000 < rate < 1.04 * 512_000
        assert up["dropped_queue"] > 300  # about 3/4 of 600 (the queue keeps 0.5 s)
        assert up["packets_out"] == len(target.arrivals)
        assert up["queue_max_bytes"] <= VSAT_UP.queue_bytes
        # What waited in a full queue: 0.5 s of queue behind the 300 ms of delay.
        assert 0.7 < up["delay_max_s"] < 0.9
        assert numbers(target.arrivals) == sorted(numbers(target.arrivals))  # FIFO
    finally:
        target.close()
        client.close()


async def test_an_echo_through_vsat_takes_600_ms_give_or_take_its_jitter() -> None:
    relay, client = await endpoint(echo=True), await endpoint()
    try:
        async with UdpLinkEmulator((HOST, relay.port), default="vsat", seed=2) as link:
            loop = asyncio.get_running_loop()
            sent: dict[int, float] = {}
            for n in range(40):
                sent[n] = loop.time()
                client.sendto(numbered(n, 100), (HOST, link.port))
                await asyncio.sleep(0.025)
            await wait_for(lambda: len(client.arrivals) >= 36, 5, "the echoes")
            await asyncio.sleep(0.7)  # the last ones, or they were lost
            await settled(link)
        rtts = [at - sent[n] for n, (at, _) in zip(numbers(client.arrivals), client.arrivals,
                                                   strict=True)]
        mean = sum(rtts) / len(rtts)
        print(f"vsat echo: {len(rtts)}/40 back, RTT {min(rtts) * 1000:.0f}-"
              f"{max(rtts) * 1000:.0f} ms, mean {mean * 1000:.0f} ms")
        # 2 x 300 ms, 2 x up to 10 ms of jitter, 2 x 1.6 ms to send 100 bytes at 512 kbps, and
        # the event loop's wake-ups (late ones on a loaded machine).
        assert 0.580 < min(rtts) and max(rtts) < 0.700
        assert 0.590 < mean < 0.640
        assert len(rtts) >= 36
    finally:
        relay.close()
        client.close()


async def lost_numbers(profile: Profile, seed: int, count: int) -> list[int]:
    """Which of ``count`` datagrams sent through ``profile`` (up) never reached the target."""
    target, client = await endpoint(), await endpoint()
    try:
        async with UdpLinkEmulator((HOST, target.port), default=(profile, profile),
                                   seed=seed) as link:
            for start in range(0, count, 100):
                for n in range(start, min(start + 100, count)):
                    client.sendto(numbered(n, 60), (HOST, link.port))
                await asyncio.sleep(0.005)  # the emulator and the target read; buffers stay small
            await settled(link)
            up = link.stats()[0]["up"]
            assert up["packets_in"] == count, up  # nothing lost before the emulator
            await wait_for(lambda: len(target.arrivals) == up["packets_out"], 5, "the last")
        arrived = set(numbers(target.arrivals))
        return [n for n in range(count) if n not in arrived]
    finally:
        target.close()
        client.close()


def runs(lost: list[int]) -> list[int]:
    """Lengths of the runs of consecutive losses."""
    lengths: list[int] = []
    for i, n in enumerate(lost):
        if i and lost[i - 1] == n - 1:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


async def test_random_loss_is_one_percent_and_the_same_for_the_same_seed() -> None:
    profile = Profile(loss=0.01)
    lost = await lost_numbers(profile, seed=3, count=4000)
    again = await lost_numbers(profile, seed=3, count=4000)
    other = await lost_numbers(profile, seed=4, count=4000)
    print(f"1 % random loss over 4000: {len(lost)} lost (seed 3, twice), {len(other)} "
          f"(seed 4); runs {runs(lost)}")
    assert 20 <= len(lost) <= 60  # 40 expected, a binomial's sd is 6.3
    assert again == lost
    assert other != lost


async def test_bursty_loss_comes_in_runs_random_loss_does_not() -> None:
    bursty = Profile(burst=GilbertElliott(p_enter_bad=0.01, p_leave_bad=0.32))
    scattered = Profile(loss=bursty.burst.mean_loss if bursty.burst else 0)
    in_bursts = runs(await lost_numbers(bursty, seed=5, count=6000))
    at_random = runs(await lost_numbers(scattered, seed=5, count=6000))
    mean_bursty = sum(in_bursts) / len(in_bursts)
    mean_random = sum(at_random) / len(at_random)
    print(f"3 % loss over 6000: Gilbert-Elliott {sum(in_bursts)} lost in {len(in_bursts)} runs "
          f"(mean {mean_bursty:.2f}, longest {max(in_bursts)}); random {sum(at_random)} in "
          f"{len(at_random)} runs (mean {mean_random:.2f}, longest {max(at_random)})")
    assert 0.015 * 6000 < sum(in_bursts) < 0.05 * 6000
    assert 0.02 * 6000 < sum(at_random) < 0.04 * 6000
    assert mean_bursty > 2.0 and mean_random < 1.2
    assert max(in_bursts) >= 6


async def test_nothing_passes_during_an_outage_and_traffic_resumes_after() -> None:
    # Truong Sa's outage, time-scaled: 0.5 s every 2 s (the first at 0.5 s), 50 ms delay.
    profile = Profile(delay_ms=50, outage_every_s=2, outage_s=0.5, outage_first_at_s=0.5)
    target, client = await endpoint(), await endpoint()
    try:
        async with UdpLinkEmulator((HOST, target.port), default=profile, seed=6) as link:
            await send_paced(client, (HOST, link.port), 350, 100)  # 3.5 s, one each 10 ms
            await settled(link)
            epoch, up = link.epoch, link.stats()[0]["up"]
        at = [t - epoch for t, _ in target.arrivals]
        # A datagram released just before an outage may be read a little late by the target
        # (the loop is busy): 60 ms of slack at the start, none at the end.
        inside = [t for t in at if 0.56 < t < 1.0 or 2.56 < t < 3.0]
        print(f"outages 0.5-1.0 s and 2.5-3.0 s: {len(at)} of 350 arrived, "
              f"{up['dropped_outage']} dropped by outage, {len(inside)} inside; back at "
              f"{min(t for t in at if t > 1):.3f} s and {min(t for t in at if t > 3):.3f} s")
        assert not inside
        # 2 x 0.5 s of 10 ms packets, and the 50 ms in flight as each outage starts.
        assert 95 <= up["dropped_outage"] <= 120
        assert min(t for t in at if t > 1) < 1.0 + 0.05 + 0.1  # the first sent after
        assert min(t for t in at if t > 3) < 3.0 + 0.05 + 0.1
        assert [t for t in at if 0.4 < t < 0.5]  # it was up right before
    finally:
        target.close()
        client.close()


async def test_an_idle_flow_is_closed_and_its_stats_kept() -> None:
    target, client = await endpoint(), await endpoint()
    try:
        async with UdpLinkEmulator((HOST, target.port), idle_s=0.4) as link:
            client.sendto(numbered(0, 100), (HOST, link.port))
            await wait_for(lambda: len(target.arrivals) == 1, 2, "the first datagram")
            first = next(iter(link.flows.values()))
            await wait_for(lambda: not link.flows, 2, "the idle flow closed")
            assert first.sock.fileno() == -1
            client.sendto(numbered(1, 100), (HOST, link.port))
            await wait_for(lambda: len(target.arrivals) == 2, 2, "a new flow")
            stats = link.stats()
        assert [s["index"] for s in stats] == [0, 1]
        assert [s["up"]["packets_out"] for s in stats] == [1, 1]
    finally:
        target.close()
        client.close()


def test_profiles_read_as_the_issue_says() -> None:
    up, down = PROFILES["vsat"]
    assert up.rate_bps == down.rate_bps == 512_000 and up.loss == down.loss == 0.01
    assert up.delay_ms + down.delay_ms == 600
    up, down = PROFILES["truong-sa"]
    assert up.rate_bps == 256_000 and up.delay_ms + down.delay_ms == 700
    assert up.burst is not None and 0.028 < up.burst.mean_loss < 0.032
    assert up.outage_every_s == 60 and up.outage_s == 5
    assert up.in_outage(30) and up.in_outage(34.9) and not up.in_outage(35)
    assert up.in_outage(92) and up.outage_end(92) == 95 and not up.in_outage(29.9)
    assert set(PROFILES) == {"good", "4g", "3g", "vsat", "truong-sa"}
    with pytest.raises(ValidationError):
        Profile(outage_every_s=5, outage_s=5)


def test_the_client_ufrag_is_read_from_a_binding_request() -> None:
    from aioice import stun

    request = stun.Message(message_method=stun.Method.BINDING,
                           message_class=stun.Class.REQUEST)
    request.attributes["PRIORITY"] = 1
    request.attributes["USERNAME"] = "relayUfrag:clientUfrag"
    request.add_message_integrity(b"password")
    assert client_ufrag(bytes(request)) == "clientUfrag"
    response = stun.Message(message_method=stun.Method.BINDING,
                            message_class=stun.Class.RESPONSE)
    assert client_ufrag(bytes(response)) is None
    assert client_ufrag(b"\x00\x01" + bytes(30)) is None


# -- the TCP proxy ------------------------------------------------------------------------------


async def test_the_tcp_proxy_has_the_links_delay_rate_and_outages() -> None:
    received = bytearray()
    arrivals: list[tuple[float, int]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
            arrivals.append((asyncio.get_running_loop().time(), len(received)))
            if data.startswith(b"ping"):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        async with TcpLinkEmulator((HOST, port), "vsat", seed=7) as link:
            reader, writer = await asyncio.open_connection(HOST, link.port)
            rtts = []
            for n in range(5):
                start = loop.time()
                writer.write(b"ping %d\n" % n)
                await asyncio.wait_for(reader.readline(), 5)
                rtts.append(loop.time() - start)
            # 96 KiB at 512 kbps: 1.5 s.
            received.clear()
            arrivals.clear()
            writer.write(bytes(96 * 1024))
            await wait_for(lambda: len(received) >= 96 * 1024, 10, "96 KiB through vsat")
            rate = (arrivals[-1][1] - arrivals[0][1]) * 8 / (arrivals[-1][0] - arrivals[0][0])
            # An outage holds bytes, never loses them: 0.4 s from 0.2 s after now.
            now = loop.time() - link.epoch
            link.set_profile(Profile(delay_ms=20, outage_every_s=100, outage_s=0.4,
                                     outage_first_at_s=now + 0.2))
            received.clear()
            arrivals.clear()
            for n in range(60):  # 1.2 s, one each 20 ms
                writer.write(b"x%03d" % n)
                await asyncio.sleep(0.02)
            await wait_for(lambda: len(received) >= 240, 5, "the bytes held by the outage")
            held = [t - link.epoch - now for t, _ in arrivals]
            writer.close()
            print(f"tcp vsat: RTT {', '.join(f'{r * 1000:.0f}' for r in rtts)} ms; 96 KiB at "
                  f"{rate / 1000:.0f} kbps; around a 0.2-0.6 s outage arrivals at "
                  f"{', '.join(f'{t:.2f}' for t in held[:12])}... s")
        assert all(0.58 < r < 0.72 for r in rtts)
        assert 0.9 * 512_000 < rate < 1.1 * 512_000
        assert bytes(received) == b"".join(b"x%03d" % n for n in range(60))  # all, in order
        assert not [t for t in held if 0.26 < t < 0.6]  # (slack at the start: as above)
        assert [t for t in held if 0.6 <= t < 0.7]  # what was held, delivered at the end
    finally:
        server.close()
        await server.wait_closed()


async def test_the_command_line_relays_through_a_profile() -> None:
    relay = await endpoint(echo=True)
    client = await endpoint()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.link_emulator", "--profile", "4g", "--listen-port", "0",
        "--to", f"{HOST}:{relay.port}", "--seed", "3", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        match = re.match(r"READY udp 127\.0\.0\.1:(\d+) -> ", line)
        assert match is not None, line
        for n in range(10):
            client.sendto(numbered(n, 200), (HOST, int(match.group(1))))
        await wait_for(lambda: len(client.arrivals) >= 9, 5, "echoes through the CLI")
        process.terminate()
        out = (await asyncio.wait_for(process.stdout.read(), 10)).decode()
        assert await asyncio.wait_for(process.wait(), 10) == 0
        stats: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
        assert stats[0]["profile"] == "4g" and stats[0]["up"]["packets_in"] == 10
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        relay.close()
        client.close()


# -- relay.announced_port -----------------------------------------------------------------------


def test_announced_port_needs_the_single_port_and_one_relay_process() -> None:
    assert from_settings(RelaySettings(udp_port=3478, announced_port=40000)).announced_port \
        == 40000
    with pytest.raises(ValidationError, match="needs udp_port"):
        RelaySettings(announced_port=40000)
    with pytest.raises(ValidationError):
        RelaySettings(udp_port=3478, announced_port=70000)
    with pytest.raises(ValidationError, match="embedded_workers"):
        RelaySettings(udp_port=3478, announced_port=40000, embedded_workers=2)


async def test_open_ports_refuses_an_announced_port_without_the_single_port() -> None:
    with pytest.raises(UdpPortsUnavailable, match=r"needs relay\.udp_port"):
        await open_ports(MediaConfig(host_addresses=[HOST], announced_port=40000))


async def test_an_aiortc_participant_reaches_the_relay_through_the_emulator_on_good_then_3g(
        ) -> None:
    (relay_port, _) = free_udp_ports(1)
    async with UdpLinkEmulator((HOST, relay_port), default="good", seed=8) as link, \
            relay_room(udp_port=relay_port, announced_port=link.port) as room:
        await room.relay.start()  # binds the single port
        hide_client_addresses(room.relay)
        mux = room.relay.udp_ports
        assert isinstance(mux, UdpMux) and mux.port == relay_port
        peers: dict[str, MediaPeer] = {}
        for name in ("island", "hospital"):
            peers[name] = await room.join(name, fps=15)

        async def decoding(frames: int, timeout: float) -> None:
            start = {(n, o): peers[n].frames(o) for n, o in (("island", "hospital"),
                                                             ("hospital", "island"))}
            for viewer, sender in start:
                await wait_for(lambda v=viewer, s=sender: peers[v].frames(s)  # type: ignore[misc]
                               >= start[(v, s)] + frames, timeout, f"{viewer} decoding {sender}")

        loop = asyncio.get_running_loop()
        began = loop.time()
        await decoding(20, 20)
        on_good = loop.time() - began
        island = peers["island"]
        mine: set[str] = set()
        for pc in (island.publish_pc, island.subscribe_pc):
            assert pc is not None and pc.remoteDescription is not None
            assert set(relay_candidate_ports(pc.remoteDescription.sdp)) == {link.port}
            mine |= sdp_ufrags(pc.localDescription.sdp)
        # Every client's media goes through the emulator: the relay knows the clients only by
        # the emulator's sockets, one per client flow.
        assert len(link.flows) == 4
        for client, flow in link.flows.items():
            assert mux.owner((HOST, flow.local_port)) is not None
            assert mux.owner(client) is None
        for ufrag in mine:
            link.assign(ufrag, "3g")
        flows = [f for f in link.flows.values() if f.ufrag in mine]
        assert len(flows) == 2 and all(f.profile_name == "3g" for f in flows)
        before = [(f.down.stats.packets_out, f.down.stats.delay_sum_s) for f in flows]
        began = loop.time()
        await decoding(30, 30)
        on_3g = loop.time() - began
        held = [(f.down.stats.delay_sum_s - s) / max(f.down.stats.packets_out - p, 1)
                for f, (p, s) in zip(flows, before, strict=True)]
        lost = sum(f.up.stats.dropped_loss + f.down.stats.dropped_loss for f in flows)
        print(f"through the emulator: 20 frames each way in {on_good:.1f} s on good, 30 more "
              f"in {on_3g:.1f} s with the island on 3g (its flows' down delay "
              f"{', '.join(f'{h * 1000:.0f}' for h in held)} ms, {lost} packets lost); "
              f"stats {json.dumps([f.stats()['down'] for f in flows])[:300]}")
        assert all(0.07 < h < 0.5 for h in held)
        for viewer, sender in (("island", "hospital"), ("hospital", "island")):
            received = peers[viewer].video_from(sender)
            assert received is not None
            assert received.counters == sorted(received.counters)
