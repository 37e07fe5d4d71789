"""Media through signaling: a consultation opened over socket.io, MediaPeers speaking the
media:* events of docs/protocol.md, and a standalone `telehealth relay` node process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.media import MediaPeer
from tests.support import Client

GUEST_SITES = {"ref2": "d2", "ref3": "d3"}
"""Sites invited when these referrers are extra guests (the first guest asks)."""


async def open_consultation(c: dict[str, Client], host: str = "cardio1",
                            guests: tuple[str, ...] = ("ref1",)) -> str:
    """The first guest asks, ``host`` accepts, the other guests' sites are invited, and
    everyone joins; returns the consultation id."""
    asked = await c[guests[0]].ok("consult:request", {
        "specialty": "cardiology", "priority": "urgent", "reason": "media test"})
    accepted = await c[host].ok("consult:accept", {"request_id": asked["request"]["id"]})
    cid: str = accepted["consultation"]["id"]
    for guest in guests[1:]:
        await c[host].ok("consult:invite", {"consultation_id": cid,
                                            "site_id": GUEST_SITES[guest]})
    for name in (host, *guests):
        await c[name].ok("consult:join", {"consultation_id": cid})
    return cid


def media_peer(client: Client, cid: str) -> MediaPeer:
    """A MediaPeer speaking the media:* events of docs/protocol.md over the client's socket;
    it answers every media:offer (renegotiation) it gets."""

    async def call(command: str, payload: dict[str, Any]) -> dict[str, Any]:
        answer = await client.ok(f"media:{command}", {"consultation_id": cid, **payload})
        return answer

    peer = MediaPeer(client.token or "", call)

    async def on_offer(data: dict[str, Any]) -> None:
        await peer.answer_offer(data)

    client.sio.on("media:offer", on_offer)
    return peer


async def start_media(client: Client, cid: str, *, publish: bool = True, fps: int = 15,
                      video_codec: str | None = None, audio_hz: float = 440.0) -> MediaPeer:
    """media:join, subscribe, and (unless ``publish=False``) publish a camera and a tone."""
    await client.ok("media:join", {"consultation_id": cid})
    peer = media_peer(client, cid)
    await peer.subscribe()
    if publish:
        await peer.publish(fps=fps, video_codec=video_codec, audio_hz=audio_hz)
    return peer


def start_node(config: Path, url: str, token: str, region: str,
               log: Path | None = None) -> subprocess.Popen[str]:
    """`telehealth relay` as a subprocess dialling in to the signaling server at ``url``;
    its output goes to ``log`` (default: nowhere)."""
    command = [sys.executable, "-m", "telehealth.cli", "--config", str(config), "relay",
               "--signaling", url, "--node-token", token, "--region", region]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if log is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, text=True, env=env)
    with log.open("w", encoding="utf-8") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=env)


async def stop_node(node: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """SIGTERM a node started by ``start_node`` and wait for it off the event loop: the node
    drains first (``relay:drain``), which a server running in this event loop must answer."""
    if node.poll() is None:
        node.terminate()
        await asyncio.to_thread(node.wait, timeout)
