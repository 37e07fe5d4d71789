"""Media through the real signaling server and the embedded relay, with real aiortc peers
publishing counter-stamped video and a tone over 127.0.0.1."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.media import MediaPeer, Received, wait_for
from tests.support import Client, Server, clients

REFERRERS = ("ref1", "ref2", "ref3")


async def open_consultation(c: dict[str, Client], host: str = "cardio1",
                            guests: tuple[str, ...] = ("ref1",)) -> str:
    asked = await c[guests[0]].ok("consult:request", {
        "specialty": "cardiology", "priority": "urgent", "reason": "media test"})
    accepted = await c[host].ok("consult:accept", {"request_id": asked["request"]["id"]})
    cid: str = accepted["consultation"]["id"]
    sites = {"ref2": "d2", "ref3": "d3"}
    for guest in guests[1:]:
        await c[host].ok("consult:invite", {"consultation_id": cid, "site_id": sites[guest]})
    for name in (host, *guests):
        await c[name].ok("consult:join", {"consultation_id": cid})
    return cid


def media_peer(client: Client, cid: str) -> MediaPeer:
    """A MediaPeer speaking the media:* events of docs/protocol.md over the client's socket."""

    async def call(command: str, payload: dict[str, Any]) -> dict[str, Any]:
        answer = await client.ok(f"media:{command}", {"consultation_id": cid, **payload})
        return answer

    peer = MediaPeer(client.token or "", call)

    async def on_offer(data: dict[str, Any]) -> None:
        await peer.answer_offer(data)

    client.sio.on("media:offer", on_offer)
    return peer


async def start_media(client: Client, cid: str, **publish: Any) -> MediaPeer:
    await client.ok("media:join", {"consultation_id": cid})
    peer = media_peer(client, cid)
    await peer.subscribe()
    if publish.get("publish", True):
        await peer.publish(fps=publish.get("fps", 15), video_codec=publish.get("video_codec"),
                           audio_hz=publish.get("audio_hz", 440.0))
    return peer


def check_stream(received: Received, *, at_least: int) -> None:
    counters = received.counters
    assert len(counters) >= at_least, (len(counters), counters[-5:])
    # In order, and no frame lost on loopback once the stream started.
    assert counters == list(range(counters[0], counters[0] + len(counters))), counters


@pytest.mark.parametrize("size", [2, 4])
async def test_every_participant_decodes_every_other_participants_video(
    server: Server, size: int
) -> None:
    names = ("cardio1", *REFERRERS[:size - 1])
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=names[1:])
        peers = {n: await start_media(c[n], cid) for n in names}
        try:
            for name, peer in peers.items():
                for other in names:
                    if other == name:
                        continue
                    await wait_for(
                        lambda p=peer, o=other: (v := p.video_from(o)) is not None
                        and len(v.counters) >= 45, 30, f"{name} decoding {other}")
            for name, peer in peers.items():
                for other in names:
                    if other == name:
                        continue
                    video = peer.video_from(other)
                    assert video is not None
                    check_stream(video, at_least=45)
                    audio = peer.video_from(other, source="microphone")
                    assert audio is not None and audio.audio_frames >= 50
        finally:
            for peer in peers.values():
                await peer.close()


async def test_a_late_joiner_gets_its_first_frame_within_a_second(server: Server) -> None:
    names = ("cardio1", "ref1", "ref2")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1", "ref2"))
        first = await start_media(c["cardio1"], cid)
        second = await start_media(c["ref1"], cid)
        late: MediaPeer | None = None
        try:
            await wait_for(lambda: (v := second.video_from("cardio1")) is not None
                           and len(v.counters) > 20, 20, "the stream to run")
            await c["ref2"].ok("media:join", {"consultation_id": cid})
            late = media_peer(c["ref2"], cid)
            started = time.monotonic()
            await late.subscribe()
            await wait_for(lambda: (v := late.video_from("cardio1")) is not None  # type: ignore[union-attr]
                           and len(v.counters) > 0, 5, "the late joiner's first frame")
            took = time.monotonic() - started
            print(f"late joiner: first frame {took * 1000:.0f} ms after subscribing")
            assert took < 1.0
        finally:
            for peer in (first, second, late):
                if peer is not None:
                    await peer.close()


async def test_h264_from_the_publisher_reaches_the_subscriber_as_h264(server: Server) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c)
        sender = await start_media(c["cardio1"], cid, video_codec="H264")
        viewer = await start_media(c["ref1"], cid, publish=False)
        try:
            await wait_for(lambda: (v := viewer.video_from("cardio1")) is not None
                           and len(v.counters) >= 30, 30, "H.264 video")
            video = viewer.video_from("cardio1")
            assert video is not None and video.info["codec"].lower() == "video/h264"
            check_stream(video, at_least=30)
            # The subscriber's leg was negotiated with H.264 only: the same codec both ways.
            assert viewer.subscribe_pc is not None
            sdp = viewer.subscribe_pc.remoteDescription.sdp
            video_section = sdp[sdp.index("m=video"):]
            assert "H264/90000" in video_section and "VP8/90000" not in video_section
        finally:
            await sender.close()
            await viewer.close()
