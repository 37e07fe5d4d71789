"""How the domain reaches clients without knowing socket.io: named audiences (rooms) and a
Notifier that emits to them. ``signaling.handlers`` provides the socket.io implementation."""

from __future__ import annotations

from typing import Any, Protocol

COORDINATORS = "coordinators"
CENTRAL_SPECIALISTS = "central-specialists"


def clinician_room(clinician_id: str) -> str:
    return f"clinician:{clinician_id}"


def site_room(site_id: str) -> str:
    return f"site:{site_id}"


def specialty_room(specialty: str) -> str:
    return f"specialty:{specialty}"


def consultation_room(consultation_id: str) -> str:
    return f"consultation:{consultation_id}"


class Notifier(Protocol):
    async def emit(self, event: str, payload: dict[str, Any], to: str | list[str]) -> None:
        """Send an event to every connection in the named room(s), each connection once."""

    async def enter(self, sid: str, room: str) -> None: ...

    async def leave(self, sid: str, room: str) -> None: ...

    async def close(self, room: str) -> None:
        """Take every connection out of the room."""
