"""All cores of a relay machine (relay/workers.py): `telehealth relay` with ``relay.workers``
N > 1 runs N worker processes under a supervisor, each registered with signaling as
``<relay id>.w<k>`` and holding its own share of the machine's UDP ports.

The process test runs the real `serve` and the real supervisor with 4 workers as
subprocesses (tests/failover_processes.py) and aiortc participants that follow the client
rules of docs/protocol.md (tests/failover_client.py): consultations spread over the workers,
everyone decodes everyone, a killed worker is restarted while its consultation moves to
another worker, and a SIGTERM stops every worker."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from config.settings import Settings
from relay.api import MAX_WORKERS, NODE_TOKEN_ENV, worker_relay_id
from relay.errors import UdpPortsUnavailable
from relay.workers import (
    RESTART_FIRST_S,
    Supervisor,
    port_slice,
    worker_count,
    worker_settings,
)
from signaling.directory import Directory
from signaling.errors import Unauthenticated
from signaling.tokens import TokenAuthority
from tests.consultation_media import open_consultation, start_node
from tests.failover_client import Participant, describe, participants
from tests.failover_processes import Cluster
from tests.media import wait_for
from tests.relay.test_ports import free_udp_ports, relay_candidate_ports
from tests.support import SECRET, Client, write_config

MACHINE = "relay-machine"
WORKERS = 4
PORTS_PER_WORKER = 20
CONSULTATIONS = (("racer0", "ref1"), ("racer1", "ref2"), ("racer2", "ref3"))
"""(host, guest): three consultations, one per referring site (each client is in one)."""
FPS = 10
DRAIN_S = 5.0


# -- the ports of each worker -------------------------------------------------------------


def test_a_port_range_is_split_into_disjoint_slices_that_cover_it() -> None:
    slices = [port_slice(40000, 40199, k, 4) for k in range(4)]
    assert slices == [(40000, 40049), (40050, 40099), (40100, 40149), (40150, 40199)]
    uneven = [port_slice(100, 109, k, 3) for k in range(3)]
    assert uneven == [(100, 103), (104, 106), (107, 109)]
    covered = [p for low, high in uneven for p in range(low, high + 1)]
    assert covered == list(range(100, 110))


def test_a_range_smaller_than_the_workers_stops_start_up() -> None:
    with pytest.raises(UdpPortsUnavailable, match=r"\[100, 102\] has 3 ports for 4 workers"):
        port_slice(100, 102, 0, 4)


def test_single_port_mode_gives_each_worker_the_next_port() -> None:
    settings = Settings.model_validate({"relay": {"udp_port": 3479, "capacity": 50}})
    ports = [worker_settings(settings, k, 4).relay.udp_port for k in range(4)]
    assert ports == [3479, 3480, 3481, 3482]
    assert settings.relay.udp_port == 3479  # the machine's settings are untouched
    with pytest.raises(UdpPortsUnavailable, match="passes 65535"):
        worker_settings(Settings.model_validate({"relay": {"udp_port": 65534}}), 0, 4)
    forwarded = Settings.model_validate({"relay": {"udp_port": 3479, "announced_port": 443}})
    assert [worker_settings(forwarded, k, 3).relay.announced_port for k in range(3)] == \
        [443, 444, 445]
    with pytest.raises(UdpPortsUnavailable, match="announced_port 65534"):
        worker_settings(Settings.model_validate(
            {"relay": {"udp_port": 3479, "announced_port": 65534}}), 0, 4)


def test_each_worker_takes_its_share_of_the_capacity_and_of_the_range() -> None:
    settings = Settings.model_validate({"relay": {"udp_port_range": [40000, 40199],
                                                  "capacity": 50}})
    shares = [worker_settings(settings, k, 4).relay for k in range(4)]
    assert [s.capacity for s in shares] == [math.ceil(50 / 4)] * 4
    assert [s.udp_port_range for s in shares] == [port_slice(40000, 40199, k, 4)
                                                  for k in range(4)]
    plain = worker_settings(Settings(), 1, 2).relay
    assert plain.udp_port is None and plain.udp_port_range is None


def test_a_range_too_small_for_the_workers_stops_the_relay_command_with_2(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, relay={"udp_port_range": [40000, 40002]})
    done = subprocess.run(
        [sys.executable, "-m", "telehealth.cli", "--config", str(config), "relay",
         "--signaling", "http://127.0.0.1:1", "--node-token", "x", "--workers", "4"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "relay.udp_port_range [40000, 40002] has 3 ports for 4 workers" in done.stderr


def test_a_relay_without_a_node_token_stops_with_2_saying_where_to_put_it(
        tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != NODE_TOKEN_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "telehealth.cli", "--config", str(config), "relay",
         "--signaling", "http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert f"--node-token, or {NODE_TOKEN_ENV} in the environment" in done.stderr


def test_zero_workers_means_one_per_core() -> None:
    assert worker_count(0) == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert worker_count(3) == 3
    with pytest.raises(UdpPortsUnavailable):
        worker_count(MAX_WORKERS + 1)


def test_signaling_names_a_worker_from_the_machine_s_token(tmp_path: Path) -> None:
    write_config(tmp_path)
    tokens = TokenAuthority(SECRET, Directory.load(tmp_path / "directory.toml"), 3600)
    token = tokens.issue_node(MACHINE)
    assert tokens.verify_node(token) == MACHINE
    assert tokens.verify_node(token, 3) == worker_relay_id(MACHINE, 3) == f"{MACHINE}.w3"
    for wrong in (True, -1, MAX_WORKERS, "1", 1.0):
        with pytest.raises(Unauthenticated) as refused:
            tokens.verify_node(token, wrong)
        assert refused.value.code == "invalid_registration"


# -- the supervisor, with stand-in worker processes -------------------------------------------


def stand_in(worker: int, *, exit_code: int | None = None, drain_s: float = 0.0,
             refuse: int | None = None) -> list[str]:
    """A real worker process that does what a relay worker does with its supervisor: prints
    READY (or exits 2 when it is ``refuse``), then exits with ``exit_code`` at once, or reads
    its stdin and "drains" ``drain_s`` before exiting 0."""
    if worker == refuse:
        return [sys.executable, "-c", "import sys; sys.exit(2)"]
    body = ["import sys, time", "print('READY relay stand-in', flush=True)"]
    if exit_code is not None:
        body.append(f"sys.exit({exit_code})")
    body += ["sys.stdin.readline()", f"time.sleep({drain_s})", "sys.exit(0)"]
    return [sys.executable, "-c", "; ".join(body)]


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    await wait_for(predicate, timeout, what)


async def test_the_supervisor_is_ready_once_every_worker_is_and_stops_them() -> None:
    supervisor = Supervisor(MACHINE, 3, lambda k: stand_in(k, drain_s=0.2),
                            signaling_url="http://signaling", drain_s=5)
    run = asyncio.create_task(supervisor.run())
    try:
        await until(lambda: all(w.ready for w in supervisor.workers), 20, "3 READY workers")
        supervisor.on_signal(signal.SIGTERM)
        assert await asyncio.wait_for(run, 20) == 0
        assert all(w.process is not None and w.process.returncode == 0
                   for w in supervisor.workers)
    finally:
        supervisor.on_signal(signal.SIGTERM)
        supervisor.on_signal(signal.SIGTERM)  # kills what is left


async def test_a_second_signal_kills_the_draining_workers() -> None:
    supervisor = Supervisor(MACHINE, 2, lambda k: stand_in(k, drain_s=60),
                            signaling_url="http://signaling", drain_s=5)
    run = asyncio.create_task(supervisor.run())
    await until(lambda: all(w.ready for w in supervisor.workers), 20, "2 READY workers")
    supervisor.on_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    started = time.monotonic()
    supervisor.on_signal(signal.SIGINT)
    assert await asyncio.wait_for(run, 10) == 128 + signal.SIGINT
    assert time.monotonic() - started < 5
    assert all(w.process is not None and w.process.returncode == -signal.SIGKILL
               for w in supervisor.workers)


async def test_a_worker_refused_at_its_start_stops_the_machine_with_2() -> None:
    supervisor = Supervisor(MACHINE, 2, lambda k: stand_in(k, refuse=1),
                            signaling_url="http://signaling", drain_s=5)
    assert await asyncio.wait_for(supervisor.run(), 20) == 2
    first = supervisor.workers[0].process
    assert first is not None and first.returncode == 0  # asked to stop, not left behind


async def test_a_dying_worker_is_restarted_with_back_off() -> None:
    supervisor = Supervisor(MACHINE, 1, lambda k: stand_in(k, exit_code=1),
                            signaling_url="http://signaling", drain_s=5)
    run = asyncio.create_task(supervisor.run())
    worker = supervisor.workers[0]
    try:
        started = time.monotonic()
        await until(lambda: worker.starts >= 3, 20, "two restarts")
        took = time.monotonic() - started
        print(f"third start {took:.2f} s after the first")
        # 0.5 s, then 1 s: the back-off doubles between restarts.
        assert took >= RESTART_FIRST_S * 3 and worker.delay >= 4 * RESTART_FIRST_S
    finally:
        supervisor.on_signal(signal.SIGTERM)
        await asyncio.wait_for(run, 20)


# -- the machine's workers, as processes -----------------------------------------------------


def worker_pids(supervisor: int) -> dict[int, int]:
    """Worker index -> pid, from the supervisor's children's command lines."""
    found = {}
    for child in psutil.Process(supervisor).children():
        with _gone():
            line = child.cmdline()
            if "--worker" in line:
                found[int(line[line.index("--worker") + 1])] = child.pid
    return found


class _gone:
    """Ignore a process that exits while it is looked at."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return isinstance(exc, psutil.NoSuchProcess | psutil.ZombieProcess)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with _gone():
            psutil.Process(pid).kill()


async def test_four_workers_spread_consultations_restart_and_stop(tmp_path: Path) -> None:
    low, high = free_udp_ports(WORKERS * PORTS_PER_WORKER)
    ids = [worker_relay_id(MACHINE, k) for k in range(WORKERS)]
    started = time.monotonic()
    leftover: list[int] = []
    async with Cluster(tmp_path, node_relay={"workers": WORKERS, "drain_s": DRAIN_S,
                                             "udp_port_range": [low, high]}) as cluster:
        await cluster.start_serve()
        node = await cluster.start_node(MACHINE, "11", wait=False)
        try:
            for relay_id in ids:
                await cluster.wait_registered(relay_id)
            await wait_for(lambda: f"READY relay {MACHINE} ({WORKERS} workers" in node.output(),
                           20, "the supervisor's READY line")
            pids = worker_pids(node.process.pid)
            leftover += pids.values()
            assert sorted(pids) == list(range(WORKERS)), pids
            print(f"{WORKERS} workers registered {time.monotonic() - started:.1f} s after the "
                  "test started")

            names = [n for pair in CONSULTATIONS for n in pair]
            parts = await participants(cluster.url, {n: cluster.token(n) for n in names},
                                       fps=FPS, audio=False)
            try:
                as_clients: dict[str, Client] = dict(parts)
                cids = [await open_consultation(as_clients, host=host, guests=(guest,))
                        for host, guest in CONSULTATIONS]
                for cid, pair in zip(cids, CONSULTATIONS, strict=True):
                    for name in pair:
                        await parts[name].start(cid)
                await wait_for(lambda: all(parts[a].frames(b, 0, time.monotonic()) >= FPS
                                           for a, b in _pairs()), 40,
                               "every participant decoding the other")
                where = {cid: {parts[n].relay_id() for n in pair}
                         for cid, pair in zip(cids, CONSULTATIONS, strict=True)}
                print(f"placed: {where}")
                # One worker per consultation (least loaded first), both participants on it.
                assert all(len(on) == 1 for on in where.values()), where
                used = [str(next(iter(on))) for on in where.values()]
                assert len(set(used)) == len(cids) and set(used) <= set(ids), used
                for name in names:
                    _check_ports(parts[name], low, high)

                # A worker dies: the supervisor starts it again, its consultation moves.
                victim = used[0]
                index = ids.index(victim)
                moved = CONSULTATIONS[0]
                registered = cluster.registrations(victim)
                t0 = time.monotonic()
                os.kill(pids[index], signal.SIGKILL)
                await _media_back({n: parts[n] for n in moved}, t0)
                after = {parts[n].relay_id() for n in moved}
                assert len(after) == 1 and after <= set(ids) - {victim}, after
                await cluster.wait_registered(victim, more_than=registered, timeout=30)
                print(f"worker {victim} registered again {time.monotonic() - t0:.1f} s after "
                      "its kill")
                assert "died (exit -9" in node.output()
                restarted = worker_pids(node.process.pid)
                leftover += restarted.values()
                assert restarted[index] != pids[index] and node.running
                # The consultations on the other workers went on.
                others = [p for pair in CONSULTATIONS[1:] for p in pair]
                now = time.monotonic()
                await wait_for(lambda: all(parts[a].frames(b, now, time.monotonic()) >= FPS
                                           for a, b in _pairs() if a in others), 20,
                               "media on the other workers")
            finally:
                for part in parts.values():
                    await part.close()

            # SIGTERM to every process, as systemd sends it (KillMode=control-group): every
            # worker drains once (not "second signal") and exits, then the supervisor, with 0.
            running = worker_pids(node.process.pid)
            node.process.send_signal(signal.SIGTERM)
            for pid in running.values():
                os.kill(pid, signal.SIGTERM)
            code, took = await cluster.node_exit(MACHINE, DRAIN_S + 30)
            print(f"SIGTERM: the supervisor exited with {code} after {took:.1f} s")
            assert code == 0, node.output()[-3000:]
            assert node.output().count(" exited (0)") == WORKERS, node.output()[-3000:]
            assert "exiting at once" not in node.output()
            # One worker's drain drained the machine: nothing moved between its workers.
            assert took < DRAIN_S, took
            assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status()
                           != psutil.STATUS_ZOMBIE for pid in running.values()), running
        finally:
            kill_all(leftover)


def _pairs() -> list[tuple[str, str]]:
    return [(a, b) for pair in CONSULTATIONS for a in pair for b in pair if a != b]


def _check_ports(part: Participant, low: int, high: int) -> None:
    """The relay's candidates to this participant lie in its worker's slice of the range."""
    relay_id = part.relay_id()
    peer = part.peer
    assert relay_id is not None and peer is not None and peer.subscribe_pc is not None
    index = int(relay_id.rsplit(".w", 1)[1])
    first, last = port_slice(low, high, index, WORKERS)
    description = peer.subscribe_pc.remoteDescription
    assert description is not None
    ports = relay_candidate_ports(description.sdp)
    assert ports and all(first <= p <= last for p in ports), (relay_id, ports, first, last)


async def _media_back(parts: dict[str, Participant], t0: float) -> None:
    def back() -> bool:
        return all(p.recovery(t0, [o for o in parts if o != p.name]).media_back_s is not None
                   for p in parts.values())

    try:
        await wait_for(back, 30, "media back after the worker's kill")
    finally:
        print(describe([p.recovery(t0, [o for o in parts if o != p.name])
                        for p in parts.values()]))


async def test_a_machine_whose_token_is_refused_exits_2(tmp_path: Path) -> None:
    async with Cluster(tmp_path) as cluster:
        await cluster.start_serve()
        (tmp_path / "machine").mkdir()
        config = write_config(tmp_path / "machine", relay={"workers": 2})
        log = tmp_path / "machine.log"
        # Not a node token: every worker is refused, and the machine stops as one node does.
        process = start_node(config, cluster.url, cluster.token("admin"), "11", log)
        try:
            code = await asyncio.to_thread(process.wait, 60)
            assert code == 2, log.read_text()
            assert "was refused at its start" in log.read_text()
        finally:
            if process.poll() is None:
                process.kill()


async def test_workers_whose_supervisor_is_killed_stop_by_themselves(tmp_path: Path) -> None:
    async with Cluster(tmp_path, node_relay={"workers": 2}) as cluster:
        await cluster.start_serve()
        node = await cluster.start_node(MACHINE, "11", wait=False)
        for k in range(2):
            await cluster.wait_registered(worker_relay_id(MACHINE, k))
        pids = list(worker_pids(node.process.pid).values())
        try:
            assert len(pids) == 2
            for pid in pids:  # the token in their environment, out of the process list
                assert not any("node-token" in a for a in psutil.Process(pid).cmdline())
            cluster.signal_node(MACHINE, signal.SIGKILL)
            # Their stdin closed: each drains (nothing to move) and exits.
            await wait_for(lambda: not any(_alive(pid) for pid in pids), 20,
                           "the orphaned workers to exit")
            assert "its supervisor is gone; draining" in node.output()
        finally:
            kill_all(pids)


def _alive(pid: int) -> bool:
    with _gone():
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


async def test_single_port_workers_each_carry_media_on_their_own_port(tmp_path: Path) -> None:
    base, _ = free_udp_ports(2)
    async with Cluster(tmp_path, node_relay={"workers": 2, "udp_port": base}) as cluster:
        await cluster.start_serve()
        node = await cluster.start_node(MACHINE, "11", wait=False)
        pids = []
        try:
            for k in range(2):
                await cluster.wait_registered(worker_relay_id(MACHINE, k))
            pids = list(worker_pids(node.process.pid).values())
            names = [n for pair in CONSULTATIONS[:2] for n in pair]
            parts = await participants(cluster.url, {n: cluster.token(n) for n in names},
                                       fps=FPS, audio=False)
            try:
                as_clients: dict[str, Client] = dict(parts)
                for host, guest in CONSULTATIONS[:2]:
                    cid = await open_consultation(as_clients, host=host, guests=(guest,))
                    for name in (host, guest):
                        await parts[name].start(cid)
                await wait_for(lambda: all(parts[a].frames(b, 0, time.monotonic()) >= FPS
                                           for a, b in _pairs() if a in names), 40,
                               "every participant decoding the other")
                for name in names:
                    relay_id, peer = parts[name].relay_id(), parts[name].peer
                    assert relay_id is not None and peer is not None
                    assert peer.subscribe_pc is not None
                    description = peer.subscribe_pc.remoteDescription
                    assert description is not None
                    index = int(relay_id.rsplit(".w", 1)[1])
                    assert set(relay_candidate_ports(description.sdp)) == {base + index}
                assert {parts[n].relay_id() for n in names} == {
                    worker_relay_id(MACHINE, 0), worker_relay_id(MACHINE, 1)}
            finally:
                for part in parts.values():
                    await part.close()
        finally:
            kill_all(pids)
