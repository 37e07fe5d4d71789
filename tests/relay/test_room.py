"""A room's life on a LocalRelay driven through relay.api, with real aiortc peers: leaving,
refusals, renegotiation as publications come and go, audio-only mode, media sinks, closing,
and teardown."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.errors import AlreadyPublished, BadSdp, NotInRoom, UnknownRoom
from tests.media import MediaPeer, wait_for
from tests.relay.peers import PacketSink, RelayRoom

BAD_SDPS = ("v=0\r\n", "not sdp at all", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n"
            "t=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n")


def removed(room: RelayRoom) -> set[str]:
    return {p["id"] for _, event, p in room.events.publications if event == "removed"}


async def test_a_participant_leaving_ends_its_tracks_and_the_others_go_on(
    room: RelayRoom,
) -> None:
    names = ("cardio1", "ref1", "ref2")
    peers = {name: await room.join(name) for name in names}
    for name in ("cardio1", "ref2"):
        await wait_for(lambda n=name: peers[n].frames("ref1") > 10, 20, f"{name} video")
    leaver = peers["ref1"]
    await room.relay.leave(room.id, "ref1")
    for name in ("cardio1", "ref2"):
        gone = peers[name].video_from("ref1")
        assert gone is not None
        await wait_for(lambda g=gone: g.ended, 10, f"ref1's video ending for {name}")
        sound = peers[name].video_from("ref1", source="microphone")
        assert sound is not None
        await wait_for(lambda s=sound: s.ended, 10, "ref1's audio ending")
    assert "ref1" not in await room.relay.stats(room.id)
    # The relay closed the leaver's connections: its client sees them closed.
    await wait_for(lambda: all(pc is not None and pc.connectionState == "closed"
                               for pc in (leaver.publish_pc, leaver.subscribe_pc)), 10,
                   "the leaver's connections closing")
    # The two who stayed still see each other.
    before = peers["ref2"].frames("cardio1"), peers["cardio1"].frames("ref2")
    await wait_for(lambda: peers["ref2"].frames("cardio1") > before[0] + 15
                   and peers["cardio1"].frames("ref2") > before[1] + 15, 10,
                   "media between those who stayed")


async def test_the_relay_refuses_bad_media_steps_and_stays_up(room: RelayRoom) -> None:
    with pytest.raises(UnknownRoom):
        await room.relay.join("no-such-room", "ref1")
    # Publishing before joining the room is refused.
    with pytest.raises(NotInRoom):
        await room.relay.publish(room.id, "ref1", BAD_SDPS[2], {"0": "camera"})
    await room.relay.join(room.id, "ref1")
    for sdp in BAD_SDPS:
        with pytest.raises(BadSdp) as refused:
            await room.relay.publish(room.id, "ref1", sdp, {"0": "camera"})
        assert refused.value.code == "bad_sdp" and refused.value.message
    peer = room.peer("ref1")
    await peer.publish()
    # A second camera from the same participant: refused with a clear error.
    second = room.peer("ref1", label="-again")
    with pytest.raises(AlreadyPublished, match="camera"):
        await second.publish(audio=False)
    # The relay is still serving: the host gets ref1's video.
    host = await room.join("cardio1", publish=False)
    await wait_for(lambda: host.frames("ref1") > 10, 20, "video after refusals")


async def test_publications_coming_and_going_renegotiate_the_subscription(
    room: RelayRoom,
) -> None:
    await room.join("cardio1")
    viewer = await room.join("ref1", publish=False)
    await wait_for(lambda: viewer.frames("cardio1") > 10, 20, "the camera")
    camera = viewer.video_from("cardio1")
    sound = viewer.video_from("cardio1", source="microphone")
    assert camera is not None and sound is not None
    offers = room.events.offers_to("ref1")
    await room.relay.unpublish(room.id, "cardio1", "camera")
    await wait_for(lambda: camera.ended, 10, "the camera's track ending")
    await wait_for(lambda: room.events.offers_to("ref1") > offers, 5, "a new offer")
    assert camera.info["id"] in removed(room)
    # A new publication reaches the subscriber on a new offer; the sound never stopped.
    heard = sound.audio_frames
    screen = room.peer("cardio1", label="-screen")
    await screen.publish(audio=False, source="screen")
    await wait_for(lambda: viewer.frames("cardio1", source="screen") > 10, 10, "the screen")
    assert not sound.ended and sound.audio_frames > heard
    assert not room.events.failures
    with pytest.raises(NotInRoom):
        await room.relay.unpublish(room.id, "cardio1", "camera")


async def test_audio_only_mode_pauses_video_and_resumes_with_a_keyframe(
    room: RelayRoom,
) -> None:
    await room.join("cardio1")
    island = await room.join("ref1", publish=False)
    await wait_for(lambda: island.frames("cardio1") > 10, 20, "video")
    await room.relay.set_audio_only(room.id, "ref1", True)
    await asyncio.sleep(0.5)
    paused_at = island.frames("cardio1")
    sound = island.video_from("cardio1", source="microphone")
    assert sound is not None
    audio_before = sound.audio_frames
    await asyncio.sleep(1.5)
    assert island.frames("cardio1") <= paused_at + 1
    assert sound.audio_frames > audio_before + 40  # audio goes on
    await room.relay.set_audio_only(room.id, "ref1", False)
    resumed = time.monotonic()
    await wait_for(lambda: island.frames("cardio1") > paused_at + 3, 3,
                   "video after audio-only")
    assert time.monotonic() - resumed < 1.5


async def test_a_sink_gets_every_publication_and_its_packets_until_detached(
    room: RelayRoom,
) -> None:
    first = await room.join("cardio1")
    await wait_for(lambda: first.publish_pc is not None
                   and first.publish_pc.connectionState == "connected", 10, "publishing")
    sink = PacketSink()
    await room.relay.attach_sink(room.id, sink)
    # The publications present are given at once, the later ones as they come.
    assert {(p["participant_id"], p["source"]) for p in sink.added.values()} == {
        ("cardio1", "camera"), ("cardio1", "microphone")}
    await room.join("ref1", subscribe=False)
    assert len(sink.added) == 4
    camera = next(p for p in sink.added.values()
                  if p["participant_id"] == "ref1" and p["source"] == "camera")
    assert camera["kind"] == "video" and camera["codec"].lower() == "video/vp8"
    assert camera["clock_rate"] == 90000
    await wait_for(lambda: len(sink.packets) == 4 and min(sink.packets.values()) > 20, 10,
                   "packets of every publication")
    await room.relay.unpublish(room.id, "ref1", "camera")
    assert sink.removed == [camera["id"]]
    await room.relay.detach_sink(room.id, sink)
    counted = dict(sink.packets)
    await asyncio.sleep(0.3)
    assert sink.packets == counted


async def test_closing_the_room_ends_every_track_and_connection(room: RelayRoom) -> None:
    baseline = len(asyncio.all_tasks())
    peers = {name: await room.join(name) for name in ("cardio1", "ref1")}
    await wait_for(lambda: peers["ref1"].frames("cardio1") > 10
                   and peers["cardio1"].frames("ref1") > 10, 20, "media both ways")
    await room.relay.close_room(room.id)
    await room.relay.close_room(room.id)  # idempotent
    for peer in peers.values():
        await wait_for(lambda p=peer: all(r.ended for r in p.received.values()), 10,
                       f"{peer.name}'s tracks ending")
        await wait_for(lambda p=peer: all(pc is not None and pc.connectionState == "closed"
                                          for pc in (p.publish_pc, p.subscribe_pc)), 10,
                       f"{peer.name}'s connections closing")
    assert room.relay.info.load == 0
    with pytest.raises(UnknownRoom):
        await room.relay.stats(room.id)
    await room.close_peers()
    await wait_for(lambda: len(asyncio.all_tasks()) <= baseline, 10,
                   "the relay's tasks to finish")


async def test_when_everyone_leaves_nothing_is_left_behind(room: RelayRoom) -> None:
    baseline = len(asyncio.all_tasks())
    peers = {name: await room.join(name) for name in ("cardio1", "ref1")}
    await wait_for(lambda: peers["ref1"].frames("cardio1") > 10
                   and peers["cardio1"].frames("ref1") > 10, 20, "media both ways")
    publications = {p["id"] for _, event, p in room.events.publications if event == "added"}
    assert len(publications) == 4
    await room.close_peers()
    for name in peers:
        await room.relay.leave(room.id, name)
    # Every publication ended, and the room is empty but keeps its place for the next join.
    await wait_for(lambda: removed(room) == publications, 5, "every publication removed")
    assert await room.relay.stats(room.id) == {}
    assert room.relay.info.load == 1
    await wait_for(lambda: len(asyncio.all_tasks()) <= baseline, 10,
                   "the relay's tasks to finish")
    back: MediaPeer = await room.join("ref1", publish=False)
    assert back.subscribe_pc is not None and not back.tracks
    assert set(await room.relay.stats(room.id)) == {"ref1"}
