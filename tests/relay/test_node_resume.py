"""Resume on the relay side: a participant whose signaling connection changed (a reconnect, a
restarted signaling, its node found again) keeps its peer connections, and the subscribe offer
it never answered arrives again. Real aiortc peers on a LocalRelay (a node's engine)."""

from __future__ import annotations

from tests.media import wait_for
from tests.relay.peers import RelayRoom


async def test_a_resumed_participant_keeps_its_connections_and_gets_its_lost_offer_again(
        room: RelayRoom) -> None:
    viewer = await room.join("viewer", publish=False)
    client_pc = viewer.subscribe_pc
    relay_pc = room.relay.rooms[room.id].participants["viewer"].subscribe_pc
    # The viewer's signaling connection is gone: the renegotiation offer for the new
    # publication is lost on the way.
    del room.events.peers[(room.id, "viewer")]
    await room.join("camera")
    await wait_for(lambda: room.events.offers_to("viewer") == 1, 10, "the lost offer")
    assert viewer.frames("camera") == 0

    assert await room.relay.resume(room.id, "viewer") is True
    first, again = [o for _, who, o in room.events.offers if who == "viewer"]
    assert again == first
    # The client is reachable again: it answers this offer and those that follow.
    room.events.peers[(room.id, "viewer")] = viewer
    await viewer.answer_offer(again)
    await wait_for(lambda: viewer.frames("camera") > 20, 20, "video after the resume")
    participant = room.relay.rooms[room.id].participants["viewer"]
    assert viewer.subscribe_pc is client_pc and participant.subscribe_pc is relay_pc

    # Nothing unanswered: a resume sends nothing; a stranger or another room is not here.
    negotiation = participant.subscriber.negotiation
    await wait_for(lambda: not negotiation.in_flight, 10, "every offer answered")
    offers = room.events.offers_to("viewer")
    assert await room.relay.resume(room.id, "viewer") is True
    assert room.events.offers_to("viewer") == offers
    assert await room.relay.resume(room.id, "ghost") is False
    assert await room.relay.resume("elsewhere", "viewer") is False


async def test_a_participant_whose_connection_is_gone_cannot_resume(room: RelayRoom) -> None:
    viewer = await room.join("viewer", publish=False)
    camera = await room.join("camera")
    participant = room.relay.rooms[room.id].participants["camera"]
    await wait_for(lambda: viewer.frames("camera") > 5, 20, "the camera's video")
    assert await room.relay.resume(room.id, "camera") is True
    # The camera's client closes its publish connection (a crashed tab; a lost network ends
    # the same way once ICE gives up): resuming would keep a dead connection, so the client
    # is told to join afresh.
    assert camera.publish_pc is not None
    await camera.publish_pc.close()
    await wait_for(lambda: participant.media_lost, 10, "the relay to see the connection go")
    assert await room.relay.resume(room.id, "camera") is False
    assert await room.relay.resume(room.id, "viewer") is True
