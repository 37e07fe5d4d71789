"""Room: a consultation's media scope on one relay. Owns its Participants; every Publication
of one participant is offered to every other participant."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from relay.api import MediaSink, RelayEvents
from relay.config import MediaConfig
from relay.errors import NotInRoom
from relay.participant import Participant
from relay.publication import Publication

logger = logging.getLogger(__name__)


class Room:
    def __init__(self, room_id: str, config: MediaConfig, events: RelayEvents) -> None:
        self.id = room_id
        self.config = config
        self.events = events
        self.participants: dict[str, Participant] = {}
        self.sinks: list[MediaSink] = []
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a background step of this room; failures are logged, never lost."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                logger.error("Room(%s) background step failed", self.id,
                             exc_info=finished.exception())

        task.add_done_callback(done)

    async def join(self, participant_id: str) -> Participant:
        """Add a participant; one who was already here (a reconnect) starts afresh."""
        old = self.participants.pop(participant_id, None)
        if old is not None:
            await old.close()
        participant = Participant(self, participant_id, self.config)
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

    def publications_for(self, participant: Participant) -> list[Publication]:
        return [p for other in self.participants.values() if other is not participant
                for p in other.publications.values()]

    def publications(self) -> list[Publication]:
        return [p for participant in self.participants.values()
                for p in participant.publications.values()]

    def attach_sink(self, sink: MediaSink) -> None:
        if sink in self.sinks:
            return
        self.sinks.append(sink)
        for publication in self.publications():
            self._give(sink, publication)

    def detach_sink(self, sink: MediaSink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)
        for publication in self.publications():
            publication.sinks = tuple(s for s in publication.sinks if s is not sink)

    def _give(self, sink: MediaSink, publication: Publication) -> None:
        try:
            sink.publication_added(publication.sink_info())
        except Exception:
            logger.exception("Room(%s): media sink refused publication %s", self.id,
                             publication.id)
            return
        publication.sinks = (*publication.sinks, sink)
        # The sink starts at a keyframe: ask for one now rather than wait for the next.
        publication.request_keyframe()

    def request_keyframe(self, publication_id: str) -> None:
        for publication in self.publications():
            if publication.id == publication_id:
                publication.request_keyframe()

    def publication_added(self, publication: Publication) -> None:
        for sink in self.sinks:
            self._give(sink, publication)
        for participant in self.participants.values():
            if participant.id != publication.participant_id:
                participant.publication_added(publication)
        self.spawn(self.events.publication(self.id, "added", publication.to_wire()))

    def publication_removed(self, publication: Publication) -> None:
        for subscription in publication.close():
            subscriber = self.participants.get(subscription.subscriber_id)
            if subscriber is not None:
                subscriber.publication_removed(publication)
            subscription.close()
        self.spawn(self.events.publication(self.id, "removed", publication.to_wire()))

    def stats(self) -> dict[str, Any]:
        return {pid: p.stats() for pid, p in self.participants.items()}

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        participants = list(self.participants.values())
        self.participants.clear()
        for participant in participants:
            await participant.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        logger.info("Room(%s) closed", self.id)
