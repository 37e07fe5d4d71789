"""Forwarding through a LocalRelay driven through relay.api, with real aiortc peers publishing
counter-stamped video and a tone over 127.0.0.1: every frame arrives, in order, in the
publisher's codec; a newcomer starts at a prompt keyframe; keyframe requests are merged; a
stalled subscriber holds back nobody."""

from __future__ import annotations

import asyncio
import gc
import time

import psutil
import pytest

from tests.media import check_everyone_sees_everyone, check_stream, wait_for, wait_until
from tests.relay.peers import RelayRoom

NAMES = ("cardio1", "ref1", "ref2", "ref3")


@pytest.mark.parametrize("size", [2, 4])
async def test_every_participant_decodes_every_other_participants_video(
    room: RelayRoom, size: int
) -> None:
    peers = {name: await room.join(name) for name in NAMES[:size]}
    await check_everyone_sees_everyone(peers, frames=45)
    assert not room.events.failures


async def test_a_late_joiner_gets_its_first_frame_within_a_second(room: RelayRoom) -> None:
    await room.join("cardio1")
    second = await room.join("ref1")
    await wait_for(lambda: second.frames("cardio1") > 20, 20, "the stream to run")
    await room.relay.join(room.id, "ref2")
    late = room.peer("ref2")
    started = time.monotonic()
    await late.subscribe()
    await wait_for(lambda: late.frames("cardio1") > 0, 5, "the late joiner's first frame")
    took = time.monotonic() - started
    print(f"late joiner: first frame {took * 1000:.0f} ms after subscribing")
    assert took < 1.0


async def test_h264_from_the_publisher_reaches_the_subscriber_as_h264(room: RelayRoom) -> None:
    await room.join("cardio1", video_codec="H264")
    viewer = await room.join("ref1", publish=False)
    await wait_for(lambda: viewer.frames("cardio1") >= 30, 30, "H.264 video")
    video = viewer.video_from("cardio1")
    assert video is not None and video.info["codec"].lower() == "video/h264"
    check_stream(video, at_least=30)
    # The subscriber's leg was negotiated with H.264 only: the same codec both ways.
    assert viewer.subscribe_pc is not None
    sdp = viewer.subscribe_pc.remoteDescription.sdp
    video_section = sdp[sdp.index("m=video"):]
    assert "H264/90000" in video_section and "VP8/90000" not in video_section


async def test_keyframe_requests_reach_the_publisher_once_for_many_subscribers(
    room: RelayRoom,
) -> None:
    await room.join("cardio1")
    viewers = {name: await room.join(name, publish=False) for name in NAMES[1:]}
    for name, viewer in viewers.items():
        await wait_for(lambda v=viewer: v.frames("cardio1") > 20, 20, f"{name} video")
    await asyncio.sleep(1.0)  # past the start-up keyframes
    before = (await room.stats("cardio1"))["publications"]["camera"]
    # Every subscriber reports picture loss at the same moment.
    for viewer in viewers.values():
        await viewer.send_pli("camera")

    async def keyframe_came() -> bool:
        camera = (await room.stats("cardio1"))["publications"]["camera"]
        return bool(camera["keyframes"] > before["keyframes"])

    await wait_until(keyframe_came, 3, "a keyframe from the publisher")
    after = (await room.stats("cardio1"))["publications"]["camera"]
    assert after["plis"] == before["plis"] + 1


async def test_a_stalled_subscriber_neither_delays_the_others_nor_grows_memory(
    room: RelayRoom,
) -> None:
    await room.join("cardio1", fps=30)
    healthy = await room.join("ref1", publish=False)
    stalled = await room.join("ref2", publish=False)
    await wait_for(lambda: healthy.frames("cardio1") > 20 and stalled.frames("cardio1") > 20,
                   20, "both receiving")
    camera_id = healthy.video_from("cardio1").info["id"]  # type: ignore[union-attr]
    stalled.stall()
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    got_before = healthy.frames("cardio1")
    sent_before = (await room.stats("cardio1"))["publications"]["camera"]["packets"]
    toward_stalled = (await room.stats("ref2"))["subscriptions"][camera_id]
    started = time.monotonic()
    await asyncio.sleep(4.0)
    elapsed = time.monotonic() - started
    got = healthy.frames("cardio1") - got_before
    # The healthy subscriber still gets (nearly) every frame at 30 fps.
    assert got >= 0.9 * 30 * elapsed, (got, elapsed)
    counters = healthy.video_from("cardio1").counters  # type: ignore[union-attr]
    tail = counters[-got:]
    assert tail == list(range(tail[0], tail[0] + len(tail)))
    # The relay holds nothing back for the stalled one: every packet of the camera that
    # arrived meanwhile was sent on toward it or skipped, none is waiting.
    arrived = (await room.stats("cardio1"))["publications"]["camera"]["packets"] - sent_before
    now = (await room.stats("ref2"))["subscriptions"][camera_id]
    handled = (now["forwarded"] - toward_stalled["forwarded"]
               + now["skipped"] - toward_stalled["skipped"])
    print(f"stalled subscriber: {handled} of {arrived} packets sent on or skipped")
    assert handled >= arrived - 8, (handled, arrived)
    gc.collect()
    grown = (process.memory_info().rss - rss_before) / 1e6
    assert grown < 30, f"memory grew {grown:.1f} MB in 4 s"
