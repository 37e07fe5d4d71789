"""Sign-in benchmark: password sign-ins per second on one server process with Argon2id at the
configured cost, and the pairing latency of bench/signaling_load.py while sign-ins run beside
it (hashing runs on a thread pool: it must not stall the event loop).

    python bench/signin_load.py            # signaling_load's defaults: 1000 sites, 50 req/s
    python bench/signin_load.py --quick    # smoke run, under 60 s

1. Throughput: a server (``signaling_load.Server``, its generated directory and config) with
   ``--accounts`` accounts activated; ``--concurrency`` clients sign in as fast as they are
   answered for ``--signin-duration`` seconds. Sign-ins per second = successes / wall time.
2. Beside the signaling load: ``signaling_load.run`` as it is, its ``Server`` replaced by one
   that, once READY, activates accounts and sends ``--signin-rate`` sign-ins per second (open
   loop, from a thread of this process) until the run ends. Pairing p99 as signaling_load
   measures it; the goal is <= 50 ms.

Accounts are activated the way `telehealth account activation` does it (``Accounts`` on the
server's own accounts file, then ``POST /api/auth/activate``). The Argon2id cost is the
default of ``[accounts]`` unless ``--time-cost``/``--memory-kib``/``--parallelism`` say
otherwise; it is printed. The last line is ``RESULT signins_per_s=<x> pair_p99_ms=<y>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

try:
    from bench import signaling_load as load
except ImportError:  # run as a script: bench/ itself is on sys.path
    import signaling_load as load  # type: ignore[no-redef]

from config.settings import AccountsSettings, load_settings
from recorder.audit import AUDIT_LOG, AuditLog
from signaling.accounts import ACCOUNTS_FILE, Accounts
from signaling.directory import Directory
from signaling.tokens import TokenAuthority, load_or_create_secret

PASSWORD_PREFIX = "bench passphrase "
GOAL_P99_MS = 50.0
REQUEST_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def password_of(clinician_id: str) -> str:
    """Each account's password (the policy refuses one that contains the identifier)."""
    return PASSWORD_PREFIX + clinician_id[::-1]


@dataclass
class SigninStats:
    latencies_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1

    def describe(self) -> str:
        return (f"{self.ok} ok, failures {self.failures or 'none'}, latency p50 "
                f"{load.percentile(self.latencies_ms, 50):.0f} ms, p99 "
                f"{load.percentile(self.latencies_ms, 99):.0f} ms")


def accounts_overrides(args: argparse.Namespace) -> dict[str, int]:
    chosen = {"argon2_time_cost": args.time_cost, "argon2_memory_kib": args.memory_kib,
              "argon2_parallelism": args.parallelism, "hash_threads": args.hash_threads,
              "hash_nice": args.hash_nice}
    return {key: value for key, value in chosen.items() if value is not None}


def cost_of(config: Path) -> AccountsSettings:
    return load_settings(config).accounts


def add_accounts_section(config: Path, args: argparse.Namespace) -> None:
    """The Argon2id cost asked for on the command line (else the defaults), and no lockout
    in the way (every sign-in comes from 127.0.0.1, and all of them succeed)."""
    lines = ["", "[accounts]"] + [f"{k} = {v}" for k, v in accounts_overrides(args).items()]
    with config.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


async def activate_accounts(config: Path, url: str, ids: Sequence[str]) -> None:
    """What `telehealth account activation` and the activation page do, for each id."""
    settings = load_settings(config)
    assert settings.directory.file is not None
    directory = Directory.load(settings.directory.file)
    secret = load_or_create_secret(settings.security.token_secret, settings.storage.data_dir)
    accounts = Accounts(settings.storage.data_dir / ACCOUNTS_FILE, directory=directory,
                        tokens=TokenAuthority(secret, directory, 600),
                        settings=settings.accounts,
                        audit=AuditLog(settings.archive_dir() / AUDIT_LOG))
    await accounts.open()
    try:
        codes = [await accounts.issue_activation(cid, actor="bench", address=None)
                 for cid in ids]
    finally:
        await accounts.close()
    async with aiohttp.ClientSession() as session:
        for issued in codes:
            body = {"code": issued.code, "password": password_of(issued.clinician_id)}
            async with session.post(f"{url}/api/auth/activate", json=body) as response:
                if response.status != 200:
                    raise load.BenchError(f"activation of {issued.clinician_id} failed: "
                                          f"{response.status} {await response.text()}")


async def sign_in(session: aiohttp.ClientSession, url: str, clinician_id: str,
                  stats: SigninStats) -> None:
    body = {"clinician_id": clinician_id, "password": password_of(clinician_id)}
    started = time.monotonic()
    try:
        async with session.post(f"{url}/api/auth/signin", json=body,
                                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as r:
            answer = await r.json()
            if r.status == 200 and answer.get("access_token"):
                stats.latencies_ms.append((time.monotonic() - started) * 1000)
            else:
                stats.fail(str(answer.get("error", {}).get("code", r.status)))
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.fail(type(exc).__name__)


async def closed_loop(url: str, ids: Sequence[str], concurrency: int,
                      duration_s: float) -> SigninStats:
    """``concurrency`` clients, each signing in again as soon as it is answered."""
    stats = SigninStats()
    deadline = time.monotonic() + duration_s
    async with aiohttp.ClientSession() as session:
        async def client(index: int) -> None:
            n = index
            while time.monotonic() < deadline:
                await sign_in(session, url, ids[n % len(ids)], stats)
                n += concurrency

        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        stats.wall_s = time.monotonic() - started
    return stats


async def open_loop(url: str, ids: Sequence[str], rate: float,
                    stop: threading.Event) -> SigninStats:
    """``rate`` sign-ins per second whether or not earlier ones were answered, until
    ``stop``."""
    stats = SigninStats()
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        n = 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            task = asyncio.create_task(sign_in(session, url, ids[n % len(ids)], stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S)
        stats.wall_s = time.monotonic() - started
    return stats


def referring_ids(population: load.Population, count: int) -> list[str]:
    return [c.clinician_id for c in population.clients if c.kind == load.REFERRING][:count]


def measure_throughput(args: argparse.Namespace) -> tuple[SigninStats, AccountsSettings]:
    population = load.build_population(20, 1, 5, 5)
    workdir = Path(tempfile.mkdtemp(prefix="telehealth-signin-", dir=args.tmp_dir))
    directory_file = workdir / "directory.toml"
    directory_file.write_text(population.directory_toml, encoding="utf-8")
    config = workdir / "config.toml"
    config.write_text(load.config_toml(workdir / "data", directory_file,
                                       secrets.token_urlsafe(48), secrets.token_urlsafe(32)))
    add_accounts_section(config, args)
    server = load.Server(config, workdir / "server.log")
    try:
        server.start()
        ids = referring_ids(population, args.accounts)
        asyncio.run(activate_accounts(config, server.url, ids))
        stats = asyncio.run(closed_loop(server.url, ids, args.concurrency,
                                        args.signin_duration))
        return stats, cost_of(config)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class SignInsBeside:
    """Sign-ins at a fixed rate from a thread of this process, against the server that
    ``signaling_load.run`` starts (it replaces ``signaling_load.Server`` for that run)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.stats: SigninStats | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def server_class(self) -> type[load.Server]:
        beside = self

        class ServerWithSignIns(load.Server):
            def start(self) -> None:
                add_accounts_section(self.config, beside.args)
                super().start()
                beside.begin(self.config, self.url)

            def stop(self) -> int | None:
                beside.end()
                return super().stop()

        return ServerWithSignIns

    def begin(self, config: Path, url: str) -> None:
        population = load.build_population(self.args.sites, self.args.central,
                                           self.args.specialists, self.args.specialties)
        ids = referring_ids(population, self.args.accounts)

        async def main() -> None:
            await activate_accounts(config, url, ids)
            self.stats = await open_loop(url, ids, self.args.signin_rate, self.stop)

        def thread() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported by end()
                self.error = exc

        self.thread = threading.Thread(target=thread, name="sign-ins", daemon=True)
        self.thread.start()

    def end(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=STOP_TIMEOUT_S)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Sign-ins per second, and pairing latency with sign-ins beside it. "
                    "Other options go to bench/signaling_load.py.")
    parser.add_argument("--quick", action="store_true", help="smoke run, under 60 s")
    parser.add_argument("--signin-rate", type=float, default=10.0,
                        help="sign-ins per second beside the signaling load (default 10)")
    parser.add_argument("--signin-duration", type=float, default=None,
                        help="seconds of the throughput phase (default 15, quick 5)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="clients signing in at once in the throughput phase (default 8)")
    parser.add_argument("--accounts", type=int, default=20,
                        help="accounts activated and signed in in turn (default 20)")
    parser.add_argument("--time-cost", type=int, default=None)
    parser.add_argument("--memory-kib", type=int, default=None)
    parser.add_argument("--parallelism", type=int, default=None)
    parser.add_argument("--hash-threads", type=int, default=None)
    parser.add_argument("--hash-nice", type=int, default=None)
    parser.add_argument("--tmp-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the baseline: the same signaling load without sign-ins, "
                             "run first in the same process")
    args, rest = parser.parse_known_args(argv)
    if args.signin_duration is None:
        args.signin_duration = 5.0 if args.quick else 15.0
    if args.signin_rate <= 0 or args.concurrency < 1 or args.accounts < 1:
        parser.error("--signin-rate must be > 0, --concurrency and --accounts >= 1")
    return args, rest


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    load_args = load.parse_args([*(["--quick"] if args.quick else []), *rest])
    for name in ("sites", "central", "specialists", "specialties"):
        setattr(args, name, getattr(load_args, name))
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
          flush=True)
    try:
        throughput, cost = measure_throughput(args)
        print(f"Argon2id time_cost={cost.argon2_time_cost} memory_kib="
              f"{cost.argon2_memory_kib} parallelism={cost.argon2_parallelism} "
              f"hash_threads={cost.hash_threads} hash_nice={cost.hash_nice}", flush=True)
        signins_per_s = throughput.ok / throughput.wall_s if throughput.wall_s else 0.0
        print(f"throughput: {signins_per_s:.1f} sign-ins/s over {throughput.wall_s:.1f} s with "
              f"{args.concurrency} clients: {throughput.describe()}", flush=True)
        baseline = None
        if not args.no_baseline:
            # The baseline, side by side in this run: the machines are shared and noisy.
            baseline = load.run(load_args)
            print(f"baseline (no sign-ins): pairing p50 {load._ms(baseline.pair_p50_ms)} ms, "
                  f"p99 {load._ms(baseline.pair_p99_ms)} ms", flush=True)
        original_server = load.Server
        beside = SignInsBeside(args)
        load.Server = beside.server_class()  # type: ignore[misc]
        try:
            res = load.run(load_args)
        finally:
            load.Server = original_server  # type: ignore[misc]
    except load.BenchError as exc:
        print(f"signin_load: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("signin_load: interrupted; servers and workers stopped", file=sys.stderr)
        return 130
    for line in load.render(res):
        print(line)
    if beside.error is not None or beside.stats is None:
        print(f"signin_load: the sign-ins beside the load failed: {beside.error!r}",
              file=sys.stderr)
        return 1
    stats = beside.stats
    rate = stats.ok / stats.wall_s if stats.wall_s else 0.0
    print(f"beside the signaling load: {rate:.1f} sign-ins/s answered over {stats.wall_s:.1f} s "
          f"({args.signin_rate:g}/s sent): {stats.describe()}")
    if baseline is not None and baseline.pair_p99_ms:
        print(f"pairing p99 with sign-ins / baseline: {load._ms(res.pair_p99_ms)} / "
              f"{load._ms(baseline.pair_p99_ms)} ms = "
              f"{res.pair_p99_ms / baseline.pair_p99_ms:.2f}x")
    met = res.pair_p99_ms <= GOAL_P99_MS and not stats.failures
    print(f"goal (pairing p99 <= {GOAL_P99_MS:g} ms with {args.signin_rate:g} sign-ins/s, "
          f"every sign-in answered): {'met' if met else 'NOT met'}")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "signins_per_s": signins_per_s, "throughput_p99_ms": load.percentile(
                throughput.latencies_ms, 99),
            "beside_ok": stats.ok, "beside_failures": stats.failures,
            "beside_p99_ms": load.percentile(stats.latencies_ms, 99),
            "pair_p50_ms": res.pair_p50_ms, "pair_p99_ms": res.pair_p99_ms}, indent=2) + "\n")
    print(f"RESULT signins_per_s={signins_per_s:.1f} pair_p99_ms={load._ms(res.pair_p99_ms)}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
