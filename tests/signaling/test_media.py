"""Media through the real signaling server and its embedded relay: the media:* events of
docs/protocol.md carried over socket.io, who may take which media step, and the relay's
refusals reaching the client as codes. What the relay does with the media is tested in
tests/relay/ through relay.api."""

from __future__ import annotations

from relay.api import Relay
from telehealth.startup import SERVICES
from tests.consultation_media import media_peer, open_consultation, start_media
from tests.media import MediaPeer, check_everyone_sees_everyone, wait_for
from tests.support import Server, clients


def relay_of(server: Server, cid: str) -> Relay:
    assert server.app is not None
    relay = server.app[SERVICES].relays.for_room(cid)
    assert relay is not None
    return relay


async def test_media_flows_both_ways_through_the_server_and_leaving_ends_it(
    server: Server,
) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        peers = {n: await start_media(c[n], cid) for n in names}
        try:
            await check_everyone_sees_everyone(peers, frames=30, audio_frames=30)
            relay = relay_of(server, cid)
            # media:mode reaches the relay: ref1's video subscriptions are paused.
            answer = await c["ref1"].ok("media:mode", {"consultation_id": cid,
                                                       "audio_only": True})
            assert answer["audio_only"] is True
            paused = [s["paused"] for s in (await relay.stats(cid))["ref1"][
                "subscriptions"].values()]
            assert ["audio_only"] in paused and [] in paused  # the video, not the audio
            # consult:leave ends the leaver's media for the others, and its place on the relay.
            await c["ref1"].ok("consult:leave", {"consultation_id": cid})
            for source in ("camera", "microphone"):
                gone = peers["cardio1"].video_from("ref1", source)
                assert gone is not None
                await wait_for(lambda g=gone: g.ended, 10, f"ref1's {source} ending")
            assert set(await relay.stats(cid)) == {"cardio1"}
            await c["cardio1"].ok("consult:leave", {"consultation_id": cid})
            assert await relay.stats(cid) == {}
        finally:
            for peer in peers.values():
                await peer.close()


async def test_media_steps_are_checked_and_the_relays_refusals_reach_the_client(
    server: Server,
) -> None:
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
        # The relay's refusal comes back with its code.
        await c["ref1"].refused("media:publish", {
            "consultation_id": cid, "sdp": "not sdp at all", "sources": {"0": "camera"}},
            "bad_sdp")
        peer = media_peer(c["ref1"], cid)
        try:
            await peer.publish()
            second = MediaPeer("again", peer.call)
            try:
                await second.publish(audio=False)
            except AssertionError as refused:
                assert "already_published" in str(refused)
            else:
                raise AssertionError("a second camera was accepted")
            finally:
                await second.close()
        finally:
            await peer.close()
        await c["ref1"].refused("media:mode", {"consultation_id": cid, "audio_only": "yes"},
                                "invalid_payload")
