"""relay.subscriber: the renegotiation state machine on its own, then a Subscriber offering
real publications to a plain aiortc answerer (no media flows: only offers and answers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from relay.config import MediaConfig
from relay.errors import BadSdp, NegotiationPending
from relay.publication import Publication
from relay.sdp import Codec
from relay.subscriber import Negotiation, Subscriber
from relay.tasks import Tasks
from tests.media import wait_for
from tests.relay.loopback import loopback


# -- the state machine ----------------------------------------------------------------------
def test_one_offer_is_in_flight_and_changes_meanwhile_make_the_next() -> None:
    negotiation = Negotiation()
    assert negotiation.change()
    negotiation.offering({"audio"})
    assert not negotiation.change()  # merged into the next offer
    assert negotiation.answered(applied=True)
    assert negotiation.change()
    negotiation.offering({"audio"})
    assert not negotiation.answered(applied=True)  # nothing changed meanwhile


def test_a_kind_gets_one_new_m_line_per_offer_until_the_client_answered_one() -> None:
    negotiation = Negotiation()
    assert negotiation.may_open("audio", 3)  # the primary m-line's kind
    assert negotiation.may_open("video", 0)
    assert not negotiation.may_open("video", 1)
    negotiation.offering({"audio", "video"}, deferred=True)
    assert negotiation.answered(applied=False)  # deferred changes: another offer follows
    assert not negotiation.may_open("video", 1)  # a refused answer settles nothing
    negotiation.offering({"audio", "video"})
    negotiation.answered(applied=True)
    assert negotiation.may_open("video", 5)


# -- a Subscriber and a plain aiortc answerer -------------------------------------------------
class Side:
    """The publications on offer, the offers sent, and the client answering them."""

    def __init__(self) -> None:
        self.publisher_pc = RTCPeerConnection()
        self.publications: list[Publication] = []
        self.offers: list[dict[str, Any]] = []
        self.client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.tasks = Tasks("test")

    def publish(self, participant_id: str) -> Publication:
        receiver = self.publisher_pc.addTransceiver("video", direction="recvonly").receiver
        publication = Publication(
            publication_id=f"pubn_{participant_id}", room_id="r", participant_id=participant_id,
            source="camera", kind="video", codec=Codec("video/VP8", 90000), receiver=receiver)
        self.publications.append(publication)
        return publication

    async def send_offer(self, offer: dict[str, Any]) -> None:
        self.offers.append(offer)

    async def answer(self, subscriber: Subscriber, offer: dict[str, Any]) -> None:
        await self.client.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        await self.client.setLocalDescription(await self.client.createAnswer())
        await subscriber.answer(offer["transport_id"], self.client.localDescription.sdp)

    async def close(self) -> None:
        await self.tasks.close()
        for pc in (self.publisher_pc, self.client):
            await pc.close()


@pytest.fixture
async def side() -> AsyncIterator[tuple[Subscriber, Side]]:
    with loopback():
        made = Side()
        subscriber = Subscriber("r", "viewer", "sub_1", MediaConfig(),
                                publications=lambda: list(made.publications),
                                send_offer=made.send_offer, spawn=made.tasks.spawn,
                                on_remb=lambda bitrate, ssrcs: None,
                                on_loss=lambda fraction: None)
        yield subscriber, made
        await subscriber.close()
        await made.close()


async def test_a_second_subscribe_before_the_answer_is_refused_with_a_typed_error(
    side: tuple[Subscriber, Side],
) -> None:
    subscriber, _ = side
    offer = await subscriber.subscribe()
    with pytest.raises(NegotiationPending, match=r"'sub_1' of 'viewer' has an offer waiting"):
        await subscriber.subscribe()
    assert offer["transport_id"] == "sub_1"


async def test_two_videos_present_are_offered_one_after_the_other(
    side: tuple[Subscriber, Side],
) -> None:
    subscriber, made = side
    north, south = made.publish("north"), made.publish("south")
    first = await subscriber.subscribe()
    assert [t["participant_id"] for t in first["tracks"].values()] == ["north"]
    await made.answer(subscriber, first)
    await wait_for(lambda: len(made.offers) == 1, 5, "the second offer")
    second = made.offers[0]
    assert sorted(t["participant_id"] for t in second["tracks"].values()) == ["north", "south"]
    await made.answer(subscriber, second)
    assert set(subscriber.subscriptions) == {north.id, south.id}
    assert all(s.ready for s in subscriber.subscriptions.values())
    # Once the client has a video m-line, several arrive in one offer.
    subscriber.publication_added(made.publish("east"))
    subscriber.publication_added(made.publish("west"))
    await wait_for(lambda: len(made.offers) == 2, 5, "the third offer")
    assert len(made.offers[1]["tracks"]) == 4


async def test_an_answer_without_an_offer_waiting_is_refused(
    side: tuple[Subscriber, Side],
) -> None:
    subscriber, made = side
    offer = await subscriber.subscribe()
    await made.answer(subscriber, offer)
    with pytest.raises(BadSdp, match="no offer is waiting"):
        await subscriber.answer("sub_1", made.client.localDescription.sdp)


async def test_a_removed_publication_ends_its_subscription_and_detaches_it_once(
    side: tuple[Subscriber, Side],
) -> None:
    subscriber, made = side
    north = made.publish("north")
    await made.answer(subscriber, await subscriber.subscribe())
    subscription = subscriber.subscriptions[north.id]
    assert north.subscriptions == {subscription}
    north.close()
    subscriber.publication_removed(north)
    subscriber.publication_removed(north)
    assert subscription.closed and not north.subscriptions and subscription.leg.retired
    await wait_for(lambda: len(made.offers) == 1, 5, "the offer that turns the m-line off")
    assert made.offers[0]["tracks"] == {}


async def test_the_publisher_s_own_loss_is_not_counted_against_the_subscriber() -> None:
    """The relay forwards a publication's packets in their places: what the publisher's link
    lost shows in the subscriber's receiver reports too. The layer policy hears only what the
    subscriber's own link lost, measured from the reports' cumulative counts over intervals
    of at least 0.5 s (a report that comes sooner, as a browser's with each NACK, waits)."""
    heard: list[float] = []
    with loopback():
        made = Side()
        subscriber = Subscriber("r", "viewer", "sub_1", MediaConfig(),
                                publications=lambda: list(made.publications),
                                send_offer=made.send_offer, spawn=made.tasks.spawn,
                                on_remb=lambda bitrate, ssrcs: None, on_loss=heard.append)
        try:
            north = made.publish("north")
            await made.answer(subscriber, await subscriber.subscribe())
            leg = subscriber.subscriptions[north.id].leg

            def arrive(first: int, last: int, lost_every: int = 0) -> None:
                for seq in range(first, last + 1):
                    if lost_every and seq % lost_every == 0:
                        continue  # lost on the publisher's link
                    north.packets += 1
                    north.sequence.extend(seq % 65536)

            # The subscriber's leg numbers its packets from 1000 (its own sequence).
            arrive(65000, 65099)
            subscriber._on_receipt(leg, 1099, 0, now=100.0)  # the first: a mark
            arrive(65100, 65299, lost_every=10)  # 10 % lost upstream, across the wrap
            subscriber._on_receipt(leg, 1299, 20, now=101.0)  # exactly those holes
            subscriber._on_receipt(leg, 1300, 20, now=101.2)  # too soon: waits
            arrive(65300, 65499, lost_every=10)
            subscriber._on_receipt(leg, 1499, 70, now=102.0)  # 10 % upstream, 15 % its own
            arrive(65500, 65599)
            subscriber._on_receipt(leg, 1599, 75, now=103.0)  # a clean upstream: all its own
        finally:
            await subscriber.close()
            await made.close()
    assert len(heard) == 3
    assert heard[0] == pytest.approx(0.0, abs=1e-9)
    assert heard[1] == pytest.approx(0.15, abs=1e-9) and heard[2] == pytest.approx(0.05)
