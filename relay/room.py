"""Room: a consultation's media scope on one relay. Owns its Participants; every Publication
of one participant is offered to every other participant and to the room's media sinks.

A participant reports its publications coming and going through the RoomLink the room hands
it; the room passes the news down to the others and out to ``RelayEvents``."""

from __future__ import annotations

import logging
from typing import Any

from relay.api import MediaSink, RelayEvents
from relay.config import MediaConfig
from relay.errors import NotInRoom
from relay.participant import Participant, RoomLink
from relay.publication import Publication
from relay.tasks import Tasks

logger = logging.getLogger(__name__)


class Room:
    def __init__(self, room_id: str, config: MediaConfig, events: RelayEvents) -> None:
        self.id = room_id
        self.config = config
        self.events = events
        self.participants: dict[str, Participant] = {}
        self.sinks: list[MediaSink] = []
        self.closed = False
        self._tasks = Tasks(f"Room({room_id})")

    async def join(self, participant_id: str) -> Participant:
        """Add a participant; one who was already here (a reconnect) starts afresh."""
        old = self.participants.pop(participant_id, None)
        if old is not None:
            await old.close()
        link = RoomLink(
            room_id=self.id, events=self.events,
            publications=lambda: self._publications(excluding=participant_id),
            publication_added=self._publication_added,
            publication_removed=self._publication_removed)
        participant = Participant(participant_id, self.config, link)
        self.participants[participant_id] = participant
        logger.info("Room(%s) %s joined (%d present)", self.id, participant_id,
                    len(self.participants))
        return participant

    def get(self, participant_id: str) -> Participant:
        participant = self.participants.get(participant_id)
        if participant is None:
            raise NotInRoom(f"{participant_id!r} has not joined the media of room {self.id!r}")
        return participant

    async def leave(self, participant_id: str) -> None:
        participant = self.participants.pop(participant_id, None)
        if participant is not None:
            await participant.close()

    def _publications(self, excluding: str | None = None) -> list[Publication]:
        return [p for participant in self.participants.values() if participant.id != excluding
                for p in participant.publications.values()]

    # -- what participants report ---------------------------------------------------------
    def _publication_added(self, publication: Publication) -> None:
        for sink in self.sinks:
            publication.add_sink(sink)
        for participant in self.participants.values():
            if participant.id != publication.participant_id:
                participant.publication_added(publication)
        self._tasks.spawn(self.events.publication(self.id, "added", publication.to_wire()))

    def _publication_removed(self, publication: Publication) -> None:
        for participant in self.participants.values():
            if participant.id != publication.participant_id:
                participant.publication_removed(publication)
        self._tasks.spawn(self.events.publication(self.id, "removed", publication.to_wire()))

    # -- media sinks (the recorder) -------------------------------------------------------
    def attach_sink(self, sink: MediaSink) -> None:
        if sink in self.sinks:
            return
        self.sinks.append(sink)
        for publication in self._publications():
            publication.add_sink(sink)

    def announce_to(self, sink: MediaSink) -> int:
        """Give an attached sink every publication again (``publication_added``, then a
        keyframe is asked for), as if it had just been attached: the recorder behind it
        started afresh (a relay node's stream outlived a signaling restart). Attaches the
        sink if it was not. Returns how many publications were announced."""
        if sink not in self.sinks:
            self.attach_sink(sink)
            return len(self._publications())
        count = 0
        for publication in self._publications():
            publication.remove_sink(sink)
            count += publication.add_sink(sink)
        return count

    def detach_sink(self, sink: MediaSink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)
        for publication in self._publications():
            publication.remove_sink(sink)

    def request_keyframe(self, publication_id: str) -> None:
        for publication in self._publications():
            if publication.id == publication_id:
                publication.request_keyframe()

    def stats(self) -> dict[str, Any]:
        return {pid: p.stats() for pid, p in self.participants.items()}

    async def close(self) -> None:
        """Close every participant (and so everything in the room), once."""
        if self.closed:
            return
        self.closed = True
        participants = list(self.participants.values())
        self.participants.clear()
        for participant in participants:
            await participant.close()
        await self._tasks.close()
        logger.info("Room(%s) closed", self.id)
