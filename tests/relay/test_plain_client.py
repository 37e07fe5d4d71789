"""A plain aiortc client works: a subscriber whose peer connection has aiortc's DEFAULT settings
(balanced bundle policy) gets every video of the room, driven through ``relay.api`` alone.

aiortc's balanced answerer gives the first m-line of each kind a transport of its own and puts
the next ones of that kind on it; applying BUNDLE then moves only the first of each kind onto
the primary transport and stops the one the others still sit on. The relay's offers therefore
introduce one m-line of a kind at a time (see relay/subscriber.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import av
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from relay.embedded import LocalRelay
from tests.media import MediaPeer, Received, read_counter, wait_for
from tests.relay.loopback import loopback

ROOM = "plain"


class Offers:
    """RelayEvents that answer every renegotiation offer with the subscriber's plain peer."""

    def __init__(self) -> None:
        self.subscribers: dict[str, PlainSubscriber] = {}

    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        await self.subscribers[participant_id].answer(offer)

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        return None

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        return None


class PlainSubscriber:
    """A subscriber whose RTCPeerConnection has aiortc's default configuration but no ICE
    servers (loopback only)."""

    def __init__(self, relay: LocalRelay, participant_id: str) -> None:
        self.relay = relay
        self.id = participant_id
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.tracks: dict[str, dict[str, Any]] = {}
        self.received: dict[str, Received] = {}
        self._tasks: list[asyncio.Task[None]] = []

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            transceiver = next(t for t in self.pc.getTransceivers() if t.receiver.track is track)
            mid = transceiver.mid or ""
            received = Received(mid, track.kind, self.tracks.get(mid, {}))
            self.received[mid] = received
            self._tasks.append(asyncio.ensure_future(self._read(track, received)))

    async def answer(self, offer: dict[str, Any]) -> None:
        self.tracks.update(offer["tracks"])
        for mid, received in self.received.items():
            received.info = self.tracks.get(mid, received.info)
        await self.pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self.relay.answer(ROOM, self.id, offer["transport_id"],
                                self.pc.localDescription.sdp)

    async def _read(self, track: MediaStreamTrack, received: Received) -> None:
        try:
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    received.counters.append(read_counter(frame))
        except Exception:
            received.ended = True

    def frames_from(self, participant_id: str) -> int:
        return sum(len(r.counters) for r in self.received.values()
                   if r.kind == "video" and self.tracks.get(r.mid, {}).get("participant_id")
                   == participant_id)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


@pytest.fixture
async def relay() -> AsyncIterator[tuple[LocalRelay, Offers]]:
    offers = Offers()
    with loopback():
        local = LocalRelay(events=offers)
        await local.open_room(ROOM)
        yield local, offers
        await local.close()


async def publisher(relay: LocalRelay, participant_id: str) -> MediaPeer:
    await relay.join(ROOM, participant_id)

    async def call(command: str, payload: dict[str, Any]) -> dict[str, Any]:
        assert command == "publish"
        return await relay.publish(ROOM, participant_id, payload["sdp"], payload["sources"])

    peer = MediaPeer(participant_id, call)
    await peer.publish(audio=False)
    return peer


async def test_a_default_aiortc_subscriber_gets_every_video_of_two_publishers_present(
    relay: tuple[LocalRelay, Offers],
) -> None:
    local, offers = relay
    publishers = [await publisher(local, name) for name in ("north", "south")]
    await local.join(ROOM, "viewer")
    viewer = offers.subscribers["viewer"] = PlainSubscriber(local, "viewer")
    try:
        await viewer.answer(await local.subscribe(ROOM, "viewer"))
        for name in ("north", "south"):
            await wait_for(lambda n=name: viewer.frames_from(n) > 10, 20,  # type: ignore[misc]
                           f"video from {name} at the plain subscriber")
    finally:
        await viewer.close()
        for peer in publishers:
            await peer.close()
