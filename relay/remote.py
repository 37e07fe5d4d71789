"""The wire between signaling and a standalone relay node, both sides.

A node dials out to signaling (so it works from behind a hospital firewall) on the socket.io
namespace ``/relay`` with ``auth={"token", "region", "capacity", "public_address"}``.
Signaling sends commands as events with an ack; the node answers ``{"ok": true, "result"}`` or
``{"error": {"code", "message"}}`` and reports with ``relay:offer``, ``relay:publication``,
``relay:notice`` and ``relay:heartbeat``. This module has no aiortc import: signaling uses
``RemoteRelay`` from it."""

from __future__ import annotations

from typing import Any, Protocol

from relay.api import MediaSink, RelayInfo
from relay.errors import RelayError

NAMESPACE = "/relay"
COMMAND_TIMEOUT_S = 15.0
COMMANDS = ("open_room", "close_room", "join", "leave", "publish", "unpublish", "subscribe",
            "answer", "add_ice_candidate", "set_audio_only", "stats")


class RemoteRelayError(RelayError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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

    async def _command(self, command: str, **payload: Any) -> Any:
        try:
            answer = await self._server.call(command, payload, to=self.sid,
                                             namespace=NAMESPACE, timeout=COMMAND_TIMEOUT_S)
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
        raise RemoteRelayError(
            "recording_unavailable",
            f"consultation {room_id!r} runs on standalone relay {self.info.id!r}; this "
            "version records consultations on the embedded relay only")

    async def detach_sink(self, room_id: str, sink: MediaSink) -> None:
        return None

    async def request_keyframe(self, room_id: str, publication_id: str) -> None:
        return None
