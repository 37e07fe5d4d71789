"""`serve`'s embedded relay as worker processes (``relay.embedded_workers``,
telehealth/relay_workers.py): a real `telehealth serve` with 2 workers, real aiortc participants
that follow the client rules (tests/failover_client.py), recording on.

One process test walks the whole life: both workers register before `serve` says READY, two
consultations land one on each worker and every participant decodes the other, both are
recorded through the workers (relay.remote.RemoteRelay's stream); a worker killed with -9 is
started again by `serve` while its consultation moves to the other worker (the time printed),
and a consultation placed after that lands on the restarted worker; SIGTERM to `serve` stops
its workers, none left behind; `serve` started again (an upgrade) brings every consultation
back on its new workers (the time printed); the recordings, in parts across the move and the
restart, decode."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from config.settings import ConfigError, Settings, load_settings
from recorder import manifest as mf
from relay.api import worker_relay_id
from relay.config import MediaConfig
from relay.workers import port_slice
from telehealth.relay_workers import worker_environment
from tests.consultation_media import open_consultation
from tests.failover_client import Participant, describe, participants
from tests.failover_processes import Cluster
from tests.media import wait_for
from tests.recorder.media_check import decode
from tests.relay.test_ports import free_udp_ports, relay_candidate_ports
from tests.relay.test_workers import kill_all, worker_pids
from tests.support import Client, write_config

WORKERS = 2
PORTS_PER_WORKER = 20
RELAY_ID = "embedded"
IDS = [worker_relay_id(RELAY_ID, k) for k in range(WORKERS)]
CONSULTATIONS = (("racer0", "ref1"), ("racer1", "ref2"))
LATE = ("racer2", "ref3")
"""A consultation opened once the killed worker is back: it goes to that worker (the least
loaded)."""
FPS = 10
MEDIA_BACK_S = 15.0
"""Generous on the shared 2-core machine (docs/failover.md's target for a dead relay is 5 s);
the time is printed."""
STOP_S = 15.0


def test_embedded_workers_need_the_embedded_relay() -> None:
    with pytest.raises(ConfigError, match=r"embedded_workers = 2 .* needs embedded = true"):
        load_settings(None, overrides={"relay": {"embedded": False, "embedded_workers": 2}})
    assert load_settings(None).relay.embedded_workers == 0  # the in-process relay by default


def test_the_workers_get_serve_s_relay_settings_and_nothing_else(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through their environment: this process's ``[relay]`` with the ICE host addresses the
    in-process relay would use, its ``[logging]``; not `serve`'s config file (a
    ``TELEHEALTH_CONFIG`` would make a worker read it) nor its other variables."""
    monkeypatch.setenv("TELEHEALTH_CONFIG", "/etc/telehealth/serve.toml")
    monkeypatch.setenv("TELEHEALTH_STORAGE__DATA_DIR", "/var/lib/telehealth")
    settings = Settings.model_validate({
        "relay": {"embedded_workers": 3, "udp_port_range": [40000, 40299], "capacity": 90,
                  "region": "22", "ice_servers": [{"urls": "stun:stun.example.vn:3478"}]},
        "logging": {"level": "WARNING"}})
    env = worker_environment(settings, MediaConfig(host_addresses=["127.0.0.1"]), "t0ken")
    assert sorted(k for k in env if k.startswith("TELEHEALTH_")) == [
        "TELEHEALTH_LOGGING", "TELEHEALTH_NODE_TOKEN", "TELEHEALTH_RELAY"]
    assert env["TELEHEALTH_NODE_TOKEN"] == "t0ken"
    monkeypatch.delenv("TELEHEALTH_CONFIG")
    monkeypatch.delenv("TELEHEALTH_STORAGE__DATA_DIR")
    for key in ("TELEHEALTH_LOGGING", "TELEHEALTH_RELAY", "TELEHEALTH_NODE_TOKEN"):
        monkeypatch.setenv(key, env[key])
    worker = load_settings(None)  # what `telehealth relay --worker k` reads
    assert worker.relay.host_addresses == ["127.0.0.1"]
    assert worker.relay.udp_port_range == (40000, 40299)
    assert (worker.relay.capacity, worker.relay.region) == (90, "22")
    assert worker.relay.ice_servers == settings.relay.ice_servers
    assert (worker.relay.workers, worker.relay.embedded_workers) == (3, 0)
    assert worker.logging.level == "WARNING"


def _pairs(consultations: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(a, b) for pair in consultations for a in pair for b in pair if a != b]


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


async def _decoding(parts: dict[str, Participant], consultations: tuple[tuple[str, str], ...],
                    since: float, what: str, timeout: float = 40.0) -> None:
    await wait_for(lambda: all(parts[a].frames(b, since, time.monotonic()) >= FPS
                               for a, b in _pairs(consultations)), timeout, what)


async def test_serve_runs_its_relay_as_two_workers(tmp_path: Path) -> None:
    low, high = free_udp_ports(WORKERS * PORTS_PER_WORKER)
    sections = {
        "relay": {"embedded": True, "embedded_workers": WORKERS, "id": RELAY_ID,
                  "host_addresses": ["127.0.0.1"], "udp_port_range": [low, high],
                  "reconnect_delay_max_s": 1.0},
        "recording": {"policy": "always", "cluster_ms": 200, "fsync_interval_s": 0.5},
    }
    started = time.monotonic()
    leftover: list[int] = []
    async with Cluster(tmp_path, sections=sections) as cluster:
        serve = await cluster.start_serve()
        try:
            # READY comes once both workers registered (telehealth/relay_workers.py).
            assert [cluster.registrations(r) for r in IDS] == [1, 1], cluster.serve_log("relay")
            assert cluster.serve_log("embedded workers registered in")
            pids = worker_pids(serve.process.pid)
            leftover += pids.values()
            assert sorted(pids) == list(range(WORKERS)), pids
            # The node token is in their environment, not in the process list.
            for pid in pids.values():
                line = " ".join(psutil.Process(pid).cmdline())
                assert "telehealth.relay_workers" in line and "token" not in line, line
                assert psutil.Process(pid).environ().get("TELEHEALTH_NODE_TOKEN")
            print(f"serve READY with {WORKERS} workers {time.monotonic() - started:.1f} s after "
                  "the test started")

            names = [n for pair in (*CONSULTATIONS, LATE) for n in pair]
            parts = await participants(cluster.url, {n: cluster.token(n) for n in names},
                                       fps=FPS, audio=False)
            cids: dict[tuple[str, str], str] = {}
            try:
                as_clients: dict[str, Client] = dict(parts)
                for pair in CONSULTATIONS:
                    cids[pair] = await open_consultation(as_clients, host=pair[0],
                                                         guests=(pair[1],))
                    for name in pair:
                        await parts[name].start(cids[pair])
                await _decoding(parts, CONSULTATIONS, 0, "every participant decoding the other")
                where = {pair: {parts[n].relay_id() for n in pair} for pair in CONSULTATIONS}
                print(f"placed: {where}")
                assert all(len(on) == 1 for on in where.values()), where
                used = [str(next(iter(on))) for on in where.values()]
                assert sorted(used) == IDS, used  # one consultation on each worker
                for name in (n for pair in CONSULTATIONS for n in pair):
                    _check_ports(parts[name], low, high)

                # kill -9 the first consultation's worker: serve starts it again; the
                # consultation moves to the other worker meanwhile.
                victim = used[0]
                index = IDS.index(victim)
                moved = CONSULTATIONS[0]
                registered = cluster.registrations(victim)
                t0 = time.monotonic()
                os.kill(pids[index], signal.SIGKILL)
                await _media_back({n: parts[n] for n in moved}, t0)
                after = {parts[n].relay_id() for n in moved}
                assert after == {used[1]}, after
                await cluster.wait_registered(victim, more_than=registered, timeout=30)
                print(f"worker {victim} registered again {time.monotonic() - t0:.1f} s after "
                      "its kill")
                assert cluster.serve_log(f"worker {victim} died \\(exit -9")
                restarted = worker_pids(serve.process.pid)
                leftover += restarted.values()
                assert restarted[index] != pids[index], (pids, restarted)
                assert restarted[1 - index] == pids[1 - index]
                # The other worker's consultation went on.
                now = time.monotonic()
                await _decoding(parts, CONSULTATIONS, now, "media after the restart", 20)

                # The restarted worker carries media: the next consultation goes to it.
                cids[LATE] = await open_consultation(as_clients, host=LATE[0],
                                                     guests=(LATE[1],))
                for name in LATE:
                    await parts[name].start(cids[LATE])
                await _decoding(parts, (LATE,), 0, "the late consultation's media")
                assert {parts[n].relay_id() for n in LATE} == {victim}
                await asyncio.sleep(1.0)  # a second more of every recording

                # SIGTERM: serve stops its workers (each closes its rooms) and exits; none is
                # left. The participants stay and redial.
                running = list(worker_pids(serve.process.pid).values())
                leftover += running
                await _stop(cluster, running)

                # serve started again (an upgrade): new workers; every consultation comes
                # back on them (its media rebuilt, as with the in-process relay).
                t1 = time.monotonic()
                serve = await cluster.start_serve()
                leftover += worker_pids(serve.process.pid).values()
                print(f"serve READY again {time.monotonic() - t1:.1f} s after its start")
                every = (*CONSULTATIONS, LATE)
                try:
                    await wait_for(lambda: all(
                        p.recovery(t1, [o for pair in every if p.name in pair for o in pair
                                        if o != p.name]).media_back_s is not None
                        for p in parts.values()), 40, "media back after serve's restart")
                finally:
                    print(describe([p.recovery(t1, [o for pair in every if p.name in pair
                                                    for o in pair if o != p.name])
                                    for p in parts.values()]))
                assert {parts[n].relay_id() for n in names} <= set(IDS)
                await asyncio.sleep(1.0)
            finally:
                for part in parts.values():
                    await part.close()

            running = list(worker_pids(serve.process.pid).values())
            leftover += running
            await _stop(cluster, running)
        finally:
            kill_all(leftover)

    # Recorded through the workers: every participant's camera, decodable, in order.
    archive = tmp_path / "serve" / "data" / "archive"
    for pair, cid in cids.items():
        manifest = mf.load(archive / cid / mf.MANIFEST)
        for name in pair:
            files = [f for f in manifest.files
                     if f.participant_id == name and f.source == "camera"]
            assert files, (cid, name, manifest.files)
            # One file per part (a move starts new ones); a rebuilt publisher counts from 0.
            parts_counters = [decode(archive / cid / f.name).counters for f in files]
            print(f"{cid} {name}: {len(files)} files, "
                  f"{sum(map(len, parts_counters))} frames recorded")
            assert sum(map(len, parts_counters)) >= 2 * FPS, (cid, name, parts_counters)
            assert all(c == sorted(c) for c in parts_counters), (cid, name)
    moved_cid = cids[CONSULTATIONS[0]]
    gaps = mf.load(archive / moved_cid / mf.MANIFEST).recording.gaps
    assert gaps, "the move of the killed worker's consultation is a recording gap"


async def _stop(cluster: Cluster, workers: list[int]) -> None:
    """SIGTERM to `serve`: it exits 0 having stopped its workers, none left running."""
    assert len(workers) == WORKERS, workers
    stopped = len(cluster.serve_log(f"{WORKERS} embedded workers stopped in"))
    code, took = await cluster.stop_serve(STOP_S)
    print(f"SIGTERM: serve exited with {code} after {took:.1f} s")
    assert code == 0, cluster.serve_log(".")[-40:]
    assert len(cluster.serve_log(f"{WORKERS} embedded workers stopped in")) == stopped + 1
    await wait_for(lambda: not _alive(workers), 5, "no worker left")


async def _media_back(parts: dict[str, Participant], t0: float) -> None:
    def back() -> bool:
        return all(p.recovery(t0, [o for o in parts if o != p.name]).media_back_s is not None
                   for p in parts.values())

    try:
        await wait_for(back, MEDIA_BACK_S, "media back after the worker's kill")
    finally:
        print(describe([p.recovery(t0, [o for o in parts if o != p.name])
                        for p in parts.values()]))


def _check_ports(part: Participant, low: int, high: int) -> None:
    """The relay's candidates to this participant lie in its worker's slice of the range."""
    relay_id, peer = part.relay_id(), part.peer
    assert relay_id is not None and peer is not None and peer.subscribe_pc is not None
    description = peer.subscribe_pc.remoteDescription
    assert description is not None
    first, last = port_slice(low, high, IDS.index(relay_id), WORKERS)
    ports = relay_candidate_ports(description.sdp)
    assert ports and all(first <= p <= last for p in ports), (relay_id, ports, first, last)


async def test_the_workers_of_a_killed_serve_stop_by_themselves(tmp_path: Path) -> None:
    sections = {"relay": {"embedded": True, "embedded_workers": WORKERS,
                          "host_addresses": ["127.0.0.1"]}}
    async with Cluster(tmp_path, sections=sections) as cluster:
        serve = await cluster.start_serve()
        pids = list(worker_pids(serve.process.pid).values())
        try:
            assert len(pids) == WORKERS
            t0 = time.monotonic()
            cluster.kill_serve()
            # Their stdin closed: each stops (nothing to drain: signaling is gone).
            await wait_for(lambda: not _alive(pids), 20, "the workers of a dead serve to exit")
            print(f"workers gone {time.monotonic() - t0:.2f} s after serve's kill -9")
        finally:
            kill_all(pids)


def test_a_worker_that_cannot_start_stops_serve_s_start_with_2(tmp_path: Path) -> None:
    """Single-port mode, worker 1's port (``udp_port + 1``) taken: that worker exits 2, so
    `serve` stops the other and exits 2, naming the cause."""
    base, _ = free_udp_ports(2)
    config = write_config(tmp_path, relay={"embedded_workers": WORKERS, "udp_port": base,
                                           "host_addresses": ["127.0.0.1"]})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", base + 1))
        process = subprocess.Popen(
            [sys.executable, "-m", "telehealth.cli", "--config", str(config), "serve"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    assert process.returncode == 2, output[-3000:]
    assert f"relay.udp_port {base + 1} cannot be bound" in output, output[-3000:]
    assert "the relay workers stopped at their start (exit 2)" in output, output[-3000:]
    assert "READY" not in output
