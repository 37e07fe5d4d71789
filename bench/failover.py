"""Failover benchmark (#13): how long the participants of consultations on a relay that dies
(kill -9) or goes silent (SIGSTOP) are without media.

    python bench/failover.py                 # R = 4 consultations, 12 participants, ~1.5 min
    python bench/failover.py --rooms 2       # 6 participants
    python bench/failover.py --rooms 8 --workers 3
    python bench/failover.py --idle 100      # 100 more consultations (no participants)
                                             # on the relay, moved before the measured ones

What happens (all on 127.0.0.1; every process is stopped at the end, also on failure):

1. `telehealth serve` runs as a subprocess (tests/failover_processes.py) with no embedded
   relay, and two standalone relay nodes (`telehealth relay`): ``relay-a`` serves province 11,
   ``relay-b`` province 79. The directory is this script's: ``--rooms`` R district sites of
   province 11 (``d<i>``, a referring doctor ``ref<i>`` each), R invited sites (``x<i>``,
   ``guest<i>``) and a central hospital with R cardiologists (``spec<i>``).
2. R consultations: ``ref<i>`` asks, ``spec<i>`` accepts and invites ``x<i>``; being of province
   11 they are all placed on ``relay-a``. Their 3R participants are aiortc clients
   (tests/failover_client.py, which follows the client rules of docs/protocol.md), spread over
   ``--workers`` load-generator processes so that the relays and `serve` keep a core: each
   publishes a ``--fps`` 320x240 counter video (audio off: it costs the generators CPU and
   measures nothing more) and decodes the others'.
3. Once every participant has decoded ``READY_FRAMES`` frames from every other, ``relay-a`` is
   killed (SIGKILL, t0). Each participant's times are read from t0 on its own clock
   (CLOCK_MONOTONIC: the same across processes): **learn** = ``media:moved`` with the new relay
   arrived, **connect** = its new publish and subscribe connections both connected, **first
   frame** from each other participant through the new connections; **back** = the last of
   those. A participant not back within ``--timeout`` seconds is *unrecovered*.
4. The consultations are now on ``relay-b``; a third node ``relay-c`` (province 11) starts as
   the spare, media flows again, and ``relay-b`` is frozen (SIGSTOP): signaling notices only
   by the missing heartbeats (``relay.heartbeat_s`` x ``relay.heartbeat_misses``, 1.5 s by
   default). The same times are read.

A table per phase, one row per participant, then the last line

    RESULT kill_media_back_p50_s=<x> kill_media_back_max_s=<y> \
        silent_media_back_max_s=<z> unrecovered=<n>

(one line; split here only to fit).
Goals: both maxima <= 5 s, 0 unrecovered. docs/benchmarks.md has figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ itself is on sys.path
    sys.path.insert(0, str(ROOT))

from tests.failover_client import Participant, Recovery  # noqa: E402
from tests.failover_processes import Cluster  # noqa: E402
from tests.support import Client  # noqa: E402

GOAL_S = 5.0
READY_FRAMES = 15
"""Frames every participant decodes from every other before a relay is taken away."""
FLOWING_TIMEOUT_S = 90.0
COMMAND_TIMEOUT_S = 120.0
IDLE_PACE_S = 0.06
"""Between two idle consultations: each connection stays under ``limits.events_per_s``."""
FIRST = ("relay-a", "11")
SECOND = ("relay-b", "79")
THIRD = ("relay-c", "11")


def directory_toml(rooms: int) -> str:
    sites = [("c1", "Central Hospital", "central", "01"), ("d0", "District 0", "district", "11")]
    people: list[tuple[str, str, str, str]] = [("idle", "d0", "referring", "")]
    for i in range(1, rooms + 1):
        sites += [(f"d{i}", f"District {i}", "district", "11"),
                  (f"x{i}", f"Invited {i}", "district", "12")]
        people += [(f"ref{i}", f"d{i}", "referring", ""),
                   (f"spec{i}", "c1", "specialist", "cardiology"),
                   (f"guest{i}", f"x{i}", "referring", "")]
    out = [f'[[sites]]\nid = "{sid}"\nname = "{name}"\ntier = "{tier}"\nregion = "{region}"\n'
           for sid, name, tier, region in sites]
    for cid, site, role, specialty in people:
        specialties = f'\nspecialties = ["{specialty}"]' if specialty else ""
        out.append(f'[[clinicians]]\nid = "{cid}"\nname = "{cid}"\nsite = "{site}"\n'
                   f'roles = ["{role}"]{specialties}\n')
    return "\n".join(out)


# -- a load-generator process (--worker): participants driven by JSON lines on stdin ---------


async def worker() -> int:
    loop = asyncio.get_running_loop()
    parts: dict[str, Participant] = {}
    others: dict[str, list[str]] = {}
    rooms: dict[str, str] = {}

    def reply(message: dict[str, Any]) -> None:
        print(json.dumps(message), flush=True)

    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        what = command["cmd"]
        if what == "start":
            for person in command["people"]:
                part = Participant(command["url"], person["token"], person["name"],
                                   fps=command["fps"], audio=False)
                await part.connect()
                await part.ok("consult:join", {"consultation_id": person["cid"]})
                parts[part.name] = part
                others[part.name] = person["others"]
                rooms[part.name] = person["cid"]
            await asyncio.gather(*(p.start(rooms[p.name], timeout=60)
                                   for p in parts.values()))
            reply({"ok": True})
        elif what == "flowing":
            since, deadline = command["since"], time.monotonic() + command["timeout"]
            while not all(p.frames(o, since, time.monotonic()) >= READY_FRAMES
                          for p in parts.values() for o in others[p.name]):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            reply({"ok": all(p.frames(o, since, time.monotonic()) >= READY_FRAMES
                             for p in parts.values() for o in others[p.name])})
        elif what == "recover":
            t0, deadline = command["t0"], time.monotonic() + command["timeout"]
            while not all(p.recovery(t0, others[p.name]).media_back_s is not None
                          for p in parts.values()):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            reply({"recoveries": [
                {"cid": rooms[p.name], "relay": p.relay_id(), "failures": p.failures[-3:],
                 **vars(p.recovery(t0, others[p.name]))} for p in parts.values()]})
        elif what == "close":
            for part in parts.values():
                await part.close()
            reply({"ok": True})
            break
    return 0


@dataclass
class Worker:
    """A load-generator process of this script, spoken to with JSON lines."""

    process: asyncio.subprocess.Process

    @classmethod
    async def start(cls, log: Path) -> Worker:
        with log.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=err,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return cls(process)

    async def ask(self, command: dict[str, Any],
                  timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"a worker exited (code {self.process.returncode}) on "
                               f"{command['cmd']}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.process.returncode is None:
            try:
                await self.ask({"cmd": "close"}, timeout=20)
                await asyncio.wait_for(self.process.wait(), 10)
            except (TimeoutError, RuntimeError, BrokenPipeError, ConnectionResetError):
                self.process.kill()
                await self.process.wait()


# -- the bench ------------------------------------------------------------------------------


async def open_idle(cluster: Cluster, count: int) -> None:
    """``count`` consultations of ``idle`` (province 11) with ``spec1``, nobody joined: rooms
    on the relay that move before the measured ones (placed first, moved first)."""
    idle = await Client(cluster.url, cluster.token("idle")).connect()
    spec = await Client(cluster.url, cluster.token("spec1")).connect()
    try:
        for _ in range(count):
            asked = await idle.ok("consult:request", {
                "specialty": "cardiology", "priority": "routine", "reason": "idle room"})
            await spec.ok("consult:accept", {"request_id": asked["request"]["id"]})
            await asyncio.sleep(IDLE_PACE_S)
    finally:
        await idle.close()
        await spec.close()


async def open_consultations(cluster: Cluster, rooms: int) -> list[str]:
    """ref<i> asks, spec<i> accepts and invites x<i>; nobody has joined yet."""
    cids = []
    for i in range(1, rooms + 1):
        ref = await Client(cluster.url, cluster.token(f"ref{i}")).connect()
        spec = await Client(cluster.url, cluster.token(f"spec{i}")).connect()
        try:
            asked = await ref.ok("consult:request", {
                "specialty": "cardiology", "priority": "urgent", "reason": "failover bench"})
            accepted = await spec.ok("consult:accept", {"request_id": asked["request"]["id"]})
            cid = accepted["consultation"]["id"]
            await spec.ok("consult:invite", {"consultation_id": cid, "site_id": f"x{i}"})
            cids.append(cid)
        finally:
            await ref.close()
            await spec.close()
    return cids


def table(phase: str, recoveries: list[dict[str, Any]], labels: dict[str, str]) -> str:
    head = (f"{'phase':<8}{'room':<6}{'participant':<12}{'learn s':>8}{'connect s':>10}"
            f"{'back s':>8}  first frame from (s)")
    lines = [head, "-" * len(head)]
    for r in sorted(recoveries, key=lambda r: (labels[r["cid"]], r["participant"])):
        firsts = ", ".join(f"{o} {_s(v)}" for o, v in sorted(r["first_frame_s"].items()))
        back = Recovery(r["participant"], r["learned_s"], r["connected_s"],
                        r["first_frame_s"]).media_back_s
        lines.append(f"{phase:<8}{labels[r['cid']]:<6}{r['participant']:<12}"
                     f"{_s(r['learned_s']):>8}{_s(r['connected_s']):>10}{_s(back):>8}  "
                     f"{firsts}" + (f"  (on {r['relay']}; {r['failures']})"
                                    if back is None else ""))
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def backs(recoveries: list[dict[str, Any]]) -> list[float | None]:
    return [Recovery(r["participant"], r["learned_s"], r["connected_s"],
                     r["first_frame_s"]).media_back_s for r in recoveries]


class CpuWindow:
    """Cores the whole machine and each of this benchmark's processes (itself, `serve`, the
    nodes, the workers) kept busy over a window: on the shared machine, what the others took
    is the difference."""

    def __init__(self, named: dict[str, int]) -> None:
        self._processes: dict[str, psutil.Process] = {}
        for name, pid in named.items():
            with contextlib.suppress(psutil.Error):
                self._processes[name] = psutil.Process(pid)
        self._started = time.monotonic()
        self._machine = self._busy()
        self._before = {name: self._cpu(p) for name, p in self._processes.items()}

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    @staticmethod
    def _cpu(process: psutil.Process) -> float | None:
        try:
            cpu = process.cpu_times()
        except psutil.Error:
            return None  # gone (the relay killed): its share is not counted
        return float(cpu.user + cpu.system)

    def close(self) -> str:
        seconds = max(time.monotonic() - self._started, 1e-6)
        machine = (self._busy() - self._machine) / seconds
        shares: dict[str, float] = {}
        for name, process in self._processes.items():
            before, after = self._before.get(name), self._cpu(process)
            if before is not None and after is not None:
                shares[name] = (after - before) / seconds
        ours = sum(shares.values())
        each = ", ".join(f"{name} {share:.2f}" for name, share in shares.items()
                         if share >= 0.05)
        return (f"machine {machine:.2f} cores busy over {seconds:.1f} s, this benchmark's "
                f"processes {ours:.2f} ({each}), others {max(machine - ours, 0.0):.2f}")


def processes(cluster: Cluster, workers: list[Worker]) -> dict[str, int]:
    named = {"bench": os.getpid()}
    if cluster.serve is not None and cluster.serve.process.poll() is None:
        named["serve"] = cluster.serve.process.pid
    named.update({node.relay_id: node.process.pid for node in cluster.nodes.values()
                  if node.running})
    named.update({f"worker{i}": w.process.pid for i, w in enumerate(workers)})
    return named


async def phase(workers: list[Worker], cluster: Cluster, name: str, relay_id: str,
                signum: signal.Signals, timeout: float) -> list[dict[str, Any]]:
    """Takes ``relay_id`` away with ``signum`` and collects every participant's recovery."""
    window = CpuWindow(processes(cluster, workers))
    t0 = time.monotonic()
    cluster.signal_node(relay_id, signum)
    answers = await asyncio.gather(*(w.ask({"cmd": "recover", "t0": t0, "timeout": timeout})
                                     for w in workers))
    recoveries = [r for answer in answers for r in answer["recoveries"]]
    print(f"{name}: {relay_id} {signum.name} at t0; "
          f"{sum(b is not None for b in backs(recoveries))}/{len(recoveries)} participants "
          f"back within {timeout:.0f} s; {window.close()}", flush=True)
    return recoveries


async def flowing(workers: list[Worker], since: float) -> None:
    answers = await asyncio.gather(*(w.ask({"cmd": "flowing", "since": since,
                                            "timeout": FLOWING_TIMEOUT_S}) for w in workers))
    if not all(a["ok"] for a in answers):
        raise RuntimeError(f"media did not flow between every participant within "
                           f"{FLOWING_TIMEOUT_S:.0f} s")


async def bench(args: argparse.Namespace, tmp: Path) -> str:
    print(f"{args.rooms} consultations x 3 participants, {args.workers} load-generator "
          f"processes, {args.fps} fps; load average {os.getloadavg()[0]:.2f}; data in {tmp}",
          flush=True)
    async with Cluster(tmp, directory=directory_toml(args.rooms)) as cluster:
        await cluster.start_serve()
        for relay_id, region in (FIRST, SECOND):
            await cluster.start_node(relay_id, region, wait=False)
        for relay_id, _ in (FIRST, SECOND):
            await cluster.wait_registered(relay_id)
        if args.idle:
            started = time.monotonic()
            await open_idle(cluster, args.idle)
            print(f"{args.idle} consultations without participants placed first on "
                  f"{FIRST[0]} in {time.monotonic() - started:.1f} s", flush=True)
        cids = await open_consultations(cluster, args.rooms)
        labels = {cid: f"C{i}" for i, cid in enumerate(cids, 1)}
        people = []
        for i, cid in enumerate(cids, 1):
            names = [f"ref{i}", f"spec{i}", f"guest{i}"]
            people += [{"name": n, "token": cluster.token(n), "cid": cid,
                        "others": [o for o in names if o != n]} for n in names]
        workers = [await Worker.start(tmp / f"worker{w}.log") for w in range(args.workers)]
        try:
            started = time.monotonic()
            await asyncio.gather(*(w.ask({"cmd": "start", "url": cluster.url, "fps": args.fps,
                                          "people": people[k::args.workers]})
                                   for k, w in enumerate(workers)))
            await flowing(workers, started)
            print(f"media flowing between all {len(people)} participants "
                  f"{time.monotonic() - started:.1f} s after they started", flush=True)
            killed = await phase(workers, cluster, "kill", FIRST[0], signal.SIGKILL,
                                 args.timeout)
            await cluster.start_node(*THIRD)
            await flowing(workers, time.monotonic())
            silent = await phase(workers, cluster, "silent", SECOND[0], signal.SIGSTOP,
                                 args.timeout)
        finally:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
    print()
    print(table("kill", killed, labels))
    print()
    print(table("silent", silent, labels))
    kill_backs = [b for b in backs(killed) if b is not None]
    silent_backs = [b for b in backs(silent) if b is not None]
    unrecovered = sum(b is None for b in backs(killed) + backs(silent))
    p50 = statistics.median(kill_backs) if kill_backs else float("nan")
    kill_max = max(kill_backs, default=float("nan"))
    silent_max = max(silent_backs, default=float("nan"))
    learned = [r["learned_s"] for r in silent if r["learned_s"] is not None]
    print(f"\nkill: media back p50 {p50:.2f} s, max {kill_max:.2f} s; silent: learned "
          f"{min(learned, default=float('nan')):.2f}-{max(learned, default=float('nan')):.2f}"
          f" s, media back max {silent_max:.2f} s; load average {os.getloadavg()[0]:.2f}")
    met = kill_max <= GOAL_S and silent_max <= GOAL_S and unrecovered == 0
    print(f"goals: max <= {GOAL_S:.0f} s in both cases, 0 unrecovered: "
          f"{'met' if met else 'NOT met'}")
    return (f"RESULT kill_media_back_p50_s={p50:.2f} kill_media_back_max_s={kill_max:.2f} "
            f"silent_media_back_max_s={silent_max:.2f} unrecovered={unrecovered}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rooms", type=int, default=4, help="consultations (R), 3 "
                        "participants each (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes "
                        "for the participants (default 2)")
    parser.add_argument("--fps", type=int, default=15, help="video frames a second each "
                        "participant sends (default 15)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a participant "
                        "may take to get media back before it counts as unrecovered")
    parser.add_argument("--idle", type=int, default=0, help="consultations without "
                        "participants placed on the relay before the measured ones (they "
                        "move first: a relay holding many consultations); default 0")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return asyncio.run(worker())
    if args.rooms < 1 or args.workers < 1 or args.idle < 0:
        parser.error("--rooms and --workers must be >= 1, --idle >= 0")
    tmp = Path(tempfile.mkdtemp(prefix="failover-bench-"))  # left for a look at the logs
    result = asyncio.run(bench(args, tmp))
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
