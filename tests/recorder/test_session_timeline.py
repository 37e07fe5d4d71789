"""``RoomRecording`` alone, fed RTP packets by hand: where a gap after its files starts."""

from __future__ import annotations

import time
from pathlib import Path

import av

from recorder import manifest as mf
from recorder.session import RoomRecording

SILENCE = b"\xf8\xff\xfe"
"""One 20 ms Opus frame of silence (CELT, fullband), as WebRTC sends for a muted mic."""


async def test_a_file_ends_at_its_last_arrival_when_its_first_frame_came_late(
        tmp_path: Path) -> None:
    """The first packet comes 60 ms late, the next 49 on time: the file's timeline keeps the
    RTP spacing from that late first arrival, so its last frame sits 60 ms after it arrived.
    The file's ``ended_at`` is that arrival, where a gap after it starts (the session's
    ``last_arrival``): a gap never begins inside a file, nor does the next node's file (a
    fleet's hand-over gap of 0.2 s was seen so in CI), whose start is its first arrival."""
    closed: list[mf.FileEntry] = []

    async def on_closed(entry: mf.FileEntry) -> None:
        closed.append(entry)

    async def nothing(_: object) -> None:
        return None

    recording = RoomRecording("c-1", tmp_path, on_file_opened=nothing, on_file_closed=on_closed,
                              on_failure=lambda _: None, request_keyframe=nothing)
    recording.publication_added({"id": "mic", "participant_id": "p-1", "source": "microphone",
                                 "kind": "audio", "codec": "opus", "clock_rate": 48000})
    recording.allow({"p-1"})
    start = time.time() - 5.0
    for i in range(50):
        arrival = start + i * 0.02 + (0.06 if i == 0 else 0.0)
        recording.packet("mic", 1000 + i, 960 * i, True, SILENCE, arrival)
    await recording.close()

    (entry,) = closed
    last_arrival = start + 49 * 0.02
    assert entry.started_at == start + 0.06
    assert entry.ended_at == recording.last_arrival == last_arrival
    assert entry.duration_s == 0.98  # the media itself: 49 packets of 20 ms after the first
    with av.open(str(tmp_path / entry.name)) as container:
        packets = [p for p in container.demux() if p.size]
    assert len(packets) == 50
