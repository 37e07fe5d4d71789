"""Signaling load benchmark: many sites connected over socket.io, consult requests at a fixed
aggregate rate, pairing latency measured from ``consult:request`` to ``consult:ready``.

    python bench/signaling_load.py --sites 2000 --rate 50 --duration 20
    python bench/signaling_load.py --quick            # smoke run, well under 20 s

What happens:

1. A temporary data dir gets a generated directory (a few central hospitals with the specialist
   clinicians, every other site a district or commune site with one referring clinician) and a
   config (port 0, logging WARNING, a fixed token secret so this script mints the tokens).
2. The real server starts as a subprocess (``python -m telehealth.cli --config CFG serve``).
3. Worker processes (``--workers``, default 2) each connect their share of the clients, one
   socket.io AsyncClient per clinician, websocket transport, ``auth={"token": ...}``.
4. Open loop: referring clients emit ``consult:request`` on a fixed schedule (aggregate
   ``--rate`` per second for ``--duration`` seconds) whether or not earlier requests were
   answered. Every specialist of the specialty answers ``queue:update`` "added" with
   ``consult:accept`` at once (one wins, the others get ``already_taken``); the winner ends the
   consultation with ``consult:end`` after ``--hold`` seconds, so open consultations stay
   bounded (rate x hold) like in a real network, and below the embedded relay's room capacity
   (``relay.capacity``; every accept beyond it is refused with ``no_relay``).
5. Pairing latency = the requester's monotonic clock from emitting ``consult:request`` to
   receiving ``consult:ready`` (the request is matched by a tag in its ``reason``).

Server RSS and CPU come from psutil on the server pid; every worker reports its own CPU time and
GC pauses, and the machine-wide CPU use is printed so that a saturated load generator (or another
job on the machine) is visible. Diagnostics: ``--gc-trace`` logs the server's GC pauses,
``--py-spy FILE`` profiles it, ``--gc-threshold`` (the server's collector thresholds) and
``--ping-interval`` are experiments that change settings, never the server's code. The last
line printed is ``RESULT sites=<n> pair_p50_ms=<x> pair_p99_ms=<y> rss_mb=<z>``;
docs/benchmarks.md has figures.

A fleet (issue #14): ``--nodes 2 --redis --postgres --sites 4000``

    python bench/signaling_load.py --nodes 2 --redis --postgres --sites 4000
    python bench/signaling_load.py --nodes 2 --redis --postgres --quick   # smoke, ~40 s

The same population and the same open-loop schedule, against a real local fleet started by
tests/fleet_processes.py (the harness of the fleet tests and of `make fleet`: redis-server,
PostgreSQL as an unprivileged user, ``--nodes`` `serve` processes with ``live.backend =
"redis"``, ``storage.backend = "postgresql"`` and ``relay.embedded = false``, ``--relays``
standalone `telehealth relay` processes, nginx in front). Every client connects to **one
node directly**, not through nginx: the split is then known and even (referring clients in
turn over the nodes; each specialty's specialists in turn, so every node has specialists of
every specialty), each pairing can be told same-node or cross-node (the requester knows which
specialist accepted and on which node it is), and nginx's proxy hop and CPU stay out of a
figure about the nodes (nginx is the fleet's address for the relays; the fleet tests cover
clients through it). ``--split cross`` (the default with several nodes): a specialist
accepts only the requests made on another node than its own (the requester's node is known
from the request's ``requester_id``), so **every pairing crosses nodes**, each request raced
by its specialty's specialists on the other nodes. ``--split mixed``: every specialist
accepts every request; the specialists on the requester's node hear of it first (socket.io's
Redis manager emits locally, then publishes) and win most races.

The baseline is measured in the same invocation, first: the single-node embedded
configuration (SQLite records, live state in memory, the embedded relay), same population,
same schedule, same seed, same logging level; ``--no-baseline`` skips it. The comparison
table gives both and the ratio of the p99s. With more than one node the last line is
``RESULT sites=<n> nodes=<k> pair_p50_ms=<x> pair_p99_ms=<y>``; with one node it keeps the
format above.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import multiprocessing as mp
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_messages
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Protocol

import aiohttp
import psutil
import socketio

HOST = "127.0.0.1"
SPECIALTIES = (
    "cardiology", "neurology", "obstetrics", "pediatrics", "infectious-disease",
    "intensive-care", "orthopedics", "dermatology",
)
PRIORITIES = ("routine", "urgent", "asap", "stat")
PRIORITY_WEIGHTS = (50, 30, 15, 5)
REGIONS = tuple(f"{n:02d}" for n in range(1, 64))
GOAL_SITES = 2000
GOAL_RATE = 50.0
GOAL_P99_MS = 50.0
GOAL_FLEET_SITES = 4000
"""The fleet's goal (issue #14): the same p99 at 50 requests per second, 4000 sites."""
FLEET_START_TIMEOUT_S = 120.0
"""Redis, PostgreSQL, the nodes (each importing aiortc and PyAV), nginx and the relays, on a
machine whose two cores the load generator's workers are starting on too."""
ROOT = Path(__file__).resolve().parent.parent
QUIET_BUSY = 0.2
"""A machine busier than this before a configuration starts disturbs its figures."""

CALL_TIMEOUT_S = 15.0
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 60.0
SAMPLE_EVERY_S = 0.5
TAG = re.compile(r"^\[(w\d+-\d+)\]")
GENERATOR_GC_THRESHOLD = (50_000, 20, 100)
IDLE_FRAMES = ("EpollSelector.select (", "_worker (concurrent/futures/thread.py)")
GC_LINE = re.compile(r"^GC gen(\d) ([\d.]+) ms .*at=([\d.]+)")

PR_SET_PDEATHSIG = 1

REFERRING = "referring"
SPECIALIST = "specialist"


class BenchError(Exception):
    """The benchmark could not run (server did not start, a worker failed, a timeout)."""


# -- plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    clinician_id: str
    site_id: str
    kind: str
    specialty: str | None
    token: str = ""
    node: int = 0
    """Index of the node this client connects to (always 0 with one node)."""


@dataclass(frozen=True)
class Population:
    sites: int
    central: int
    specialties: tuple[str, ...]
    clients: tuple[ClientSpec, ...]
    directory_toml: str

    @property
    def referring(self) -> int:
        return sum(1 for c in self.clients if c.kind == REFERRING)

    @property
    def specialists(self) -> int:
        return sum(1 for c in self.clients if c.kind == SPECIALIST)


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    workers: int
    urls: tuple[str, ...]
    """The nodes' URLs; each client connects to ``urls[spec.node]``."""
    clients: tuple[ClientSpec, ...]
    rate: float
    """Aggregate requests per second over all workers; this worker sends rate / workers."""
    duration_s: float
    hold_s: float
    drain_s: float
    connect_concurrency: int
    connect_timeout_s: float
    specialties: tuple[str, ...]
    seed: int
    specialist_nodes: tuple[tuple[str, int], ...] = ()
    """(clinician id, node) of every specialist: a requester tells a cross-node pairing."""
    referring_nodes: tuple[tuple[str, int], ...] = ()
    """(clinician id, node) of every referring clinician, with ``cross_only``."""
    cross_only: bool = False
    """A specialist accepts only requests made on another node than its own."""


@dataclass
class ConnectReport:
    attempted: int = 0
    connected: int = 0
    errors: list[str] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0


@dataclass
class RunReport:
    sent: int = 0
    acked: int = 0
    paired: int = 0
    unmatched_ready: int = 0
    request_errors: dict[str, int] = field(default_factory=dict)
    accepts_won: int = 0
    accepts_taken: int = 0
    accept_errors: dict[str, int] = field(default_factory=dict)
    ended: int = 0
    end_errors: dict[str, int] = field(default_factory=dict)
    request_updates: int = 0
    unexpected_disconnects: int = 0
    pair_ms: list[float] = field(default_factory=list)
    pair_sent_s: list[float] = field(default_factory=list)
    """For each pair_ms: when the request was emitted, seconds after the common start."""
    pair_cross: list[bool] = field(default_factory=list)
    """For each pair_ms: the accepting specialist is on another node than the requester."""
    ack_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    last_send_s: float = 0.0
    """Seconds from the common start to this worker's last emitted request."""
    cpu_s: float = 0.0
    gc_pauses: list[tuple[int, float, float]] = field(default_factory=list)
    """(generation, ms, ended at s after the start) of this worker's own full collections and
    of its young ones over 5 ms."""


def build_population(sites: int, central: int, specialists: int,
                     specialties: int) -> Population:
    """The generated directory: ``central`` hospitals holding the specialists, every other site
    a district (one in five) or commune site with one referring clinician."""
    chosen = SPECIALTIES[:specialties]
    lines = ["# Generated by bench/signaling_load.py", ""]
    clients: list[ClientSpec] = []

    def site(site_id: str, name: str, tier: str, region: str) -> None:
        lines.extend(["[[sites]]", f'id = "{site_id}"', f'name = "{name}"', f'tier = "{tier}"',
                      f'region = "{region}"', ""])

    def clinician(cid: str, name: str, site_id: str, role: str, specialty: str | None) -> None:
        lines.extend(["[[clinicians]]", f'id = "{cid}"', f'name = "{name}"',
                      f'site = "{site_id}"', f'roles = ["{role}"]'])
        if specialty is not None:
            lines.append(f'specialties = ["{specialty}"]')
        lines.append("")
        clients.append(ClientSpec(cid, site_id, role, specialty))

    central_ids = [f"c{i:03d}" for i in range(1, central + 1)]
    for i, site_id in enumerate(central_ids):
        site(site_id, f"Central Hospital {i + 1}", "central", REGIONS[i % len(REGIONS)])
    for i in range(specialists):
        clinician(f"sp{i + 1:04d}", f"Specialist {i + 1}", central_ids[i % central],
                  SPECIALIST, chosen[i % len(chosen)])
    for i in range(sites - central):
        site_id = f"s{i + 1:05d}"
        tier = "district" if i % 5 == 0 else "commune"
        site(site_id, f"{tier.title()} Site {i + 1}", tier, REGIONS[i % len(REGIONS)])
        clinician(f"rf{i + 1:05d}", f"Referring Doctor {i + 1}", site_id, REFERRING, None)
    return Population(sites, central, chosen, tuple(clients), "\n".join(lines))


def config_toml(data_dir: Path, directory_file: Path, secret: str, metrics_token: str,
                ping_interval_s: float | None = None,
                gc_thresholds: tuple[int, ...] | None = None, log_level: str = "WARNING") -> str:
    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    return "\n".join([
        "[server]", f"host = {q(HOST)}", "port = 0",
        *([f"gc_thresholds = {list(gc_thresholds)}"] if gc_thresholds else []), "",
        "[security]", f"token_secret = {q(secret)}", "token_ttl_s = 7200",
        f"metrics_token = {q(metrics_token)}", "",
        "[storage]", f"data_dir = {q(str(data_dir))}", "",
        "[directory]", f"file = {q(str(directory_file))}", "",
        "[logging]", f"level = {q(log_level)}", "",
        *(["[presence]", f"ping_interval_s = {ping_interval_s}", ""]
          if ping_interval_s is not None else []),
    ])


def mint_tokens(population: Population, directory_file: Path, secret: str) -> list[ClientSpec]:
    from signaling.directory import Directory
    from signaling.tokens import TokenAuthority

    authority = TokenAuthority(secret, Directory.load(directory_file), ttl_s=7200)
    return [ClientSpec(c.clinician_id, c.site_id, c.kind, c.specialty,
                       authority.issue(c.clinician_id)) for c in population.clients]


def assign_nodes(clients: Sequence[ClientSpec], nodes: int) -> list[ClientSpec]:
    """Each client's node: referring clients in turn over the nodes, and each specialty's
    specialists in turn (counted per specialty, so that every node has specialists of every
    specialty whatever the counts)."""
    seen: Counter[str] = Counter()
    placed = []
    for client in clients:
        key = REFERRING if client.kind == REFERRING else f"{SPECIALIST}:{client.specialty}"
        placed.append(replace(client, node=seen[key] % nodes))
        seen[key] += 1
    return placed


def split_clients(clients: Sequence[ClientSpec], workers: int) -> list[tuple[ClientSpec, ...]]:
    """Round-robin per kind, so every worker gets referring clients and specialists."""
    shares: list[list[ClientSpec]] = [[] for _ in range(workers)]
    for kind in (SPECIALIST, REFERRING):
        for i, client in enumerate(c for c in clients if c.kind == kind):
            shares[i % workers].append(client)
    return [tuple(share) for share in shares]


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def merge_counts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


# -- load-generator worker (runs in its own process) ----------------------------------------


class GcWatch:
    """Records this process's garbage-collector pauses while ``active``: a load generator that
    pauses delays the ``consult:ready`` it is timing, so its pauses are reported too."""

    def __init__(self, into: list[tuple[int, float, float]]) -> None:
        self.active = False
        self.start = 0.0
        self._into = into
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1000
        if self.active and (info["generation"] == 2 or ms > 5):
            self._into.append((int(info["generation"]), ms, time.monotonic() - self.start))


@dataclass
class WorkerState:
    report: RunReport = field(default_factory=RunReport)
    pending: dict[str, float] = field(default_factory=dict)
    """Tag of each request sent and not yet paired -> monotonic time it was emitted."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever a request is paired or a task ends (the drain waits on it)."""
    stopping: bool = False
    start: float = 0.0
    """Monotonic time the requests start (common to all workers)."""
    specialist_nodes: dict[str, int] = field(default_factory=dict)
    referring_nodes: dict[str, int] = field(default_factory=dict)

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.changed.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is pending or running, at most ``timeout`` s; True if drained."""
        deadline = time.monotonic() + timeout
        while self.pending or self.tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True


def _error_code(answer: Any) -> str | None:
    """None for an ``{"ok": true}`` ack, else the error code."""
    if isinstance(answer, dict) and answer.get("ok") is True:
        return None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("code", "error"))
    return "malformed_ack"


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


class SiteClient:
    """One clinician's socket.io connection and its scripted behaviour."""

    def __init__(self, spec: ClientSpec, plan: WorkerPlan, http: aiohttp.ClientSession,
                 state: WorkerState) -> None:
        self.spec = spec
        self.plan = plan
        self.state = state
        self.connected = False
        self.sio = socketio.AsyncClient(reconnection=False, http_session=http,
                                        handle_sigint=False)
        self.sio.on("disconnect", self._on_disconnect)
        if spec.kind == SPECIALIST:
            self.sio.on("queue:update", self._on_queue_update)
        else:
            self.sio.on("consult:ready", self._on_ready)
            self.sio.on("request:update", self._on_request_update)

    async def connect(self) -> float:
        """Connect and sign in; returns the time it took in ms."""
        started = time.monotonic()
        await asyncio.wait_for(
            self.sio.connect(self.plan.urls[self.spec.node], auth={"token": self.spec.token},
                             transports=["websocket"], wait_timeout=self.plan.connect_timeout_s),
            self.plan.connect_timeout_s + 5,
        )
        self.connected = True
        return (time.monotonic() - started) * 1000

    async def disconnect(self) -> None:
        if self.connected:
            with contextlib.suppress(Exception):
                await self.sio.disconnect()
            self.connected = False

    async def call(self, event: str, payload: dict[str, Any]) -> tuple[Any, str | None]:
        """Emit with an ack; returns (ack, error code or None)."""
        try:
            answer = await self.sio.call(event, payload, timeout=CALL_TIMEOUT_S)
        except socketio.exceptions.TimeoutError:
            return None, "timeout"
        except socketio.exceptions.SocketIOError as exc:
            return None, type(exc).__name__
        return answer, _error_code(answer)

    # -- referring side -----------------------------------------------------------------------
    async def send_request(self, tag: str, specialty: str, priority: str,
                           scheduled: float) -> None:
        report = self.state.report
        emitted = time.monotonic()
        report.lag_ms.append((emitted - scheduled) * 1000)
        report.sent += 1
        self.state.pending[tag] = emitted
        _, code = await self.call("consult:request", {
            "specialty": specialty, "priority": priority,
            "reason": f"[{tag}] load test referral, {priority} {specialty} opinion requested",
        })
        if code is not None:
            self.state.pending.pop(tag, None)
            _bump(report.request_errors, code)
            return
        report.acked += 1
        report.ack_ms.append((time.monotonic() - emitted) * 1000)

    async def _on_ready(self, data: Any) -> None:
        received = time.monotonic()
        request = data.get("request") if isinstance(data, dict) else None
        reason = request.get("reason", "") if isinstance(request, dict) else ""
        match = TAG.match(reason if isinstance(reason, str) else "")
        emitted = self.state.pending.pop(match.group(1), None) if match else None
        if emitted is None:
            self.state.report.unmatched_ready += 1
            return
        self.state.report.paired += 1
        self.state.report.pair_ms.append((received - emitted) * 1000)
        self.state.report.pair_sent_s.append(emitted - self.state.start)
        winner = request.get("accepted_by") if isinstance(request, dict) else None
        node = self.state.specialist_nodes.get(winner) if isinstance(winner, str) else None
        self.state.report.pair_cross.append(node is not None and node != self.spec.node)
        self.state.changed.set()

    async def _on_request_update(self, data: Any) -> None:
        self.state.report.request_updates += 1

    # -- specialist side ------------------------------------------------------------------------
    async def _on_queue_update(self, data: Any) -> None:
        if self.state.stopping or not isinstance(data, dict) or data.get("action") != "added":
            return
        request = data.get("request")
        if not isinstance(request, dict) or not isinstance(request.get("id"), str):
            return
        if (self.plan.cross_only and self.state.referring_nodes.get(
                str(request.get("requester_id")), self.spec.node) == self.spec.node):
            return  # made on this node: the other nodes' specialists take it
        report = self.state.report
        answer, code = await self.call("consult:accept", {"request_id": request["id"]})
        if code == "already_taken":
            report.accepts_taken += 1
        elif code is not None:
            _bump(report.accept_errors, code)
        else:
            report.accepts_won += 1
            self.state.spawn(self._end_later(answer["consultation"]["id"]))

    async def _end_later(self, consultation_id: str) -> None:
        await asyncio.sleep(self.plan.hold_s)
        _, code = await self.call("consult:end", {
            "consultation_id": consultation_id,
            "conclusion": "Load test: advice given, patient stays at the referring site.",
        })
        if code is None:
            self.state.report.ended += 1
        else:
            _bump(self.state.report.end_errors, code)

    async def _on_disconnect(self, reason: Any = None) -> None:
        self.connected = False
        if not self.state.stopping:
            self.state.report.unexpected_disconnects += 1


async def _expect(conn: Connection, expected: str, timeout: float) -> tuple[Any, ...]:
    """Wait (bounded) for the orchestrator's next message; anything else aborts the worker."""
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, conn.poll, timeout):
        raise BenchError(f"no {expected!r} from the orchestrator within {timeout:.0f} s")
    message: tuple[Any, ...] = conn.recv()
    if message[0] != expected:
        raise BenchError(f"expected {expected!r}, got {message[0]!r}")
    return message


async def _connect_all(clients: list[SiteClient], concurrency: int) -> ConnectReport:
    report = ConnectReport(attempted=len(clients))
    gate = asyncio.Semaphore(concurrency)
    cpu0 = time.process_time()

    async def one(client: SiteClient) -> None:
        async with gate:
            try:
                report.connect_ms.append(await client.connect())
                report.connected += 1
            except Exception as exc:
                if len(report.errors) < 5:
                    report.errors.append(f"{client.spec.clinician_id}: "
                                         f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(c) for c in clients))
    report.cpu_s = time.process_time() - cpu0
    return report


async def _generate(plan: WorkerPlan, clients: list[SiteClient], state: WorkerState,
                    start: float) -> None:
    """Emit this worker's share of the requests on a fixed schedule (open loop), then wait,
    bounded, for the answers and for the consultations its specialists host to end."""
    rng = random.Random(plan.seed * 1000 + plan.index)
    requesters = [c for c in clients if c.spec.kind == REFERRING and c.connected]
    rng.shuffle(requesters)
    interval = plan.workers / plan.rate
    offset = plan.index / plan.rate
    count = max(0, math.ceil((plan.duration_s - offset) / interval)) if requesters else 0
    for i in range(count):
        scheduled = start + offset + i * interval
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        client = requesters[i % len(requesters)]
        if not client.connected:
            continue
        specialty = rng.choice(plan.specialties)
        priority = rng.choices(PRIORITIES, PRIORITY_WEIGHTS)[0]
        state.spawn(client.send_request(f"w{plan.index}-{i}", specialty, priority, scheduled))
        state.report.last_send_s = time.monotonic() - start
    await state.drain(plan.drain_s + plan.hold_s)


async def _worker(plan: WorkerPlan, conn: Connection) -> None:
    state = WorkerState(specialist_nodes=dict(plan.specialist_nodes),
                        referring_nodes=dict(plan.referring_nodes))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        clients = [SiteClient(spec, plan, http, state) for spec in plan.clients]
        conn.send(("ready",))
        try:
            await _expect(conn, "connect", WORKER_START_TIMEOUT_S)
            connected = await _connect_all(clients, plan.connect_concurrency)
            # The connections live for the whole run: move them out of the collector's way, and
            # collect young objects less often, so that the generator's own pauses stay rare and
            # short (they would delay the consult:ready it is timing). The server is untouched.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GENERATOR_GC_THRESHOLD)
            watch = GcWatch(state.report.gc_pauses)
            conn.send(("connected", connected))
            _, start = await _expect(conn, "go", WORKER_START_TIMEOUT_S + plan.connect_timeout_s)
            state.start = start
            watch.start = start
            watch.active = True
            cpu0 = time.process_time()
            await _generate(plan, clients, state, start)
            conn.send(("drained",))
            await _expect(conn, "stop", plan.duration_s + plan.drain_s + plan.hold_s + 120)
            state.report.cpu_s = time.process_time() - cpu0
            watch.active = False
            state.stopping = True
            if state.tasks:
                await asyncio.wait(set(state.tasks), timeout=plan.hold_s + CALL_TIMEOUT_S)
            conn.send(("report", state.report))
        finally:
            state.stopping = True
            for task in list(state.tasks):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True),
                    30,
                )


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """Entry point of a load-generator process."""
    try:
        asyncio.run(_worker(plan, conn))
    except BaseException as exc:  # report anything to the orchestrator, then exit
        with contextlib.suppress(Exception):
            conn.send(("error", f"worker {plan.index}: {exc!r}\n{traceback.format_exc()}"))
        if not isinstance(exc, Exception):
            raise
    finally:
        conn.close()


# -- the server under test -------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the server child (Linux): get SIGTERM when the benchmark dies, even by SIGKILL, so no
    server is ever left behind. SIGTERM stops the server gracefully."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Target(Protocol):
    """What the benchmark runs against: one `serve` (``Server``) or a fleet
    (``FleetTarget``)."""

    label: str
    nodes: int
    relays: int

    @property
    def urls(self) -> list[str]: ...

    def start(self) -> None: ...

    def stop(self) -> object: ...

    def alive(self) -> bool: ...

    def log_tail(self, lines: int = 20) -> str: ...

    def node_pids(self) -> list[int]: ...

    def side_processes(self) -> dict[str, list[psutil.Process]]:
        """The other processes of the configuration (Redis, PostgreSQL, relays, nginx), whose
        CPU is reported beside the nodes'."""
        ...


class Server:
    """``python -m telehealth.cli --config CFG serve`` as a subprocess."""

    nodes = 1
    relays = 0

    def __init__(self, config: Path, log: Path, *, gc_trace: bool = False,
                 wrapper_gc_threshold: str = "",
                 label: str = "1 node, embedded: SQLite, memory, embedded relay") -> None:
        self.label = label
        self.config = config
        self.log_path = log
        self.gc_trace = gc_trace or bool(wrapper_gc_threshold)
        self.wrapper_gc_threshold = wrapper_gc_threshold
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self._lines: Queue[str] = Queue()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TELEHEALTH_", "BENCH_GC_"))}
        entry = ["-m", "telehealth.cli"]
        if self.gc_trace:
            entry = [str(Path(__file__).with_name("gc_trace_server.py"))]
        if self.wrapper_gc_threshold:
            env["BENCH_GC_THRESHOLD"] = self.wrapper_gc_threshold
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, *entry, "--config", str(self.config), "serve"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                cwd=self.config.parent,  # not the caller's cwd: `-m` must not pick up a stray copy
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        threading.Thread(target=self._pump, daemon=True, name="server-stdout").start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except Empty:
                if self.process.poll() is not None:
                    raise BenchError(f"server exited with {self.process.returncode}:\n"
                                     f"{self.log_tail()}") from None
                continue
            if line.startswith("READY "):
                self.url = line.split(None, 1)[1].strip()
                if not self.url.startswith(f"http://{HOST}:"):
                    raise BenchError(f"server listens on {self.url}, not on {HOST}")
                return
        raise BenchError(f"server not READY within {SERVER_START_TIMEOUT_S:.0f} s:\n"
                         f"{self.log_tail()}")

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:  # ends when the server closes stdout
            self._lines.put(line)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def urls(self) -> list[str]:
        return [self.url]

    def node_pids(self) -> list[int]:
        return [self.pid]

    def side_processes(self) -> dict[str, list[psutil.Process]]:
        return {}  # records, live state and the relay are all inside the server

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self) -> int | None:
        """SIGINT (graceful: closes the records), SIGKILL if it does not exit in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        return self.process.returncode


class FleetTarget:
    """A real local fleet from tests/fleet_processes.py (H4's harness, also `make fleet`'s):
    redis-server, PostgreSQL, ``nodes`` `serve` processes, ``relays`` standalone relays
    dialling nginx. The harness reads relay registrations from the nodes' INFO log, so the
    nodes log at INFO (and the baseline of the same run too, for a like-for-like figure)."""

    def __init__(self, folder: Path, *, nodes: int, relays: int, directory_toml: str,
                 secret: str, sections: dict[str, dict[str, Any]]) -> None:
        if str(ROOT) not in sys.path:  # run as a script: bench/ itself is on sys.path
            sys.path.insert(0, str(ROOT))
        from tests.fleet_processes import Fleet

        self.nodes = nodes
        self.relays = relays
        self.label = (f"fleet: {nodes} node{'s' if nodes > 1 else ''}, Redis, PostgreSQL, "
                      f"{relays} standalone relays")
        self.fleet = Fleet(folder, nodes=nodes, relays=relays, directory=directory_toml,
                           sections=sections, secret=secret, token_ttl_s=7200)

    @property
    def urls(self) -> list[str]:
        return [self.fleet.node_url(name) for name in self.fleet.node_names]

    def start(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self.fleet.start(), FLEET_START_TIMEOUT_S))
        except Exception as exc:
            tail = self.log_tail()
            self.stop()
            raise BenchError(f"the fleet did not start: {exc!r}\n{tail}") from exc
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.fleet.stop_all()  # every member's process group (nginx's worker included)

    def alive(self) -> bool:
        members = self.fleet.members
        return all(name in members and members[name].running
                   for name in (*self.fleet.node_names, *self.fleet.relay_names,
                                "redis", "postgres"))

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for name, member in self.fleet.members.items():
            state = "running" if member.running else f"exited {member.process.returncode}"
            tail = member.output().splitlines()[-lines:]
            parts.append(f"--- {name} ({state}) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def node_pids(self) -> list[int]:
        return [self.fleet.members[name].process.pid for name in self.fleet.node_names]

    def side_processes(self) -> dict[str, list[psutil.Process]]:
        """PostgreSQL's backends (one per pooled connection) and nginx's worker are children
        of the processes the harness started: each member with its children, as they are
        now (after the connects, the pools are full)."""
        groups: dict[str, list[psutil.Process]] = {}
        for name, member in self.fleet.members.items():
            if name in self.fleet.node_names or not member.running:
                continue
            group = "relays" if name in self.fleet.relay_names else name
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(member.process.pid)
                groups.setdefault(group, []).extend([top, *top.children(recursive=True)])
        return groups


class Processes:
    """The nodes of a configuration as one: their RSS, CPU and fds summed."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.members = [psutil.Process(pid) for pid in pids]

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.members)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.members)

    def fds(self) -> int:
        return sum(p.num_fds() for p in self.members)


def group_cpu(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds so far of each group (a process gone meanwhile counts what it had)."""
    totals: dict[str, float] = {}
    for name, members in groups.items():
        total = 0.0
        for process in members:
            with contextlib.suppress(psutil.Error):
                total += cpu_seconds(process)
        totals[name] = total
    return totals


class Sampler:
    """Samples the nodes' CPU use (summed) every SAMPLE_EVERY_S in a thread; keeps the
    peak."""

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self._processes = list(processes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")
        self.peak_cpu_percent = 0.0
        self.peak_rss = 0

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with contextlib.suppress(psutil.Error):
            for process in self._processes:
                process.cpu_percent(None)
            while not self._stop.wait(SAMPLE_EVERY_S):
                self.peak_cpu_percent = max(self.peak_cpu_percent, sum(
                    p.cpu_percent(None) for p in self._processes))
                self.peak_rss = max(self.peak_rss,
                                    sum(p.memory_info().rss for p in self._processes))


def server_gc_thresholds() -> tuple[int, ...] | None:
    """The server's own collector thresholds (``server.gc_thresholds``, set by `serve` since
    0ed36e8), or None if this version of the server has no such setting."""
    try:
        from config.settings import ServerSettings

        value = getattr(ServerSettings(), "gc_thresholds", None)
    except Exception:
        return None
    return tuple(int(v) for v in value) if value is not None else None


def relay_capacity() -> int | None:
    """Rooms the embedded relay accepts (the bench leaves ``[relay]`` at its defaults); None if
    this version of the server has no such setting."""
    try:
        from config.settings import RelaySettings  # type: ignore[attr-defined,unused-ignore]

        capacity = RelaySettings().capacity
    except Exception:
        return None
    return capacity if isinstance(capacity, int) else None


def code_version() -> str:
    """Where the server code comes from, and its git commit when it is a checkout."""
    spec = importlib.util.find_spec("signaling")
    if spec is None or spec.origin is None:
        return "signaling not importable"
    root = Path(spec.origin).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(root), *argv], capture_output=True,
                                  text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return f"{root} (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "signaling", "relay", "config")
    return f"{root} at {head}" + (" + uncommitted changes in signaling/relay/config"
                                  if dirty else "")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (guest time is already
    part of user time on Linux, so it is not added again)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    busy = (t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
            + getattr(t, "steal", 0.0))
    return float(busy), float(busy + idle)


def busy_fraction(seconds: float) -> float:
    """Share of all cores busy over the next ``seconds`` (a quiet-machine check)."""
    busy0, total0 = machine_busy()
    time.sleep(seconds)
    busy1, total1 = machine_busy()
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def busy_before_start(wait_s: float) -> float:
    """The machine's busy share over 2 s before a configuration starts. With ``wait_s`` > 0
    it is sampled again until it is at most ``QUIET_BUSY`` or ``wait_s`` have passed: on a
    machine shared with other jobs (test runs come and go within minutes) a fleet measured
    while another job holds a core is a figure about that job."""
    started = time.monotonic()
    busy = busy_fraction(2.0)
    while busy > QUIET_BUSY and time.monotonic() - started < wait_s:
        busy = busy_fraction(2.0)
    if wait_s > 0:
        waited = time.monotonic() - started
        state = "quiet" if busy <= QUIET_BUSY else "still busy"
        print(f"waited {waited:.0f} s for a quiet machine ({state}: {busy * 100:.0f}% busy)",
              file=sys.stderr, flush=True)
    return busy


# -- orchestration --------------------------------------------------------------------------


@dataclass
class Results:
    sites: int
    referring: int
    central: int
    specialists: int
    specialties: int
    workers: int
    rate: float
    duration_s: float
    hold_s: float
    connect_concurrency: int
    clients: int = 0
    connected: int = 0
    connect_errors: list[str] = field(default_factory=list)
    connect_total_s: float = math.nan
    connect_p50_ms: float = math.nan
    connect_p99_ms: float = math.nan
    connect_server_cpu_s: float = math.nan
    connect_generator_cpu_s: float = math.nan
    sent: int = 0
    acked: int = 0
    paired: int = 0
    unpaired: int = 0
    achieved_rate: float = math.nan
    ack_p50_ms: float = math.nan
    ack_p99_ms: float = math.nan
    pair_p50_ms: float = math.nan
    pair_p90_ms: float = math.nan
    pair_p99_ms: float = math.nan
    pair_max_ms: float = math.nan
    lag_p99_ms: float = math.nan
    lag_max_ms: float = math.nan
    request_errors: dict[str, int] = field(default_factory=dict)
    accepts_won: int = 0
    accepts_taken: int = 0
    accept_errors: dict[str, int] = field(default_factory=dict)
    ended: int = 0
    end_errors: dict[str, int] = field(default_factory=dict)
    request_updates: int = 0
    unmatched_ready: int = 0
    unexpected_disconnects: int = 0
    rss_idle_mb: float = math.nan
    rss_connected_mb: float = math.nan
    rss_end_mb: float = math.nan
    rss_per_site_kb: float = math.nan
    server_fds: int = 0
    run_wall_s: float = math.nan
    run_server_cpu_s: float = math.nan
    run_server_peak_cpu_percent: float = math.nan
    run_generator_cpu_s: float = math.nan
    run_machine_busy: float = math.nan
    """Fraction of all cores busy during the run (server + generator + everything else)."""
    run_other_cpu_s: float = math.nan
    """Busy CPU seconds of the machine during the run not used by the server or the workers
    (the orchestrator, the kernel, other processes): interference shows up here."""
    busy_before: float = math.nan
    """Share of all cores busy during 2 s before the server started."""
    cores: int = 0
    profile_top: list[tuple[str, float]] = field(default_factory=list)
    gc_trace: bool = False
    gc_threshold: str = ""
    """--gc-threshold as given; empty: the server's own collector settings."""
    server_gc_thresholds: tuple[int, ...] | None = None
    """``server.gc_thresholds`` of this server version (None: no such setting, Python's)."""
    ping_interval_s: float | None = None
    gc_pauses_run: list[tuple[int, float, float]] = field(default_factory=list)
    """(generation, ms, ended at s after the start) of each logged server GC pause during the
    run (--gc-trace)."""
    generator_gc_pauses: list[tuple[int, float, float]] = field(default_factory=list)
    """The same for the workers: their full collections and young ones over 5 ms."""
    server_pairing_count: int = 0
    """telehealth_pairing_seconds from /metrics: accepts the server handled successfully..."""
    server_pairing_mean_ms: float = math.nan
    server_pairing_over_50ms: int = 0
    """...and how many of them took the server more than 50 ms (claim to both notified)."""
    code: str = ""
    relay_capacity: int | None = None
    start_monotonic: float = math.nan
    """The common start on the machine's monotonic clock (to line up server-side logs)."""
    pairings: list[tuple[float, float]] = field(default_factory=list)
    """(emitted at, seconds after the start; pairing latency ms), by emission time."""
    label: str = ""
    """The configuration measured (Target.label)."""
    nodes: int = 1
    relays: int = 0
    """Standalone relays (0: the embedded one)."""
    split: str = ""
    """How the clients are spread over the nodes (assign_nodes); empty with one node."""
    log_level: str = "WARNING"
    heartbeat_misses: int | None = None
    """--heartbeat-misses given to the fleet's nodes (None: the server's default)."""
    cross_pairs: int = 0
    """Pairings whose specialist was on another node than the requester."""
    cross_p50_ms: float = math.nan
    cross_p99_ms: float = math.nan
    same_p50_ms: float = math.nan
    same_p99_ms: float = math.nan
    side_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds during the run of Redis, PostgreSQL, the relays, nginx (a fleet)."""


def _gather(conns: Sequence[Connection], expected: str, timeout: float,
            server: Target) -> list[tuple[Any, ...]]:
    """One ``expected`` message from every worker, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[Any, ...]] = {}
    while len(got) < len(conns):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"workers did not report {expected!r} within {timeout:.0f} s")
        if not server.alive():
            raise BenchError(f"the server died while waiting for {expected!r}:\n"
                             f"{server.log_tail()}")
        waiting = [c for i, c in enumerate(conns) if i not in got]
        for conn in wait_for_messages(waiting, timeout=min(1.0, remaining)):
            assert isinstance(conn, Connection)
            try:
                message: tuple[Any, ...] = conn.recv()
            except EOFError:
                raise BenchError(f"a worker exited before reporting {expected!r}") from None
            if message[0] == "error":
                raise BenchError(str(message[1]))
            if message[0] != expected:
                raise BenchError(f"expected {expected!r} from a worker, got {message[0]!r}")
            got[conns.index(conn)] = message
    return [got[i] for i in range(len(conns))]


def _broadcast(conns: Sequence[Connection], *message: Any) -> None:
    for conn in conns:
        conn.send(message)


def _start_profiler(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print(f"py-spy not found ({exe}); running without the profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--format", "raw",
         "--duration", str(max(1, int(seconds))), "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def summarize_profile(paths: Sequence[Path], top: int = 15) -> list[tuple[str, float]]:
    """Self time per function, as a share of the busy samples, from py-spy's raw (collapsed)
    output (of several nodes: their samples added). Samples of a thread waiting (the event
    loop in select, the records thread waiting for work) are left out: with --nonblocking
    py-spy cannot always tell they are idle."""
    counts: Counter[str] = Counter()
    total = 0
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            stack, _, number = line.rpartition(" ")
            if not stack or not number.isdigit():
                continue
            leaf = stack.split(";")[-1]
            leaf = re.sub(r":\d+\)$", ")", leaf)  # one entry per function, not per line
            if leaf.startswith(IDLE_FRAMES):
                continue
            counts[leaf] += int(number)
            total += int(number)
    return [(name, n / total) for name, n in counts.most_common(top)] if total else []


def new_results(args: argparse.Namespace, population: Population, target: Target,
                log_level: str) -> Results:
    return Results(sites=args.sites, referring=population.referring, central=args.central,
                   specialists=population.specialists, specialties=len(population.specialties),
                   workers=args.workers, rate=args.rate, duration_s=args.duration,
                   hold_s=args.hold, connect_concurrency=args.connect_concurrency,
                   clients=len(population.clients), cores=psutil.cpu_count() or 0,
                   gc_trace=args.gc_trace or bool(args.gc_threshold),
                   gc_threshold=args.gc_threshold, server_gc_thresholds=server_gc_thresholds(),
                   ping_interval_s=args.ping_interval, code=code_version(),
                   relay_capacity=(relay_capacity() or 0) * max(1, target.relays) or None,
                   label=target.label, nodes=target.nodes, relays=target.relays,
                   split=args.split if target.nodes > 1 else "", log_level=log_level,
                   heartbeat_misses=(args.heartbeat_misses if isinstance(target, FleetTarget)
                                     else None))


def fleet_sections(args: argparse.Namespace, metrics_token: str) -> dict[str, dict[str, Any]]:
    """Every fleet node's config over the harness's: the server defaults wherever the
    harness (made for quick tests) differs from them and the load depends on it (presence
    pings: 5 s in tests/support.py, 20 s by default), the metrics token, INFO logging (the
    harness reads relay registrations from it)."""
    from config.settings import PresenceSettings

    presence = PresenceSettings().model_dump()
    if args.ping_interval is not None:
        presence["ping_interval_s"] = args.ping_interval
    sections: dict[str, dict[str, Any]] = {
        "presence": presence, "security": {"metrics_token": metrics_token},
        "logging": {"level": "INFO"}}
    if args.heartbeat_misses is not None:
        sections["relay"] = {"heartbeat_misses": args.heartbeat_misses}
    return sections


def run(args: argparse.Namespace) -> list[Results]:
    """Every configuration of the invocation, in turn, on one population: the baseline
    first when a fleet is measured (unless --no-baseline), then the configuration asked
    for."""
    population = build_population(args.sites, args.central, args.specialists, args.specialties)
    workdir = Path(tempfile.mkdtemp(prefix="telehealth-bench-", dir=args.tmp_dir))
    fleet = args.redis and args.postgres
    # The harness's nodes log at INFO; a baseline beside them does too (like for like).
    log_level = "INFO" if fleet else "WARNING"
    try:
        secret = secrets.token_urlsafe(48)
        metrics_token = secrets.token_urlsafe(32)
        directory_file = workdir / "directory.toml"
        directory_file.write_text(population.directory_toml, encoding="utf-8")
        clients = mint_tokens(population, directory_file, secret)
        results: list[Results] = []
        if not fleet or args.baseline:
            # Since 0ed36e8 `serve` sets the collector thresholds from its config: an
            # experiment goes there. Older servers have no such setting:
            # gc_trace_server.py sets them before start-up.
            own_gc = server_gc_thresholds()
            wanted_gc = (tuple(int(v) for v in args.gc_threshold.split(","))
                         if args.gc_threshold else None)
            server = Server(workdir / "config.toml", workdir / "server.log",
                            gc_trace=args.gc_trace or bool(wanted_gc),
                            wrapper_gc_threshold=args.gc_threshold if own_gc is None else "",
                            label=("baseline: " if fleet else "")
                            + "1 node, embedded: SQLite, memory, embedded relay")
            server.config.write_text(config_toml(
                workdir / "data", directory_file, secret, metrics_token, args.ping_interval,
                wanted_gc if own_gc is not None else None, log_level))
            results.append(measure(args, population, clients, server, log_level,
                                   metrics_token, profile=not fleet))
        if fleet:
            target = FleetTarget(workdir / "fleet", nodes=args.nodes, relays=args.relays,
                                 directory_toml=population.directory_toml, secret=secret,
                                 sections=fleet_sections(args, metrics_token))
            results.append(measure(args, population,
                                   assign_nodes(clients, args.nodes), target,
                                   log_level, metrics_token, profile=True))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def measure(args: argparse.Namespace, population: Population, clients: Sequence[ClientSpec],
            target: Target, log_level: str, metrics_token: str, *,
            profile: bool) -> Results:
    """Start ``target``, connect every client to its node, run the schedule, stop it all
    (also on failure)."""
    res = new_results(args, population, target, log_level)
    processes: list[mp.process.BaseProcess] = []
    conns: list[Connection] = []
    profilers: list[subprocess.Popen[bytes]] = []
    profile_paths: list[Path] = []
    print(f"measuring {target.label}...", file=sys.stderr, flush=True)
    try:
        res.busy_before = busy_before_start(args.wait_quiet)
        if res.busy_before > QUIET_BUSY:
            print(f"warning: the machine is already {res.busy_before * 100:.0f}% busy before "
                  "the benchmark starts; figures will be disturbed", file=sys.stderr)
        target.start()
        nodes = Processes(target.node_pids())
        time.sleep(0.5)
        rss_idle = nodes.rss()
        res.rss_idle_mb = rss_idle / 2**20

        specialist_nodes = tuple((c.clinician_id, c.node) for c in clients
                                 if c.kind == SPECIALIST)
        cross_only = target.nodes > 1 and args.split == "cross"
        referring_nodes = tuple((c.clinician_id, c.node) for c in clients
                                if c.kind == REFERRING) if cross_only else ()
        context = mp.get_context("spawn")
        for index, share in enumerate(split_clients(clients, args.workers)):
            parent, child = context.Pipe()
            plan = WorkerPlan(index=index, workers=args.workers, urls=tuple(target.urls),
                              clients=share, rate=args.rate, duration_s=args.duration,
                              hold_s=args.hold, drain_s=args.drain,
                              connect_concurrency=args.connect_concurrency,
                              connect_timeout_s=args.connect_timeout,
                              specialties=population.specialties, seed=args.seed,
                              specialist_nodes=specialist_nodes,
                              referring_nodes=referring_nodes, cross_only=cross_only)
            process = context.Process(target=worker_main, args=(plan, child),
                                      name=f"bench-worker-{index}", daemon=True)
            process.start()
            child.close()
            processes.append(process)
            conns.append(parent)
        _gather(conns, "ready", WORKER_START_TIMEOUT_S, target)

        # -- connect -------------------------------------------------------------------------
        print(f"connecting {len(clients)} clients ({args.workers} workers x "
              f"{args.connect_concurrency} at a time) to {len(target.urls)} node(s)...",
              file=sys.stderr, flush=True)
        server_cpu0 = nodes.cpu()
        started = time.monotonic()
        _broadcast(conns, "connect")
        connect_timeout = args.connect_timeout + 60 + len(clients) * 0.05
        reports: list[ConnectReport] = [m[1] for m in _gather(conns, "connected",
                                                              connect_timeout, target)]
        res.connect_total_s = time.monotonic() - started
        res.connect_server_cpu_s = nodes.cpu() - server_cpu0
        connect_ms = [ms for r in reports for ms in r.connect_ms]
        res.connected = sum(r.connected for r in reports)
        res.connect_errors = [e for r in reports for e in r.errors][:5]
        res.connect_p50_ms = percentile(connect_ms, 50)
        res.connect_p99_ms = percentile(connect_ms, 99)
        res.connect_generator_cpu_s = sum(r.cpu_s for r in reports)
        time.sleep(1.0)  # let the server finish the tail of the connects before measuring
        rss_connected = nodes.rss()
        res.rss_connected_mb = rss_connected / 2**20
        res.rss_per_site_kb = (rss_connected - rss_idle) / 1024 / args.sites
        res.server_fds = nodes.fds()
        if res.connected == 0:
            raise BenchError("no client could connect: " + "; ".join(res.connect_errors))

        # -- requests ------------------------------------------------------------------------
        print(f"sending {args.rate:g} requests/s for {args.duration:g} s...", file=sys.stderr,
              flush=True)
        side = target.side_processes()
        side0 = group_cpu(side)
        server_cpu0 = nodes.cpu()
        busy0, total0 = machine_busy()
        start = time.monotonic() + 0.5
        res.start_monotonic = start
        if profile and args.py_spy is not None:
            pids = target.node_pids()
            for i, pid in enumerate(pids):
                path = (args.py_spy if len(pids) == 1
                        else args.py_spy.with_name(f"{args.py_spy.name}.node{i}"))
                profiler = _start_profiler(pid, args.duration, path)
                if profiler is not None:
                    profilers.append(profiler)
                    profile_paths.append(path)
        with Sampler(nodes.members) as sampler:
            _broadcast(conns, "go", start)
            _gather(conns, "drained", args.duration + args.drain + args.hold + 60, target)
            _broadcast(conns, "stop")
            res.run_wall_s = time.monotonic() - start
            res.run_server_cpu_s = nodes.cpu() - server_cpu0
            side1 = group_cpu(side)
            busy1, total1 = machine_busy()
            runs: list[RunReport] = [m[1] for m in _gather(
                conns, "report", args.hold + CALL_TIMEOUT_S + 60, target)]
        res.side_cpu_s = {name: side1[name] - side0[name] for name in side0}
        res.run_server_peak_cpu_percent = sampler.peak_cpu_percent
        res.run_machine_busy = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0
        res.rss_end_mb = nodes.rss() / 2**20
        _collect(res, runs)
        res.run_other_cpu_s = (busy1 - busy0 - res.run_server_cpu_s - res.run_generator_cpu_s
                               - sum(res.side_cpu_s.values()))
        _scrape_metrics(res, target.urls, metrics_token)
        if isinstance(target, Server) and target.gc_trace:
            res.gc_pauses_run = gc_pauses(target.log_path, start, start + res.run_wall_s)
        for profiler in profilers:
            try:
                profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                profiler.kill()
        if profile_paths:
            res.profile_top = summarize_profile(profile_paths)
    finally:
        for profiler in profilers:
            if profiler.poll() is None:
                profiler.kill()
        for conn in conns:  # a worker still waiting for orders sees EOF and winds down
            conn.close()
        for worker in processes:
            worker.join(timeout=40)  # it disconnects its clients first (30 s at most)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        target.stop()
    return res


def gc_pauses(log: Path, start: float, until: float) -> list[tuple[int, float, float]]:
    """(generation, ms, ended at s after ``start``) of the GC pauses gc_trace_server.py logged
    between two monotonic times."""
    found = []
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            match = GC_LINE.match(line)
            if match and start <= float(match.group(3)) <= until:
                found.append((int(match.group(1)), float(match.group(2)),
                              round(float(match.group(3)) - start, 3)))
    return found


def _scrape_metrics(res: Results, urls: Sequence[str], token: str) -> None:
    """Cross-check with the server's own accept timing (``telehealth_pairing_seconds``),
    summed over the nodes (each counts the accepts it handled)."""
    values: dict[str, float] = {}
    for url in urls:
        request = urllib.request.Request(f"{url}/metrics",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except OSError as exc:
            print(f"could not read {url}/metrics: {exc}", file=sys.stderr)
            return
        for line in text.splitlines():
            if line.startswith("telehealth_pairing_seconds"):
                name, _, value = line.rpartition(" ")
                values[name] = values.get(name, 0.0) + float(value)
    count = values.get("telehealth_pairing_seconds_count", 0.0)
    within = values.get('telehealth_pairing_seconds_bucket{le="0.05"}', 0.0)
    res.server_pairing_count = int(count)
    res.server_pairing_over_50ms = int(count - within)
    if count:
        res.server_pairing_mean_ms = values["telehealth_pairing_seconds_sum"] / count * 1000


def _collect(res: Results, runs: Sequence[RunReport]) -> None:
    pair_ms = [ms for r in runs for ms in r.pair_ms]
    ack_ms = [ms for r in runs for ms in r.ack_ms]
    lag_ms = [ms for r in runs for ms in r.lag_ms]
    res.sent = sum(r.sent for r in runs)
    res.acked = sum(r.acked for r in runs)
    res.paired = sum(r.paired for r in runs)
    res.unpaired = res.acked - res.paired
    last_send = max((r.last_send_s for r in runs), default=0.0)
    # n requests on a fixed schedule span (n - 1) intervals
    res.achieved_rate = (res.sent - 1) / last_send if res.sent > 1 and last_send > 0 else math.nan
    res.ack_p50_ms = percentile(ack_ms, 50)
    res.ack_p99_ms = percentile(ack_ms, 99)
    res.pair_p50_ms = percentile(pair_ms, 50)
    res.pair_p90_ms = percentile(pair_ms, 90)
    res.pair_p99_ms = percentile(pair_ms, 99)
    res.pair_max_ms = max(pair_ms, default=math.nan)
    cross = [ms for r in runs for ms, x in zip(r.pair_ms, r.pair_cross, strict=True) if x]
    same = [ms for r in runs for ms, x in zip(r.pair_ms, r.pair_cross, strict=True) if not x]
    res.cross_pairs = len(cross)
    res.cross_p50_ms, res.cross_p99_ms = percentile(cross, 50), percentile(cross, 99)
    res.same_p50_ms, res.same_p99_ms = percentile(same, 50), percentile(same, 99)
    res.pairings = sorted((round(t, 4), round(ms, 3)) for r in runs
                          for t, ms in zip(r.pair_sent_s, r.pair_ms, strict=True))
    res.lag_p99_ms = percentile(lag_ms, 99)
    res.lag_max_ms = max(lag_ms, default=math.nan)
    res.request_errors = merge_counts([r.request_errors for r in runs])
    res.accepts_won = sum(r.accepts_won for r in runs)
    res.accepts_taken = sum(r.accepts_taken for r in runs)
    res.accept_errors = merge_counts([r.accept_errors for r in runs])
    res.ended = sum(r.ended for r in runs)
    res.end_errors = merge_counts([r.end_errors for r in runs])
    res.request_updates = sum(r.request_updates for r in runs)
    res.unmatched_ready = sum(r.unmatched_ready for r in runs)
    res.unexpected_disconnects = sum(r.unexpected_disconnects for r in runs)
    res.run_generator_cpu_s = sum(r.cpu_s for r in runs)
    res.generator_gc_pauses = [pause for r in runs for pause in r.gc_pauses]


# -- report ---------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def slowest_seconds(pairings: Sequence[tuple[float, float]], count: int = 3) -> str:
    """The seconds of the run whose slowest pairing was slowest: "t=12 s 80 ms (3 > 50)"."""
    worst: dict[int, list[float]] = {}
    for at, ms in pairings:
        worst.setdefault(int(at), []).append(ms)
    ranked = sorted(worst.items(), key=lambda item: max(item[1]), reverse=True)[:count]
    return ", ".join(
        f"t={second} s max {max(values):.0f} ms ({sum(v > GOAL_P99_MS for v in values)} of "
        f"{len(values)} > {GOAL_P99_MS:g} ms)" for second, values in ranked
    ) or "n/a"


def _gc_setting(res: Results) -> str:
    if res.server_gc_thresholds is None:
        return (f", gc.set_threshold({res.gc_threshold}) via bench/gc_trace_server.py"
                if res.gc_threshold else ", Python's collector thresholds")
    chosen = res.gc_threshold or ",".join(map(str, res.server_gc_thresholds))
    return f", server.gc_thresholds = {chosen}" + ("" if res.gc_threshold else " (default)")


def describe_pauses(pauses: Sequence[tuple[int, float, float]]) -> str:
    full = sorted((at, ms) for gen, ms, at in pauses if gen == 2)
    young = [ms for gen, ms, _ in pauses if gen < 2]
    when = ", ".join(f"{ms:.0f} ms at t={at:.1f} s" for at, ms in full[:8])
    return (f"{len(full)} full ({when or 'none'}); "
            f"{len(young)} young > 5 ms, longest {max(young, default=0):.0f} ms")


def render(res: Results) -> list[str]:
    wall = res.run_wall_s
    server_cores = res.run_server_cpu_s / wall if wall > 0 else math.nan
    generator_cores = res.run_generator_cpu_s / wall if wall > 0 else math.nan
    rows: list[tuple[str, str]] = [
        ("configuration", res.label + (f"; clients connect to the nodes directly, split "
                                       f"{res.split}; server figures are the {res.nodes} "
                                       "nodes' summed" if res.nodes > 1 else "")),
        ("setup", f"{res.sites} sites: {res.central} central with {res.specialists} specialists "
                  f"over {res.specialties} specialties, {res.referring} referring sites"),
        ("machine", f"{res.cores} cores, server and load generator share them; "
                    f"loopback {HOST}; {res.workers} generator processes"),
        ("server code", res.code),
        ("server settings", f"defaults, logging {res.log_level}"
         + (f", relay.heartbeat_misses = {res.heartbeat_misses}"
            if res.heartbeat_misses is not None else "")
         + (f", presence.ping_interval_s = {res.ping_interval_s:g}"
            if res.ping_interval_s is not None else "")
         + _gc_setting(res)),
        ("", ""),
        ("clients connected", f"{res.connected} / {res.clients} (websocket transport, "
                              f"{res.workers} x {res.connect_concurrency} at a time)"),
        ("connect time, all clients", f"{res.connect_total_s:.2f} s"),
        ("connect time per client p50 / p99", f"{_ms(res.connect_p50_ms)} / "
                                              f"{_ms(res.connect_p99_ms)} ms"),
        ("CPU during connect: server / generator", f"{res.connect_server_cpu_s:.1f} s / "
                                                   f"{res.connect_generator_cpu_s:.1f} s"),
        ("", ""),
        ("requests sent / acked / paired", f"{res.sent} / {res.acked} / {res.paired} "
                                           f"(unpaired {res.unpaired})"),
        ("rate target / achieved", f"{res.rate:g} / {_ms(res.achieved_rate)} per s for "
                                   f"{res.duration_s:g} s"),
        ("request ack p50 / p99", f"{_ms(res.ack_p50_ms)} / {_ms(res.ack_p99_ms)} ms"),
        ("pairing latency p50 / p90 / p99 / max",
         f"{_ms(res.pair_p50_ms)} / {_ms(res.pair_p90_ms)} / {_ms(res.pair_p99_ms)} / "
         f"{_ms(res.pair_max_ms)} ms"),
        *([("pairing cross-node p50 / p99 (count)",
            f"{_ms(res.cross_p50_ms)} / {_ms(res.cross_p99_ms)} ms ({res.cross_pairs}); "
            f"same node {_ms(res.same_p50_ms)} / {_ms(res.same_p99_ms)} ms "
            f"({res.paired - res.cross_pairs})")] if res.nodes > 1 else []),
        ("slowest seconds of the run", slowest_seconds(res.pairings)),
        ("send lag behind schedule p99 / max", f"{_ms(res.lag_p99_ms)} / {_ms(res.lag_max_ms)} "
                                               "ms (generator)"),
        ("server-side accept handling", f"{res.server_pairing_count} accepts, mean "
                                        f"{_ms(res.server_pairing_mean_ms)} ms, "
                                        f"{res.server_pairing_over_50ms} over 50 ms "
                                        "(telehealth_pairing_seconds)"),
        ("accepts won / already_taken", f"{res.accepts_won} / {res.accepts_taken}"
         + (" (a specialist accepts only requests made on another node)"
            if res.split == "cross" else "")),
        ("consultations ended", f"{res.ended} (hold {res.hold_s:g} s: about "
                                f"{res.rate * res.hold_s:.0f} open at a time; relay capacity "
                                f"{res.relay_capacity or 'unknown'})"),
        ("errors: request / accept / end", f"{_codes(res.request_errors)} / "
                                           f"{_codes(res.accept_errors)} / "
                                           f"{_codes(res.end_errors)}"),
        ("unexpected disconnects", str(res.unexpected_disconnects)),
        ("", ""),
        ("server RSS idle / connected / end", f"{res.rss_idle_mb:.1f} / "
                                              f"{res.rss_connected_mb:.1f} / "
                                              f"{res.rss_end_mb:.1f} MiB"),
        ("server RSS per connected site", f"{res.rss_per_site_kb:.1f} KiB "
                                          f"(({res.rss_connected_mb:.1f} - "
                                          f"{res.rss_idle_mb:.1f}) MiB / {res.sites})"),
        ("server open fds", str(res.server_fds)),
        ("run window", f"{wall:.1f} s (sending + drain)"),
        ("server CPU during run", f"{res.run_server_cpu_s:.1f} s = {server_cores:.2f} cores, "
                                  f"peak {res.run_server_peak_cpu_percent:.0f}% over "
                                  f"{SAMPLE_EVERY_S:g} s"),
        ("generator CPU during run", f"{res.run_generator_cpu_s:.1f} s = "
                                     f"{generator_cores:.2f} cores"),
        *([("fleet's other processes' CPU", ", ".join(
            f"{name} {cpu:.1f} s" for name, cpu in sorted(res.side_cpu_s.items())))]
          if res.side_cpu_s else []),
        ("machine CPU busy during run", f"{res.run_machine_busy * 100:.0f}% of {res.cores} "
                                        f"cores (other than server, generator"
                                        f"{' and the fleet' if res.side_cpu_s else ''}: "
                                        f"{res.run_other_cpu_s:.1f} s; "
                                        f"{res.busy_before * 100:.0f}% busy before start)"),
    ]
    rows.append(("generator GC pauses during run", describe_pauses(res.generator_gc_pauses)))
    if res.gc_trace:
        rows.append(("server GC pauses during run", describe_pauses(res.gc_pauses_run)))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" if k else "" for k, v in rows]
    if res.connect_errors:
        lines.append("connect errors (first 5): " + "; ".join(res.connect_errors))
    if res.run_machine_busy >= 0.9:
        lines.append("WARNING: the machine was >= 90% busy: the load generator competes with "
                     "the server for the cores, so latencies are an upper bound.")
    if res.relay_capacity and res.rate * res.hold_s >= 0.8 * res.relay_capacity:
        lines.append("WARNING: rate x hold comes close to the relay's room capacity: accepts "
                     "will fail with no_relay; use a shorter --hold.")
    if res.run_other_cpu_s > 0.05 * wall * res.cores:
        lines.append(f"WARNING: other processes used {res.run_other_cpu_s:.1f} CPU s during the "
                     "run (more than 5% of the machine): this run is disturbed, repeat it on a "
                     "quiet machine.")
    if not math.isnan(res.lag_p99_ms) and res.lag_p99_ms > 10:
        lines.append("WARNING: the generator fell behind its schedule (send lag p99 > 10 ms).")
    if res.profile_top:
        lines.append("")
        lines.append("server profile (py-spy, self time, share of busy samples):")
        lines += [f"  {share * 100:5.1f}%  {name}" for name, share in res.profile_top]
    lines.append("")
    goal_sites = GOAL_FLEET_SITES if res.nodes > 1 else GOAL_SITES
    at_goal = res.sites >= goal_sites and res.rate >= GOAL_RATE
    met = (at_goal and res.connected == res.clients and res.unpaired == 0
           and res.pair_p99_ms <= GOAL_P99_MS)
    verdict = ("met" if met else "NOT met") if at_goal else "not applicable (smaller run)"
    lines.append(f"goal ({goal_sites} sites, {GOAL_RATE:g} req/s, pairing p99 <= "
                 f"{GOAL_P99_MS:g} ms, all connected and paired): {verdict}")
    return lines


def compare(results: Sequence[Results]) -> list[str]:
    """The configurations of the run side by side, and the ratio of the p99s (the last
    against the first, the baseline)."""
    rows = [("configuration", "clients", "paired", "p50 ms", "p90 ms", "p99 ms", "max ms",
             "nodes' CPU", "other fleet CPU")]
    for res in results:
        rows.append((res.label, f"{res.connected}/{res.clients}", f"{res.paired}/{res.acked}",
                     _ms(res.pair_p50_ms), _ms(res.pair_p90_ms), _ms(res.pair_p99_ms),
                     _ms(res.pair_max_ms), f"{res.run_server_cpu_s:.1f} s",
                     f"{sum(res.side_cpu_s.values()):.1f} s" if res.side_cpu_s else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    base, last = results[0], results[-1]

    def ratio(ours: float, theirs: float) -> str:
        return "n/a" if not theirs > 0 or math.isnan(ours) else f"{ours / theirs:.2f}"

    lines.append(f"ratio of p99s, {last.label.split(':')[0]} / baseline: "
                 f"{ratio(last.pair_p99_ms, base.pair_p99_ms)} "
                 f"(of p50s: {ratio(last.pair_p50_ms, base.pair_p50_ms)})")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Load-test the signaling server: N sites, consult requests at R/s.")
    parser.add_argument("--sites", type=int,
                        help="sites in the directory (default 1000; 4000 for a fleet)")
    parser.add_argument("--rate", type=float, help="consult requests per second (default 50)")
    parser.add_argument("--duration", type=float, help="seconds of requests (default 20)")
    parser.add_argument("--specialists", type=int, help="specialist clinicians (default 40)")
    parser.add_argument("--specialties", type=int, default=5,
                        help=f"specialties, 1-{len(SPECIALTIES)} (default 5)")
    parser.add_argument("--central", type=int, default=3, help="central hospitals (default 3)")
    parser.add_argument("--workers", type=int, default=2,
                        help="load-generator processes (default 2)")
    parser.add_argument("--connect-concurrency", type=int, default=50,
                        help="connects in flight per worker (default 50)")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds one connect may take (default 30)")
    parser.add_argument("--hold", type=float,
                        help="seconds a consultation stays open before its host ends it "
                             "(default 2)")
    parser.add_argument("--drain", type=float,
                        help="seconds to wait for the last pairings (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 50 sites, 10 req/s for 3 s (explicit flags win)")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="where the temporary data dir goes (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here (a fleet with its baseline: a list, "
                             "the baseline first)")
    parser.add_argument("--ping-interval", type=float, default=None, metavar="S",
                        help="experiment: presence.ping_interval_s of the server (default: the "
                             "server's own, 20 s)")
    parser.add_argument("--gc-trace", action="store_true",
                        help="start the server through bench/gc_trace_server.py and report its "
                             "garbage-collector pauses during the run")
    parser.add_argument("--gc-threshold", default="", metavar="A,B,C",
                        help="experiment: the server's collector thresholds (server.gc_thresholds"
                             " where the server has that setting, else gc.set_threshold(A, B, C) "
                             "before it starts); implies --gc-trace; the server code is unchanged")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="RAW_FILE",
                        help="profile the server with py-spy during the requests "
                             "(collapsed stacks written here, top functions printed; a fleet: "
                             "each node's to RAW_FILE.node<i>, the top of all of them)")
    fleet = parser.add_argument_group(
        "fleet (issue #14)", "--redis --postgres: a real local fleet from "
        "tests/fleet_processes.py, measured after the embedded single node (the baseline)")
    fleet.add_argument("--nodes", type=int, default=1,
                       help="signaling nodes (default 1; more than one needs --redis "
                            "--postgres)")
    fleet.add_argument("--redis", action="store_true",
                       help='live.backend = "redis" (a redis-server started for the run)')
    fleet.add_argument("--postgres", action="store_true",
                       help='storage.backend = "postgresql" (a PostgreSQL started for the '
                            "run)")
    fleet.add_argument("--relays", type=int, default=2,
                       help="standalone relays of the fleet (default 2); the nodes run "
                            "relay.embedded = false")
    fleet.add_argument("--split", choices=("cross", "mixed"), default="cross",
                       help="both kinds of clients spread over the nodes; cross (default): a "
                            "specialist accepts only requests made on another node, so every "
                            "pairing crosses nodes; mixed: every specialist accepts every "
                            "request")
    fleet.add_argument("--heartbeat-misses", type=int, default=None, metavar="N",
                       help="experiment: relay.heartbeat_misses of the fleet's nodes (default: "
                            "the server's, 3 x 0.5 s); a node whose loop lags behind its "
                            "relays' heartbeats takes a live relay out")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each configuration, wait up to S seconds for the machine "
                             f"to be at most {QUIET_BUSY * 100:.0f}%% busy (a shared machine; "
                             "default 0: start at once)")
    fleet.add_argument("--no-baseline", dest="baseline", action="store_false",
                       help="measure the fleet alone, without the embedded single node "
                            "first")
    args = parser.parse_args(argv)
    defaults: dict[str, float] = (
        {"sites": 50, "rate": 10, "duration": 3, "specialists": 10, "hold": 0.5, "drain": 3}
        if args.quick else
        {"sites": GOAL_FLEET_SITES if args.nodes > 1 else 1000, "rate": 50, "duration": 20,
         "specialists": 40, "hold": 2, "drain": 5}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, type(value)(value))
    problems = []
    if not 1 <= args.specialties <= len(SPECIALTIES):
        problems.append(f"--specialties must be 1-{len(SPECIALTIES)}")
    if args.central < 1 or args.sites <= args.central:
        problems.append("need --central >= 1 and --sites > --central")
    if args.specialists < args.specialties:
        problems.append("need at least one specialist per specialty (--specialists)")
    if args.ping_interval is not None and args.ping_interval < 1:
        problems.append("--ping-interval must be >= 1 s")
    if args.rate <= 0 or args.duration <= 0 or args.hold < 0 or args.drain < 0:
        problems.append("--rate and --duration must be > 0, --hold and --drain >= 0")
    if args.workers < 1 or args.connect_concurrency < 1:
        problems.append("--workers and --connect-concurrency must be >= 1")
    if args.gc_threshold and not re.fullmatch(r"[1-9]\d*,[1-9]\d*,[1-9]\d*", args.gc_threshold):
        problems.append("--gc-threshold takes three positive integers: A,B,C")
    if args.nodes < 1 or args.relays < 1:
        problems.append("--nodes and --relays must be >= 1")
    if args.redis != args.postgres:
        problems.append("--redis and --postgres go together: the nodes act as one only with "
                        "both (signaling/fleet.py), and the harness starts both")
    if args.nodes > 1 and not args.redis:
        problems.append("--nodes > 1 needs --redis --postgres (separate nodes on SQLite and "
                        "memory do not share requests)")
    if args.nodes > 1 and args.split == "cross" and args.specialists < (
            args.specialties * args.nodes):
        problems.append("--split cross needs a specialist of every specialty on every node: "
                        "--specialists >= --specialties x --nodes")
    if args.heartbeat_misses is not None and (not args.redis or args.heartbeat_misses < 1):
        problems.append("--heartbeat-misses is for a fleet (--redis --postgres), >= 1")
    if args.redis and (args.gc_trace or args.gc_threshold):
        problems.append("--gc-trace and --gc-threshold are for one server: the fleet's nodes "
                        "are started by tests/fleet_processes.py")
    if problems:
        parser.error("; ".join(problems))
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM and SIGINT unwind through run()'s cleanup: workers and server are stopped.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        results = run(args)
    except BenchError as exc:
        print(f"signaling_load: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("signaling_load: interrupted; server and workers stopped", file=sys.stderr)
        return 130
    for res in results:
        if len(results) > 1:
            print(f"== {res.label} ==")
        for line in render(res):
            print(line)
        print()
    if len(results) > 1:
        for line in compare(results):
            print(line)
    if args.json is not None:
        # One run: its results, as before; a comparison: every configuration in order.
        payload: Any = ([asdict(r) for r in results] if len(results) > 1
                        else asdict(results[0]))
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    res = results[-1]
    if res.nodes > 1:
        print(f"RESULT sites={res.sites} nodes={res.nodes} pair_p50_ms={_ms(res.pair_p50_ms)} "
              f"pair_p99_ms={_ms(res.pair_p99_ms)}", flush=True)
    else:
        print(f"RESULT sites={res.sites} pair_p50_ms={_ms(res.pair_p50_ms)} "
              f"pair_p99_ms={_ms(res.pair_p99_ms)} rss_mb={res.rss_connected_mb:.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
