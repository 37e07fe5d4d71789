"""Value objects of the domain: Site, Clinician, ConsultRequest, Consultation, Minutes, ChatMessage.

They are plain dataclasses; the wire form of each is ``to_wire()`` (JSON-ready dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Tier = Literal["central", "provincial", "district", "commune"]
Role = Literal["referring", "specialist", "coordinator", "admin", "site_admin"]
"""``site_admin``: manages the clinicians of its own site (``signaling.permissions``)."""
Priority = Literal["routine", "urgent", "asap", "stat"]
RequestStatus = Literal["waiting", "accepted", "closed", "cancelled", "expired"]
ConsultationState = Literal["open", "live", "ended"]

# Most urgent first: the queue is ordered by this rank, then by waiting time.
PRIORITY_RANK: dict[str, int] = {"stat": 0, "asap": 1, "urgent": 2, "routine": 3}


@dataclass(frozen=True)
class Site:
    id: str
    name: str
    tier: Tier
    region: str
    active: bool = True
    """A deactivated site stays in the store (records name it) but is out of every lookup."""
    updated_at: float = 0.0
    region_name: str = ""
    """The province's Vietnamese name, filled in by the directory's lookups (regions are
    directory data); not stored with the site."""

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "tier": self.tier, "region": self.region,
                "region_name": self.region_name or self.region}


@dataclass(frozen=True)
class Clinician:
    id: str
    name: str
    site_id: str
    roles: frozenset[str]
    specialties: frozenset[str]
    active: bool = True
    """A deactivated clinician stays in the store (records name them) but cannot sign in."""
    updated_at: float = 0.0

    def has(self, role: str) -> bool:
        return role in self.roles

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "site_id": self.site_id,
            "roles": sorted(self.roles),
            "specialties": sorted(self.specialties),
        }


@dataclass
class ConsultRequest:
    id: str
    site_id: str
    requester_id: str
    specialty: str
    priority: Priority
    reason: str
    patient_pseudonym: str | None
    status: RequestStatus
    created_at: float
    escalated_at: float | None = None
    accepted_by: str | None = None
    accepted_at: float | None = None
    consultation_id: str | None = None
    closed_at: float | None = None

    @property
    def sort_key(self) -> tuple[int, float, str]:
        return (PRIORITY_RANK[self.priority], self.created_at, self.id)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "site_id": self.site_id,
            "requester_id": self.requester_id,
            "specialty": self.specialty,
            "priority": self.priority,
            "reason": self.reason,
            "patient_pseudonym": self.patient_pseudonym,
            "status": self.status,
            "created_at": self.created_at,
            "escalated": self.escalated_at is not None,
            "accepted_by": self.accepted_by,
            "accepted_at": self.accepted_at,
            "consultation_id": self.consultation_id,
            "closed_at": self.closed_at,
        }


@dataclass(frozen=True)
class Minutes:
    conclusion: str
    signed_by: str
    signed_at: float

    def to_wire(self) -> dict[str, Any]:
        return {"conclusion": self.conclusion, "signed_by": self.signed_by,
                "signed_at": self.signed_at}


@dataclass
class Consultation:
    id: str
    request_id: str
    host_id: str
    relay_id: str
    state: ConsultationState
    created_at: float
    site_ids: list[str] = field(default_factory=list)
    """Sites taking part: the requesting site, the host's site and every invited site."""
    clinician_ids: list[str] = field(default_factory=list)
    """Clinicians named on the consultation (requester and host); clinicians of invited sites
    and coordinators may join as well."""
    invited_site_ids: list[str] = field(default_factory=list)
    started_at: float | None = None
    ended_at: float | None = None
    minutes: Minutes | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "host_id": self.host_id,
            "relay_id": self.relay_id,
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "site_ids": list(self.site_ids),
            "clinician_ids": list(self.clinician_ids),
            "invited_site_ids": list(self.invited_site_ids),
            "minutes": self.minutes.to_wire() if self.minutes else None,
        }


@dataclass(frozen=True)
class ChatMessage:
    id: str
    consultation_id: str
    sender_id: str
    site_id: str
    text: str
    sent_at: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "consultation_id": self.consultation_id,
            "sender_id": self.sender_id,
            "site_id": self.site_id,
            "text": self.text,
            "sent_at": self.sent_at,
        }
