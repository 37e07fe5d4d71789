"""The consult queue: waiting requests ordered by priority (stat, asap, urgent, routine) then
by waiting time. The durable store is the authority; this is its in-memory index of the
requests that are waiting, rebuilt from the store at start-up. In a fleet each member keeps
one, kept in step by the fleet's messages and healed by ``Pairing.resync`` (signaling/
pairing.py)."""

from __future__ import annotations

import bisect

from signaling.models import ConsultRequest


def _key(request: ConsultRequest) -> tuple[int, float, str]:
    return request.sort_key


class ConsultQueue:
    def __init__(self) -> None:
        self._by_id: dict[str, ConsultRequest] = {}
        self._by_specialty: dict[str, list[ConsultRequest]] = {}
        self._by_requester: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def ids(self) -> set[str]:
        return set(self._by_id)

    def get(self, request_id: str) -> ConsultRequest | None:
        return self._by_id.get(request_id)

    def add(self, request: ConsultRequest) -> None:
        if request.id in self._by_id:
            return
        self._by_id[request.id] = request
        self._by_requester[request.requester_id] = self.waiting_of(request.requester_id) + 1
        lane = self._by_specialty.setdefault(request.specialty, [])
        bisect.insort(lane, request, key=_key)

    def remove(self, request_id: str) -> ConsultRequest | None:
        request = self._by_id.pop(request_id, None)
        if request is None:
            return None
        lane = self._by_specialty[request.specialty]
        index = bisect.bisect_left(lane, request.sort_key, key=_key)
        del lane[index]
        if not lane:
            del self._by_specialty[request.specialty]
        left = self._by_requester.pop(request.requester_id, 1) - 1
        if left > 0:
            self._by_requester[request.requester_id] = left
        return request

    def waiting_of(self, requester_id: str) -> int:
        """How many waiting requests ``requester_id`` holds."""
        return self._by_requester.get(requester_id, 0)

    def position(self, request_id: str) -> int | None:
        """1-based place of the request in its specialty's lane."""
        request = self._by_id.get(request_id)
        if request is None:
            return None
        lane = self._by_specialty[request.specialty]
        return bisect.bisect_left(lane, request.sort_key, key=_key) + 1

    def lane(self, specialty: str) -> list[ConsultRequest]:
        return list(self._by_specialty.get(specialty, ()))

    def behind(self, request: ConsultRequest) -> list[ConsultRequest]:
        """Requests of the same specialty ordered after ``request`` (their position moves when
        it leaves or arrives)."""
        lane = self._by_specialty.get(request.specialty, [])
        index = bisect.bisect_right(lane, request.sort_key, key=_key)
        return lane[index:]

    def visible_to(self, specialties: frozenset[str], *, everything: bool,
                   escalated: bool) -> list[ConsultRequest]:
        """The queue as a clinician sees it: every request when ``everything``, else the lanes
        of their specialties, plus every escalated request when ``escalated``."""
        if everything:
            chosen = list(self._by_id.values())
        else:
            chosen = [r for s in specialties for r in self.lane(s)]
            if escalated:
                seen = {r.id for r in chosen}
                chosen += [r for r in self._by_id.values()
                           if r.escalated_at is not None and r.id not in seen]
        return sorted(chosen, key=lambda r: r.sort_key)

    def all(self) -> list[ConsultRequest]:
        return sorted(self._by_id.values(), key=lambda r: r.sort_key)

    def counts_by_priority(self) -> dict[str, int]:
        counts = {"stat": 0, "asap": 0, "urgent": 0, "routine": 0}
        for request in self._by_id.values():
            counts[request.priority] += 1
        return counts
