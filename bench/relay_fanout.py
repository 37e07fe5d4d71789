"""Relay fan-out benchmark: one publisher of pre-encoded VP8 (640x480, ~500 kbps, 30 fps) to N
subscribers, through the relay (``LocalRelay``: encoded RTP packets forwarded, never decoded)
and, as the baseline, through aiortc's ``MediaRelay`` (decoded once, re-encoded per subscriber).

    python bench/relay_fanout.py                 # full run, ~3 minutes (at most ~10)
    python bench/relay_fanout.py --quick         # N = 1, 4; 4 s a step; ~40 s
    python bench/relay_fanout.py --profile /tmp/relay.prof   # + py-spy on the relay at the top N
    python bench/relay_fanout.py --udp-port 24000 # + the relay in single-port mode, same run
    python bench/relay_fanout.py --quick --udp-port 24000       # the same, N = 1, 4; ~70 s

Processes (multiprocessing, spawn; all on 127.0.0.1; all stopped, or killed, at the end):

* the server under test, alone on CPU 0 (``--no-pin`` to share), behind a JSON-lines RPC
  (open_room, join, publish, subscribe, answer; renegotiation offers and notices pushed to the
  client that joined the participant); its CPU time is read with psutil around each window;
* the publisher: an aiortc peer whose track returns the clip's ``av.Packet``s (pts and
  time_base set, paced at 30 fps, looped with increasing timestamps; never re-encoded; a
  keyframe request jumps to the clip's next keyframe). The clip is encoded once with libvpx
  from FFmpeg's testsrc2 pattern and cached (``--cache-dir``);
* subscriber processes: aiortc peers (max-bundle) whose receiver's jitter buffer is replaced by
  a counting tap, so nothing is decoded. aiortc's receive path still runs (SRTP, statistics,
  NACK, receiver reports); its per-packet bandwidth estimator is replaced by one REMB a second,
  as a browser sends (``--remb aiortc`` keeps it: on a loaded machine it sends a REMB per
  packet). A "probe" process hosts the first 4 subscribers and nothing else, ``--workers``
  processes host the rest.

Each step adds subscribers up to N, waits until each has received frames, then measures a
window: the server's CPU seconds per forwarded stream-second (CPU / (N x window)); the frames
delivered (frames the publisher sent in the window that reached each subscriber complete within
1 s); and latencies, wall clock, from the moment the publisher handed a frame's last packet to
its socket: to the relay handing it to each subscriber's socket (the relay's own share, timed
inside the relay process), and to the frame being complete at the probe subscribers and at all
subscribers. The same path without a relay (publisher straight to one subscriber) is measured
first: "added" latency is the probe's percentile minus the direct path's. N steps up until a
step delivers < 95 % or the time budget runs out. The last line printed is

    RESULT cpu_ratio_vs_mediarelay=<x> max_streams_one_core=<n> added_latency_p50_ms=<a> p99_ms=<b>

cpu_ratio compares CPU per stream-second at the largest N both servers sustain; the latencies
are those at the largest N the relay sustained. On this 2-core machine the load generator (on
the other core) runs out before the relay reaches 80 % of its core: max_streams_one_core is then
0.8 / (relay CPU seconds per stream-second at the largest N sustained), and the output says so.

``--udp-port N`` adds a phase after the relay's: the same relay in single-port mode
(``relay.udp_port = N``: every connection's ICE and media on one socket, relay/udp_mux.py), the
same steps, publisher and subscribers. Its rows read ``sfu-1port``; before the RESULT line,

    RESULT_SINGLE_PORT cpu_ratio_vs_default=<r> at_n=<n>

is its CPU per stream-second over the default's at the largest N both sustain (goal <= 1.1).

``--workers-relay W`` measures instead what a relay machine's workers add (relay/workers.py,
`telehealth relay --workers W`): W relay processes side by side, each with its own room, its
own publisher and its own subscriber process (what placement does: rooms spread over the
workers), against one relay process measured the same way in the same run. Each step adds N
subscribers per relay process; the servers are pinned one per CPU (the generator processes
share all CPUs). The figure is the machine's capacity in streams: ``0.8 x relay processes /
CPU seconds per stream-second`` (what each relay process forwards at 80 % of its core), at
the largest N per process that both configurations sustain (>= 95 % of frames delivered to
every subscriber of every process); the last line is

    RESULT_WORKERS workers=<w> ratio=<r> streams_1=<a> streams_w=<b> at_n=<n> measured=<yes|no>

with ``measured=no`` when the relay processes never reached 80 % of their cores (the load
generator shares the machine: the capacities are then extrapolated from CPU per stream).
Goal: ratio >= 1.8 with 2 workers on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any

import psutil

from codec.rtp import ts_add

try:
    from bench import _relay_peers as peers
except ImportError:  # run as a script: bench/ itself is on sys.path
    import _relay_peers as peers  # type: ignore[no-redef]

SFU_STEPS = (1, 4, 16, 64, 128, 192, 256)
BASELINE_STEPS = (1, 4, 16)
QUICK_STEPS = (1, 4)
DELIVERED_GOAL_PCT = 95.0
CPU_RATIO_GOAL = 0.1
SINGLE_PORT_RATIO_GOAL = 1.1
SINGLE_PORT_QUICK_BUDGET_S = 35.0
"""Seconds --quick adds for the single-port phase."""
STREAMS_GOAL = 300
WORKER_STEPS = (4, 16, 32, 64)
WORKER_QUICK_STEPS = (4, 16)
WORKERS_RATIO_GOAL = 1.8
CORE_SHARE = 0.8
ADDED_P50_GOAL_MS = 5.0
ADDED_P99_GOAL_MS = 20.0
LATE_S = 1.0
"""A frame complete later than this after it was sent counts as not delivered."""
READY_FRAMES = 10
PROBES = 4
"""Subscribers in the probe process (worker 0), which hosts nothing else."""
GRACE_S = 1.0
NOISE_CORES = 0.3
NOISE_RETRIES = 2
"""A window during which other programs kept more than NOISE_CORES busy is measured again, at
most NOISE_RETRIES times (the machine is shared); never in --quick mode."""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    """The benchmark could not go on (a child died, a command failed or timed out)."""


# -- child processes ------------------------------------------------------------------------


class Child:
    """A child process running one role of ``_relay_peers``; commands over a pipe."""

    def __init__(self, ctx: SpawnContext, name: str, role: str, options: dict[str, Any]) -> None:
        self.name = name
        parent, child = ctx.Pipe()
        self.conn: Connection = parent
        self.process: SpawnProcess = ctx.Process(target=peers.child_main,
                                                 args=(role, child, options), name=name,
                                                 daemon=True)
        self.process.start()
        child.close()
        self._next = 0
        self._early: dict[int, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}
        self.ps: psutil.Process | None = None

    def started(self) -> None:
        self.info = self.wait(0, START_TIMEOUT_S)
        self.ps = psutil.Process(int(self.info["pid"]))

    def send(self, cmd: str, **args: Any) -> int:
        self._next += 1
        self.conn.send({"id": self._next, "cmd": cmd, "args": args})
        return self._next

    def wait(self, request_id: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            message = self._early.pop(request_id, None)
            if message is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{self.name}: no answer to request {request_id} within "
                                     f"{timeout:.0f} s")
                if not self.conn.poll(min(remaining, 0.5)):
                    if not self.process.is_alive():
                        raise BenchError(f"{self.name} exited with {self.process.exitcode}")
                    continue
                message = self.conn.recv()
                if message["id"] != request_id:
                    self._early[message["id"]] = message
                    continue
            if not message["ok"]:
                raise BenchError(f"{self.name}: {message['error']}")
            return message["result"]

    def request(self, cmd: str, timeout: float = 60.0, **args: Any) -> Any:
        return self.wait(self.send(cmd, **args), timeout)

    def cpu_seconds(self) -> float:
        assert self.ps is not None
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.request("stop", timeout=STOP_TIMEOUT_S)
            except (BenchError, OSError, EOFError):
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self.conn.close()


def gather(children: Sequence[Child], cmd: str, timeout: float = 60.0,
           per_child: Sequence[dict[str, Any]] | None = None, **args: Any) -> list[Any]:
    """The same command to several children at once; their answers in order."""
    ids = [c.send(cmd, **(per_child[i] if per_child else args)) for i, c in enumerate(children)]
    return [c.wait(i, timeout) for c, i in zip(children, ids, strict=True)]


# -- measurement ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks; ``values`` sorted."""
    if not values:
        return math.nan
    position = (len(values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def background_load(seconds: float = 1.0) -> float:
    """Cores busy on the machine before the benchmark starts anything."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - before) / seconds


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass
class Step:
    mode: str
    n: int
    window_s: float
    server_cpu_s: float
    workers_cpu_s: float
    publisher_cpu_s: float
    machine_cores: float
    frames_sent: int
    delivered: int
    ready: int
    p50_ms: float
    p99_ms: float
    probe_p50_ms: float
    probe_p99_ms: float
    relay_p50_ms: float
    relay_p99_ms: float
    """Publisher sent a frame's last packet -> the relay handed it to a subscriber's socket
    (every subscriber); nan for the baseline."""
    forwarded_pps: float | None = None
    skipped: int = 0
    rtcp_per_subscriber_s: dict[str, float] = field(default_factory=dict)
    generator_capacity: float = 2.0
    """Cores the publisher and subscriber processes may use."""
    notes: list[str] = field(default_factory=list)

    @property
    def server_core(self) -> float:
        return self.server_cpu_s / self.window_s

    @property
    def ms_per_stream_s(self) -> float:
        return 1000 * self.server_cpu_s / (self.n * self.window_s)

    @property
    def delivered_pct(self) -> float:
        expected = self.frames_sent * self.n
        return 100.0 * self.delivered / expected if expected else 0.0

    @property
    def sustained(self) -> bool:
        return self.ready >= self.n and self.delivered_pct >= DELIVERED_GOAL_PCT

    @property
    def limit(self) -> str:
        """What held this step back, if anything."""
        if self.sustained:
            return "gen busy" if self.generator_cores >= 0.85 * self.generator_capacity else "-"
        generator = self.generator_cores >= 0.85 * self.generator_capacity
        if self.server_core >= 0.9:
            return "srv+gen" if generator else "server CPU"
        if generator:
            return "generator"
        if self.machine_cores >= 0.9 * (psutil.cpu_count() or 1):
            return "machine"
        return "unknown"

    @property
    def other_cores(self) -> float:
        """Cores busy with work that is not the benchmark's (other programs: noise)."""
        return max(0.0, self.machine_cores - self.server_core - self.generator_cores)

    @property
    def generator_cores(self) -> float:
        return (self.workers_cpu_s + self.publisher_cpu_s) / self.window_s


@dataclass
class Reference:
    """The same path without a relay: publisher straight to one subscriber."""

    p50_ms: float
    p99_ms: float
    delivered_pct: float
    frames: int


def latencies(mode: str, sent: list[list[Any]], collected: dict[str, list[list[Any]]],
              offsets: dict[str, int]) -> dict[str, list[float]]:
    """Per subscriber, the latency in ms of each delivered frame. The relay forwards payloads
    untouched: frames match by VP8 picture id. The baseline re-encodes: by RTP timestamp less
    the subscriber's offset, within 2 ticks (aiortc rounds when rebasing timestamps)."""
    by_picture = {int(f[0]): float(f[3]) for f in sent}
    by_timestamp = {int(f[1]): float(f[3]) for f in sent}
    result: dict[str, list[float]] = {}
    for subscriber, frames in collected.items():
        found = result.setdefault(subscriber, [])
        offset = offsets.get(subscriber)
        for timestamp, picture_id, done_t in frames:
            if mode == "mediarelay":
                if offset is None:
                    continue
                base = ts_add(int(timestamp), -offset)
                sent_t = next((by_timestamp[t] for t in (base, base - 1, base + 1, base - 2,
                                                         base + 2) if t in by_timestamp), None)
            else:
                sent_t = by_picture.get(int(picture_id))
            if sent_t is None:
                continue
            found.append(1000 * (float(done_t) - sent_t))
    return result


def pooled(per_subscriber: dict[str, list[float]], only: set[str] | None = None
           ) -> list[float]:
    values = [v for s, found in per_subscriber.items() if only is None or s in only
              for v in found]
    values.sort()
    return values


def subscriber_ids(start: int, stop: int) -> list[str]:
    return [f"s{i:04d}" for i in range(start, stop)]


def share_out(start: int, stop: int, workers: int) -> list[dict[str, Any]]:
    """Subscribers start..stop over the worker processes: the first PROBES go to worker 0 (the
    probe process, lightly loaded: its latency is the relay's, not the load generator's),
    the others round-robin over the rest."""
    shares: list[list[str]] = [[] for _ in range(workers)]
    for i, participant in enumerate(subscriber_ids(start, stop), start):
        bulk = workers - 1
        shares[0 if i < PROBES or not bulk else 1 + (i - PROBES) % bulk].append(participant)
    return [{"ids": ids} for ids in shares]


def wait_ready(workers: Sequence[Child], n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        ready = sum(int(r) for r in gather(workers, "ready", frames=READY_FRAMES))
        if ready >= n or time.monotonic() > deadline:
            return ready
        time.sleep(0.25)


def measure_direct(publisher: Child, worker: Child, window_s: float, settle_s: float,
                   retries: int) -> Reference:
    """The path without a relay: publisher straight to one subscriber of the probe process.
    A window during which other programs were busy is measured again (``retries`` times)."""
    offer = publisher.request("direct_offer")
    answer = worker.request("direct_answer", sdp=offer["sdp"])
    publisher.request("direct_answer", sdp=answer["sdp"])
    try:
        if wait_ready([worker], 1, 20.0) < 1:
            raise BenchError("the direct reference path delivered no frames in 20 s")
        time.sleep(settle_s)
        for attempt in range(1 + retries):
            ours0 = publisher.cpu_seconds() + worker.cpu_seconds()
            busy0, m0, t0 = machine_busy_seconds(), time.monotonic(), time.time()
            time.sleep(window_s)
            t1 = time.time()
            ours = publisher.cpu_seconds() + worker.cpu_seconds() - ours0
            other = (machine_busy_seconds() - busy0 - ours) / (time.monotonic() - m0)
            time.sleep(GRACE_S)
            sent = publisher.request("frames", name="direct", t0=t0, t1=t1)
            collected = worker.request("collect", since=t0 - 0.5)
            if other <= NOISE_CORES or attempt == retries:
                break
            print(f"other programs kept {other:.2f} cores busy during the direct-path window: "
                  "measuring again", flush=True)
    finally:
        worker.request("close_all")
        publisher.request("close", name="direct")
    found = pooled(latencies("direct", sent, collected, {}))
    on_time = sum(1 for v in found if v <= 1000 * LATE_S)
    return Reference(percentile(found, 50), percentile(found, 99),
                     100.0 * on_time / len(sent) if sent else 0.0, len(sent))


def rtcp_counts(workers: Sequence[Child]) -> Counter[str]:
    total: Counter[str] = Counter()
    for status in gather(workers, "status"):
        total.update(status["rtcp"])
    return total


def measure(mode: str, n: int, server: Child, publisher: Child, workers: Sequence[Child],
            window_s: float) -> Step:
    stats0 = server.request("stats")
    rtcp0 = rtcp_counts(workers)
    server.request("timing_start")
    cpu0 = (server.cpu_seconds(), sum(w.cpu_seconds() for w in workers),
            publisher.cpu_seconds(), machine_busy_seconds())
    m0, t0 = time.monotonic(), time.time()
    time.sleep(window_s)
    m1, t1 = time.monotonic(), time.time()
    cpu1 = (server.cpu_seconds(), sum(w.cpu_seconds() for w in workers),
            publisher.cpu_seconds(), machine_busy_seconds())
    forwarded_at = server.request("timing_stop")
    stats1 = server.request("stats")
    rtcp1 = rtcp_counts(workers)
    time.sleep(GRACE_S)
    sent = publisher.request("frames", name="main", t0=t0, t1=t1)
    collected: dict[str, list[list[Any]]] = {}
    for part in gather(workers, "collect", timeout=120.0, since=t0 - 0.5):
        collected.update(part)
    offsets = {k: int(v) for k, v in stats1.get("offsets", {}).items()}
    per_subscriber = latencies(mode, sent, collected, offsets)
    found = pooled(per_subscriber)
    probe = pooled(per_subscriber, set(subscriber_ids(0, min(n, PROBES))))
    on_time = sum(1 for v in found if v <= 1000 * LATE_S)
    sent_at = {int(f[0]): float(f[3]) for f in sent}
    residence = sorted(1000 * (float(t) - sent_at[int(p)]) for p, t in forwarded_at
                       if int(p) in sent_at)
    wall = m1 - m0
    step = Step(mode=mode, n=n, window_s=wall, server_cpu_s=cpu1[0] - cpu0[0],
                workers_cpu_s=cpu1[1] - cpu0[1], publisher_cpu_s=cpu1[2] - cpu0[2],
                machine_cores=(cpu1[3] - cpu0[3]) / wall, frames_sent=len(sent),
                delivered=on_time, ready=0, p50_ms=percentile(found, 50),
                p99_ms=percentile(found, 99), probe_p50_ms=percentile(probe, 50),
                probe_p99_ms=percentile(probe, 99), relay_p50_ms=percentile(residence, 50),
                relay_p99_ms=percentile(residence, 99))
    step.rtcp_per_subscriber_s = {k: round((rtcp1[k] - rtcp0.get(k, 0)) / wall / n, 2)
                                  for k in rtcp1}
    if on_time < len(found):
        step.notes.append(f"{len(found) - on_time} frames complete but later than {LATE_S:.0f} s "
                          "(not counted as delivered)")
    if "forwarded" in stats1:
        step.forwarded_pps = (stats1["forwarded"] - stats0["forwarded"]) / wall
        step.skipped = int(stats1["skipped"] - stats0["skipped"])
        if stats1.get("paused"):
            step.notes.append(f"{stats1['paused']} subscriptions paused by the relay")
        if stats1.get("notices"):
            step.notes.append(f"relay notices so far: {stats1['notices']}")
    if mode == "mediarelay" and len(offsets) < n:
        step.notes.append(f"timestamp offset known for {len(offsets)} of {n} subscribers")
    return step


# -- phases -----------------------------------------------------------------------------------


@dataclass
class Settings:
    sfu_steps: tuple[int, ...]
    baseline_steps: tuple[int, ...]
    window_s: float
    settle_s: float
    workers: int
    budget_s: float
    cache_dir: Path
    profile: Path | None
    json_path: Path | None
    quick: bool
    remb: str
    noise_retries: int
    server_cpus: list[int]
    other_cpus: list[int]
    udp_port: int | None = None
    """Also measure the relay in single-port mode on this port."""
    workers_relay: int | None = None
    """Measure W relay processes side by side against one, instead of the phases above."""
    worker_steps: tuple[int, ...] = WORKER_STEPS


def run_phase(ctx: SpawnContext, mode: str, steps: Sequence[int], publisher: Child,
              workers: Sequence[Child], settings: Settings, deadline: float,
              children: list[Child], reference: Reference) -> tuple[list[Step], list[str]]:
    notes: list[str] = []
    server = Child(ctx, f"{mode}-server", "server",
                   {"mode": mode, "max_life_s": settings.budget_s + 120,
                    "cpus": settings.server_cpus, "udp_port": settings.udp_port})
    children.append(server)
    server.started()
    rows: list[Step] = []
    try:
        publisher.request("publish", port=server.info["port"])
        gather(workers, "connect", port=server.info["port"])
        current = 0
        for n in steps:
            added = n - current
            needed = 6 + 0.12 * added + settings.settle_s + settings.window_s + GRACE_S
            if time.monotonic() + needed > deadline:
                notes.append(f"{mode}: N={n} skipped, the time budget "
                             f"({settings.budget_s:.0f} s) would run out")
                break
            shares = share_out(current, n, len(workers))
            for result in gather(workers, "add", timeout=60 + 0.5 * added, per_child=shares):
                if result["errors"]:
                    notes.append(f"{mode} N={n}: {len(result['errors'])} subscribe errors, "
                                 f"first: {result['errors'][0]}")
            current = n
            ready = wait_ready(workers, n, 20 + 0.1 * added)
            time.sleep(settings.settle_s)
            for attempt in range(1 + settings.noise_retries):
                step = measure(mode, n, server, publisher, workers, settings.window_s)
                if step.other_cores <= NOISE_CORES or attempt == settings.noise_retries or \
                        time.monotonic() + settings.window_s + 5 > deadline:
                    break
                print(f"      other programs kept {step.other_cores:.2f} cores busy during the "
                      f"{mode} N={n} window: measuring again", flush=True)
                time.sleep(settings.settle_s)
            if step.other_cores > NOISE_CORES:
                step.notes.append(f"noisy: other programs used {step.other_cores:.2f} cores")
            step.ready = ready
            step.generator_capacity = float(len(settings.other_cpus) or psutil.cpu_count() or 1)
            if ready < n:
                step.notes.append(f"only {ready} of {n} subscribers received {READY_FRAMES} "
                                  "frames before the window")
            rows.append(step)
            print(format_row(step, reference), flush=True)
            print(f"      subscriber feedback per subscriber per s: {step.rtcp_per_subscriber_s}; "
                  f"skipped {step.skipped} packets", flush=True)
            for note in step.notes:
                print(f"      note: {note}", flush=True)
            if not step.sustained:
                break
        if settings.profile is not None and mode == "sfu" and rows:
            notes += profile_server(server, settings.profile, rows[-1].n, settings.window_s)
    finally:
        for call in (lambda: gather(workers, "close_all", timeout=60.0),
                     lambda: publisher.request("close", name="main")):
            try:
                call()
            except BenchError as exc:
                notes.append(f"{mode} teardown: {exc}")
        server.stop()
    return rows, notes


def profile_server(server: Child, output: Path, n: int, seconds: float) -> list[str]:
    """py-spy on the relay process for ``seconds`` (after the measured window, so it does not
    disturb it); prints where the relay spends its CPU."""
    candidates = [Path(sys.executable).parent / "py-spy", Path(shutil.which("py-spy") or "")]
    spy = next((c for c in candidates if c.name and c.is_file()), None)
    if spy is None:
        return ["--profile: py-spy not found (pip install py-spy into the venv)"]
    duration = max(2, round(seconds))
    command = [str(spy), "record", "--pid", str(server.info["pid"]), "--duration",
               str(duration), "--rate", "250", "--nonblocking", "--format", "raw", "--output",
               str(output)]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=duration + 30)
    except (subprocess.SubprocessError, OSError) as exc:
        return [f"--profile: py-spy failed: {exc}"]
    print(f"\nRelay profile at N={n} ({duration} s, py-spy raw stacks in {output}):")
    for line in summarize_profile(output):
        print(line)
    return []


IDLE_FRAMES = ("<module>", "run (", "run_until_complete", "run_forever", "_run_once",
               "_run (asyncio/events.py", "child_main", "_child", "_bootstrap", "_main",
               "spawn_main", "runpy", "run_module", "_run_code")


def summarize_profile(path: Path, top: int = 18) -> list[str]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        names = [_frame_name(f) for f in stack.split(";")]
        if names[-1].startswith("select (") or names[-1].endswith(".select (selectors.py)"):
            continue  # the event loop waiting (py-spy --nonblocking cannot tell it is idle)
        total += count
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if not total:
        return ["  (no samples)"]
    lines = [f"  {total} busy samples (event-loop waits left out); self time:"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines.append("  inclusive time:")
    shown = [(name, c) for name, c in inclusive.most_common()
             if not any(marker in name for marker in IDLE_FRAMES)][:top]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in shown]
    return lines


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (to/file.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(where.split("/")[-2:])
    return f"{name} ({short})"


# -- report -----------------------------------------------------------------------------------


HEADER = (f"{'server':<10} {'N':>4} {'srv %core':>9} {'ms/str-s':>8} {'marg.':>6} "
          f"{'deliv %':>7} {'rly p50':>7} {'rly p99':>7} {'prb p50':>7} {'prb p99':>7} "
          f"{'+p50':>6} {'+p99':>6} {'all p50':>7} {'all p99':>7} {'gen %':>6} {'other':>5} "
          f"{'pkt/s out':>9} {'limit':>8}")


def format_row(step: Step, reference: Reference, previous: Step | None = None) -> str:
    marginal = "-"
    if previous is not None and step.n > previous.n:
        extra = step.server_core - previous.server_core
        marginal = f"{1000 * extra / (step.n - previous.n):.2f}"
    generator = 100 * step.generator_cores
    pps = f"{step.forwarded_pps:.0f}" if step.forwarded_pps is not None else "-"
    return (f"{step.mode:<10} {step.n:>4} {100 * step.server_core:>9.1f} "
            f"{step.ms_per_stream_s:>8.2f} {marginal:>6} {step.delivered_pct:>7.1f} "
            f"{step.relay_p50_ms:>7.1f} {step.relay_p99_ms:>7.1f} {step.probe_p50_ms:>7.1f} "
            f"{step.probe_p99_ms:>7.1f} {step.probe_p50_ms - reference.p50_ms:>6.1f} "
            f"{step.probe_p99_ms - reference.p99_ms:>6.1f} {step.p50_ms:>7.1f} "
            f"{step.p99_ms:>7.1f} {generator:>6.0f} "
            f"{step.other_cores:>5.2f} {pps:>9} {step.limit:>8}")


def report(sfu: list[Step], baseline: list[Step], reference: Reference, notes: list[str],
           settings: Settings, single: Sequence[Step] = ()) -> dict[str, Any]:
    print("\nRelay fan-out: one VP8 640x480 30 fps publisher -> N subscribers "
          f"(1 probe + {settings.workers} subscriber processes, {settings.window_s:.0f} s "
          "windows)")
    print(f"direct path (no relay): frame latency p50 {reference.p50_ms:.2f} ms, "
          f"p99 {reference.p99_ms:.2f} ms, delivered {reference.delivered_pct:.1f} % of "
          f"{reference.frames} frames")
    print(HEADER)
    for rows in (baseline, sfu, single):
        previous: Step | None = None
        for step in rows:
            print(format_row(step, reference, previous))
            previous = step
    print("srv %core: server CPU / wall; ms/str-s: server CPU ms per forwarded stream-second; "
          "marg.: the same for the streams added by the step; rly p50/p99: publisher sent a "
          "frame's last packet -> the relay handed it to each subscriber's socket; prb/all "
          f"p50, p99: frame latency to the {PROBES} subscribers of the probe process / to all "
          "subscribers (frame complete at the subscriber); +p50/+p99: probe latency minus the "
          "direct path's; gen %: publisher + subscriber processes' CPU (100 = one core); "
          "other: cores busy with other programs during the window (noise); limit: what "
          "stopped the step, 'gen busy' when the generator used > 85 % of its cores")
    for note in notes:
        print(f"note: {note}")

    sfu_ok = [s for s in sfu if s.sustained]
    base_ok = {s.n: s for s in baseline if s.sustained}
    ratio = math.nan
    common = [s for s in sfu_ok if s.n in base_ok]
    if common:
        ratio = common[-1].ms_per_stream_s / base_ok[common[-1].n].ms_per_stream_s
        print(f"cpu ratio at N={common[-1].n} (largest N both sustain): "
              f"{common[-1].ms_per_stream_s:.2f} / {base_ok[common[-1].n].ms_per_stream_s:.2f} "
              f"ms per stream-second = {ratio:.3f} (goal <= {CPU_RATIO_GOAL})")
    max_streams = 0
    added_p50 = added_p99 = math.nan
    if sfu_ok:
        top = sfu_ok[-1]
        max_streams = int(CORE_SHARE / (top.ms_per_stream_s / 1000))
        added_p50 = top.probe_p50_ms - reference.p50_ms
        added_p99 = top.probe_p99_ms - reference.p99_ms
        measured = top.server_core >= CORE_SHARE
        stopped = next((s for s in sfu if not s.sustained), None)
        why = (f"N={stopped.n} delivered {stopped.delivered_pct:.1f} % "
               f"(limit: {stopped.limit})" if stopped else "no larger N was tried")
        print(f"largest N sustained (>= {DELIVERED_GOAL_PCT:.0f} % delivered): {top.n}, relay at "
              f"{100 * top.server_core:.0f} % of one core, machine {top.machine_cores:.2f} "
              f"cores busy; next: {why}")
        if not measured:
            where = (f"pinned to CPU {settings.other_cpus}" if settings.other_cpus
                     else "sharing the machine's cores")
            after = ""
            if stopped is not None:
                after = (f"; at N={stopped.n} the relay ran at {100 * stopped.server_core:.0f} % "
                         f"and the generator at {100 * stopped.generator_cores:.0f} % of a core "
                         f"({stopped.limit})")
            print(f"max_streams_one_core is EXTRAPOLATED: {CORE_SHARE} / "
                  f"{top.ms_per_stream_s / 1000:.5f} CPU s per stream-second at N={top.n}, the "
                  f"largest N sustained, with the relay at {100 * top.server_core:.0f} % of its "
                  f"core (load generator: publisher and subscriber processes, {where}){after}")
        if top.forwarded_pps:
            per_packet_us = 1e6 * top.server_core / top.forwarded_pps
            print(f"relay CPU per forwarded packet at N={top.n}: {per_packet_us:.1f} us; the "
                  f"fan-out of one incoming packet to all {top.n} subscribers is serial, "
                  f"~{top.n * per_packet_us / 1000:.1f} ms of the event loop")
        print(f"added latency at N={top.n} (probe subscribers minus the direct path): p50 "
              f"{added_p50:.2f} ms, p99 {added_p99:.2f} ms (goal <= {ADDED_P50_GOAL_MS:.0f} / "
              f"{ADDED_P99_GOAL_MS:.0f} ms); it includes one extra loopback hop, the relay's "
              "receive, SRTP and forwarding work and its serial fan-out to the other "
              "subscribers, and the probe process's wait for a CPU shared with the load "
              f"generator; the relay's own share (publisher send -> relay sendto, all "
              f"subscribers): p50 {top.relay_p50_ms:.2f} ms, p99 {top.relay_p99_ms:.2f} ms; all "
              f"subscribers end to end: p50 {top.p50_ms:.2f}, p99 {top.p99_ms:.2f} ms")
        fast = added_p50 <= ADDED_P50_GOAL_MS and added_p99 <= ADDED_P99_GOAL_MS
        print(f"goals: cpu ratio {'met' if ratio <= CPU_RATIO_GOAL else 'NOT met'}; "
              f"streams/core {'met' if max_streams >= STREAMS_GOAL else 'NOT met'} "
              f"({max_streams} vs {STREAMS_GOAL}); latency {'met' if fast else 'NOT met'}")
    if settings.udp_port is not None:
        single_port_report(sfu, single)
    result = {"cpu_ratio_vs_mediarelay": ratio, "max_streams_one_core": max_streams,
              "added_latency_p50_ms": added_p50, "p99_ms": added_p99}
    print("RESULT " + " ".join(
        f"{k}={v:.3f}" if k == "cpu_ratio_vs_mediarelay" else
        f"{k}={v}" if isinstance(v, int) else f"{k}={v:.2f}" for k, v in result.items()))
    return result


def single_port_report(sfu: Sequence[Step], single: Sequence[Step]) -> None:
    """The single-port relay's CPU per stream-second over the default relay's, per N both
    sustained; the ratio at the largest such N on the RESULT_SINGLE_PORT line."""
    default = {s.n: s for s in sfu if s.sustained}
    common = [s for s in single if s.sustained and s.n in default]
    for step in common:
        base = default[step.n]
        print(f"single port at N={step.n}: {step.ms_per_stream_s:.2f} / "
              f"{base.ms_per_stream_s:.2f} ms per stream-second = "
              f"{step.ms_per_stream_s / base.ms_per_stream_s:.3f} x the default "
              f"(other programs: {step.other_cores:.2f} / {base.other_cores:.2f} cores)")
    ratio, at_n = math.nan, 0
    if common:
        at_n = common[-1].n
        ratio = common[-1].ms_per_stream_s / default[at_n].ms_per_stream_s
        print(f"goal: single port {'met' if ratio <= SINGLE_PORT_RATIO_GOAL else 'NOT met'} "
              f"({ratio:.3f} vs <= {SINGLE_PORT_RATIO_GOAL} at N={at_n})")
    else:
        print("single port: no N sustained by both the default and the single-port relay")
    print(f"RESULT_SINGLE_PORT cpu_ratio_vs_default={ratio:.3f} at_n={at_n}")


# -- relay workers ----------------------------------------------------------------------------


@dataclass
class Group:
    """One relay process with its own room, publisher and subscriber process."""

    server: Child
    publisher: Child
    subscribers: Child


@dataclass
class WorkersStep:
    processes: int
    n: int
    """Subscribers per relay process."""
    steps: list[Step]

    @property
    def sustained(self) -> bool:
        return all(s.sustained for s in self.steps)

    @property
    def ms_per_stream_s(self) -> float:
        """Relay CPU per forwarded stream-second, all the relay processes together."""
        cpu = sum(s.server_cpu_s for s in self.steps)
        return 1000 * cpu / sum(s.n * s.window_s for s in self.steps)

    @property
    def busiest_core(self) -> float:
        return max(s.server_core for s in self.steps)

    @property
    def capacity(self) -> int:
        """Streams the processes forward at CORE_SHARE of a core each, from CPU per stream."""
        return int(self.processes * CORE_SHARE / (self.ms_per_stream_s / 1000))

    def row(self) -> str:
        delivered = min(s.delivered_pct for s in self.steps)
        cores = " ".join(f"{100 * s.server_core:.0f}" for s in self.steps)
        # Each step's own "other" counts the other processes' relay and generator as noise.
        other = max(0.0, self.steps[0].machine_cores - sum(s.server_core + s.generator_cores
                                                           for s in self.steps))
        return (f"{self.processes:>9} {self.n:>6} {self.processes * self.n:>7} "
                f"{self.ms_per_stream_s:>8.2f} {cores:>15} {delivered:>7.1f} "
                f"{max(s.probe_p99_ms for s in self.steps):>8.1f} {other:>5.2f} "
                f"{self.capacity:>9}")


WORKERS_HEADER = (f"{'processes':>9} {'N/proc':>6} {'streams':>7} {'ms/str-s':>8} "
                  f"{'srv %core each':>15} {'deliv %':>7} {'p99 ms':>8} {'other':>5} "
                  f"{'capacity':>9}")


def start_groups(ctx: SpawnContext, count: int, clip: Path, settings: Settings,
                 children: list[Child]) -> list[Group]:
    cpus = settings.server_cpus + settings.other_cpus or sorted(os.sched_getaffinity(0))
    life: dict[str, Any] = {"max_life_s": settings.budget_s + 120, "cpus": cpus}
    groups = []
    for k in range(count):
        server = Child(ctx, f"relay{k}", "server",
                       {"mode": "sfu", "max_life_s": settings.budget_s + 120,
                        "cpus": [cpus[k % len(cpus)]], "udp_port": None})
        publisher = Child(ctx, f"publisher{k}", "publisher", {"clip": str(clip), **life})
        subscribers = Child(ctx, f"subscribers{k}", "worker", {**life, "remb": settings.remb})
        children += [server, publisher, subscribers]
        groups.append(Group(server, publisher, subscribers))
    for group in groups:
        for child in (group.server, group.publisher, group.subscribers):
            child.started()
        group.publisher.request("publish", port=group.server.info["port"])
        group.subscribers.request("connect", port=group.server.info["port"])
    return groups


def stop_groups(groups: list[Group]) -> None:
    for group in groups:
        for child in (group.subscribers, group.publisher, group.server):
            child.stop()


def run_workers(ctx: SpawnContext, processes: int, clip: Path, settings: Settings,
                deadline: float) -> list[WorkersStep]:
    """``processes`` relay processes side by side, N subscribers each, step by step."""
    from concurrent.futures import ThreadPoolExecutor

    children: list[Child] = []
    rows: list[WorkersStep] = []
    try:
        groups = start_groups(ctx, processes, clip, settings, children)
        current = 0
        with ThreadPoolExecutor(max_workers=processes) as pool:
            for n in settings.worker_steps:
                if time.monotonic() + 10 + 0.12 * processes * (n - current) \
                        + settings.window_s > deadline:
                    print(f"  {processes} processes: N={n} skipped, the time budget would "
                          "run out", flush=True)
                    break
                for group in groups:
                    group.subscribers.request("add", timeout=60 + 0.5 * (n - current),
                                              ids=subscriber_ids(current, n))
                current = n
                ready = [wait_ready([g.subscribers], n, 20 + 0.1 * n) for g in groups]
                time.sleep(settings.settle_s)
                # The same window for every relay process: one thread per group.
                steps = list(pool.map(lambda g, n=n: measure(
                    "sfu", n, g.server, g.publisher, [g.subscribers], settings.window_s),
                    groups))
                for step, count in zip(steps, ready, strict=True):
                    step.ready = count
                row = WorkersStep(processes, n, steps)
                rows.append(row)
                print(row.row(), flush=True)
                if not row.sustained:
                    break
    finally:
        for child in reversed(children):
            child.stop()
    return rows


def workers_report(workers: int, one: list[WorkersStep], many: list[WorkersStep]) -> float:
    """The comparison, and the RESULT_WORKERS line; returns the ratio."""
    both = {s.n for s in one if s.sustained} & {s.n for s in many if s.sustained}
    ratio, at_n, measured = math.nan, 0, False
    streams_1 = streams_w = 0
    if both:
        at_n = max(both)
        a = next(s for s in one if s.n == at_n)
        b = next(s for s in many if s.n == at_n)
        streams_1, streams_w = a.capacity, b.capacity
        ratio = streams_w / streams_1
        measured = a.busiest_core >= CORE_SHARE and b.busiest_core >= CORE_SHARE
        print(f"at N={at_n} per process: 1 process {a.ms_per_stream_s:.2f} ms per "
              f"stream-second -> {streams_1} streams at {CORE_SHARE:.0%} of its core; "
              f"{workers} processes {b.ms_per_stream_s:.2f} ms -> {streams_w} streams at "
              f"{CORE_SHARE:.0%} of each core; ratio {ratio:.2f} (goal >= "
              f"{WORKERS_RATIO_GOAL}: {'met' if ratio >= WORKERS_RATIO_GOAL else 'NOT met'})")
        if not measured:
            print(f"the capacities are EXTRAPOLATED from CPU per stream: the relay processes "
                  f"ran at {100 * a.busiest_core:.0f} % (1 process) and at most "
                  f"{100 * b.busiest_core:.0f} % ({workers} processes) of their cores; the "
                  "load generator (publishers, subscribers) shares the machine's cores")
    else:
        print("no N per process was sustained by both configurations")
    print(f"RESULT_WORKERS workers={workers} ratio={ratio:.2f} streams_1={streams_1} "
          f"streams_w={streams_w} at_n={at_n} measured={'yes' if measured else 'no'}")
    return ratio


def main_workers(settings: Settings, clip: Path, started: float) -> int:
    assert settings.workers_relay is not None
    ctx = mp.get_context("spawn")
    deadline = started + settings.budget_s
    print(f"relay workers: {settings.workers_relay} relay processes side by side against one; "
          f"N subscribers per process, {settings.window_s:.0f} s windows", flush=True)
    print(WORKERS_HEADER, flush=True)
    try:
        # Half the time each: one process first, then the workers.
        one = run_workers(ctx, 1, clip, settings, started + settings.budget_s / 2)
        many = run_workers(ctx, settings.workers_relay, clip, settings, deadline)
    except BenchError as exc:
        print(f"relay_fanout: {exc}", file=sys.stderr)
        return 1
    print("\nRelay workers: one VP8 640x480 30 fps publisher per relay process")
    print(WORKERS_HEADER)
    for row in one + many:
        print(row.row())
    print("ms/str-s: relay CPU ms per forwarded stream-second, all relay processes together; "
          "srv %core each: each relay process's CPU / wall; deliv %: the worst process's "
          "frames delivered; p99 ms: the worst process's probe frame latency p99 (publisher "
          "send -> frame complete); other: cores busy with other programs; capacity: streams "
          f"forwarded at {CORE_SHARE:.0%} of each relay process's core, from ms/str-s")
    workers_report(settings.workers_relay, one, many)
    return 0


# -- main -------------------------------------------------------------------------------------


def steps_arg(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError("give increasing positive counts, e.g. 1,4,16")
    return values


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="N = 1, 4 for both servers, short windows (< 1 minute)")
    parser.add_argument("--steps", type=steps_arg, help="relay subscriber counts "
                        f"(default {','.join(map(str, SFU_STEPS))})")
    parser.add_argument("--baseline-steps", type=steps_arg, help="MediaRelay subscriber counts "
                        f"(default {','.join(map(str, BASELINE_STEPS))})")
    parser.add_argument("--window", type=float, help="seconds measured per step (default 10, "
                        "quick 4)")
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes besides "
                        f"the probe process (which hosts the first {PROBES} subscribers)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 570, "
                        "quick 55); steps that would not fit are skipped")
    parser.add_argument("--cache-dir", type=Path, default=Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "telehealth-bench",
        help="where the encoded clip is kept")
    parser.add_argument("--profile", type=Path, help="py-spy the relay at the largest N and "
                        "write the raw stacks here")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--udp-port", type=int, help="also measure the relay in single-port "
                        "mode (relay.udp_port) on this UDP port, after the default relay, with "
                        "the same steps")
    parser.add_argument("--workers-relay", type=int, help="measure W relay processes side "
                        "by side (relay.workers) against one, instead of the phases above; "
                        "last line RESULT_WORKERS")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the server to CPU 0 and every other process of the "
                        "benchmark to the other CPUs")
    parser.add_argument("--remb", choices=("browser", "aiortc"), default="browser",
                        help="subscriber bandwidth feedback: one REMB a second like a browser "
                        "(default), or aiortc's own estimator, which on a loaded machine "
                        "sends a REMB per packet")
    args = parser.parse_args(argv)
    if args.udp_port is not None and not 1 <= args.udp_port <= 65535:
        parser.error("--udp-port: give a UDP port, 1-65535")
    if args.workers_relay is not None and not 2 <= args.workers_relay <= 64:
        parser.error("--workers-relay: give 2-64 relay processes")
    quick = bool(args.quick)
    budget = args.budget or (55.0 if quick else 570.0)
    if args.udp_port is not None and not args.budget:
        budget += SINGLE_PORT_QUICK_BUDGET_S if quick else 400.0
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    return Settings(
        server_cpus=cpus[:1] if pin else [], other_cpus=cpus[1:] if pin else [],
        sfu_steps=args.steps or (QUICK_STEPS if quick else SFU_STEPS),
        baseline_steps=args.baseline_steps or (QUICK_STEPS if quick else BASELINE_STEPS),
        window_s=args.window or (4.0 if quick else 10.0),
        settle_s=0.5 if quick else 1.5,
        workers=max(1, args.workers),
        budget_s=budget, udp_port=args.udp_port, workers_relay=args.workers_relay,
        worker_steps=args.steps or (WORKER_QUICK_STEPS if quick else WORKER_STEPS),
        cache_dir=args.cache_dir, profile=args.profile, json_path=args.json, quick=quick,
        remb=args.remb, noise_retries=0 if quick else NOISE_RETRIES)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    background = background_load()
    print(f"machine: {psutil.cpu_count()} cores, {background:.2f} cores busy before the run",
          flush=True)
    started = time.monotonic()
    deadline = started + settings.budget_s
    clip, made = peers.ensure_clip(settings.cache_dir)
    summary = peers.clip_summary(peers.load_clip(clip))
    print(f"clip {clip} ({'encoded now' if made else 'cached'}): {summary['frames']} frames, "
          f"{summary['keyframes']} keyframes, {summary['kbps']} kbps", flush=True)
    if settings.workers_relay is not None:
        try:
            return main_workers(settings, clip, started)
        finally:
            print(f"(run took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    ctx = mp.get_context("spawn")
    children: list[Child] = []
    life: dict[str, Any] = {"max_life_s": settings.budget_s + 120, "cpus": settings.other_cpus}
    if settings.other_cpus:
        os.sched_setaffinity(0, settings.other_cpus)
        print(f"server pinned to CPU {settings.server_cpus}, publisher, subscribers and this "
              f"process to CPU {settings.other_cpus}", flush=True)
    try:
        publisher = Child(ctx, "publisher", "publisher", {"clip": str(clip), **life})
        worker_options = {**life, "remb": settings.remb}
        workers = [Child(ctx, "probe", "worker", worker_options),
                   *(Child(ctx, f"worker{i}", "worker", worker_options)
                     for i in range(settings.workers))]
        children += [publisher, *workers]
        for child in children:
            child.started()
        reference = measure_direct(publisher, workers[0], settings.window_s, settings.settle_s,
                                   settings.noise_retries)
        print(f"direct path: p50 {reference.p50_ms:.2f} ms, p99 {reference.p99_ms:.2f} ms, "
              f"{reference.delivered_pct:.1f} % of {reference.frames} frames", flush=True)
        print(HEADER, flush=True)
        sfu, notes = run_phase(ctx, "sfu", settings.sfu_steps, publisher, workers, settings,
                               deadline, children, reference)
        single: list[Step] = []
        if settings.udp_port is not None:
            single, more = run_phase(ctx, "sfu-1port", settings.sfu_steps, publisher, workers,
                                     settings, deadline, children, reference)
            notes += more
        baseline, more = run_phase(ctx, "mediarelay", settings.baseline_steps, publisher,
                                   workers, settings, deadline, children, reference)
        notes += more
        status = publisher.request("status")
        if any(s.get("keyframes_forced") for s in status.values()):
            notes.append(f"publisher keyframes on request: {status}")
        if background > 0.2:
            notes.append(f"{background:.2f} cores were busy before the run started: other "
                         "work on the machine skews every figure")
        result = report(sfu, baseline, reference, notes, settings, single)
        if settings.json_path is not None:
            settings.json_path.write_text(json.dumps({
                "reference": asdict(reference), "result": result, "notes": notes,
                "steps": [{**asdict(s), "ms_per_stream_s": s.ms_per_stream_s,
                           "delivered_pct": s.delivered_pct, "sustained": s.sustained}
                          for s in baseline + sfu + single]}, indent=2))
    except BenchError as exc:
        print(f"relay_fanout: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        print(f"(run took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
