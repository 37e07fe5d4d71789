"""Network probes: the pre-call check's question "can this browser reach the relay, and how?".

Before the doctor enters the room, the web client offers a peer connection with one data
channel and no media (``media:probe``); the relay answers it with a short-lived peer
connection of its own, gathered exactly as a participant's would be (same host addresses,
announced address, port range). The client watches which candidate pair gets selected (host
or srflx: the relay is reached directly; relay: only through TURN; none: not at all) and closes
its side. Nothing flows through a probe but ICE, DTLS and SCTP.

A probe is cheap but holds a UDP socket and an ICE agent, so they are bounded: at most one per
participant of a room (a new probe closes the previous one), each closed after ``lifetime_s``
whatever the client does, at most ``max_open`` on the relay, all of a room closed with it."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from relay.config import MediaConfig
from relay.errors import BadSdp, RelayError
from relay.sdp import announce, parse_sdp, peer_connection

logger = logging.getLogger(__name__)

LIFETIME_S = 20.0
"""How long a probe stays open: ICE over TURN on a slow link settles in a few seconds."""
MAX_OPEN = 64
"""Probes open at once on one relay (one per participant; a pre-call check takes seconds)."""


class TooManyProbes(RelayError):
    code = "too_many_probes"


class ProbeClosed(RelayError):
    """A newer probe of the same participant, or the room's closing, overtook this one."""

    code = "invalid_state"


@dataclass
class Probe:
    room_id: str
    participant_id: str
    id: str
    pc: RTCPeerConnection
    timer: asyncio.TimerHandle | None = None


class Probes:
    """The open probes of one relay, by (room, participant)."""

    def __init__(self, config: MediaConfig, *, lifetime_s: float = LIFETIME_S,
                 max_open: int = MAX_OPEN) -> None:
        self.config = config
        self.lifetime_s = lifetime_s
        """Tests shorten it."""
        self.max_open = max_open
        self.open: dict[tuple[str, str], Probe] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def answer(self, room_id: str, participant_id: str, sdp: object) -> dict[str, Any]:
        """Answer a probe offer ``sdp`` (data channel only): ``{type: "answer", sdp}`` with
        the relay's candidates in it. Replaces the participant's previous probe."""
        offer = parse_sdp(sdp, "offer")
        kinds = [m.kind for m in offer.media]
        if kinds != ["application"]:
            raise BadSdp(f"a probe offers one data channel and no media, got m-lines {kinds}")
        previous = self.open.get((room_id, participant_id))
        if previous is not None:
            await self._close(previous)
        if len(self.open) >= self.max_open:
            raise TooManyProbes(f"{len(self.open)} network probes are open on this relay, at "
                                f"most {self.max_open}; try again in {self.lifetime_s:.0f} s")
        probe_id = f"probe_{uuid.uuid4().hex[:12]}"
        label = f"Probe({room_id}/{participant_id} {probe_id})"
        pc = peer_connection(self.config, label)
        probe = Probe(room_id, participant_id, probe_id, pc)
        self.open[(room_id, participant_id)] = probe
        # The lifetime runs from now: a probe whose answer never completes (cancelled while
        # gathering) is closed all the same.
        probe.timer = asyncio.get_running_loop().call_later(self.lifetime_s, self._expire,
                                                            probe)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=str(sdp), type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except RelayError:
            # media_ports_exhausted and the like: the client is told that, not "bad SDP".
            if self.open.get((room_id, participant_id)) is probe:
                await self._close(probe)
            raise
        except Exception as exc:
            if self.open.get((room_id, participant_id)) is probe:
                await self._close(probe)
                raise BadSdp(f"the probe offer was refused: {exc}") from None
        if self.open.get((room_id, participant_id)) is not probe:
            # Replaced by a newer probe, or its room closed, while the answer was gathered.
            await self._close(probe)
            raise ProbeClosed(f"{label} was closed before it was answered")

        @pc.on("connectionstatechange")
        def changed() -> None:
            if pc.connectionState == "failed":
                self._expire(probe)

        logger.info("%s answered (%d open)", label, len(self.open))
        return {"type": "answer", "sdp": announce(pc.localDescription.sdp, self.config)}

    def _expire(self, probe: Probe) -> None:
        if self.open.get((probe.room_id, probe.participant_id)) is probe:
            task = asyncio.get_running_loop().create_task(self._close(probe))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close(self, probe: Probe) -> None:
        """Close ``probe`` (idempotent); it leaves ``open`` only if it is still there."""
        key = (probe.room_id, probe.participant_id)
        if self.open.get(key) is probe:
            del self.open[key]
        if probe.timer is not None:
            probe.timer.cancel()
        if probe.pc.connectionState == "closed":
            return
        await probe.pc.close()
        logger.info("Probe(%s/%s %s) closed (%d open)", probe.room_id, probe.participant_id,
                    probe.id, len(self.open))

    async def close_room(self, room_id: str) -> None:
        """Close every probe of the room (the room is closing)."""
        for probe in [p for p in self.open.values() if p.room_id == room_id]:
            await self._close(probe)

    async def close(self) -> None:
        for probe in list(self.open.values()):
            await self._close(probe)
        await asyncio.gather(*self._closing, return_exceptions=True)
