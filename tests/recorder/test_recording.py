"""Recording a consultation end to end: the real server with its embedded relay and recorder,
real aiortc participants publishing counter-stamped video and a tone over 127.0.0.1, the files
decoded back with PyAV."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from config.settings import load_settings
from recorder import manifest as mf
from recorder.archive import verify_archive
from relay.remote import RemoteRelay
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from telehealth.startup import SERVICES
from tests.consultation_media import open_consultation, start_media, start_node, stop_node
from tests.media import MediaPeer, wait_for
from tests.recorder.media_check import decode, dominant_hz
from tests.support import (
    SECRET,
    Client,
    Server,
    clients,
    run_server,
    start_server_process,
    write_config,
)

FPS = 15
TONES = {"cardio1": 660.0, "ref1": 440.0, "ref2": 550.0}


@pytest.fixture
def config_path(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    policy = getattr(request, "param", "always")
    return write_config(tmp_path, recording={"policy": policy})


def archive_of(server: Server, cid: str) -> Path:
    return server.settings.archive_dir() / cid


def manifest_of(server: Server, cid: str) -> mf.Manifest:
    return mf.load(archive_of(server, cid) / mf.MANIFEST)


async def peers_for(c: dict[str, Client], cid: str, names: tuple[str, ...],
                    codec: str | None = None) -> dict[str, MediaPeer]:
    return {n: await start_media(c[n], cid, video_codec=codec, audio_hz=TONES[n])
            for n in names}


async def close_all(peers: dict[str, MediaPeer]) -> None:
    for peer in peers.values():
        await peer.close()


def files_of(manifest: mf.Manifest, participant: str) -> list[mf.FileEntry]:
    return [f for f in manifest.files if f.participant_id == participant]


async def recording_on(client: Client, cid: str, timeout: float = 10.0) -> dict[str, Any]:
    state: dict[str, Any] = await client.next_matching(
        "recording:state", lambda s: s["consultation_id"] == cid and s["status"] == "on",
        timeout)
    return state


@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_two_participants_are_recorded_without_transcoding(server: Server,
                                                                 codec: str) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        await recording_on(c["ref1"], cid)
        peers = await peers_for(c, cid, names, codec)
        try:
            await wait_for(lambda: all(
                (v := p.video_from(o)) is not None and len(v.counters) >= 4 * FPS
                for n, p in peers.items() for o in names if o != n), 30, "media flowing")
            sent_before_end = {n: p.video.count for n, p in peers.items() if p.video}
            ended = await c["cardio1"].ok("consult:end", {
                "consultation_id": cid, "conclusion": "Recorded; follow up in a week."})
            assert ended["consultation"]["state"] == "ended"
        finally:
            await close_all(peers)

    manifest = manifest_of(server, cid)
    assert manifest.recording.status == "complete"
    assert manifest.recording.policy == "always"
    assert manifest.minutes["conclusion"] == "Recorded; follow up in a week."
    assert {s["id"] for s in manifest.sites} == {"c1", "d1"}
    assert {a["clinician_id"] for a in manifest.attendance} == set(names)
    assert manifest.request["specialty"] == "cardiology"
    assert manifest.retention.years == 10
    for name in names:
        (entry,) = files_of(manifest, name)
        path = archive_of(server, cid) / entry.name
        assert entry.status == "complete"
        assert entry.sha256 == mf.sha256_file(path)
        assert entry.bytes == path.stat().st_size
        assert path.suffix == (".webm" if codec == "vp8" else ".mkv")
        assert [t.codec for t in entry.tracks] == [codec, "opus"]
        decoded = decode(path)
        assert decoded.errors == 0
        assert (decoded.width, decoded.height) == (320, 240)
        # Every frame from the first recorded one on, in order; within 5 % of what was sent
        # over the same span.
        counters = decoded.counters
        span = counters[-1] - counters[0] + 1
        assert len(counters) >= 0.95 * span, (len(counters), span)
        assert counters == sorted(counters)
        assert counters[-1] >= sent_before_end[name] - FPS, (counters[-1], sent_before_end)
        assert decoded.keyframes >= 1
        # Duration: what the counters say was sent, within 0.5 s (file and manifest).
        sent_s = (counters[-1] - counters[0]) / FPS
        assert abs(decoded.video_seconds - sent_s) <= 0.5, (decoded.video_seconds, sent_s)
        assert abs(entry.duration_s - sent_s) <= 0.5, (entry.duration_s, sent_s)
        # Audio: present over the same span, at the publisher's pitch, aligned with the video.
        assert abs(decoded.audio_seconds - decoded.video_seconds) <= 0.5
        assert decoded.audio_start is not None
        assert abs(decoded.audio_start - decoded.video_pts[0]) <= 0.5
        assert abs(dominant_hz(decoded.samples, decoded.sample_rate) - TONES[name]) <= 5
    report = verify_archive(server.settings.archive_dir())
    assert report.ok, report.problems


async def test_a_screen_share_goes_into_its_own_file(server: Server) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        peers = await peers_for(c, cid, names)

        async def call(command: str, payload: dict[str, Any]) -> dict[str, Any]:
            return await c["ref1"].ok(f"media:{command}", {"consultation_id": cid, **payload})

        screen = MediaPeer("ref1-screen", call)
        try:
            await wait_for(lambda: len(manifest_of(server, cid).files) == 2, 15, "files")
            await screen.publish(audio=False, source="screen")
            await wait_for(lambda: len(files_of(manifest_of(server, cid), "ref1")) == 2, 15,
                           "the screen's file")
            await asyncio.sleep(2.0)
            await c["ref1"].ok("media:unpublish", {"consultation_id": cid, "source": "screen"})
            await wait_for(lambda: any(
                f.source == "screen" and f.status == "complete"
                for f in manifest_of(server, cid).files), 10, "the screen's file closed")
        finally:
            await screen.close()
            await close_all(peers)
        await c["cardio1"].ok("consult:end", {"consultation_id": cid, "conclusion": "ok"})
    manifest = manifest_of(server, cid)
    by_source = {f.source: f for f in files_of(manifest, "ref1")}
    assert set(by_source) == {"camera", "screen"}
    assert [t.kind for t in by_source["screen"].tracks] == ["video"]
    assert [t.kind for t in by_source["camera"].tracks] == ["video", "audio"]
    # The camera file went on while the screen came and went.
    assert by_source["camera"].status == "complete"
    decoded = decode(archive_of(server, cid) / by_source["screen"].name)
    assert len(decoded.counters) >= 1.5 * FPS
    assert decoded.audio == []


async def test_a_consultation_on_a_standalone_relay_node_is_recorded(tmp_path: Path) -> None:
    config = write_config(tmp_path, recording={"policy": "always"})
    names = ("cardio1", "ref1")
    async with run_server(config) as server:
        services = server.app[SERVICES]
        node = start_node(config, server.url, services.tokens.issue_node("relay-node-1"),
                          region="11")  # ref1's site d1 is in province 11
        try:
            await wait_for(lambda: any(isinstance(r, RemoteRelay)
                                       for r in services.relays.relays()), 20, "the node")
            async with clients(server.url, {n: server.token(n) for n in names}) as c:
                cid = await open_consultation(c, guests=("ref1",))
                assert isinstance(services.relays.for_room(cid), RemoteRelay)
                peers = await peers_for(c, cid, names)
                try:
                    await wait_for(lambda: len(manifest_of(server, cid).files) == 2, 20,
                                   "files of media relayed by the node")
                    await asyncio.sleep(3.0)
                finally:
                    await close_all(peers)
                await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                      "conclusion": "ok"})
        finally:
            await stop_node(node)
    manifest = manifest_of(server, cid)
    assert manifest.recording.status == "complete"
    for name in names:
        (entry,) = files_of(manifest, name)
        decoded = decode(archive_of(server, cid) / entry.name)
        counters = decoded.counters
        assert len(counters) >= 2.5 * FPS
        assert len(counters) >= 0.95 * (counters[-1] - counters[0] + 1)
        assert abs(dominant_hz(decoded.samples, decoded.sample_rate) - TONES[name]) <= 5


async def test_recording_is_shown_and_the_host_stops_and_starts_it(server: Server) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        joined = c["ref1"].drain("recording:state")
        assert joined and joined[-1]["status"] == "on"
        peers = await peers_for(c, cid, names)
        try:
            await wait_for(lambda: len(manifest_of(server, cid).files) == 2, 15, "files")
            await c["ref1"].refused("recording:stop", {"consultation_id": cid}, "forbidden")
            stopped = await c["cardio1"].ok("recording:stop", {"consultation_id": cid})
            assert stopped["recording"]["status"] == "stopped"
            seen = await c["ref1"].next_matching("recording:state",
                                                 lambda s: s["status"] == "stopped")
            assert seen["consultation_id"] == cid
            assert {f.status for f in manifest_of(server, cid).files} == {"complete"}
            await asyncio.sleep(1.0)
            started = await c["cardio1"].ok("recording:start", {"consultation_id": cid})
            assert started["recording"]["status"] == "on"
            # A second part for each participant; the first is never overwritten.
            await wait_for(lambda: len(manifest_of(server, cid).files) == 4, 15, "parts")
            await asyncio.sleep(1.0)
        finally:
            await close_all(peers)
        await c["cardio1"].ok("consult:end", {"consultation_id": cid, "conclusion": "ok"})
    manifest = manifest_of(server, cid)
    events = [e.event for e in manifest.recording.events]
    assert events[:4] == ["started", "stopped", "requested", "started"]
    names_written = sorted(f.name for f in manifest.files)
    assert names_written == ["cardio1-camera-1.webm", "cardio1-camera-2.webm",
                             "ref1-camera-1.webm", "ref1-camera-2.webm"]
    for entry in manifest.files:
        assert entry.status == "complete"
        assert decode(archive_of(server, cid) / entry.name).counters


@pytest.mark.parametrize("config_path", ["with_consent"], indirect=True)
async def test_one_decline_means_nothing_is_recorded(server: Server) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        state = c["ref1"].drain("recording:state")[-1]
        assert state["status"] == "pending"
        assert {a["clinician_id"]: a["answer"] for a in state["consent"]} == {
            "cardio1": "pending", "ref1": "pending"}
        await c["cardio1"].ok("recording:consent", {"consultation_id": cid, "agree": True})
        declined = await c["ref1"].ok("recording:consent", {"consultation_id": cid,
                                                            "agree": False})
        assert declined["recording"]["status"] == "declined"
        on_disk = [(a.clinician_id, a.answer) for a in manifest_of(server, cid).consent]
        assert on_disk == [("cardio1", "agreed"), ("ref1", "declined")]
        await c["cardio1"].next_matching("recording:state", lambda s: s["status"] == "declined")
        peers = await peers_for(c, cid, names)
        try:
            await wait_for(lambda: all((v := p.video_from(o)) is not None
                                       and len(v.counters) >= 2 * FPS
                                       for n, p in peers.items() for o in names if o != n),
                           30, "media flowing")
        finally:
            await close_all(peers)
        await c["cardio1"].ok("consult:end", {"consultation_id": cid, "conclusion": "ok"})
    manifest = manifest_of(server, cid)
    assert manifest.files == []
    assert manifest.recording.status == "declined"
    assert [(a.clinician_id, a.answer) for a in manifest.consent] == [
        ("cardio1", "agreed"), ("ref1", "declined")]
    media = [p for p in archive_of(server, cid).iterdir() if p.suffix in (".webm", ".mkv")]
    assert media == []


@pytest.mark.parametrize("config_path", ["with_consent"], indirect=True)
async def test_a_late_joiner_is_asked_and_recorded_once_they_agree(server: Server) -> None:
    names = ("cardio1", "ref1", "ref2")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        for name in ("cardio1", "ref1"):
            await c[name].ok("recording:consent", {"consultation_id": cid, "agree": True})
        await recording_on(c["ref1"], cid)
        peers = await peers_for(c, cid, ("cardio1", "ref1"))
        try:
            await c["cardio1"].ok("consult:invite", {"consultation_id": cid, "site_id": "d2"})
            joined = await c["ref2"].ok("consult:join", {"consultation_id": cid})
            answers = {a["clinician_id"]: a["answer"] for a in joined["recording"]["consent"]}
            assert answers == {"cardio1": "agreed", "ref1": "agreed", "ref2": "pending"}
            assert joined["recording"]["status"] == "on"
            peers["ref2"] = await start_media(c["ref2"], cid, audio_hz=TONES["ref2"])
            await asyncio.sleep(2.0)
            # Not asked yet: nothing of ref2 is written.
            assert files_of(manifest_of(server, cid), "ref2") == []
            assert len(files_of(manifest_of(server, cid), "ref1")) == 1
            await c["ref2"].ok("recording:consent", {"consultation_id": cid, "agree": True})
            await wait_for(lambda: bool(files_of(manifest_of(server, cid), "ref2")), 10,
                           "ref2's file")
            await asyncio.sleep(2.0)
        finally:
            await close_all(peers)
        await c["cardio1"].ok("consult:end", {"consultation_id": cid, "conclusion": "ok"})
    manifest = manifest_of(server, cid)
    (late,) = files_of(manifest, "ref2")
    decoded = decode(archive_of(server, cid) / late.name)
    assert len(decoded.counters) >= FPS
    assert abs(dominant_hz(decoded.samples, decoded.sample_rate) - TONES["ref2"]) <= 5


async def fetch(session: aiohttp.ClientSession, url: str, token: str
                ) -> tuple[int, bytes]:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.read()


async def test_recordings_only_for_participants_and_admins_and_every_access_audited(
    server: Server
) -> None:
    names = ("cardio1", "ref1")
    async with clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        peers = await peers_for(c, cid, names)
        try:
            await wait_for(lambda: len(manifest_of(server, cid).files) == 2, 15, "files")
            await asyncio.sleep(1.0)
        finally:
            await close_all(peers)
        await c["cardio1"].ok("consult:end", {"consultation_id": cid, "conclusion": "ok"})
    base = f"{server.url}/api/consultations/{cid}/recordings"
    async with aiohttp.ClientSession() as session:
        status, body = await fetch(session, base, server.token("ref1"))
        assert status == 200, body
        listing = json.loads(body)
        assert len(listing["files"]) == 2
        entry = listing["files"][0]
        status, data = await fetch(session, server.url + entry["url"], server.token("ref1"))
        assert status == 200
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        for outsider in ("ref2", "cardio2", "coord"):
            status, body = await fetch(session, base, server.token(outsider))
            assert status == 403, (outsider, body)
            assert json.loads(body)["error"]["code"] == "forbidden"
            status, _ = await fetch(session, server.url + entry["url"], server.token(outsider))
            assert status == 403
        status, _ = await fetch(session, base, server.token("admin"))
        assert status == 200
        status, body = await fetch(session, f"{base}/..%2Fmanifest.json", server.token("admin"))
        assert status == 404
        status, body = await fetch(session, f"{base}/nothing.webm", server.token("admin"))
        assert status == 404
        status, _ = await fetch(session, base, "not-a-token")
        assert status == 401
    audit = server.settings.archive_dir() / "audit.log"
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    seen = [(e["actor"], e["action"]) for e in entries if e["consultation_id"] == cid]
    assert ("ref1", "recording.list") in seen
    assert ("ref1", "recording.download") in seen
    assert ("admin", "recording.list") in seen
    for outsider in ("ref2", "cardio2", "coord"):
        assert seen.count((outsider, "recording.denied")) == 2
    report = verify_archive(server.settings.archive_dir())
    assert report.ok, report.problems

    # An edited audit line and a changed byte in a recording are both caught.
    lines = audit.read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["actor"] = "cardio1"
    lines[-1] = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    audit.write_text("\n".join(lines) + "\n")
    path = archive_of(server, cid) / entry["name"]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    report = verify_archive(server.settings.archive_dir())
    assert not report.ok
    text = "\n".join(report.problems)
    assert entry["name"] in text
    assert "audit" in text.lower()


@pytest.mark.parametrize("config_path", ["never"], indirect=True)
async def test_never_policy_refuses_to_record(server: Server) -> None:
    async with clients(server.url, {n: server.token(n) for n in ("cardio1", "ref1")}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        state = c["ref1"].drain("recording:state")[-1]
        assert state["status"] == "disabled"
        await c["cardio1"].refused("recording:start", {"consultation_id": cid},
                                   "recording_not_allowed")
        await c["ref1"].refused("recording:consent", {"consultation_id": cid, "agree": True},
                                "invalid_state")
        await c["cardio1"].ok("consult:end", {"consultation_id": cid, "conclusion": "ok"})
    assert manifest_of(server, cid).recording.status == "off"


@pytest.fixture
def tiny_archive(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB filesystem for the archive: it fills up a few seconds into a recording."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_fails_the_recording_not_the_consultation(
    tmp_path: Path, tiny_archive: Path
) -> None:
    config = write_config(tmp_path, recording={"policy": "always",
                                               "archive_dir": str(tiny_archive)})
    names = ("cardio1", "ref1")
    async with run_server(config) as server, \
            clients(server.url, {n: server.token(n) for n in names}) as c:
        cid = await open_consultation(c, guests=("ref1",))
        peers = await peers_for(c, cid, names)
        try:
            failed = await c["ref1"].next_matching(
                "recording:state", lambda s: s["status"] == "failed", timeout=60)
            assert "space" in failed["error"].lower(), failed
            await c["cardio1"].next_matching("recording:state",
                                             lambda s: s["status"] == "failed")
            # Media keeps flowing after the failure, both ways.
            counts = {n: len(p.video_from(o).counters)  # type: ignore[union-attr]
                      for n, p in peers.items() for o in names if o != n}
            await wait_for(lambda: all(
                len(p.video_from(o).counters) >= counts[n] + 2 * FPS  # type: ignore[union-attr]
                for n, p in peers.items() for o in names if o != n), 15, "media after")
            chat = await c["ref1"].ok("chat:send", {"consultation_id": cid, "text": "still here"})
            assert chat["message"]["text"] == "still here"
        finally:
            await close_all(peers)
        ended = await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                      "conclusion": "ok"})
        assert ended["consultation"]["state"] == "ended"
        stored = await server.app[SERVICES].store.get_consultation(cid)
        assert stored is not None and stored.minutes is not None


async def test_kill_9_mid_recording_leaves_a_playable_file_marked_interrupted(
    tmp_path: Path
) -> None:
    config = write_config(tmp_path, recording={"policy": "always"})
    settings = load_settings(config)
    assert settings.directory.file is not None
    authority = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    process = start_server_process(config)
    names = ("cardio1", "ref1")
    try:
        async with clients(process.url, {n: authority.issue(n) for n in names}) as c:
            cid = await open_consultation(c, guests=("ref1",))
            peers = await peers_for(c, cid, names)
            try:
                await wait_for(lambda: all(
                    (v := p.video_from(o)) is not None and len(v.counters) >= 4 * FPS
                    for n, p in peers.items() for o in names if o != n), 30, "media")
                sent = {n: p.video.count for n, p in peers.items() if p.video}
                killed_at = time.time()
                process.kill()
            finally:
                await close_all(peers)
    finally:
        if process.process.poll() is None:
            process.kill()
    directory = settings.archive_dir() / cid
    assert (directory / mf.RECORDING_MARKER).exists()
    before = mf.load(directory / mf.MANIFEST)
    for name in names:
        (entry,) = files_of(before, name)
        decoded = decode(directory / entry.name)
        # Decodes up to within 2 s of the kill.
        assert decoded.counters, name
        assert decoded.counters[-1] >= sent[name] - 2 * FPS, (decoded.counters[-1], sent)
        print(f"{name}: the file decodes to {(sent[name] - decoded.counters[-1]) / FPS:.2f} s "
              "before the kill")
        assert entry.started_at + decoded.video_pts[-1] >= killed_at - 2.0

    restarted = start_server_process(config)
    try:
        after = mf.load(directory / mf.MANIFEST)
        assert after.recording.status == "interrupted"
        assert not (directory / mf.RECORDING_MARKER).exists()
        for name in names:
            (entry,) = files_of(after, name)
            assert entry.status == "interrupted"
            assert entry.sha256 == mf.sha256_file(directory / entry.name)
            assert entry.duration_s >= 3.0
        assert "interrupted" in "".join(restarted.output)
    finally:
        restarted.kill()
    report = verify_archive(settings.archive_dir())
    assert report.ok, report.problems
