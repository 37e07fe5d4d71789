"""Participant: the bandwidth policy carried out (pause, notice, retry), and closing that
cascades once."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.config import MediaConfig
from relay.room import Room
from tests.media import wait_for


class Notices:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        return None

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        return None

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        self.seen.append(notice)


async def test_video_pauses_only_when_the_estimate_stays_low_while_loss_is_reported() -> None:
    notices = Notices()
    config = MediaConfig(bandwidth_floor_bps=150_000, bandwidth_window_s=0.2,
                         bandwidth_retry_s=0.3)
    room = Room("r", config, notices)
    participant = await room.join("island")
    try:
        # A low estimate without loss (aiortc's estimator, a still screen): nothing happens.
        for _ in range(5):
            participant._on_remb(20_000, [1])
            await asyncio.sleep(0.06)
        assert notices.seen == []
        # Low estimate and 12 % loss for longer than the window: video pauses, then retries.
        participant._on_loss(0.12)
        participant._on_remb(40_000, [1])
        await asyncio.sleep(0.25)
        participant._on_loss(0.12)
        participant._on_remb(40_000, [1])
        await wait_for(lambda: len(notices.seen) >= 1, 2, "the pause notice")
        assert notices.seen[0] == {"code": "video_paused", "reason": "bandwidth",
                                   "estimate_bps": 40_000}
        await wait_for(lambda: len(notices.seen) >= 2, 2, "the retry")
        assert notices.seen[1]["code"] == "video_resumed"
    finally:
        await room.close()


async def test_closing_a_participant_twice_closes_it_once() -> None:
    room = Room("r", MediaConfig(), Notices())
    participant = await room.join("island")
    await participant.subscribe()
    pc = participant.subscribe_pc
    assert pc is not None
    await participant.close()
    await participant.close()
    assert participant.closed and pc.connectionState == "closed"
    assert all(leg.track.readyState == "ended" for leg in participant.legs)
    await room.close()
    await room.close()
    assert room.closed
