"""``relay.adaptation`` end to end on a relay: an aiortc publisher sending VP8 in L1T3
(tests/layered_vp8.py, as the web client's camera does) and an aiortc viewer behind a lossy
link (the link emulator, real receiver reports). With adaptation on the layer policy steps
the viewer down to layer 0 for the loss (or the thin rendition for the queue its pacer
builds); with it off the same loss is reported and the viewer
keeps every layer (no frame dropped toward it), its video paused for bandwidth as before #15
instead."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.bandwidth import THIN
from relay.participant import Participant
from tests.layered_vp8 import BusyCounterTrack, layered_senders
from tests.link_emulator import Profile, UdpLinkEmulator, hide_client_addresses, peer_ufrags
from tests.media import wait_for
from tests.relay.peers import HOST, relay_room
from tests.relay.test_ports import free_udp_ports

FPS = 15
LOSSY = Profile(loss=0.15)
"""A wide link that loses 15 % of the packets either way: the policy's ``loss`` witness."""
WATCH_S = 12.0
"""How long the viewer is watched on it: loss steps a layer down within 1.5-4.5 s with
adaptation on (two reports, then one step a second)."""


@pytest.mark.parametrize("adaptation", [True, False])
async def test_adaptation_off_keeps_every_layer_and_only_the_pause(adaptation: bool) -> None:
    (relay_port, _) = free_udp_ports(1)
    async with UdpLinkEmulator((HOST, relay_port), default="good", seed=15) as link, \
            relay_room(udp_port=relay_port, announced_port=link.port, adaptation=adaptation,
                       bandwidth_window_s=0.5, bandwidth_retry_s=60.0) as room:
        await room.relay.start()
        hide_client_addresses(room.relay)
        await room.relay.join(room.id, "doctor")
        doctor = room.peer("doctor")
        await doctor.publish(fps=FPS, video_track=BusyCounterTrack(FPS, seed=3),
                             prepare=layered_senders(fps=FPS))
        island = await room.join("island", publish=False)
        await wait_for(lambda: island.frames("doctor") >= 10, 20, "the island decoding")
        viewer: Participant = room.relay.rooms[room.id].participants["island"]
        await wait_for(viewer.subscriber.layered, 5, "the doctor's camera seen in layers")
        for ufrag in peer_ufrags(island):
            link.assign(ufrag, LOSSY)
        began = time.monotonic()
        frames_before = island.frames("doctor")
        losses: list[float] = []
        layers: list[int | None] = []
        stepped_at = None
        while time.monotonic() - began < WATCH_S:
            await asyncio.sleep(0.25)
            losses.append(viewer.bandwidth.recent_loss(time.monotonic()))
            layers.append(viewer.subscriber.max_layer)
            if stepped_at is None and viewer.subscriber.max_layer is not None:
                stepped_at = time.monotonic() - began
            if adaptation and viewer.subscriber.max_layer in (0, THIN):
                break
        watched = time.monotonic() - began
        fps = (island.frames("doctor") - frames_before) / watched
        dropped = sum(s.layers.dropped_frames for s in viewer.subscriptions.values()
                      if s.layers is not None)
        # The video pause: a low estimate while loss is reported, for the window. Nothing of
        # the island's reaches the relay meanwhile: its own estimate (REMB), which may be
        # high, would start the window afresh between two of these.
        for ufrag in peer_ufrags(island):
            link.assign(ufrag, (Profile(loss=1.0), LOSSY))
        ssrcs = [leg.sender.ssrc for leg in viewer.legs]
        for _ in range(4):
            viewer._on_remb(40_000, ssrcs)
            await asyncio.sleep(0.25)
        paused = "bandwidth" in viewer.subscriber.paused
        seen = sorted(set(layers), key=lambda v: -1 if v is None else v)
        print(f"\nadaptation {'on' if adaptation else 'off'}: highest loss reported "
              f"{max(losses):.2f}, layers {seen}, first step down "
              f"{'none' if stepped_at is None else f'{stepped_at:.1f} s'} after the loss "
              f"began (last for {viewer.layers.reason or 'nothing'}); {fps:.1f} fps decoded "
              f"over {watched:.1f} s, {dropped} frames dropped "
              f"toward it by the relay; paused for a low estimate: {paused}")
        assert max(losses) >= 0.05, "the viewer's reports never told of the loss"
        if adaptation:
            # For the loss (layer 0), or for the queue the pacer builds as its estimate falls
            # with it: a lack of rate below layer 1 goes to the thin rendition
            # (relay.bandwidth.THIN_OVER_BASE).
            assert (viewer.subscriber.max_layer, viewer.layers.reason) in (
                (0, "loss"), (THIN, "backlog"), (THIN, "estimate"))
            assert dropped > 0
            assert not paused  # the layers are the first steps down: the pause waits
        else:
            assert set(layers) == {None}  # every layer, all along
            assert all(s.max_layer is None for s in viewer.subscriptions.values())
            assert dropped == 0
            assert paused
            assert any(n[2].get("code") == "video_paused" for n in room.events.notices
                       if n[1] == "island")
