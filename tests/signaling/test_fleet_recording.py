"""Recording in a fleet (signaling/recording_fleet.py): two real `serve` apps in this process
on one redis-server and one PostgreSQL, sharing one archive directory, real relay nodes
dialling one of them, real aiortc participants, every file decoded back with PyAV.

What it shows: consent given on two nodes starts one recording, written by the node the
consultation's relay is connected to; a relay move to a relay connected to the other node
hands the recording over (new files there, one gap in the manifest, the consents kept); a
node that stops hands its recordings to the node its relay dials next, with the media never
stopping."""

from __future__ import annotations

import asyncio
import itertools
from contextlib import AsyncExitStack
from pathlib import Path

import redis.asyncio as aioredis

from recorder import manifest as mf
from recorder.archive import verify_archive
from tests.consultation_media import open_consultation, start_media
from tests.media import MediaPeer, wait_for
from tests.recorder.media_check import decode
from tests.recorder.test_recording import recording_on
from tests.redis_server import RedisServer
from tests.signaling.test_failover_signaling import (
    NAMES,
    media_everywhere,
    moved,
    port_of,
    rebuild,
    relay_node,
)
from tests.signaling.test_fleet_relays import fleet_of, node, redis_client, sees
from tests.support import Client, clients

PREFIXES = itertools.count()
FPS = 15
TONES = {"cardio1": 660.0, "ref1": 440.0}


def settings_of(archive: Path) -> dict[str, object]:
    return {"policy": "with_consent", "archive_dir": str(archive)}


def on_disk(archive: Path, cid: str) -> mf.Manifest:
    return mf.load(archive / cid / mf.MANIFEST)


def cameras(data: mf.Manifest, name: str) -> list[mf.FileEntry]:
    return [f for f in data.files if f.participant_id == name and f.source == "camera"]


def camera_count(archive: Path, cid: str) -> int:
    path = archive / cid / mf.MANIFEST
    return len([f for f in mf.load(path).files if f.source == "camera"]) \
        if path.exists() else 0


def check_file(archive: Path, cid: str, entry: mf.FileEntry, seconds: float) -> None:
    decoded = decode(archive / cid / entry.name)
    assert decoded.errors == 0, entry.name
    counters = decoded.counters
    assert len(counters) >= seconds * FPS, (entry.name, len(counters))
    assert counters == sorted(counters), entry.name
    assert len(counters) >= 0.95 * (counters[-1] - counters[0] + 1), entry.name


async def holder(redis: aioredis.Redis, prefix: str, cid: str) -> str | None:
    found = await redis.get(f"{prefix}recording:{cid}")
    return found.decode() if isinstance(found, bytes) else found


async def consent_both(c: dict[str, Client], cid: str) -> None:
    for name in NAMES:
        answer = await c[name].ok("recording:consent", {"consultation_id": cid,
                                                        "agree": True})
        assert answer["recording"]["consultation_id"] == cid
    for name in NAMES:
        await recording_on(c[name], cid)


async def test_consent_on_two_nodes_records_where_the_media_arrives_and_follows_a_move(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    """cardio1 on A, ref1 on B, relay-1 connected to B: both consent (each on its node), B
    records; relay-1 dies and the consultation moves to relay-2, connected to A: A records
    on, in new files, one gap in between; the consultation ends on A's side."""
    prefix = f"rec{next(PREFIXES)}:"
    archive = tmp_path / "archive"
    settings = settings_of(archive)
    async with node(tmp_path, "a", redis_server, postgres_dsn, prefix, settings) as a, \
            node(tmp_path, "b", redis_server, postgres_dsn, prefix, settings) as b, \
            redis_client(redis_server) as redis, \
            relay_node(b, "relay-1", "01") as one, \
            clients(a.url, {"cardio1": a.token("cardio1")}) as on_a, \
            clients(b.url, {"ref1": b.token("ref1")}) as on_b:
        c = {**on_a, **on_b}
        await sees(a, "relay-1")
        cid = await open_consultation(c)
        await consent_both(c, cid)
        assert await holder(redis, prefix, cid) == fleet_of(b).instance_id
        peers: dict[str, MediaPeer] = {
            n: await start_media(c[n], cid, audio_hz=TONES[n]) for n in NAMES}
        try:
            await media_everywhere(peers)
            await wait_for(lambda: camera_count(archive, cid) == 2, 20,
                           "B writing both cameras")
            await asyncio.sleep(2.0)
            async with relay_node(a, "relay-2", "01"):
                await sees(b, "relay-2")
                one.link.drop()  # relay-1's process dies
                assert [r["id"] for r in await moved(c, cid)] == ["relay-2", "relay-2"]
                for name in NAMES:
                    peers[name] = await rebuild(c[name], cid, peers[name])
                await media_everywhere(peers)
                assert await holder(redis, prefix, cid) == fleet_of(a).instance_id
                await wait_for(lambda: camera_count(archive, cid) == 4, 20,
                               "A writing both cameras")
                await asyncio.sleep(2.0)
                state = await c["ref1"].ok("recording:consent", {"consultation_id": cid,
                                                                 "agree": True})
                # Asked on B, answered by A.
                assert state is not None and state["recording"]["status"] == "on"
                await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                      "conclusion": "recorded on two nodes"})
        finally:
            for peer in peers.values():
                await peer.close()
        assert await holder(redis, prefix, cid) is None

    data = on_disk(archive, cid)
    assert data.recording.status == "complete"
    assert data.minutes["conclusion"] == "recorded on two nodes"
    assert [e.event for e in data.recording.events] == [
        "started", "handed_over", "started", "stopped"]
    (gap,) = data.recording.gaps
    assert gap.reason == "relay_lost" and gap.to is not None
    assert sorted(a.clinician_id for a in data.consent if a.answer == "agreed") == \
        ["cardio1", "ref1", "ref1"]
    for name in NAMES:
        before, after = cameras(data, name)
        assert before.ended_at is not None and before.ended_at <= gap.to <= after.started_at
        check_file(archive, cid, before, seconds=1.5)
        check_file(archive, cid, after, seconds=1.5)
    print(f"gap of the hand-over B -> A: {gap.to - gap.from_:.2f} s")
    report = verify_archive(archive)
    assert report.ok, report.problems


async def test_a_stopping_node_hands_its_recording_to_the_node_its_relay_dials_next(
        tmp_path: Path, redis_server: RedisServer, postgres_dsn: str) -> None:
    """Both participants on B, relay-1 connected to A: A records. A stops; relay-1 redials
    B and says hello there: B takes the recording on from the manifest, the media never
    stopped and nobody rejoined."""
    prefix = f"rec{next(PREFIXES)}:"
    archive = tmp_path / "archive"
    settings = settings_of(archive)
    peers: dict[str, MediaPeer] = {}
    async with node(tmp_path, "b", redis_server, postgres_dsn, prefix, settings) as b, \
            redis_client(redis_server) as redis, \
            clients(b.url, {n: b.token(n) for n in NAMES}) as c, AsyncExitStack() as relays:
        try:
            async with node(tmp_path, "a", redis_server, postgres_dsn, prefix, settings) as a:
                one = await relays.enter_async_context(relay_node(a, "relay-1", "01"))
                await sees(b, "relay-1")
                cid = await open_consultation(c)
                await consent_both(c, cid)
                assert await holder(redis, prefix, cid) == fleet_of(a).instance_id
                peers.update({n: await start_media(c[n], cid, audio_hz=TONES[n])
                              for n in NAMES})
                await media_everywhere(peers)
                await wait_for(lambda: camera_count(archive, cid) == 2, 20,
                               "A writing both cameras")
                await asyncio.sleep(2.0)
                one.link.point_at(port_of(b))
            # A has stopped.
            await wait_for(lambda: fleet_of(b).holds("relay-1"), 20, "relay-1 at B")
            await wait_for(lambda: camera_count(archive, cid) == 4, 20,
                           "B writing both cameras")
            await media_everywhere(peers)  # the same connections all along
            assert await holder(redis, prefix, cid) == fleet_of(b).instance_id
            await asyncio.sleep(2.0)
            await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                  "conclusion": "ok"})
        finally:
            for peer in peers.values():
                await peer.close()

    data = on_disk(archive, cid)
    assert data.recording.status == "complete"
    assert [e.event for e in data.recording.events] == [
        "started", "interrupted", "started", "stopped"]
    (gap,) = data.recording.gaps
    assert gap.reason == "signaling_restart" and gap.to is not None
    for name in NAMES:
        before, after = cameras(data, name)
        check_file(archive, cid, before, seconds=1.5)
        check_file(archive, cid, after, seconds=1.5)
    print(f"gap of A's stop: {gap.to - gap.from_:.2f} s")
    report = verify_archive(archive)
    assert report.ok, report.problems
