"""Abuse benchmark (#10): one hostile client floods the server each way in turn while a
bystander consultation chats; the bystanders' chat latency and the server's memory are measured.

    python bench/abuse_load.py              # 15 s a flood, ~2.5 minutes
    python bench/abuse_load.py --quick      # 5 s a flood, ~1 minute

What happens:

1. A temporary data dir gets a directory of its own (below) and a config (port 0, logging
   INFO, default limits, a fixed token secret so that this script mints the tokens); the real
   server starts as a subprocess (``python -m telehealth.cli --config CFG serve``).
2. The bystander consultation: ``bref`` (district site d1) asks, ``bhost`` (central site c1,
   infectious disease) accepts and invites site x1, whose ``--chatters`` clinicians join too.
   The probe sends ``--probe-rate`` chat messages a second in all, round robin over every
   bystander (so that each stays under ``limits.chat_per_minute``); latency = the sender's
   monotonic clock from ``chat:send`` to ``chat:message`` at ``bref`` and ``bhost`` (not the
   sender). The hostile clinician ``href`` (site d2) has a cardiology consultation with ``hhost``
   (site c2): no site, specialty or role in common with the bystanders.
3. Floods, one at a time, each by ``href`` in its own process (so that the flooder's CPU is
   not the probe's loop), ``--duration`` seconds, reconnecting whenever the server closes it:
   ``chat`` (``chat:send`` of 3,900 characters as fast as acks come back, 64 in flight),
   ``events`` (``queue:get``), ``connections`` (200 connections with one token, held),
   ``requests`` (``consult:request`` stat), ``nonreader`` (a websocket that never reads, with a
   4 KiB receive buffer and blind pongs, asking ``consult:join`` for the consultation's whole
   chat ``--nonreader-rate`` times a second).
4. Per flood: bystander p50/p99 during it, the server's RSS (psutil) before, peak and after
   (``--settle`` seconds after the flooder is gone), acks by code (``internal`` must stay 0), how
   often the server closed the flooder. The server's log is scanned for tracebacks and ERROR lines.

The last line is ``RESULT bystander_p99_ms=<x> rss_growth_pct=<y> internal_acks=<n>`` (the worst
flood's p99; RSS after the last flood against before the first). Goals: p99 <= 100 ms, RSS
growth <= 10 %, 0 internal acks. docs/benchmarks.md has figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ itself is on sys.path
    sys.path.insert(0, str(ROOT))

from signaling.directory import Directory  # noqa: E402
from signaling.tokens import TokenAuthority  # noqa: E402
from tests.abuse import (  # noqa: E402
    QUIET_QUEUE,
    ChatProbe,
    NonReader,
    RawSocket,
    RssSampler,
    connection_flood,
    flood,
    log_faults,
    percentile,
    rss_mb,
)
from tests.support import SECRET, Client, start_server_process, write_config  # noqa: E402

FLOODS = ("chat", "events", "connections", "requests", "nonreader")
GOAL_P99_MS = 100.0
GOAL_RSS_GROWTH_PCT = 10.0
CHAT_TEXT = "x" * 3900
CONNECTIONS = 200
STOP_TIMEOUT_S = 30.0


def directory_toml(chatters: int) -> str:
    sites = [("d1", "Bystander District", "district", "11"),
             ("c1", "Bystander Central", "central", "01"),
             ("x1", "Bystander Invited", "district", "12"),
             ("d2", "Hostile District", "district", "79"),
             ("c2", "Hostile Central", "central", "79")]
    people = [("bref", "d1", "referring", ""), ("bhost", "c1", "specialist", "infectious-disease"),
              ("href", "d2", "referring", ""), ("hhost", "c2", "specialist", "cardiology")]
    people += [(f"chat{i}", "x1", "referring", "") for i in range(chatters)]
    out = []
    for sid, name, tier, region in sites:
        out.append(f'[[sites]]\nid = "{sid}"\nname = "{name}"\ntier = "{tier}"\n'
                   f'region = "{region}"\n')
    for cid, site, role, specialty in people:
        specialties = f'\nspecialties = ["{specialty}"]' if specialty else ""
        out.append(f'[[clinicians]]\nid = "{cid}"\nname = "{cid}"\nsite = "{site}"\n'
                   f'roles = ["{role}"]{specialties}\n')
    return "\n".join(out)


# -- the flooder (a process of its own) --------------------------------------------------------


async def run_flood(kind: str, url: str, token: str, consultation: str, duration: float,
                    nonreader_rate: float) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    closed = 0
    deadline = time.monotonic() + duration
    if kind == "connections":
        outcomes, opened = await connection_flood(url, token, CONNECTIONS, timeout_s=duration)
        codes.update(outcomes)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        closed = sum(1 for sock in opened if sock.closed)
        for sock in opened:
            await sock.close()
        return {"codes": dict(codes), "closed": closed}
    if kind == "nonreader":
        reader = NonReader(url, token)
        await reader.connect()
        opened_at = time.monotonic()
        alive = await reader.emit("consult:join", {"consultation_id": consultation})
        sent = 0
        while alive and time.monotonic() < deadline:
            alive = await reader.emit("consult:join", {"consultation_id": consultation})
            sent += 1
            if sent % 5 == 0:
                alive = alive and await reader.pong()
            await asyncio.sleep(1 / nonreader_rate)
        reader.close()
        return {"codes": {"sent": sent}, "closed": 0 if alive else 1,
                "closed_after_s": None if alive else round(time.monotonic() - opened_at, 1)}

    def make(i: int) -> tuple[Any, ...]:
        if kind == "chat":
            return ("chat:send", {"consultation_id": consultation, "text": CHAT_TEXT})
        if kind == "events":
            return ("queue:get", {})
        return ("consult:request", {"specialty": "cardiology", "priority": "stat",
                                    "reason": f"flood {i}"})

    while time.monotonic() < deadline:
        sock = RawSocket(url, token)
        try:
            if not await sock.connect():
                codes[f"refused:{sock.refusal}"[:60]] += 1
                await asyncio.sleep(0.5)
                continue
        except Exception as exc:
            codes[f"connect:{type(exc).__name__}"] += 1
            await asyncio.sleep(0.5)
            continue
        if kind == "chat":
            codes["join:" + (await sock.call("consult:join", {"consultation_id": consultation}
                                             )).code] += 1
        codes.update(await flood(sock, make, deadline - time.monotonic()))
        if sock.closed:
            closed += 1
        await sock.close()
    return {"codes": dict(codes), "closed": closed}


# -- the bench ---------------------------------------------------------------------------------


@dataclass
class FloodReport:
    kind: str
    p50_ms: float
    p99_ms: float
    samples: int
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    codes: dict[str, int]
    closed: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bystanders:
    clients: dict[str, Client]
    consultation: str
    probe: ChatProbe


async def bystanders(url: str, tokens: TokenAuthority, chatters: int,
                     rate: float) -> Bystanders:
    names = ["bref", "bhost", *(f"chat{i}" for i in range(chatters))]
    made = {n: await Client(url, tokens.issue(n)).connect() for n in names}
    asked = await made["bref"].ok("consult:request", {
        "specialty": "infectious-disease", "priority": "routine", "reason": "bystanders"})
    accepted = await made["bhost"].ok("consult:accept", {"request_id": asked["request"]["id"]})
    cid = accepted["consultation"]["id"]
    await made["bhost"].ok("consult:invite", {"consultation_id": cid, "site_id": "x1"})
    for client in made.values():
        await client.ok("consult:join", {"consultation_id": cid})
    await asyncio.sleep(0.5)
    listeners = [made["bref"], made["bhost"]]
    probe = ChatProbe(list(made.values()), listeners, cid, rate)
    return Bystanders(made, cid, probe)


async def hostile(url: str, tokens: TokenAuthority) -> tuple[Client, str]:
    """``href``'s consultation with ``hhost`` (who stays connected, joined, reading)."""
    href = await Client(url, tokens.issue("href")).connect()
    hhost = await Client(url, tokens.issue("hhost")).connect()
    asked = await href.ok("consult:request", {
        "specialty": "cardiology", "priority": "routine", "reason": "hostile"})
    accepted = await hhost.ok("consult:accept", {"request_id": asked["request"]["id"]})
    cid = accepted["consultation"]["id"]
    await hhost.ok("consult:join", {"consultation_id": cid})
    await href.close()
    return hhost, cid


async def one_flood(args: argparse.Namespace, kind: str, url: str, token: str, cid: str,
                    pid: int, probe: ChatProbe, host: Client) -> FloodReport:
    """One flood in a process of its own; ``host`` (hhost) reads the queue afterwards."""
    before = rss_mb(pid)
    sampler = RssSampler(pid)
    sampler.start()
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--flood", kind, "--url", url, "--token", token,
        "--consultation", cid, "--duration", str(args.duration),
        "--nonreader-rate", str(args.nonreader_rate),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), args.duration + 60)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
    ended = time.monotonic()
    result: dict[str, Any] = {"codes": {"flooder_failed": 1}, "closed": 0}
    for line in out.decode().splitlines():
        if line.startswith("FLOOD "):
            result = json.loads(line[6:])
    if "flooder_failed" in result["codes"]:
        print(f"flooder {kind} failed:\n{err.decode()[-2000:]}", file=sys.stderr)
    await asyncio.sleep(args.settle)
    peak = await sampler.stop()
    after = rss_mb(pid)
    latencies = probe.latencies_ms(started, ended)
    extra = {k: v for k, v in result.items() if k not in ("codes", "closed")}
    if kind == "requests":
        queue = await host.ok("queue:get", {})
        extra["waiting_after"] = sum(1 for r in queue["queue"] if r["requester_id"] == "href")
    return FloodReport(kind, percentile(latencies, 50), percentile(latencies, 99),
                       len(latencies), before, peak, after, result["codes"], result["closed"],
                       extra)


def table(reports: list[FloodReport]) -> str:
    head = (f"{'flood':<12}{'p50 ms':>8}{'p99 ms':>8}{'n':>5}{'RSS before':>11}{'peak':>8}"
            f"{'after':>8}{'closed':>7}  acks by code")
    lines = [head, "-" * len(head)]
    for r in reports:
        codes = ", ".join(f"{k}={v}" for k, v in sorted(r.codes.items()))
        extra = "".join(f", {k}={v}" for k, v in r.extra.items())
        lines.append(f"{r.kind:<12}{r.p50_ms:>8.1f}{r.p99_ms:>8.1f}{r.samples:>5}"
                     f"{r.rss_before_mb:>11.1f}{r.rss_peak_mb:>8.1f}{r.rss_after_mb:>8.1f}"
                     f"{r.closed:>7}  {codes}{extra}")
    return "\n".join(lines)


async def bench(args: argparse.Namespace, url: str, pid: int, tokens: TokenAuthority,
                output: list[str]) -> str:
    """Runs the floods, prints the tables; returns the RESULT line."""
    b = await bystanders(url, tokens, args.chatters, args.probe_rate)
    hhost, cid = await hostile(url, tokens)
    b.probe.start()
    await asyncio.sleep(args.baseline)
    base = b.probe.latencies_ms()
    rss_start = rss_mb(pid)
    print(f"baseline: bystander p50 {percentile(base, 50):.1f} ms, p99 "
          f"{percentile(base, 99):.1f} ms ({len(base)} messages), server RSS {rss_start:.1f} MiB",
          flush=True)
    reports = []
    log_start = len(output)
    for kind in args.floods:
        report = await one_flood(args, kind, url, tokens.issue("href"), cid, pid, b.probe,
                                 hhost)
        reports.append(report)
        print(f"  {kind}: p99 {report.p99_ms:.1f} ms, RSS {report.rss_before_mb:.1f} -> "
              f"{report.rss_peak_mb:.1f} -> {report.rss_after_mb:.1f} MiB", flush=True)
    await b.probe.stop()
    rss_end = rss_mb(pid)
    print()
    print(table(reports))
    faults = log_faults(output[log_start:])
    lost = b.probe.lost()
    print(f"\nbystander chat: {len(b.probe.sent)} sent, {len(lost)} lost, refused "
          f"{dict(b.probe.refused)}, leaks {len(b.probe.leaks)}; server log: {len(faults)} "
          "traceback/ERROR lines")
    for line in faults[:5]:
        print(f"  {line[:160]}")
    for client in [*b.clients.values(), hhost]:
        await client.close()
    internal = sum(r.codes.get("internal", 0) for r in reports) + b.probe.refused["internal"]
    worst = max((r.p99_ms for r in reports), default=float("nan"))
    growth = (rss_end - rss_start) / rss_start * 100
    ok = worst <= GOAL_P99_MS and growth <= GOAL_RSS_GROWTH_PCT and internal == 0
    print(f"goals: p99 <= {GOAL_P99_MS:.0f} ms, RSS growth <= {GOAL_RSS_GROWTH_PCT:.0f} %, "
          f"0 internal acks: {'met' if ok else 'NOT met'}")
    return (f"RESULT bystander_p99_ms={worst:.1f} rss_growth_pct={growth:.1f} "
            f"internal_acks={internal}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s floods, about a minute")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds a flood")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after a flood before RSS 'after' is read")
    parser.add_argument("--baseline", type=float, default=5.0)
    parser.add_argument("--probe-rate", type=float, default=10.0,
                        help="bystander chat messages a second, in all")
    parser.add_argument("--chatters", type=int, default=22,
                        help="clinicians of the invited bystander site who chat too")
    parser.add_argument("--nonreader-rate", type=float, default=19.0,
                        help="consult:join a second from the connection that never reads "
                        "(under limits.events_per_s, so that only its send queue can end it)")
    parser.add_argument("--floods", nargs="+", choices=FLOODS, default=list(FLOODS))
    parser.add_argument("--flood", choices=FLOODS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--consultation", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flood:
        flooded = asyncio.run(run_flood(args.flood, args.url, args.token, args.consultation,
                                        args.duration, args.nonreader_rate))
        print("FLOOD " + json.dumps(flooded), flush=True)
        return 0
    if args.quick:
        args.duration, args.settle, args.baseline = 5.0, 3.0, 3.0
    tmp = Path(tempfile.mkdtemp(prefix="abuse-load-"))  # left for a look at the server's data
    config = write_config(tmp, queue=QUIET_QUEUE)
    (tmp / "directory.toml").write_text(directory_toml(args.chatters), encoding="utf-8")
    tokens = TokenAuthority(SECRET, Directory.load(tmp / "directory.toml"), 3600)
    server = start_server_process(config)
    pid = server.process.pid
    print(f"server {server.url} pid {pid}; floods {', '.join(args.floods)}, "
          f"{args.duration:.0f} s each; probe {args.probe_rate:g} msg/s over "
          f"{args.chatters + 2} bystanders", flush=True)
    try:
        result = asyncio.run(bench(args, server.url, pid, tokens, server.output))
    finally:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=STOP_TIMEOUT_S)
            print(f"server stopped {time.monotonic() - started:.1f} s after SIGTERM "
                  f"(exit {server.process.returncode})")
        except subprocess.TimeoutExpired:
            print(f"server still running {STOP_TIMEOUT_S:.0f} s after SIGTERM; killed")
            server.kill()
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
