"""Live state: presence (who is connected, from which site) and membership (who is in
which consultation, present or reconnecting). It is rebuilt as clients reconnect, so it may live
in memory (``MemoryLiveStore``, the default); ``LiveStore`` is the narrow interface that
``signaling.live_redis.RedisLiveStore`` also answers (``live.backend = "redis"``), with the
same semantics: tests/signaling/test_live_store.py runs one contract against both."""

from __future__ import annotations

import asyncio
import weakref
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

ParticipantState = Literal["present", "reconnecting"]


@dataclass
class Connection:
    sid: str
    clinician_id: str
    site_id: str


@dataclass
class Participant:
    consultation_id: str
    clinician_id: str
    site_id: str
    joined_at: float
    sids: set[str] = field(default_factory=set)
    state: ParticipantState = "present"
    away_since: float | None = None
    media_sid: str | None = None
    """The connection that carries the participant's media (``media:join``): where the
    relay's offers and notices for them go, on whichever process it lives. Written only by
    ``set_media_sid``: a ``put_participant`` keeps the stored one, so that the lifecycle's
    read-modify-write of a participant never undoes a ``media:join`` that ran meanwhile."""

    def to_wire(self) -> dict[str, object]:
        return {
            "clinician_id": self.clinician_id,
            "site_id": self.site_id,
            "joined_at": self.joined_at,
            "state": self.state,
        }


class ClinicianLocks:
    """One ``asyncio.Lock`` per clinician while in use (dropped when no one holds or waits)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = \
            weakref.WeakValueDictionary()

    def get(self, clinician_id: str) -> asyncio.Lock:
        lock = self._locks.get(clinician_id)
        if lock is None:
            lock = self._locks[clinician_id] = asyncio.Lock()
        return lock


class LiveStore(Protocol):
    """Presence and membership. Every method is a coroutine so that a networked store fits."""

    def clinician_lock(self, clinician_id: str) -> AbstractAsyncContextManager[object]:
        """Held while one of the clinician's participants is read, changed and written back
        (its sockets, its state): in this process, and with Redis across every process that
        shares it (a return on one node and the reconnect grace running out on another)."""

    async def add_connection(self, connection: Connection) -> bool:
        """Record a connection; True if it is the clinician's site's first one."""

    async def remove_connection(self, sid: str) -> tuple[Connection | None, bool]:
        """Forget a connection; returns it and True if its site has no connection left."""

    async def online_sites(self) -> dict[str, int]:
        """Site id -> number of connections, for every site with at least one."""

    async def put_participant(self, participant: Participant) -> None: ...

    async def get_participant(self, consultation_id: str,
                              clinician_id: str) -> Participant | None: ...

    async def participants(self, consultation_id: str) -> list[Participant]: ...

    async def remove_participant(self, consultation_id: str, clinician_id: str) -> None: ...

    async def memberships_of(self, clinician_id: str) -> list[Participant]: ...

    async def drop_consultation(self, consultation_id: str) -> list[Participant]: ...

    async def reconnecting(self) -> list[Participant]: ...

    async def set_media_sid(self, consultation_id: str, clinician_id: str, sid: str | None, *,
                            expected: str | None = None) -> bool:
        """Bind the participant's media to connection ``sid`` (None: to none); with
        ``expected``, only while it is bound to that one (a compare-and-set). True if it was
        written; False for a participant that is not there or bound to another."""


class MemoryLiveStore:
    """LiveStore in this process's memory: the embedded default."""

    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        self._by_site: dict[str, set[str]] = {}
        self._members: dict[str, dict[str, Participant]] = {}
        self._memberships: dict[str, set[str]] = {}
        self._locks = ClinicianLocks()

    def clinician_lock(self, clinician_id: str) -> asyncio.Lock:
        return self._locks.get(clinician_id)

    async def add_connection(self, connection: Connection) -> bool:
        self._connections[connection.sid] = connection
        at_site = self._by_site.setdefault(connection.site_id, set())
        at_site.add(connection.sid)
        return len(at_site) == 1

    async def remove_connection(self, sid: str) -> tuple[Connection | None, bool]:
        connection = self._connections.pop(sid, None)
        if connection is None:
            return None, False
        at_site = self._by_site.get(connection.site_id, set())
        at_site.discard(sid)
        if not at_site:
            self._by_site.pop(connection.site_id, None)
            return connection, True
        return connection, False

    async def online_sites(self) -> dict[str, int]:
        return {site: len(sids) for site, sids in self._by_site.items()}

    async def put_participant(self, participant: Participant) -> None:
        members = self._members.setdefault(participant.consultation_id, {})
        old = members.get(participant.clinician_id)
        if old is not None and old is not participant:
            participant.media_sid = old.media_sid
        members[participant.clinician_id] = participant
        self._memberships.setdefault(participant.clinician_id, set()).add(
            participant.consultation_id
        )

    async def get_participant(self, consultation_id: str,
                              clinician_id: str) -> Participant | None:
        return self._members.get(consultation_id, {}).get(clinician_id)

    async def participants(self, consultation_id: str) -> list[Participant]:
        return list(self._members.get(consultation_id, {}).values())

    async def remove_participant(self, consultation_id: str, clinician_id: str) -> None:
        members = self._members.get(consultation_id)
        if members is not None:
            members.pop(clinician_id, None)
            if not members:
                del self._members[consultation_id]
        mine = self._memberships.get(clinician_id)
        if mine is not None:
            mine.discard(consultation_id)
            if not mine:
                del self._memberships[clinician_id]

    async def memberships_of(self, clinician_id: str) -> list[Participant]:
        return [
            self._members[c][clinician_id]
            for c in self._memberships.get(clinician_id, ())
            if clinician_id in self._members.get(c, {})
        ]

    async def drop_consultation(self, consultation_id: str) -> list[Participant]:
        members = self._members.pop(consultation_id, {})
        for clinician_id in members:
            mine = self._memberships.get(clinician_id)
            if mine is not None:
                mine.discard(consultation_id)
                if not mine:
                    del self._memberships[clinician_id]
        return list(members.values())

    async def reconnecting(self) -> list[Participant]:
        return [p for members in self._members.values() for p in members.values()
                if p.state == "reconnecting"]

    async def set_media_sid(self, consultation_id: str, clinician_id: str, sid: str | None, *,
                            expected: str | None = None) -> bool:
        participant = self._members.get(consultation_id, {}).get(clinician_id)
        if participant is None or (expected is not None and participant.media_sid != expected):
            return False
        participant.media_sid = sid
        return True
