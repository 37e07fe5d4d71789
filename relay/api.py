"""The narrow interface between signaling and a relay node, embedded or standalone.

Signaling places each consultation's Room on one relay through this interface and never knows
which kind it talks to. This module imports nothing from aiortc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class RelayInfo:
    id: str
    region: str
    """Province code the relay serves; empty: it serves any region (the embedded relay)."""
    public_address: str
    capacity: int
    """How many rooms the relay accepts at most."""
    load: int = 0
    """Rooms open on it now."""
    heartbeat_at: float = 0.0
    embedded: bool = False

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"relay {self.id!r}: capacity must be > 0, got {self.capacity}")

    @property
    def has_room(self) -> bool:
        return self.load < self.capacity


class Relay(Protocol):
    """What signaling asks of a relay."""

    info: RelayInfo

    async def open_room(self, room_id: str) -> None:
        """Prepare the Room of a consultation (idempotent)."""

    async def close_room(self, room_id: str) -> None:
        """Close the Room and everything in it (idempotent)."""
