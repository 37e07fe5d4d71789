"""Placement (``signaling.placement.RelayDirectory``): the requesting site's region first,
then the least loaded."""

from __future__ import annotations

import pytest

from relay.embedded import LocalRelay
from signaling.placement import NoRelayAvailable, RelayDirectory


async def test_a_room_goes_to_a_relay_of_the_region_then_to_the_least_loaded() -> None:
    relays = RelayDirectory()
    hanoi = LocalRelay("hn-1", region="01", capacity=2)
    saigon = LocalRelay("hcm-1", region="79", capacity=2)
    anywhere = LocalRelay("embedded", capacity=10)
    for relay in (hanoi, saigon, anywhere):
        relays.register(relay)
    assert (await relays.place("r1", "79")).info.id == "hcm-1"
    assert (await relays.place("r2", "79")).info.id == "hcm-1"
    # hcm-1 is full: the least loaded of the rest (by share of capacity, then id).
    assert (await relays.place("r3", "79")).info.id == "embedded"
    assert (await relays.place("r4", "22")).info.id == "hn-1"
    assert (await relays.place("r6", "01")).info.id == "hn-1"
    assert saigon.info.load == 2 and anywhere.info.load == 1 and hanoi.info.load == 2
    await relays.release("r1")
    assert saigon.info.load == 1 and "r1" not in saigon.rooms
    await relays.release("r1")  # idempotent
    assert (await relays.place("r5", "79")).info.id == "hcm-1"


async def test_no_capacity_anywhere_is_a_clear_error() -> None:
    relays = RelayDirectory()
    relays.register(LocalRelay("only", capacity=1))
    await relays.place("r1", "01")
    with pytest.raises(NoRelayAvailable, match="capacity"):
        await relays.place("r2", "01")


def test_a_relay_must_have_capacity() -> None:
    with pytest.raises(ValueError, match="capacity must be > 0, got 0"):
        LocalRelay("x", capacity=0)


async def test_a_reserved_room_counts_until_it_is_opened_or_given_back() -> None:
    relays = RelayDirectory()
    relays.register(LocalRelay("only", capacity=1))
    held = relays.reserve("01")
    with pytest.raises(NoRelayAvailable):
        relays.reserve("01")  # a concurrent accept cannot overfill the relay
    relays.unreserve(held)
    held = relays.reserve("01")
    await relays.open("r1", held, "01", reserved=True)
    assert held.info.load == 1
    with pytest.raises(NoRelayAvailable):
        relays.reserve("01")
