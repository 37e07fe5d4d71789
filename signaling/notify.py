"""How the domain reaches clients without knowing socket.io: named audiences (a clinician, a
site, a specialty, a consultation's participants, coordinators, central specialists) and a
Notifier that emits to them. ``signaling.handlers`` provides the socket.io implementation, where
an audience is a socket.io room (not to be confused with a relay's Room)."""

from __future__ import annotations

from typing import Any, Protocol

COORDINATORS = "coordinators"
CENTRAL_SPECIALISTS = "central-specialists"


def clinician_audience(clinician_id: str) -> str:
    return f"clinician:{clinician_id}"


def site_audience(site_id: str) -> str:
    return f"site:{site_id}"


def specialty_audience(specialty: str) -> str:
    return f"specialty:{specialty}"


def consultation_audience(consultation_id: str) -> str:
    return f"consultation:{consultation_id}"


class Notifier(Protocol):
    async def emit(self, event: str, payload: dict[str, Any], to: str | list[str]) -> None:
        """Send an event to every connection in the named audience(s), each connection
        once."""

    async def emit_here(self, event: str, payload: dict[str, Any],
                        to: str | list[str]) -> None:
        """``emit`` to this process's connections only (a fleet: each process tells its
        own)."""

    async def enter(self, sid: str, audience: str) -> None:
        """Add the connection to the audience."""

    async def leave(self, sid: str, audience: str) -> None: ...

    async def close(self, audience: str) -> None:
        """Take every connection out of the audience."""
