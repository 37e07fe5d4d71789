"""Room behaviour through the real signaling server and embedded relay: leaving, refusals,
keyframe requests, audio-only mode, a stalled subscriber, and teardown."""

from __future__ import annotations

import asyncio
import gc
import time

import psutil

from relay import hooks
from relay.embedded import LocalRelay
from signaling.app import SERVICES
from tests.media import MediaPeer, wait_for
from tests.relay.test_forwarding import media_peer, open_consultation, start_media
from tests.support import Server, clients


def embedded(server: Server) -> LocalRelay:
    assert server.app is not None
    relay = server.app[SERVICES].embedded
    assert relay is not None
    return relay


def frames(peer: MediaPeer, publisher: str) -> int:
    received = peer.video_from(publisher)
    return len(received.counters) if received is not None else 0


async def test_a_participant_leaving_ends_its_tracks_and_the_others_go_on(
    server: Server,
) -> None:
    names = ("cardio1", "ref1", "ref2")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1", "ref2"))
        peers = {n: await start_media(c[n], cid) for n in names}
        try:
            for name in ("cardio1", "ref2"):
                await wait_for(lambda n=name: frames(peers[n], "ref1") > 10, 20, f"{name} video")
            room = embedded(server).rooms[cid]
            leaver_pcs = [room.participants["ref1"].subscribe_pc,
                          *room.participants["ref1"].publish_pcs.values()]
            await c["ref1"].ok("consult:leave", {"consultation_id": cid})
            for name in ("cardio1", "ref2"):
                gone = peers[name].video_from("ref1")
                assert gone is not None
                await wait_for(lambda g=gone: g.ended, 10, f"ref1's video ending for {name}")
                sound = peers[name].video_from("ref1", source="microphone")
                assert sound is not None
                await wait_for(lambda s=sound: s.ended, 10, "ref1's audio ending")
            assert "ref1" not in room.participants
            assert all(pc is not None and pc.connectionState == "closed" for pc in leaver_pcs)
            # The two who stayed still see each other.
            before = frames(peers["ref2"], "cardio1"), frames(peers["cardio1"], "ref2")
            await wait_for(lambda: frames(peers["ref2"], "cardio1") > before[0] + 15
                           and frames(peers["cardio1"], "ref2") > before[1] + 15, 10,
                           "media between those who stayed")
        finally:
            for peer in peers.values():
                await peer.close()


async def test_the_relay_refuses_bad_media_steps_and_stays_up(server: Server) -> None:
    names = ("cardio1", "ref1", "ref2", "cardio2")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        # Not in the consultation: refused before reaching the relay.
        await c["ref2"].refused("media:join", {"consultation_id": cid}, "forbidden")
        other = await c["ref2"].ok("consult:request", {
            "specialty": "cardiology", "priority": "routine", "reason": "other"})
        other_cid = (await c["cardio2"].ok("consult:accept", {
            "request_id": other["request"]["id"]}))["consultation"]["id"]
        # A participant of one consultation cannot reach another's media.
        await c["ref1"].refused("media:join", {"consultation_id": other_cid}, "forbidden")
        # Publishing before media:join on this connection is refused.
        await c["ref1"].refused("media:publish", {
            "consultation_id": cid, "sdp": "v=0", "sources": {"0": "camera"}}, "invalid_state")
        await c["ref1"].ok("media:join", {"consultation_id": cid})
        for sdp in ("v=0\r\n", "not sdp at all", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n"
                    "t=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n"):
            await c["ref1"].refused("media:publish", {
                "consultation_id": cid, "sdp": sdp, "sources": {"0": "camera"}}, "bad_sdp")
        peer = media_peer(c["ref1"], cid)
        await peer.publish()
        # A second camera from the same participant: refused with a clear error.
        second = MediaPeer("again", peer.call)
        try:
            await second.publish(audio=False)
        except AssertionError as refused:
            assert "already_published" in str(refused)
        else:
            raise AssertionError("a second camera was accepted")
        finally:
            await second.close()
        await c["ref1"].refused("media:mode", {"consultation_id": cid, "audio_only": "yes"},
                                "invalid_payload")
        # The relay is still serving: the host gets ref1's video.
        host = await start_media(c["cardio1"], cid, publish=False)
        try:
            await wait_for(lambda: frames(host, "ref1") > 10, 20, "video after refusals")
        finally:
            await host.close()
            await peer.close()


async def test_keyframe_requests_reach_the_publisher_once_for_many_subscribers(
    server: Server,
) -> None:
    names = ("cardio1", "ref1", "ref2", "ref3")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1", "ref2", "ref3"))
        publisher = await start_media(c["cardio1"], cid)
        viewers = {n: await start_media(c[n], cid, publish=False) for n in names[1:]}
        try:
            for name, viewer in viewers.items():
                await wait_for(lambda v=viewer: frames(v, "cardio1") > 20, 20, f"{name} video")
            publication = embedded(server).rooms[cid].participants["cardio1"].publications[
                "camera"]
            await asyncio.sleep(1.0)  # past the start-up keyframes
            keyframes, plis = publication.keyframes, publication.plis_sent
            # Every subscriber reports picture loss at the same moment.
            for viewer in viewers.values():
                assert viewer.subscribe_pc is not None
                transceiver = next(t for t in viewer.subscribe_pc.getTransceivers()
                                   if viewer.tracks.get(t.mid or "", {}).get("source")
                                   == "camera")
                ssrc = next(iter(transceiver.receiver._RTCRtpReceiver__remote_streams))
                await transceiver.receiver._send_rtcp_pli(ssrc)
            await wait_for(lambda: publication.keyframes > keyframes, 3,
                           "a keyframe from the publisher")
            assert publication.plis_sent == plis + 1
        finally:
            await publisher.close()
            for viewer in viewers.values():
                await viewer.close()


async def test_audio_only_mode_pauses_video_and_resumes_with_a_keyframe(
    server: Server,
) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        sender = await start_media(c["cardio1"], cid)
        island = await start_media(c["ref1"], cid, publish=False)
        try:
            await wait_for(lambda: frames(island, "cardio1") > 10, 20, "video")
            answer = await c["ref1"].ok("media:mode", {"consultation_id": cid,
                                                       "audio_only": True})
            assert answer["audio_only"] is True
            await asyncio.sleep(0.5)
            paused_at = frames(island, "cardio1")
            sound = island.video_from("cardio1", source="microphone")
            assert sound is not None
            audio_before = sound.audio_frames
            await asyncio.sleep(1.5)
            assert frames(island, "cardio1") <= paused_at + 1
            assert sound.audio_frames > audio_before + 40  # audio goes on
            await c["ref1"].ok("media:mode", {"consultation_id": cid, "audio_only": False})
            resumed = time.monotonic()
            await wait_for(lambda: frames(island, "cardio1") > paused_at + 3, 3,
                           "video after audio-only")
            assert time.monotonic() - resumed < 1.5
        finally:
            await sender.close()
            await island.close()


async def test_a_stalled_subscriber_neither_delays_the_others_nor_grows_memory(
    server: Server,
) -> None:
    names = ("cardio1", "ref1", "ref2")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1", "ref2"))
        sender = await start_media(c["cardio1"], cid, fps=30)
        healthy = await start_media(c["ref1"], cid, publish=False)
        stalled = await start_media(c["ref2"], cid, publish=False)
        try:
            await wait_for(lambda: frames(healthy, "cardio1") > 20
                           and frames(stalled, "cardio1") > 20, 20, "both receiving")
            # ref2 stops reading its socket altogether: its kernel buffer fills, the rest
            # of what the relay sends it is dropped on the floor.
            assert stalled.subscribe_pc is not None
            ice = stalled.subscribe_pc.getTransceivers()[0].receiver.transport.transport
            for protocol in ice._connection._protocols:
                protocol.transport.pause_reading()
            process = psutil.Process()
            gc.collect()
            rss_before = process.memory_info().rss
            got_before = frames(healthy, "cardio1")
            started = time.monotonic()
            await asyncio.sleep(4.0)
            elapsed = time.monotonic() - started
            got = frames(healthy, "cardio1") - got_before
            # The healthy subscriber still gets (nearly) every frame at 30 fps.
            assert got >= 0.9 * 30 * elapsed, (got, elapsed)
            counters = healthy.video_from("cardio1").counters  # type: ignore[union-attr]
            tail = counters[-got:]
            assert tail == list(range(tail[0], tail[0] + len(tail)))
            # The relay holds nothing back for the stalled one.
            room = embedded(server).rooms[cid]
            for subscription in room.participants["ref2"].subscriptions.values():
                assert hooks.backlog_bytes(subscription.leg.transceiver.sender) <= 512 * 1024
            gc.collect()
            grown = (process.memory_info().rss - rss_before) / 1e6
            assert grown < 30, f"memory grew {grown:.1f} MB in 4 s"
        finally:
            for peer in (sender, healthy, stalled):
                await peer.close()


async def test_when_everyone_leaves_nothing_is_left_behind(server: Server) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        baseline = len(asyncio.all_tasks())
        peers = {n: await start_media(c[n], cid) for n in names}
        await wait_for(lambda: frames(peers["ref1"], "cardio1") > 10
                       and frames(peers["cardio1"], "ref1") > 10, 20, "media both ways")
        room = embedded(server).rooms[cid]
        pcs = [pc for p in room.participants.values()
               for pc in (p.subscribe_pc, *p.publish_pcs.values())]
        tracks = [leg.track for p in room.participants.values() for leg in p.legs]
        publications = [pub for p in room.participants.values()
                        for pub in p.publications.values()]
        for peer in peers.values():
            await peer.close()
        for name in names:
            await c[name].ok("consult:leave", {"consultation_id": cid})
        assert all(pc is not None and pc.connectionState == "closed" for pc in pcs)
        assert all(track.readyState == "ended" for track in tracks)
        assert all(pub.closed and not pub.subscriptions for pub in publications)
        assert room.closed and not room.participants
        fresh = embedded(server).rooms[cid]
        assert fresh is not room and not fresh.participants
        await wait_for(lambda: len(asyncio.all_tasks()) <= baseline, 10,
                       "the relay's tasks to finish")
