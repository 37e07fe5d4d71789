"""ICE consent (RFC 7675) on a long link: a participant behind a 700 ms round trip (Trường Sa's)
keeps its connection. aioice sends each consent check once and gives it 0.5 s, so on such a
link every check failed and the relay closed the connection after six of them, ~30 s into
every consultation; relay/hooks.py's checks are retransmitted and consent lasts 30 s without an
answer. aioice's interval is shortened here (0.5 s: consent lost after 3 s unanswered) so that
the test takes seconds; the control runs aioice's own checks over the same link and loses the
connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aioice.ice
import pytest

from relay import hooks
from tests.link_emulator import Profile, UdpLinkEmulator, hide_client_addresses, peer_ufrags
from tests.media import wait_for
from tests.relay.peers import relay_room
from tests.relay.test_ports import HOST, free_udp_ports

LONG_LINK = Profile(delay_ms=350)
"""700 ms round trip, nothing lost: only the delay is under test."""
INTERVAL_S = 0.5
HELD_S = 6.0
"""Twice the shortened expiry (6 x 0.5 s)."""


@pytest.fixture
def short_consent_interval() -> Iterator[None]:
    before = aioice.ice.CONSENT_INTERVAL
    aioice.ice.CONSENT_INTERVAL = INTERVAL_S  # type: ignore[misc]
    try:
        yield
    finally:
        aioice.ice.CONSENT_INTERVAL = before  # type: ignore[misc]
        hooks.patient_consent()


async def connection_over_long_link(patient: bool) -> tuple[str, str, float]:
    """A viewer behind LONG_LINK for HELD_S seconds: the relay's and the viewer's connection
    states at the end, and the measured round trip."""
    (port, _) = free_udp_ports(1)
    async with UdpLinkEmulator((HOST, port), default="good", seed=1) as link, \
            relay_room(udp_port=port, announced_port=link.port) as room:
        await room.relay.start()
        hooks.patient_consent(patient)
        hide_client_addresses(room.relay)
        await room.relay.join(room.id, "island")
        peer = room.peer("island")
        await peer.subscribe()
        for ufrag in peer_ufrags(peer):
            link.assign(ufrag, LONG_LINK)
        participant = room.relay.rooms[room.id].participants["island"]
        relay_pc = participant.subscribe_pc
        assert relay_pc is not None and peer.subscribe_pc is not None
        await wait_for(lambda: relay_pc.connectionState == "connected", 15,
                       "the island connected through the long link")
        start = time.monotonic()
        client_pc = peer.subscribe_pc
        while time.monotonic() - start < HELD_S:
            if "closed" in (relay_pc.connectionState, client_pc.connectionState):
                break
            await asyncio.sleep(0.1)
        flows = [f for u in peer_ufrags(peer) for f in link.flows_of(u)]
        delay = max(f.down.stats.as_dict()["delay_mean_s"] for f in flows)
        return relay_pc.connectionState, client_pc.connectionState, 2 * delay


async def test_a_700_ms_round_trip_keeps_its_connection(short_consent_interval: None) -> None:
    relay_state, client_state, rtt = await connection_over_long_link(patient=True)
    print(f"retransmitted consent over a {rtt * 1000:.0f} ms round trip: relay {relay_state}, "
          f"client {client_state} after {HELD_S} s (consent lost after 3 s unanswered)")
    assert rtt > 0.6
    assert relay_state == "connected" and client_state == "connected"


async def test_aioices_own_checks_lose_it(short_consent_interval: None) -> None:
    """The control: the same link with aioice's single 0.5 s check closes the connection, so
    the test above is about the checks, not a link too kind to fail them."""
    relay_state, client_state, rtt = await connection_over_long_link(patient=False)
    print(f"aioice's own consent over a {rtt * 1000:.0f} ms round trip: relay {relay_state}, "
          f"client {client_state}")
    assert "closed" in (relay_state, client_state)
