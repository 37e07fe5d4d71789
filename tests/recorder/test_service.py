"""recorder/service.py: the Recorder's locks. A write that fails (the disk is full) while the
host ends the consultation or stops the recording must not deadlock the two: the session's
``close()`` never waits for the failure handler that wants the consultation's lock.

The relay here is a stand-in that hands the recorder's sink Opus packets (a real RoomRecording,
real files, the failure injected at the file layer); the end-to-end recording through the real
relay is tests/recorder/test_recording.py."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recorder import manifest as mf
from recorder import writer
from recorder.service import Recorder
from tests.recorder.recordings import Microphone

CID = "c-1"
@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it and every later write into a recorded file fails with ENOSPC, as a full disk
    does (PyAV holds on to the file object's ``write`` from the moment the file opens)."""
    full = [False]
    real_write = writer._SyncedFile.write

    def write(self: Any, data: Any) -> int:
        if full[0]:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(writer._SyncedFile, "write", write)

    def fill() -> None:
        full[0] = True
    return fill


async def recording(tmp_path: Path, relay: Microphone) -> tuple[Recorder, list[dict[str, Any]]]:
    shown: list[dict[str, Any]] = []

    async def describe(consultation_id: str) -> None:
        return None

    async def notify(consultation_id: str, state: dict[str, Any]) -> None:
        shown.append(state)

    recorder = Recorder(tmp_path / "archive", relay_for=lambda cid: relay,  # type: ignore[arg-type,return-value]
                        describe=describe, notify=notify, cluster_ms=20)
    state = await recorder.joined(CID, "always", "cardio1", "c1")
    assert state["status"] == "on"
    relay.speak(5)
    for _ in range(200):
        manifest = recorder.manifest_of(CID)
        if manifest is not None and manifest.files:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("no file opened")
    return recorder, shown


@pytest.mark.parametrize("host", ["ends the consultation", "stops the recording"])
async def test_a_write_failing_while_the_host_ends_or_stops_does_not_hang(
    tmp_path: Path, full_disk: Callable[[], None], host: str,
) -> None:
    relay = Microphone(spacing_s=0.02)
    recorder, shown = await recording(tmp_path, relay)

    def fail_now() -> None:
        # The host holds the consultation's lock; a packet still in flight fails to write.
        full_disk()
        relay.speak(100)
        assert relay.sink.failed

    relay.on_detach = fail_now
    if host == "ends the consultation":
        await asyncio.wait_for(recorder.ended(CID), 10)
    else:
        stopped = await asyncio.wait_for(recorder.stop(CID, "cardio1"), 10)
        assert stopped["status"] == "failed"
        assert shown[-1]["status"] == "failed"
    await asyncio.wait_for(recorder.close(), 10)

    data = mf.load(recorder.manifest_path(CID))
    assert data.recording.error == "cannot write cardio1-camera-1.webm: No space left on device"
    assert data.recording.status == "failed"
    assert [f.status for f in data.files] == ["failed"]
    assert [e.event for e in data.recording.events] == ["started", "failed", "stopped"]
    assert not (recorder.manifest_path(CID).parent / mf.RECORDING_MARKER).exists()


async def test_a_write_failing_while_recording_stops_the_session_and_shows_it(
    tmp_path: Path, full_disk: Callable[[], None],
) -> None:
    relay = Microphone(spacing_s=0.02)
    recorder, shown = await recording(tmp_path, relay)
    full_disk()
    relay.speak(100)
    for _ in range(500):
        if shown[-1]["status"] == "failed":
            break
        await asyncio.sleep(0.01)
    assert shown[-1]["status"] == "failed", shown[-1]
    assert relay.sink is None, "the failed session was not detached"
    assert recorder.state(CID)["status"] == "failed"
    await asyncio.wait_for(recorder.ended(CID), 10)
    data = mf.load(recorder.manifest_path(CID))
    assert data.recording.status == "failed"
    assert [e.event for e in data.recording.events] == ["started", "failed", "stopped"]
