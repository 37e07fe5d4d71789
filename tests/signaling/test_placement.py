"""Placement (``signaling.placement.RelayDirectory``): the requesting site's region first,
then the least loaded; a relay that does not answer is skipped; after a restart a
consultation reopens on its relay or waits for its node."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.embedded import LocalRelay
from signaling.placement import NoRelayAvailable, RelayDirectory, RelayUnanswered


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


class FrozenRelay(LocalRelay):
    """A relay that never answers ``open_room`` (what a frozen node looks like from here;
    tests/signaling/test_failover_signaling.py freezes a real one behind a cut link)."""

    async def open_room(self, room_id: str) -> None:
        await asyncio.Event().wait()


async def test_a_relay_that_does_not_answer_open_room_is_skipped_for_the_next() -> None:
    relays = RelayDirectory(open_room_timeout_s=0.2)
    frozen = FrozenRelay("hn-1", region="01", capacity=5)
    spare = LocalRelay("hn-2", region="01", capacity=5)
    anywhere = LocalRelay("embedded", capacity=5)
    for relay in (frozen, spare, anywhere):
        relays.register(relay)
    failed: set[str] = set()
    started = time.monotonic()
    assert (await relays.place("r1", "01", failed)).info.id == "hn-2"
    assert failed == {"hn-1"}
    assert 0.15 < time.monotonic() - started < 1.0
    # The batch that saw it fail does not wait for it again.
    started = time.monotonic()
    assert (await relays.place("r2", "01", failed)).info.id == "hn-2"
    assert time.monotonic() - started < 0.15
    with pytest.raises(RelayUnanswered, match="hn-1"):
        await relays.open("r3", frozen, "01")


async def test_a_room_a_relay_opened_too_late_is_closed_there_unless_placed_there() -> None:
    relays = RelayDirectory(open_room_timeout_s=0.1)
    slow = LocalRelay("hn-1", region="01", capacity=5)
    relays.register(slow)

    # The relay's own open goes on after the timeout (a remote node's would: the call was
    # sent); here the open is shielded from the timeout's cancellation to do the same.
    opening: list[asyncio.Task[None]] = []
    plain_open = LocalRelay.open_room

    async def late_open(room_id: str) -> None:
        async def go() -> None:
            await asyncio.sleep(0.15)
            await plain_open(slow, room_id)
        opening.append(asyncio.ensure_future(go()))
        await asyncio.shield(opening[-1])

    slow.open_room = late_open  # type: ignore[method-assign]
    with pytest.raises(RelayUnanswered):
        await relays.open("r1", slow, "01")
    await asyncio.wait_for(opening[0], 1.0)
    assert "r1" in slow.rooms  # opened after all, and placed nowhere
    await asyncio.sleep(0.3)
    assert "r1" not in slow.rooms
    # Placed on that relay meanwhile (a later try that succeeded): the Room stays.
    with pytest.raises(RelayUnanswered):
        await relays.open("r2", slow, "01")
    await asyncio.wait_for(opening[1], 1.0)
    slow.open_room = lambda room_id: plain_open(slow, room_id)  # type: ignore[method-assign]
    await relays.open("r2", slow, "01")
    await asyncio.sleep(0.3)
    assert "r2" in slow.rooms and relays.for_room("r2") is slow


async def test_placements_count_before_the_next_heartbeat_and_a_draining_relay_takes_none(
        ) -> None:
    relays = RelayDirectory()
    a = LocalRelay("a", region="01", capacity=2)
    b = LocalRelay("b", region="01", capacity=2)
    for relay in (a, b):
        relays.register(relay)
    # A node's own count comes with its heartbeat; what was placed since counts at once.
    assert (await relays.place("r1", "01")).info.id == "a"
    a.info.load = 0
    assert (await relays.place("r2", "01")).info.id == "b"
    relays.drain("a")
    assert (await relays.place("r3", "01")).info.id == "b"
    with pytest.raises(NoRelayAvailable):
        await relays.place("r4", "01")  # b is full, a drains


async def test_a_restored_consultation_reopens_on_its_relay_or_waits_for_its_node() -> None:
    relays = RelayDirectory(adopt_wait_s=15)
    embedded = LocalRelay("embedded", capacity=5)
    relays.register(embedded)
    assert await relays.restore("r1", "embedded", "01") is embedded
    assert "r1" in embedded.rooms
    # Its node has not dialled in yet: it waits for that node first.
    before = time.time()
    assert await relays.restore("r2", "node-x", "01") is None
    waiting = relays.waiting("r2")
    assert waiting is not None and waiting.relay_id == "node-x"
    assert waiting.reason == "signaling_restart"
    assert before + 14 < waiting.until <= time.time() + 15
    assert waiting.waits_for("node-y", time.time()) and not waiting.waits_for("node-x",
                                                                               time.time())
    assert relays.for_room("r2") is None and relays.is_known("r2")
    # Placed, it waits no more; ended, it is forgotten.
    await relays.open("r2", embedded, "01")
    assert relays.waiting("r2") is None and relays.for_room("r2") is embedded
    await relays.release("r2")
    assert not relays.is_known("r2") and "r2" not in embedded.rooms


async def test_a_restored_consultation_whose_relay_fails_goes_elsewhere_or_waits() -> None:
    relays = RelayDirectory(open_room_timeout_s=0.1)
    relays.register(FrozenRelay("embedded", capacity=5))
    assert await relays.restore("r1", "embedded", "01") is None  # never raises
    waiting = relays.waiting("r1")
    assert waiting is not None and waiting.relay_id is None
    spare = LocalRelay("spare", capacity=5)
    relays.register(spare)
    assert await relays.restore("r2", "embedded", "01") is spare


async def test_an_accepted_consultation_whose_relay_does_not_answer_goes_on_or_waits() -> None:
    relays = RelayDirectory(open_room_timeout_s=0.1)
    frozen = FrozenRelay("a-frozen", region="01", capacity=5)
    relays.register(frozen)
    held = relays.reserve("01")
    # The consultation is written already: no error, it waits for a relay.
    assert await relays.open("r1", held, "01", reserved=True) is frozen
    assert relays.for_room("r1") is None and relays.waiting("r1") is not None
    spare = LocalRelay("b-spare", region="01", capacity=5)
    relays.register(spare)
    held = relays.reserve("01")
    assert held is frozen
    assert await relays.open("r2", held, "01", reserved=True) is spare
    assert relays.for_room("r2") is spare


class SlowRelay(LocalRelay):
    """A relay whose ``open_room`` takes a round trip (a node across a WAN); counts how many
    are in flight at once."""

    def __init__(self, relay_id: str, *, region: str, capacity: int) -> None:
        super().__init__(relay_id, region=region, capacity=capacity)
        self.in_flight = 0
        self.most_in_flight = 0

    async def open_room(self, room_id: str) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            await super().open_room(room_id)
        finally:
            self.in_flight -= 1


async def test_rooms_placed_at_the_same_time_overlap_and_never_overfill_a_relay() -> None:
    relays = RelayDirectory()
    near = SlowRelay("hn-1", region="01", capacity=5)
    far = SlowRelay("hcm-1", region="79", capacity=100)
    for relay in (near, far):
        relays.register(relay)
    failed: set[str] = set()
    placed = await asyncio.gather(*(relays.place(f"r{i}", "01", failed) for i in range(40)))
    # The region's relay takes what it can hold, the rest go to the other; a room being
    # opened counts against its relay while the relay answers.
    assert sum(1 for r in placed if r is near) == 5 and len(near.rooms) == 5
    assert sum(1 for r in placed if r is far) == 35 and len(far.rooms) == 35
    assert near.most_in_flight == 5 and far.most_in_flight > 1
