"""The wire between signaling and a standalone relay node, both sides.

A node dials out to signaling (so it works from behind a hospital firewall) on the socket.io
namespace ``/relay`` with ``auth={"token", "region", "capacity", "public_address"}``, and
``"worker": k`` when it is worker k of a machine (relay/workers.py): signaling then registers
it as ``<the token's relay id>.w<k>`` (``relay.api.worker_relay_id``), one node token for
the machine.
Signaling sends commands as events with an ack; the node answers ``{"ok": true, "result"}`` or
``{"error": {"code", "message"}}`` and reports with ``relay:offer``, ``relay:publication``,
``relay:notice`` and ``relay:heartbeat``. While a room is recorded (``record_start``) the node
also streams the room's encoded packets up as ``relay:media`` (see ``pack_packets``), which
``RemoteRelay`` hands to the recorder's MediaSink here. This module has no aiortc import:
signaling uses ``RemoteRelay`` from it.

The node's lifecycle calls (relay/node.py): after each (re)connect the node calls
``relay:hello`` (``Hello``: the rooms it still holds) and signaling answers ``HelloResult``
(the rooms it adopts, the rooms the node closes); on SIGTERM the node calls ``relay:drain``
and signaling answers ``DrainResult`` once the consultations moved off the node have their
participants connected elsewhere (or after ``relay.drain_s``). A node keeps its rooms' media
flowing while signaling is away, so a ``RemoteRelay`` built for a node that dialled in again
may find rooms, and a recorded room's stream, already running there: ``record_start`` on a
room the node already streams announces every publication again (``added``).

In a fleet (``live.backend = "redis"``, signaling/relay_registry.py) a process also builds a
``RemoteRelay`` for a node connected to another process, with the node's sid there: the
socket.io Redis manager carries each command to that process and the ack back (a few ms
more per command). Its ``relay:*`` reports reach only the process it is connected to."""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from relay.api import NODE_NAMESPACE, MediaSink, RelayInfo
from relay.errors import RelayError
from relay.tasks import Abandoned, unless

logger = logging.getLogger(__name__)

NAMESPACE = NODE_NAMESPACE
COMMAND_TIMEOUT_S = 15.0
COMMANDS = ("open_room", "close_room", "join", "leave", "resume", "publish", "unpublish",
            "subscribe", "answer", "add_ice_candidate", "set_audio_only", "stats",
            "request_keyframe", "probe")
RECORD_COMMANDS = ("record_start", "record_stop")
_PACKET = struct.Struct("!HHIBdI")
"""One packet in a ``relay:media`` batch: publication index, sequence number, timestamp,
marker, arrival (wall-clock), payload length; the payload follows."""


def pack_packets(packets: list[tuple[int, int, int, bool, bytes, float]]) -> bytes:
    """``[(publication index, seq, timestamp, marker, payload, arrival)]`` -> one blob."""
    parts = []
    for index, seq, timestamp, marker, payload, arrival in packets:
        parts.append(_PACKET.pack(index, seq, timestamp, marker, arrival, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def unpack_packets(blob: bytes) -> list[tuple[int, int, int, bool, bytes, float]]:
    packets = []
    offset = 0
    while offset < len(blob):
        index, seq, timestamp, marker, arrival, size = _PACKET.unpack_from(blob, offset)
        offset += _PACKET.size
        if offset + size > len(blob):
            raise ValueError("relay:media batch is truncated")
        packets.append((index, seq, timestamp, bool(marker), blob[offset:offset + size],
                        arrival))
        offset += size
    return packets


class RemoteRelayError(RelayError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class HelloRoom(BaseModel):
    room_id: str
    participants: list[str]
    """The participants whose media the node still carries."""
    recording: bool
    """The room's media is streamed up to a recorder (``record_start``)."""


class Hello(BaseModel):
    """``relay:hello``: what a node says right after each (re)connect."""

    rooms: list[HelloRoom]


class HelloResult(BaseModel):
    """Signaling's answer to ``relay:hello``."""

    adopted: list[str]
    """Rooms of open consultations now placed on this node: their media goes on."""
    close: list[str]
    """Rooms signaling does not want here (ended, or moved elsewhere meanwhile)."""


class DrainResult(BaseModel):
    """Signaling's answer to ``relay:drain``."""

    moved: int
    """Consultations moved off the node."""
    connected: int
    """Participants connected on their new relay when signaling answered."""
    waited_s: float


ResultT = TypeVar("ResultT", bound=BaseModel)


def parse_answer(event: str, answer: Any, model: type[ResultT]) -> ResultT:
    """The ``result`` of an ``{ok: true, result}`` answer to ``event``, validated; raises
    RemoteRelayError for an ``{error: {code, message}}`` answer or one that does not fit."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = answer["error"]
        raise RemoteRelayError(str(error.get("code")), str(error.get("message")))
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        raise RemoteRelayError("invalid_answer", f"{event} was answered with {answer!r:.200}")
    try:
        return model.model_validate(answer.get("result"))
    except ValidationError as exc:
        raise RemoteRelayError("invalid_answer",
                               f"{event} was answered with an invalid result: "
                               f"{exc.error_count()} errors, first: "
                               f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None


class Caller(Protocol):
    async def call(self, event: str, data: Any, *, to: str, namespace: str,
                   timeout: float) -> Any:  # noqa: ASYNC109 (python-socketio signature)
        ...  # pragma: no cover


class RemoteRelay:
    """``relay.api.Relay`` over a node's socket.io connection."""

    def __init__(self, info: RelayInfo, sid: str, server: Caller) -> None:
        self.info = info
        self.sid = sid
        self._server = server
        self._sinks: dict[str, MediaSink] = {}
        self._gone = asyncio.Event()

    def abandon(self) -> None:
        """The node's connection is gone (closed, silent, or replaced by a new one): commands
        waiting for its answer fail now, ``relay_unreachable``, instead of at
        ``COMMAND_TIMEOUT_S`` (a client's ``media:join`` on a frozen node would otherwise hold
        its media set-up 15 s, past the move that the sweep makes after 1.5 s)."""
        self._gone.set()

    async def _command(self, command: str, **payload: Any) -> Any:
        if self._gone.is_set():
            raise RemoteRelayError("relay_unreachable",
                                   f"relay {self.info.id!r} is gone ({command} not sent)")
        try:
            answer = await unless(self._gone, self._server.call(
                command, payload, to=self.sid, namespace=NAMESPACE,
                timeout=COMMAND_TIMEOUT_S))
        except Abandoned:
            raise RemoteRelayError("relay_unreachable",
                                   f"relay {self.info.id!r} is gone ({command} not answered)"
                                   ) from None
        except Exception as exc:
            raise RemoteRelayError("relay_unreachable",
                                   f"relay {self.info.id!r} did not answer {command}: "
                                   f"{type(exc).__name__}") from None
        if not isinstance(answer, dict):
            raise RemoteRelayError("relay_error", f"relay {self.info.id!r} answered "
                                   f"{command} with {type(answer).__name__}")
        if "error" in answer:
            error = answer["error"]
            raise RemoteRelayError(str(error.get("code")), str(error.get("message")))
        return answer.get("result")

    async def open_room(self, room_id: str) -> None:
        await self._command("open_room", room_id=room_id)

    async def close_room(self, room_id: str) -> None:
        await self._command("close_room", room_id=room_id)

    async def join(self, room_id: str, participant_id: str) -> None:
        await self._command("join", room_id=room_id, participant_id=participant_id)

    async def leave(self, room_id: str, participant_id: str) -> None:
        await self._command("leave", room_id=room_id, participant_id=participant_id)

    async def resume(self, room_id: str, participant_id: str) -> bool:
        return bool(await self._command("resume", room_id=room_id,
                                        participant_id=participant_id))

    async def publish(self, room_id: str, participant_id: str, sdp: str,
                      sources: dict[str, str]) -> dict[str, Any]:
        result: dict[str, Any] = await self._command(
            "publish", room_id=room_id, participant_id=participant_id, sdp=sdp,
            sources=sources)
        return result

    async def unpublish(self, room_id: str, participant_id: str, source: str) -> None:
        await self._command("unpublish", room_id=room_id, participant_id=participant_id,
                            source=source)

    async def subscribe(self, room_id: str, participant_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._command(
            "subscribe", room_id=room_id, participant_id=participant_id)
        return result

    async def answer(self, room_id: str, participant_id: str, transport_id: str,
                     sdp: str) -> None:
        await self._command("answer", room_id=room_id, participant_id=participant_id,
                            transport_id=transport_id, sdp=sdp)

    async def add_ice_candidate(self, room_id: str, participant_id: str, transport_id: str,
                                candidate: dict[str, Any]) -> None:
        await self._command("add_ice_candidate", room_id=room_id,
                            participant_id=participant_id, transport_id=transport_id,
                            candidate=candidate)

    async def set_audio_only(self, room_id: str, participant_id: str,
                             audio_only: bool) -> None:
        await self._command("set_audio_only", room_id=room_id, participant_id=participant_id,
                            audio_only=audio_only)

    async def stats(self, room_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._command("stats", room_id=room_id)
        return result

    async def attach_sink(self, room_id: str, sink: MediaSink) -> None:
        self._sinks[room_id] = sink
        try:
            await self._command("record_start", room_id=room_id)
        except RelayError:
            self._sinks.pop(room_id, None)
            raise

    async def detach_sink(self, room_id: str, sink: MediaSink) -> None:
        if self._sinks.get(room_id) is sink:
            del self._sinks[room_id]
            await self._command("record_stop", room_id=room_id)

    async def request_keyframe(self, room_id: str, publication_id: str) -> None:
        await self._command("request_keyframe", room_id=room_id, publication_id=publication_id)

    async def probe(self, room_id: str, participant_id: str, sdp: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._command(
            "probe", room_id=room_id, participant_id=participant_id, sdp=sdp)
        return result

    def deliver(self, data: dict[str, Any]) -> None:
        """A ``relay:media`` message from the node: publications added or removed, or a batch
        of packets, for the room's sink."""
        sink = self._sinks.get(str(data.get("room_id")))
        if sink is None:
            return
        try:
            if "added" in data:
                sink.publication_added(dict(data["added"]))
            elif "removed" in data:
                sink.publication_removed(str(data["removed"]))
            else:
                ids = [str(i) for i in data.get("publications") or []]
                for index, seq, timestamp, marker, payload, arrival in unpack_packets(
                        bytes(data.get("packets") or b"")):
                    sink.packet(ids[index], seq, timestamp, marker, payload, arrival)
        except (ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
            logger.warning("relay %s sent a malformed relay:media message: %s", self.info.id,
                           exc)
