"""Failover with real processes (issue #13, "What fails today", one test per case): `telehealth
serve` and standalone `telehealth relay` nodes as subprocesses on 127.0.0.1, killed, stopped
and restarted by the test; two aiortc participants (tests/failover_client.py) follow the
client rules of docs/protocol.md. Times are printed per participant; the goals (media back
within 5 s) are measured across many participants in bench/failover.py.

Against the code before #13 (35be236, its media:join made to accept and ignore ``resume``)
these tests fail but the SIGKILL one, which the issue lists as working, and the SIGSTOP one,
which needs 7ec0d0d's 5 s heartbeat to fail (media back after 9.0 s; 35be236 set 0.5 s): the
dropped node never registered again, the consultation without a spare answered ``not_found``
for good, nobody was told of the frozen spare, media stopped with `serve` and `serve` could
not start again, the relay's SIGTERM closed its rooms before the move.

Placement is made predictable by regions: the consultation's requester (ref1) is at d1, in
province 11, so it is placed on the node of region 11 (``HOME``); ``SPARE`` serves province 79
and takes the consultation only when it must move."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.consultation_media import open_consultation
from tests.failover_client import Participant, Recovery, describe, participants
from tests.failover_processes import Cluster
from tests.media import wait_for
from tests.support import Client

HOME = ("relay-home", "11")
SPARE = ("relay-spare", "79")
NAMES = ("cardio1", "ref1")
FPS = 15
MEDIA_BACK_S = 5.0
"""The issue's goal for a relay that dies or goes silent, asserted per participant here."""
RECOVERY_WAIT_S = 25.0
"""How long a test waits for media to come back at all (then it fails with what it saw)."""
SMOOTH_GAP_S = 2.0
"""Where media must not stop (signaling away or restarting, a drain), the longest time
allowed without a frame from the other participant. Media that stopped for the outage shows
a gap of its whole length (several seconds); on the shared 2-core machine a `serve` starting
beside the relay (imports, restore) has delayed frames by up to 1.7 s."""


@asynccontextmanager
async def consultation(cluster: Cluster, nodes: list[tuple[str, str]],
                       **options: Any) -> AsyncIterator[tuple[str, dict[str, Participant]]]:
    """`serve` and ``nodes`` started; cardio1 and ref1 in a consultation, each decoding the
    other's video through the relay of region 11."""
    await cluster.start_serve()
    for relay_id, region in nodes:
        await cluster.start_node(relay_id, region, wait=False)
    for relay_id, _ in nodes:
        await cluster.wait_registered(relay_id)
    parts = await participants(cluster.url, {n: cluster.token(n) for n in NAMES}, fps=FPS,
                               audio=False, **options)
    try:
        as_clients: dict[str, Client] = dict(parts)
        cid = await open_consultation(as_clients, host=NAMES[0], guests=NAMES[1:])
        for part in parts.values():
            await part.start(cid)
        await wait_for(lambda: all(p.frames(o, 0, time.monotonic()) >= FPS
                                   for p, o in pairs(parts)), 30, "media flowing")
        yield cid, parts
    except BaseException:
        for part in parts.values():
            print(f"{part.name}: joins {part.joins}\n  moves {part.moves}\n  connects "
                  f"{part.connects}\n  disconnects {part.disconnects}\n  failures "
                  f"{part.failures}")
        raise
    finally:
        for part in parts.values():
            await part.close()


def pairs(parts: dict[str, Participant]) -> list[tuple[Participant, str]]:
    """(participant, another participant's name) for every ordered pair."""
    return [(p, other) for p in parts.values() for other in parts if other != p.name]


def others(parts: dict[str, Participant], name: str) -> list[str]:
    return [n for n in parts if n != name]


async def recovered(parts: dict[str, Participant], t0: float,
                    timeout: float = RECOVERY_WAIT_S) -> list[Recovery]:
    """Waits until every participant has frames from every other after ``t0`` (bounded);
    prints and returns each one's recovery."""
    def back() -> bool:
        return all(p.recovery(t0, others(parts, p.name)).media_back_s is not None
                   for p in parts.values())

    try:
        await wait_for(back, timeout, "media back from every participant")
    finally:
        recoveries = [p.recovery(t0, others(parts, p.name)) for p in parts.values()]
        print(describe(recoveries))
    return recoveries


def assert_back_within(recoveries: list[Recovery], seconds: float) -> None:
    for r in recoveries:
        assert r.media_back_s is not None and r.media_back_s <= seconds, r


async def test_a_killed_relay_s_participants_have_media_back_within_5_s(tmp_path: Path) -> None:
    async with Cluster(tmp_path) as cluster, \
            consultation(cluster, [HOME, SPARE]) as (_, parts):
        assert {p.relay_id() for p in parts.values()} == {HOME[0]}
        t0 = time.monotonic()
        cluster.signal_node(HOME[0], signal.SIGKILL)
        recoveries = await recovered(parts, t0)
        assert_back_within(recoveries, MEDIA_BACK_S)
        assert {p.relay_id() for p in parts.values()} == {SPARE[0]}


async def test_a_silent_relay_is_taken_out_and_media_is_back_within_5_s(tmp_path: Path) -> None:
    # SIGSTOP: the node's sockets stay open and say nothing, as after a power or network
    # cut. Only the missing heartbeats tell (0.5 s x 3); today media came back after ~13 s.
    async with Cluster(tmp_path) as cluster, \
            consultation(cluster, [HOME, SPARE]) as (_, parts):
        t0 = time.monotonic()
        cluster.signal_node(HOME[0], signal.SIGSTOP)
        recoveries = await recovered(parts, t0)
        for r in recoveries:
            # The move cannot start before the heartbeats are missed.
            assert r.learned_s is not None and r.learned_s >= 0.5, r
        assert_back_within(recoveries, MEDIA_BACK_S)
        assert {p.relay_id() for p in parts.values()} == {SPARE[0]}


async def test_a_node_that_signaling_dropped_comes_back_by_itself(tmp_path: Path) -> None:
    # The spare goes silent long enough to be dropped, then wakes up: it must redial (today
    # python-socketio's client never retries a disconnect the server started) and take the
    # consultation when the home relay dies.
    async with Cluster(tmp_path) as cluster, \
            consultation(cluster, [HOME, SPARE]) as (_, parts):
        before = cluster.registrations(SPARE[0])
        cluster.signal_node(SPARE[0], signal.SIGSTOP)
        await asyncio.sleep(3.5)
        cluster.signal_node(SPARE[0], signal.SIGCONT)
        woke = time.monotonic()
        await cluster.wait_registered(SPARE[0], more_than=before, timeout=15)
        print(f"{SPARE[0]} registered again {time.monotonic() - woke:.2f} s after SIGCONT")
        t0 = time.monotonic()
        cluster.signal_node(HOME[0], signal.SIGKILL)
        assert_back_within(await recovered(parts, t0), MEDIA_BACK_S)
        assert {p.relay_id() for p in parts.values()} == {SPARE[0]}


async def test_without_a_spare_the_consultation_waits_until_a_relay_arrives(
        tmp_path: Path) -> None:
    # Today: media:moved {relay: null}, then every media:join answers not_found for good.
    async with Cluster(tmp_path) as cluster, \
            consultation(cluster, [HOME], retry_s=1.0) as (_, parts):
        t0 = time.monotonic()
        cluster.signal_node(HOME[0], signal.SIGKILL)
        await wait_for(lambda: all(any(relay is None for t, relay in p.moves if t > t0)
                                   for p in parts.values()), 10, "media:moved {relay: null}")
        # The fallback retry (rule 2) is told to wait, not refused for good.
        await wait_for(lambda: all(any(j.outcome == "relay_waiting" and j.at > t0
                                       for j in p.joins) for p in parts.values()),
                       10, "media:join answered relay_waiting")
        assert all(p.waiting for p in parts.values())
        arrived = time.monotonic()
        await cluster.start_node(*SPARE)
        print(f"{SPARE[0]} registered {time.monotonic() - arrived:.2f} s after it started")
        recoveries = await recovered(parts, arrived)
        for r in recoveries:
            assert r.learned_s is not None, r  # told by media:moved, not found by a retry
        assert {p.relay_id() for p in parts.values()} == {SPARE[0]}


async def test_a_spare_that_does_not_answer_is_skipped_for_the_next(tmp_path: Path) -> None:
    # relay-stuck serves the consultation's own province, so it is the first candidate; it
    # is stopped just before the home relay dies: it is still registered but answers
    # nothing. Today the lost-relay handler raises and no participant is told.
    stuck = ("relay-stuck", "11")
    async with Cluster(tmp_path) as cluster, \
            consultation(cluster, [HOME, stuck, SPARE]) as (_, parts):
        assert {p.relay_id() for p in parts.values()} == {HOME[0]}  # "home" < "stuck"
        cluster.signal_node(stuck[0], signal.SIGSTOP)
        t0 = time.monotonic()
        cluster.signal_node(HOME[0], signal.SIGKILL)
        recoveries = await recovered(parts, t0)
        assert {p.relay_id() for p in parts.values()} == {SPARE[0]}
        # One open_room timeout (1 s) more than a plain kill.
        assert_back_within(recoveries, MEDIA_BACK_S + 1.0)


async def test_serve_killed_media_goes_on_and_the_restarted_serve_resumes_the_clients(
        tmp_path: Path) -> None:
    # Today each node closes its rooms when it loses signaling, and `serve` cannot start
    # again while a consultation is open on a node (NoRelayAvailable, exit 1).
    async with Cluster(tmp_path) as cluster, \
            consultation(cluster, [HOME]) as (_, parts):
        t_kill = time.monotonic()
        cluster.kill_serve()
        await asyncio.sleep(3.0)
        during = time.monotonic()
        for p, other in pairs(parts):
            frames = p.frames(other, t_kill, during)
            print(f"{p.name}: {frames} frames from {other} in the {during - t_kill:.1f} s "
                  "without signaling")
            assert frames >= FPS * (during - t_kill) / 2, (p.name, other, frames)
        t_restart = time.monotonic()
        await cluster.start_serve()
        print(f"serve started again in {time.monotonic() - t_restart:.2f} s")
        await wait_for(lambda: all(p.resumed(after=t_restart) >= 1 for p in parts.values()),
                       25, "every participant resumed")
        now = time.monotonic()
        for p, other in pairs(parts):
            resumed_at = next(j.at for j in p.joins if j.at > t_restart
                              and j.outcome == "resumed")
            gap, gap_at = p.longest_gap(other, t_kill, now)
            print(f"{p.name}: resumed {resumed_at - t_restart:.2f} s after the restart began; "
                  f"longest gap in {other}'s video {gap:.2f} s at {gap_at - t_kill:.2f} s "
                  f"after the kill (restart at {t_restart - t_kill:.2f} s); joins since then "
                  f"{[j.outcome for j in p.joins if j.at > t_kill]}")
            assert gap <= SMOOTH_GAP_S, (p.name, other, gap)
            assert p.builds(after=t_kill) == 0, p.peer_sets  # the same peer connections


async def test_a_relay_s_sigterm_moves_its_participants_before_closing_its_rooms(
        tmp_path: Path) -> None:
    # Today the node closes its rooms at once and signaling moves the consultation after
    # that: media stops until the participants have rebuilt.
    async with Cluster(tmp_path) as cluster, \
            consultation(cluster, [HOME, SPARE]) as (_, parts):
        t0 = time.monotonic()
        cluster.signal_node(HOME[0], signal.SIGTERM)
        code, took = await cluster.node_exit(HOME[0], 25.0)
        print(f"{HOME[0]} exited with {code} {took:.2f} s after SIGTERM")
        assert code == 0
        recoveries = await recovered(parts, t0)
        end = time.monotonic()
        for p, other in pairs(parts):
            old = p.peer_sets[0]
            assert old.relay_id == HOME[0] and p.relay_id() == SPARE[0], p.peer_sets
            last_old = max((t for r in old.peer.received.values()
                            if r.info.get("participant_id") == other for t in r.arrivals),
                           default=0.0)
            learned = next(t for t, relay in p.moves if t > t0 and relay is not None)
            gap, _ = p.longest_gap(other, t0, end)
            print(f"{p.name}: moved {learned - t0:.2f} s after SIGTERM, last frame from "
                  f"{other} through {HOME[0]} {last_old - t0:.2f} s, longest gap {gap:.2f} s")
            assert learned < last_old, "the rooms closed before the participants were moved"
            assert gap <= SMOOTH_GAP_S, (p.name, other, gap)
        assert_back_within(recoveries, MEDIA_BACK_S)


async def test_serve_s_sigterm_stops_within_seconds_and_relays_keep_media(
        tmp_path: Path) -> None:
    # Today a stop takes ~40 s and drops the nodes, which close their rooms and never dial
    # back. Engine.io's ping timings as in production (a stop that waits for them is slow).
    async with Cluster(tmp_path, sections={"presence": {"ping_interval_s": 20,
                                                        "ping_timeout_s": 20}}) as cluster, \
            consultation(cluster, [HOME]) as (_, parts):
        t0 = time.monotonic()
        code, took = await cluster.stop_serve(within=20.0)
        print(f"serve exited with {code} {took:.2f} s after SIGTERM")
        assert code == 0 and took <= 5.0
        await asyncio.sleep(2.0)
        t_restart = time.monotonic()
        await cluster.start_serve()
        await cluster.wait_registered(HOME[0], timeout=15)  # a fresh log: once
        await wait_for(lambda: all(p.resumed(after=t_restart) >= 1 for p in parts.values()),
                       25, "every participant resumed")
        now = time.monotonic()
        for p, other in pairs(parts):
            gap, gap_at = p.longest_gap(other, t0, now)
            print(f"{p.name}: {p.frames(other, t0, now)} frames from {other} over the stop "
                  f"and restart ({now - t0:.1f} s), longest gap {gap:.2f} s at "
                  f"{gap_at - t0:.2f} s")
            assert gap <= SMOOTH_GAP_S, (p.name, other, gap)
            assert p.builds(after=t0) == 0, p.peer_sets


async def test_serve_with_its_embedded_relay_restarted_the_clients_rebuild_media(
        tmp_path: Path) -> None:
    # The one-process default (`make run`): the media dies with `serve`, and a restarted one
    # reopens the consultation on its embedded relay; the clients' resume is answered
    # `resumed: false` and they build new peer connections by themselves.
    async with Cluster(tmp_path, sections={"relay": {"embedded": True}}) as cluster, \
            consultation(cluster, []) as (_, parts):
        cluster.kill_serve()
        t_restart = time.monotonic()
        await cluster.start_serve()
        await wait_for(lambda: all(p.builds(after=t_restart) >= 1 for p in parts.values()),
                       RECOVERY_WAIT_S, "every participant rebuilt its media")
        recoveries = await recovered(parts, t_restart)
        for p in parts.values():
            outcomes = [j.outcome for j in p.joins if j.at > t_restart]
            print(f"{p.name}: joins after the restart {outcomes}")
            assert "resumed" not in outcomes, outcomes  # the old relay's media is gone
            assert p.relay_id() == "embedded"
        assert all(r.media_back_s is not None for r in recoveries)
