"""RoomRecording: the recorder's subscription to one consultation's room.

It is a ``relay.api.MediaSink``: the relay hands it every packet of every publication as it
arrives. Each participant gets one file for camera + microphone and one for a screen share
(a "group"); a file opens once every track of its group has a first frame (video: a keyframe,
which gives the dimensions) or ``hold_s`` after the group's first frame, and a track that
appears after its group's file opened starts the group's next file. Only participants in
``allowed`` (consent) are written.

Nothing here blocks the event loop on the disk for long: muxing writes into the page cache,
fsync runs in a worker thread, and a disk error ends this recording (``on_failure``) without
touching the media.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from codec.rtp import codec_name
from recorder.depacketize import Depacketizer, Frame
from recorder.manifest import AudioTrack, FileEntry, FileStatus, Track, VideoTrack
from recorder.writer import (
    MediaFile,
    RecordingError,
    Timeline,
    TrackSpec,
    extension_for,
    video_size,
)

logger = logging.getLogger(__name__)

GROUP_OF_SOURCE: dict[str, Literal["camera", "screen"]] = {
    "microphone": "camera", "camera": "camera", "screen": "screen"}
KEYFRAME_ASK_S = 1.0
MAX_HELD_FRAMES = 2000


@dataclass
class _Publication:
    id: str
    participant_id: str
    source: str
    kind: str
    codec: str
    clock_rate: int
    depacketizer: Depacketizer
    group: _Group
    index: int | None = None
    """Its track in the group's open file (None: not in the file)."""
    first: Frame | None = None
    """Its first usable frame (video: a keyframe), once seen."""
    size: tuple[int, int] = (0, 0)
    """Video: the dimensions of ``first``."""
    timeline: Timeline | None = None
    asked_keyframe_at: float = 0.0


@dataclass
class _Group:
    participant_id: str
    name: Literal["camera", "screen"]
    """``camera`` (camera + microphone) or ``screen``."""
    publications: dict[str, _Publication] = field(default_factory=dict)
    file: MediaFile | None = None
    entry: FileEntry | None = None
    held: list[tuple[_Publication, Frame]] = field(default_factory=list)
    held_since: float | None = None
    parts: int = 0
    last_arrival: float | None = None
    """Arrival of the last frame written into its current file."""


FileEvent = Callable[[FileEntry], Awaitable[None]]


class RoomRecording:
    def __init__(self, consultation_id: str, directory: Path, *, hold_s: float = 1.5,
                 cluster_ms: int = 500, fsync_interval_s: float = 1.0,
                 on_file_opened: FileEvent, on_file_closed: FileEvent,
                 on_failure: Callable[[str], None],
                 request_keyframe: Callable[[str], Awaitable[None]]) -> None:
        """``on_file_opened`` and ``on_file_closed`` are awaited before ``close`` returns;
        ``on_failure`` is an event, called once, that ``close`` never waits for (its handler
        may want the lock of whoever is closing this recording)."""
        self.consultation_id = consultation_id
        self.directory = directory
        self.allowed: set[str] = set()
        self.failed: str | None = None
        self.closed = False
        self.last_arrival: float | None = None
        """Arrival wall-clock of the last frame written. A gap after this session starts
        there; a file's ``ended_at`` is never after its own last frame's arrival (its
        timeline keeps the RTP spacing from the first frame's arrival, so a first frame that
        came late puts the later ones after their arrival: a file ended 33-68 ms inside a
        fleet's hand-over gap so)."""
        self._hold_s = hold_s
        self._cluster_ms = cluster_ms
        self._fsync_interval_s = fsync_interval_s
        self._on_file_opened = on_file_opened
        self._on_file_closed = on_file_closed
        self._on_failure = on_failure
        self._request_keyframe = request_keyframe
        self._publications: dict[str, _Publication] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker = self._spawn(self._tick_forever())

    # -- MediaSink ---------------------------------------------------------------------------
    def publication_added(self, publication: dict[str, Any]) -> None:
        if self.closed:
            return
        codec = codec_name(str(publication["codec"]))
        group_name = GROUP_OF_SOURCE.get(str(publication["source"]))
        if group_name is None or codec not in ("vp8", "h264", "opus"):
            logger.warning("recording %s: publication %s (%s, %s) is not recordable",
                           self.consultation_id, publication.get("id"),
                           publication.get("source"), codec)
            return
        participant_id = str(publication["participant_id"])
        key = (participant_id, group_name)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(participant_id, group_name)
        pub = _Publication(
            id=str(publication["id"]), participant_id=participant_id,
            source=str(publication["source"]), kind=str(publication["kind"]), codec=codec,
            clock_rate=int(publication.get("clock_rate") or 90000),
            depacketizer=Depacketizer(str(publication["kind"]), codec), group=group)
        self._publications[pub.id] = pub
        group.publications[pub.id] = pub
        if group.file is not None:
            # A new track (camera turned on, a republish after reconnect): the group's next
            # file takes it; the current one ends here.
            self._close_group_file(group)

    def publication_removed(self, publication_id: str) -> None:
        pub = self._publications.pop(publication_id, None)
        if pub is None:
            return
        group = pub.group
        group.publications.pop(publication_id, None)
        group.held = [(p, f) for p, f in group.held if p is not pub]
        if group.file is not None and not any(p.index is not None
                                              for p in group.publications.values()):
            self._close_group_file(group)
        if not group.publications:
            self._groups.pop((group.participant_id, group.name), None)

    def packet(self, publication_id: str, sequence_number: int, timestamp: int, marker: bool,
               payload: bytes, arrival: float) -> None:
        pub = self._publications.get(publication_id)
        if pub is None or self.closed:
            return
        frames = pub.depacketizer.push(sequence_number, timestamp, marker, payload, arrival)
        if pub.depacketizer.waiting_keyframe and pub.participant_id in self.allowed:
            self._ask_keyframe(pub, arrival)
        for frame in frames:
            self._frame(pub, frame)

    # -- consent ---------------------------------------------------------------------------
    def allow(self, participant_ids: set[str]) -> None:
        """Record exactly these participants from now on."""
        for group in list(self._groups.values()):
            if group.participant_id not in participant_ids:
                group.held.clear()
                group.held_since = None
                if group.file is not None:
                    self._close_group_file(group)
        for pub in self._publications.values():
            if pub.participant_id in participant_ids and pub.participant_id not in self.allowed:
                pub.first = None
                pub.depacketizer.waiting_keyframe = pub.kind == "video"
                if pub.kind == "video":
                    self._ask_keyframe(pub, time.time())
        self.allowed = set(participant_ids)

    # -- frames ---------------------------------------------------------------------------
    def _ask_keyframe(self, pub: _Publication, now: float) -> None:
        if now - pub.asked_keyframe_at >= KEYFRAME_ASK_S:
            pub.asked_keyframe_at = now
            self._spawn(self._request_keyframe(pub.id))

    def _frame(self, pub: _Publication, frame: Frame) -> None:
        if pub.participant_id not in self.allowed or self.failed:
            return
        group = pub.group
        if group.file is not None:
            if pub.index is None:
                return  # came after this file opened: the next file takes it
            self._write(group, pub, frame)
            return
        if pub.first is None:
            if pub.kind == "video":
                size = video_size(pub.codec, frame.data) if frame.keyframe else None
                if size is None:
                    return
                pub.size = size
            pub.first = frame
        group.held.append((pub, frame))
        if group.held_since is None:
            group.held_since = time.monotonic()
        if len(group.held) > MAX_HELD_FRAMES:
            del group.held[0]
        self._maybe_open(group)

    def _maybe_open(self, group: _Group, *, now: float | None = None) -> None:
        if group.file is not None or not group.held or group.held_since is None:
            return
        now = time.monotonic() if now is None else now
        ready = all(p.first is not None for p in group.publications.values())
        if not ready and now - group.held_since < self._hold_s:
            return
        self._open(group)

    def _open(self, group: _Group) -> None:
        tracks: list[TrackSpec] = []
        members = [p for p in group.publications.values() if p.first is not None]
        # Video first, then audio: the order players expect.
        members.sort(key=lambda p: p.kind != "video")
        for pub in members:
            first = pub.first
            assert first is not None
            if pub.kind == "video":
                tracks.append(TrackSpec("video", pub.codec, pub.size[0], pub.size[1],
                                        keyframe=first.data))
            else:
                tracks.append(TrackSpec("audio", pub.codec, sample_rate=pub.clock_rate))
        origin = min(f.arrival for _, f in group.held)
        while True:
            # Parts count on across stops, restarts and reconnects: never overwrite a file.
            group.parts += 1
            name = f"{group.participant_id}-{group.name}-{group.parts}{extension_for(tracks)}"
            path = self.directory / name
            if not path.with_suffix(".webm").exists() and not path.with_suffix(".mkv").exists():
                break
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            media = MediaFile(path, tracks, cluster_ms=self._cluster_ms)
        except (RecordingError, OSError) as exc:
            self._fail(exc)
            return
        group.file = media
        for index, pub in enumerate(members):
            pub.index = index
            pub.timeline = Timeline(pub.clock_rate, origin)
        group.entry = FileEntry(name=name, participant_id=group.participant_id,
                                source=group.name, tracks=[_track_entry(t) for t in tracks],
                                started_at=origin)
        logger.info("recording %s: %s opened (%s)", self.consultation_id, name,
                    ", ".join(f"{t.codec} {t.width}x{t.height}" if t.kind == "video"
                              else t.codec for t in tracks))
        self._spawn(self._on_file_opened(group.entry.model_copy()))
        held, group.held, group.held_since = group.held, [], None
        held.sort(key=lambda item: item[1].arrival)
        for pub, frame in held:
            if group.file is None:
                break
            if pub.index is not None:
                self._write(group, pub, frame)

    def _write(self, group: _Group, pub: _Publication, frame: Frame) -> None:
        media = group.file
        assert media is not None and pub.timeline is not None and pub.index is not None
        ms = pub.timeline.ms(frame.timestamp, frame.arrival)
        try:
            media.write(pub.index, frame.data, ms, frame.keyframe)
        except RecordingError as exc:
            self._fail(exc)
            return
        if self.last_arrival is None or frame.arrival > self.last_arrival:
            self.last_arrival = frame.arrival
        if group.last_arrival is None or frame.arrival > group.last_arrival:
            group.last_arrival = frame.arrival

    def _close_group_file(self, group: _Group, status: FileStatus = "complete") -> None:
        media, entry, last_arrival = group.file, group.entry, group.last_arrival
        group.file = None
        group.entry = None
        group.last_arrival = None
        for pub in group.publications.values():
            pub.index = None
            pub.timeline = None
            pub.first = None
            if pub.kind == "video":
                pub.depacketizer.waiting_keyframe = True
        if media is None or entry is None:
            return
        self._spawn(self._finish(media, entry, status, last_arrival))

    async def _finish(self, media: MediaFile, entry: FileEntry, status: FileStatus,
                      last_arrival: float | None = None) -> None:
        try:
            await asyncio.to_thread(media.close)
        except RecordingError as exc:
            status = "failed"
            logger.warning("recording %s: finishing %s failed: %s", self.consultation_id,
                           media.path.name, exc)
        entry.status = status
        entry.ended_at = entry.started_at + media.last_ms / 1000
        if last_arrival is not None and last_arrival < entry.ended_at:
            entry.ended_at = max(entry.started_at, last_arrival)
        entry.duration_s = round(media.last_ms / 1000, 3)
        entry.frames = list(media.frames)
        logger.info("recording %s: %s %s, %.1f s, %d bytes", self.consultation_id,
                    media.path.name, status, media.last_ms / 1000, media.size)
        await self._on_file_closed(entry)

    def _fail(self, exc: BaseException) -> None:
        if self.failed:
            return
        self.failed = str(exc)
        logger.error("recording %s failed: %s", self.consultation_id, exc)
        for group in self._groups.values():
            group.held.clear()
            if group.file is not None:
                self._close_group_file(group, status="failed")
        self._on_failure(str(exc))

    # -- background -----------------------------------------------------------------------
    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                logger.error("recording %s: background step failed", self.consultation_id,
                             exc_info=finished.exception())

        task.add_done_callback(done)
        return task

    async def _tick_forever(self) -> None:
        """Open groups whose hold ran out; fsync open files."""
        interval = min(self._fsync_interval_s, 0.25)
        last_sync = time.monotonic()
        while not self.closed:
            await asyncio.sleep(interval)
            for group in list(self._groups.values()):
                self._maybe_open(group)
            now = time.monotonic()
            if now - last_sync >= self._fsync_interval_s:
                last_sync = now
                files = [g.file for g in self._groups.values() if g.file is not None]
                for media in files:
                    try:
                        await asyncio.to_thread(media.sync)
                    except RecordingError as exc:
                        self._fail(exc)

    async def close(self) -> None:
        """Finish every file (the recording stops or the consultation ends)."""
        if self.closed:
            return
        self.closed = True
        self._ticker.cancel()
        for group in self._groups.values():
            group.held.clear()
            if group.file is not None:
                self._close_group_file(group)
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not self._ticker and t is not current]
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(self._ticker, return_exceptions=True)


def _track_entry(track: TrackSpec) -> Track:
    """A track as the manifest lists it."""
    if track.kind == "video":
        return VideoTrack(codec=track.codec, width=track.width, height=track.height)
    return AudioTrack(codec=track.codec, sample_rate=track.sample_rate)
