"""A recording in progress across a relay move and across a restart of the server: it goes on
in new files and the manifest records the gap (``recording.gaps``) with its times.

The relays are real LocalRelays on 127.0.0.1 with real aiortc participants publishing
counter-stamped video and a tone; the recorder is the real one, each part is decoded back with
PyAV. A "restart" is what the server does around its recorder: ``close()`` on the old one (a
stop) or nothing at all (a kill), then a new Recorder on the same archive: ``restore()``, and
the participants' joins. Meanwhile the relay (a standalone node in production) keeps the
media flowing."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config.settings import load_settings
from recorder import manifest as mf
from recorder.archive import verify_archive
from recorder.consent import NOTHING, ConsentMachine, Decision
from recorder.service import Recorder
from relay.api import Relay
from relay.remote import RemoteRelay
from telehealth.startup import SERVICES
from tests.consultation_media import open_consultation, start_media, start_node
from tests.failover_client import participants
from tests.failover_processes import Cluster
from tests.media import MediaPeer, wait_for
from tests.recorder.media_check import decode, dominant_hz
from tests.recorder.recordings import Microphone, file_entry
from tests.relay.peers import ROOM, relay_room
from tests.support import clients, run_server, write_config

CID = ROOM
"""The recorder records the room named after the consultation."""
FPS = 15
TONE = 660.0


def recorder_on(archive: Path, relay_for: Callable[[str], Relay | None]) -> Recorder:
    async def describe(consultation_id: str) -> None:
        return None

    async def notify(consultation_id: str, state: dict[str, Any]) -> None:
        pass

    return Recorder(archive, relay_for=relay_for, describe=describe, notify=notify,
                    cluster_ms=200, fsync_interval_s=0.5)


def manifest(recorder: Recorder) -> mf.Manifest:
    found = recorder.manifest_of(CID)
    assert found is not None
    return found


def on_disk(archive: Path) -> mf.Manifest:
    return mf.load(archive / CID / mf.MANIFEST)


def camera_files(data: mf.Manifest, participant: str = "cardio1") -> list[mf.FileEntry]:
    return [f for f in data.files if f.participant_id == participant and f.source == "camera"]


def check_part(archive: Path, entry: mf.FileEntry, *, seconds: float) -> float:
    """The part decodes: ``seconds`` of video at least, every frame in order, the tone; returns
    the wall-clock arrival of its last video frame."""
    decoded = decode(archive / CID / entry.name)
    assert decoded.errors == 0, entry.name
    counters = decoded.counters
    assert len(counters) >= seconds * FPS, (entry.name, len(counters))
    assert counters == sorted(counters), entry.name
    assert len(counters) >= 0.95 * (counters[-1] - counters[0] + 1), entry.name
    assert abs(dominant_hz(decoded.samples, decoded.sample_rate) - TONE) <= 5, entry.name
    return entry.started_at + decoded.video_pts[-1]


async def test_a_recording_goes_on_across_a_relay_move(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    async with relay_room() as first, relay_room() as second:
        placed: dict[str, Relay] = {"relay": first.relay}
        recorder = recorder_on(archive, lambda cid: placed["relay"])
        try:
            state = await recorder.joined(CID, "always", "cardio1", "c1")
            assert state["status"] == "on"
            peer = await first.join("cardio1", subscribe=False, audio_hz=TONE)
            await wait_for(lambda: bool(camera_files(manifest(recorder))), 15, "the first file")
            await asyncio.sleep(2.0)

            # The relay goes silent: no more media from here; signaling notices 1.5 s later
            # (heartbeat 0.5 s x 3), moves the consultation and tells the recorder.
            cut_at = time.time()
            await peer.close()
            await asyncio.sleep(1.5)
            placed["relay"] = second.relay
            await recorder.relay_changed(CID, lost_at=time.time(), reason="relay_lost")
            assert recorder.state(CID)["status"] == "on"  # still on, across the move
            moving = manifest(recorder).recording
            assert [(g.reason, g.to) for g in moving.gaps] == [("relay_lost", None)]
            assert abs(moving.gaps[0].from_ - cut_at) <= 0.5, (moving.gaps[0], cut_at)

            # The participant's client reaches the new relay (media:moved, media:join).
            await asyncio.sleep(0.5)
            back_at = time.time()
            await second.join("cardio1", subscribe=False, audio_hz=TONE)
            await wait_for(lambda: len(camera_files(manifest(recorder))) == 2, 15,
                           "a file from the new relay")
            await asyncio.sleep(2.0)
            await recorder.ended(CID)
        finally:
            await recorder.close()

    data = on_disk(archive)
    (gap,) = data.recording.gaps
    before, after = camera_files(data)
    print(f"cut at {cut_at:.3f}, back at {back_at:.3f} (outage {back_at - cut_at:.2f} s); "
          f"gap {gap.from_:.3f} -> {gap.to} ({(gap.to or 0) - gap.from_:.2f} s)")
    assert gap.reason == "relay_lost"
    assert gap.to is not None
    # The gap is the outage: from the last packet written (media stopped at the cut) to the
    # first one written from the new relay (its connection, then the first keyframe).
    assert abs(gap.from_ - cut_at) <= 0.5
    assert back_at <= gap.to <= back_at + 2.0
    assert abs((gap.to - gap.from_) - (back_at - cut_at)) <= 1.5
    assert gap.to == after.started_at
    assert abs(check_part(archive, before, seconds=1.5) - gap.from_) <= 0.5
    check_part(archive, after, seconds=1.5)
    assert [e.event for e in data.recording.events] == [
        "started", "relay_changed", "started", "stopped"]
    assert data.recording.status == "complete"
    assert {f.status for f in data.files} == {"complete"}
    report = verify_archive(archive)
    assert report.ok, report.problems


@pytest.mark.parametrize("policy", ["always", "with_consent"])
async def test_a_recording_resumes_after_the_server_restarts(tmp_path: Path,
                                                             policy: str) -> None:
    """``always``: the participants are back before their node has dialed in again (no relay
    for the consultation yet): recording resumes by itself once the node is there.
    ``with_consent``: the consents on file hold; a late joiner who had not answered is still
    not recorded, and does not hold the others' recording back."""
    archive = tmp_path / "archive"
    async with relay_room() as node:
        before = recorder_on(archive, lambda cid: node.relay)
        try:
            await before.joined(CID, policy, "cardio1", "c1")
            await before.joined(CID, policy, "ref1", "d1")
            if policy == "with_consent":
                for clinician in ("cardio1", "ref1"):
                    await before.consent(CID, clinician, True)
                # A late joiner who has not answered yet: recording goes on without them.
                await before.joined(CID, policy, "ref2", "d2")
            assert before.state(CID)["status"] == "on"
            await node.join("cardio1", subscribe=False, audio_hz=TONE)
            await wait_for(lambda: bool(camera_files(manifest(before))), 15, "the first file")
            await asyncio.sleep(2.0)
            stopped_at = time.time()
        finally:
            await before.close()  # serve stops; the node keeps the media flowing

        stopped = on_disk(archive)
        assert stopped.recording.events[-1].event == "interrupted"
        assert [(g.reason, g.to) for g in stopped.recording.gaps] == [
            ("signaling_restart", None)]
        assert not (archive / CID / mf.RECORDING_MARKER).exists()
        await asyncio.sleep(1.0)  # the new process starts

        adopted: dict[str, Relay | None] = {
            "relay": None if policy == "always" else node.relay}
        after = recorder_on(archive, lambda cid: adopted["relay"])
        try:
            assert await after.restore() == []  # a stop, not a kill: nothing to mark
            rejoined_at = time.time()
            order = ("ref2", "cardio1", "ref1") if policy == "with_consent" else (
                "cardio1", "ref1")
            for clinician in order:
                state = await after.joined(CID, policy, clinician, "c1")
            assert state["status"] == "on", state
            if policy == "with_consent":
                answers = {a["clinician_id"]: a["answer"] for a in state["consent"]}
                assert answers == {"cardio1": "agreed", "ref1": "agreed", "ref2": "pending"}
            else:
                await asyncio.sleep(1.5)
                assert manifest(after).recording.open_gap() is not None
                rejoined_at = time.time()  # the node dials in and is adopted
                adopted["relay"] = node.relay
            await wait_for(lambda: len(camera_files(manifest(after))) == 2, 15,
                           "a file after the restart")
            await asyncio.sleep(2.0)
            await after.ended(CID)
        finally:
            await after.close()

    data = on_disk(archive)
    (gap,) = data.recording.gaps
    first, second = camera_files(data)
    print(f"{policy}: stopped at {stopped_at:.3f}, rejoined at {rejoined_at:.3f}; "
          f"gap {gap.from_:.3f} -> {gap.to} ({(gap.to or 0) - gap.from_:.2f} s)")
    assert gap.reason == "signaling_restart"
    assert gap.to is not None
    assert abs(gap.from_ - stopped_at) <= 0.5
    assert rejoined_at <= gap.to <= rejoined_at + 2.5
    assert gap.to == second.started_at
    assert abs(check_part(archive, first, seconds=1.5) - gap.from_) <= 0.5
    check_part(archive, second, seconds=1.5)
    assert {f.participant_id for f in data.files} == {"cardio1"}  # only cardio1 publishes
    assert [e.event for e in data.recording.events] == [
        "started", "interrupted", "started", "stopped"]
    assert data.recording.status == "complete"
    report = verify_archive(archive)
    assert report.ok, report.problems


async def test_a_recording_the_host_stopped_does_not_restart(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    async with relay_room() as node:
        before = recorder_on(archive, lambda cid: node.relay)
        try:
            await before.joined(CID, "always", "cardio1", "c1")
            await node.join("cardio1", subscribe=False, audio_hz=TONE)
            await wait_for(lambda: bool(camera_files(manifest(before))), 15, "the first file")
            await asyncio.sleep(1.0)
            assert (await before.stop(CID, "cardio1"))["status"] == "stopped"
        finally:
            await before.close()
        assert on_disk(archive).recording.host_stopped

        after = recorder_on(archive, lambda cid: node.relay)
        try:
            await after.restore()
            state = await after.joined(CID, "always", "cardio1", "c1")
            assert state["status"] == "stopped"
            await asyncio.sleep(2.0)  # media flows on the node all along
            assert len(manifest(after).files) == 1
            # The host's word alone starts it again.
            assert (await after.start(CID, "cardio1"))["status"] == "on"
            assert not manifest(after).recording.host_stopped
            await wait_for(lambda: len(manifest(after).files) == 2, 15, "the host's restart")
            await after.ended(CID)
        finally:
            await after.close()
    data = on_disk(archive)
    assert data.recording.gaps == []
    assert [e.event for e in data.recording.events] == [
        "started", "stopped", "requested", "started", "stopped"]


async def test_a_decline_before_the_restart_still_holds_after_it(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    async with relay_room() as node:
        before = recorder_on(archive, lambda cid: node.relay)
        try:
            for clinician in ("cardio1", "ref1"):
                await before.joined(CID, "with_consent", clinician, "c1")
            await before.consent(CID, "cardio1", True)
            assert (await before.consent(CID, "ref1", False))["status"] == "declined"
        finally:
            await before.close()
        after = recorder_on(archive, lambda cid: node.relay)
        try:
            await after.restore()
            for clinician in ("cardio1", "ref1"):
                state = await after.joined(CID, "with_consent", clinician, "c1")
            assert state["status"] == "declined"
            await after.ended(CID)
        finally:
            await after.close()
    data = on_disk(archive)
    assert data.files == [] and data.recording.gaps == []
    assert data.recording.status == "declined"


async def test_killed_while_recording_the_gap_starts_at_the_last_packet_on_disk(
    tmp_path: Path, clip: tuple[Path, list[dict[str, Any]]],
) -> None:
    """kill -9 leaves a file cut short, the marker and a manifest saying ``recording``; the
    restarted recorder marks it interrupted and opens the gap where the file ends. When the
    consultation ends before the media is back, the gap stays open (``to`` null)."""
    archive = tmp_path / "archive"
    directory = archive / CID
    directory.mkdir(parents=True)
    shutil.copyfile(clip[0], directory / "cardio1-camera-1.webm")
    started_at = time.time() - 60
    data = mf.new_manifest(CID)
    data.recording.status = "recording"
    data.recording.started_at = started_at
    data.recording.events.append(mf.RecordingEvent(at=started_at, event="started",
                                                   by="cardio1"))
    data.files = [file_entry(directory, "cardio1-camera-1.webm", "cardio1",
                             started_at=started_at, seconds=1.0, tracks=clip[1],
                             status="recording")]
    mf.write_atomic(directory / mf.MANIFEST, data)
    (directory / mf.RECORDING_MARKER).touch()

    recorder = recorder_on(archive, lambda cid: None)  # the node has not dialed in yet
    try:
        assert await recorder.restore() == [CID]
        (gap,) = on_disk(archive).recording.gaps
        assert gap.reason == "signaling_restart" and gap.to is None
        assert started_at + 0.8 <= gap.from_ <= started_at + 1.1, gap.from_ - started_at
        state = await recorder.joined(CID, "always", "cardio1", "c1")
        assert state["status"] == "on"  # resuming as soon as the relay is back
        await recorder.ended(CID)
    finally:
        await recorder.close()
    ended = on_disk(archive)
    assert [(g.from_, g.to) for g in ended.recording.gaps] == [(gap.from_, None)]
    assert ended.recording.status == "interrupted"
    assert [e.event for e in ended.recording.events] == ["started", "interrupted"]
    assert not (directory / mf.RECORDING_MARKER).exists()
    report = verify_archive(archive)
    assert report.ok, report.problems


def test_verify_counts_the_gaps_and_refuses_one_that_ends_before_it_starts(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "archive"
    data = mf.new_manifest(CID)
    data.recording.gaps = [mf.Gap.starting(100.0, "relay_drained"),
                           mf.Gap.starting(200.0, "signaling_restart")]
    data.recording.gaps[0].to = 101.5
    mf.write_atomic(archive / CID / mf.MANIFEST, data)
    report = verify_archive(archive)
    assert report.ok and report.gaps == 2, report.problems
    data.recording.gaps[1].to = 150.0
    mf.write_atomic(archive / CID / mf.MANIFEST, data)
    report = verify_archive(archive)
    assert report.problems == [f"{CID}/manifest.json: recording gap 2 (signaling_restart) "
                               "ends before it starts"]


async def test_a_recording_goes_on_when_its_relay_node_dies(tmp_path: Path) -> None:
    """Through the real server: the consultation on a standalone node (a subprocess), the node
    killed, signaling moves the consultation to the embedded relay and tells the recorder
    (``relay_changed``, ``relay_lost``); the participants rebuild their media there."""
    config = write_config(tmp_path, recording={"policy": "always"})
    names = ("cardio1", "ref1")
    tones = {"cardio1": TONE, "ref1": 440.0}
    async with run_server(config) as server:
        services = server.app[SERVICES]
        node = start_node(config, server.url, services.tokens.issue_node("relay-node-1"),
                          region="11")  # ref1's site d1 is in province 11
        peers: list[MediaPeer] = []
        try:
            await wait_for(lambda: any(isinstance(r, RemoteRelay)
                                       for r in services.relays.relays()), 20, "the node")
            async with clients(server.url, {n: server.token(n) for n in names}) as c:
                cid = await open_consultation(c, guests=("ref1",))
                assert isinstance(services.relays.for_room(cid), RemoteRelay)
                directory = server.settings.archive_dir() / cid

                def files() -> list[mf.FileEntry]:
                    return mf.load(directory / mf.MANIFEST).files

                peers = [await start_media(c[n], cid, audio_hz=tones[n]) for n in names]
                await wait_for(lambda: len(files()) == 2, 20, "files of the node's media")
                await asyncio.sleep(2.0)
                killed_at = time.time()
                node.kill()
                for name in names:
                    moved = await c[name].next_matching(
                        "media:moved", lambda m: m["relay"] is not None, 10)
                    assert moved["relay"]["embedded"], moved
                for peer in peers:
                    await peer.close()
                back_at = time.time()
                peers = [await start_media(c[n], cid, audio_hz=tones[n]) for n in names]
                await wait_for(lambda: len(files()) == 4, 20, "files from the embedded relay")
                await asyncio.sleep(2.0)
                for peer in peers:
                    await peer.close()
                await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                      "conclusion": "ok"})
        finally:
            for peer in peers:
                await peer.close()
            node.kill()
            node.wait(timeout=10)
    data = mf.load(directory / mf.MANIFEST)
    (gap,) = data.recording.gaps
    print(f"node killed at {killed_at:.3f}, media rebuilt from {back_at:.3f}; gap "
          f"{gap.from_:.3f} -> {gap.to} ({(gap.to or 0) - gap.from_:.2f} s)")
    assert gap.reason == "relay_lost"
    assert gap.to is not None
    assert killed_at - 1.0 <= gap.from_ <= killed_at + 0.2
    assert back_at <= gap.to <= back_at + 3.0
    for name in names:
        before, after = [f for f in data.files if f.participant_id == name]
        assert before.status == after.status == "complete"
        assert abs(before.started_at + (before.duration_s or 0) - gap.from_) <= 0.5
        assert after.started_at >= gap.to
        for part in (before, after):
            decoded = decode(directory / part.name)
            assert len(decoded.counters) >= 1.5 * FPS, (part.name, len(decoded.counters))
            assert abs(dominant_hz(decoded.samples, decoded.sample_rate) - tones[name]) <= 5
    assert data.recording.status == "complete"
    report = verify_archive(server.settings.archive_dir())
    assert report.ok, report.problems


@pytest.mark.parametrize("how", ["killed", "stopped"])
async def test_a_recording_resumes_when_serve_restarts_and_its_node_kept_the_media(
    tmp_path: Path, how: str,
) -> None:
    """Real processes (tests/failover_processes.py): `serve` killed (or stopped) while it
    records a consultation on a standalone node; the node keeps the media flowing and redials;
    the restarted `serve` adopts the room, the participants (tests/failover_client.py) resume,
    and recording goes on in new files with the gap in the manifest."""
    async with Cluster(tmp_path, sections={"recording": {"policy": "always"}}) as cluster:
        await cluster.start_serve()
        await cluster.start_node("relay-home", "11")
        archive = load_settings(cluster.config).archive_dir()
        parts = await participants(cluster.url, {n: cluster.token(n)
                                                 for n in ("cardio1", "ref1")}, fps=FPS)
        try:
            cid = await open_consultation(dict(parts), guests=("ref1",))
            for part in parts.values():
                await part.start(cid)
            directory = archive / cid

            def files() -> list[mf.FileEntry]:
                return mf.load(directory / mf.MANIFEST).files

            await wait_for(lambda: len(files()) == 2, 20, "files of the node's media")
            await asyncio.sleep(2.0)
            cut_at = time.time()
            if how == "killed":
                cluster.kill_serve()
            else:
                code, took = await cluster.stop_serve(within=15.0)
                assert code == 0, (code, took)
            await asyncio.sleep(1.0)
            restart_at = time.time()
            await cluster.start_serve()
            await wait_for(lambda: len(files()) == 4, 30, "files after the restart")
            ready_at = time.time()
            await asyncio.sleep(2.0)
            await parts["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                      "conclusion": "ok"})
            assert all(p.builds(after=0) == 1 for p in parts.values())  # media never rebuilt
        finally:
            for part in parts.values():
                await part.close()
    data = mf.load(directory / mf.MANIFEST)
    (gap,) = data.recording.gaps
    print(f"{how}: serve cut at {cut_at:.3f}, started again at {restart_at:.3f}, both files "
          f"back by {ready_at:.3f}; gap {gap.from_:.3f} -> {gap.to} "
          f"({(gap.to or 0) - gap.from_:.2f} s)")
    assert gap.reason == "signaling_restart"
    assert gap.to is not None
    # A kill leaves on disk what was written up to the last cluster (and fsync): < 2 s.
    assert cut_at - (2.0 if how == "killed" else 0.5) <= gap.from_ <= cut_at + 0.2
    assert restart_at < gap.to <= ready_at
    assert [e.event for e in data.recording.events][:3] == ["started", "interrupted",
                                                            "started"]
    for name in ("cardio1", "ref1"):
        before, after = [f for f in data.files if f.participant_id == name]
        assert before.status == ("interrupted" if how == "killed" else "complete")
        assert after.status == "complete"
        for part in (before, after):
            decoded = decode(directory / part.name)
            assert len(decoded.counters) >= 1.5 * FPS, (part.name, len(decoded.counters))
    assert data.recording.status == ("interrupted" if how == "killed" else "complete")
    report = verify_archive(archive)
    assert report.ok, report.problems


async def test_a_move_through_the_waiting_state_resumes_once_a_relay_takes_it(
    tmp_path: Path,
) -> None:
    """relay_changed while no relay has room (placement None): the gap opens at the last
    packet, recording shows on and resumes by itself once a relay takes the consultation."""
    archive = tmp_path / "archive"
    first, second = Microphone(), Microphone()
    placed: dict[str, Microphone | None] = {"relay": first}
    recorder = recorder_on(archive, lambda cid: placed["relay"])  # type: ignore[arg-type,return-value]
    try:
        await recorder.joined(CID, "always", "cardio1", "c1")
        first.speak(10)
        await wait_for(lambda: bool(manifest(recorder).files), 5, "the first file")
        last = time.time()
        placed["relay"] = None
        await recorder.relay_changed(CID, lost_at=last + 1.5, reason="relay_lost")
        assert recorder.state(CID)["status"] == "on"
        (gap,) = manifest(recorder).recording.gaps
        # At the last packet's arrival, where the file ends (ten packets that came at once,
        # 0.2 s of sound on its timeline).
        (written,) = manifest(recorder).files
        assert gap.to is None and written.ended_at is not None
        assert abs(gap.from_ - written.ended_at) <= 0.001 and abs(gap.from_ - last) <= 0.1
        await asyncio.sleep(1.2)  # still no relay: the retry finds none
        placed["relay"] = second
        await wait_for(lambda: second.sink is not None, 3, "the retry attaching")
        back = time.time()

        def speaking() -> bool:
            second.speak(2)
            return len(manifest(recorder).files) == 2

        await wait_for(speaking, 5, "the second file")
        await recorder.ended(CID)
    finally:
        await recorder.close()
    (gap,) = on_disk(archive).recording.gaps
    assert gap.to is not None and back <= gap.to <= back + 0.5


# -- the consent machine across a break (recorder/consent.py, no media) --------------------

def machine_recording(policy: str = "with_consent") -> ConsentMachine:
    machine = ConsentMachine(policy)
    for clinician in ("cardio1", "ref1"):
        machine.join(clinician, "c1")
        machine.answer(clinician, True, 1.0)
    assert machine.decide().start
    machine.session_started(2.0)
    return machine


def test_a_suspended_recording_shows_on_and_asks_for_a_new_session() -> None:
    machine = machine_recording()
    machine.suspend()
    assert machine.status() == "on"
    assert machine.decide() == Decision(start=True, allow=frozenset({"cardio1", "ref1"}))


@pytest.mark.parametrize("meanwhile", ["host stops", "a decline", "a failure", "the end"])
def test_a_suspension_ends_for_good_on_a_stop_a_decline_a_failure_or_the_end(
    meanwhile: str,
) -> None:
    machine = machine_recording()
    machine.suspend()
    if meanwhile == "host stops":
        machine.host_stop()
    elif meanwhile == "a decline":
        machine.answer("ref1", False, 3.0)
    elif meanwhile == "a failure":
        machine.failure("disk full")
    else:
        machine.ended()  # the recorder forgets the consultation after this
        assert not machine.suspended
        return
    assert not machine.suspended
    assert not machine.decide().start
    assert machine.status() != "on"


def test_after_a_restart_the_consents_on_file_hold_and_a_host_stop_holds() -> None:
    machine = ConsentMachine("with_consent")
    machine.answers = {"cardio1": ("agreed", 1.0), "ref1": ("agreed", 1.0)}
    machine.resume_after_restart(host_stopped=False, error=None)
    machine.join("ref2", "d2")  # had not answered before the restart
    assert machine.decide() == NOTHING  # nobody agreed is back yet
    assert machine.join("cardio1", "c1") == Decision(start=True,
                                                     allow=frozenset({"cardio1"}))
    stopped = ConsentMachine("always")
    stopped.resume_after_restart(host_stopped=True, error=None)
    assert stopped.join("cardio1", "c1") == NOTHING
    assert stopped.status() == "stopped"
    failed = ConsentMachine("always")
    failed.resume_after_restart(host_stopped=False, error="disk full")
    assert failed.join("cardio1", "c1") == NOTHING
    assert failed.status() == "failed"


@pytest.mark.parametrize("reason", ["relay_drained", "relay_lost"])
async def test_a_drained_relay_is_told_the_recorder_left_a_lost_one_is_not_waited_for(
    tmp_path: Path, reason: mf.GapReason,
) -> None:
    """A draining relay still forwards until its participants have moved: the recorder
    detaches from it. A lost one is not asked (a silent node would hold the move)."""
    first, second = Microphone(), Microphone()
    placed: dict[str, Microphone] = {"relay": first}
    recorder = recorder_on(tmp_path / "archive", lambda cid: placed["relay"])  # type: ignore[arg-type,return-value]
    try:
        await recorder.joined(CID, "always", "cardio1", "c1")
        first.speak(10)
        await wait_for(lambda: bool(manifest(recorder).files), 5, "the first file")
        placed["relay"] = second
        await recorder.relay_changed(CID, reason=reason)
        assert (first.sink is None) == (reason == "relay_drained")
        assert second.sink is not None
        assert [g.reason for g in manifest(recorder).recording.gaps] == [reason]
        await recorder.ended(CID)
    finally:
        await recorder.close()


async def test_participants_rejoining_at_once_after_a_restart_share_one_recording(
    tmp_path: Path,
) -> None:
    """Both clients of a restarted server rejoin in the same instant: the manifest is loaded
    once, one session records them both (two loads raced once: two sessions, one of them
    orphaned with cardio1's consent, and cardio1 was never recorded again)."""
    archive = tmp_path / "archive"
    relay = Microphone()
    before = recorder_on(archive, lambda cid: relay)  # type: ignore[arg-type,return-value]
    try:
        for clinician in ("cardio1", "ref1"):
            await before.joined(CID, "with_consent", clinician, "c1")
            await before.consent(CID, clinician, True)
        relay.speak(10)
        await wait_for(lambda: bool(manifest(before).files), 5, "the first file")
    finally:
        await before.close()
    relay.attached = 0
    after = recorder_on(archive, lambda cid: relay)  # type: ignore[arg-type,return-value]
    try:
        await asyncio.gather(*(after.joined(CID, "with_consent", clinician, "c1")
                               for clinician in ("cardio1", "ref1")))
        state = after.state(CID)
        assert state["status"] == "on"
        assert [a["clinician_id"] for a in state["consent"]] == ["cardio1", "ref1"]
        assert relay.attached == 1
        await after.ended(CID)
    finally:
        await after.close()
