"""A real local fleet (issue #14): redis-server, PostgreSQL, N `telehealth serve` nodes and M
standalone `telehealth relay` processes, with nginx in front (docs/nginx/fleet.conf), all on
127.0.0.1 and ports picked free at the start. The tests of tests/signaling/test_fleet_nodes.py
use it, and so does `make fleet` (``python -m tests.fleet_processes``).

Every node has its own data directory (its instance id in Redis), one archive shared by all
(``recording.archive_dir``, as a network filesystem would be) and the
same ``security.token_secret``, ``live.backend = "redis"``, ``storage.backend =
"postgresql"`` and ``relay.embedded = false``: media only on the standalone relays, which
outlive any node. The relays dial **nginx**, the fleet's one address, not a node: a relay
whose node dies redials and nginx gives it a live node (dialling one node directly, a relay
would wait for that node alone while its rooms run out of ``relay.signaling_grace_s``).
Relays open their WebSocket directly, so nginx spreads them over the nodes (fleet.conf:
hashed on address and port); a client that starts with long-polling stays on the node of its
address (hashed on the address alone).

``Fleet`` is an async context manager: every process it started is stopped at the end, also
when the test fails (a stopped process is continued first). Each process is started in its
own session, so that Ctrl-C at `make fleet` reaches the harness alone, which then stops the
members in order."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from signaling.demo import DEMO_DIRECTORY
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.failover_processes import NODE_RELAY, free_port
from tests.postgres_server import (
    PostgresServer,
    create_database,
    start_postgres,
    stop_postgres,
)
from tests.redis_server import RedisServer, start_redis, stop_redis
from tests.support import DIRECTORY, SECRET, write_config

if TYPE_CHECKING:
    import pytest

NGINX = "/usr/sbin/nginx"
TEMPLATE = Path(__file__).resolve().parent.parent / "docs" / "nginx" / "fleet.conf"

SERVE_START_S = 45.0
"""Two nodes importing aiortc and PyAV at once on the shared 2-core machine."""
RELAY_START_S = 45.0
STOP_WAIT_S = 10.0
GRACEFUL_STOP_S = 20.0
"""`make fleet`'s Ctrl-C: SIGTERM, then this long before SIGKILL (a relay's drain is 15 s at
most; with every node stopping it has nowhere to move and closes at once)."""

REGISTRY_SETTLE_S = 0.5
"""A relay registers with one node; every other node reads the shared registry every
``relay.heartbeat_s / 2`` (0.25 s, signaling/relay_registry.py) and places on it from then
on. A fleet is ready once this has passed after the last relay registered (measured: a node
asked to place 0.07 s after a relay registered elsewhere answered ``no_relay``)."""

NODE_SECTIONS: dict[str, dict[str, Any]] = {
    "relay": {"embedded": False},
    # Production's timer tick, and the shortest timers lease: a dead leader is replaced
    # within 1 s.
    "queue": {"tick_s": 1.0},
    "presence": {"reconnect_grace_s": 30.0},
    # nginx on loopback is the only proxy; its X-Forwarded-For names the client.
    "server": {"trusted_proxies": ["127.0.0.1"]},
}
"""What every node's config has, over tests/support.py's; the fleet fills in the rest."""

_REGISTERED = re.compile(r"relay node (\S+) connected")
"""What a node logs (signaling/placement.py, INFO) each time a relay registers with it."""
_READY = re.compile(r"READY (\S+)")
_CONNECTION = re.compile(r"connection (\S+): clinician (\S+) of site|connection (\S+) closed")
"""What a node logs (signaling/handlers.py, INFO) when a client's connection is made, and
when one closes."""


@dataclass
class Member:
    """One process of the fleet; its output goes to ``log`` (and, for nodes, ``lines``)."""

    name: str
    process: subprocess.Popen[Any]
    log: Path
    port: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        if self.lines:
            return "".join(list(self.lines))
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


@dataclass
class Fleet:
    """Redis, PostgreSQL, ``nodes`` `serve` processes, ``relays`` relays and nginx, in
    ``tmp``. ``regions``: the relays' regions in turn (a placement prefers the requesting
    site's region); ``directory``: a directory TOML (default: tests/support.py's)."""

    tmp: Path
    nodes: int = 2
    relays: int = 2
    regions: tuple[str, ...] = ("11", "79")
    directory: str = DIRECTORY
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config sections for every node, over ``NODE_SECTIONS``."""
    port: int = 0
    """nginx's port; 0: a free one."""
    secret: str = SECRET
    token_ttl_s: int = 3600
    members: dict[str, Member] = field(default_factory=dict)
    redis: RedisServer | None = None
    postgres: PostgresServer | None = None
    dsn: str = ""
    _old: list[subprocess.Popen[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        """nginx: the fleet's one address."""
        self.directory_file = self.tmp / "fleet-directory.toml"
        self.directory_file.write_text(self.directory, encoding="utf-8")
        self.tokens = TokenAuthority(self.secret, Directory.load(self.directory_file),
                                     self.token_ttl_s)
        self.node_names = [f"node-{chr(ord('a') + i)}" for i in range(self.nodes)]
        self.relay_names = [f"relay-{i + 1}" for i in range(self.relays)]
        self.node_ports = {name: free_port() for name in self.node_names}

    # -- the whole fleet ------------------------------------------------------------------
    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            self.print_logs()
            await asyncio.to_thread(self.stop_all)
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self.print_logs()
        await asyncio.to_thread(self.stop_all)

    async def start(self) -> None:
        """Redis and PostgreSQL, then the nodes (at once), nginx, and the relays (at once),
        each waited for: a node until it printed READY, a relay until a node registered it."""
        # A fresh Redis each time (a previous run's append-only file would bring back its
        # live state over a fresh PostgreSQL).
        shutil.rmtree(self.tmp / "redis", ignore_errors=True)
        (self.tmp / "redis").mkdir()
        self.redis, postgres = await asyncio.gather(
            asyncio.to_thread(start_redis, self.tmp / "redis", persistent=True),
            asyncio.to_thread(start_postgres))
        self.postgres = postgres
        self.members["redis"] = Member("redis", self.redis.process,
                                       self.tmp / "redis" / f"redis-{_port(self.redis.url)}.log",
                                       _port(self.redis.url))
        self.members["postgres"] = Member("postgres", postgres.process,
                                          postgres.directory / "postgres.log", postgres.port)
        self.dsn = await asyncio.to_thread(create_database, postgres, "telehealth")
        await asyncio.gather(*(self.start_node(name) for name in self.node_names))
        await asyncio.to_thread(self.start_nginx)
        for i, name in enumerate(self.relay_names):
            await self.start_relay(name, self.regions[i % len(self.regions)], wait=False)
        for name in self.relay_names:
            await self.wait_registered(name)
        # The other nodes see a relay at their next look at the shared registry.
        await asyncio.sleep(REGISTRY_SETTLE_S)

    def token(self, clinician_id: str) -> str:
        return self.tokens.issue(clinician_id)

    @property
    def archive(self) -> Path:
        """The archive every node shares."""
        return self.tmp / "archive"

    def node_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.node_ports[name]}"

    # -- serve nodes ----------------------------------------------------------------------
    def node_config(self, name: str) -> Path:
        assert self.redis is not None and self.dsn, "Redis and PostgreSQL first"
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in NODE_SECTIONS.items()}
        for section, values in self.sections.items():
            merged.setdefault(section, {}).update(values)
        merged.setdefault("server", {}).update(port=self.node_ports[name],
                                               public_url=self.url)
        merged.setdefault("security", {})["token_secret"] = self.secret
        merged.setdefault("directory", {})["file"] = str(self.directory_file)
        merged.setdefault("live", {}).update(backend="redis", redis_url=self.redis.url,
                                             timers_lease_s=2.0)
        merged.setdefault("storage", {}).update(backend="postgresql", postgresql_dsn=self.dsn)
        # One archive for the fleet (docs/fleet.md): a recording handed from one node to
        # another goes on in the same manifest.
        merged.setdefault("recording", {}).setdefault("archive_dir", str(self.archive))
        return write_config(folder, **merged)

    async def start_node(self, name: str) -> Member:
        """`serve` as ``name`` on its port (a fresh process for a node started again);
        returns once it printed READY (raises with its output otherwise). Started in a
        thread: the caller's event loop keeps carrying media."""
        old = self.members.get(name)
        if old is not None:
            self._old.append(old.process)
        config = self.node_config(name)
        log = self.tmp / f"{name}.{len(self._old)}.log"
        member = await asyncio.to_thread(_start_serve, name, config, log,
                                         self.node_ports[name])
        self.members[name] = member
        return member

    def registrations(self, relay_name: str) -> int:
        """How often the running nodes logged that this relay registered with them."""
        count = 0
        for name in self.node_names:
            member = self.members.get(name)
            if member is None:
                continue
            count += sum(1 for line in list(member.lines)
                         if (m := _REGISTERED.search(line)) and m.group(1) == relay_name)
        return count

    def relay_home(self, relay_name: str) -> str | None:
        """The running node the relay registered with last (by its log), if any."""
        home: tuple[str, str] | None = None
        for name in self.node_names:
            member = self.members.get(name)
            if member is None or not member.running:
                continue
            for line in list(member.lines):
                m = _REGISTERED.search(line)
                if m and m.group(1) == relay_name and (home is None or line[:23] > home[1]):
                    home = (name, line[:23])
        return None if home is None else home[0]

    def registered_at(self, relay_name: str, node: str) -> list[float]:
        """When (``time.time()``, from the log's timestamps) ``node`` registered the
        relay."""
        member = self.members.get(node)
        if member is None:
            return []
        return [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                for line in list(member.lines)
                if (m := _REGISTERED.search(line)) and m.group(1) == relay_name]

    def clinician_nodes(self, clinician_id: str) -> list[str]:
        """The running nodes that hold an open connection of the clinician, by their logs (a
        connection logged as made and not yet as closed): one node per signed-in page."""
        holding = []
        for name in self.node_names:
            member = self.members.get(name)
            if member is None or not member.running:
                continue
            open_sids: set[str] = set()
            for line in list(member.lines):
                m = _CONNECTION.search(line)
                if m is None:
                    continue
                if m.group(2) == clinician_id:
                    open_sids.add(m.group(1))
                elif m.group(3) is not None:
                    open_sids.discard(m.group(3))
            if open_sids:
                holding.append(name)
        return holding

    async def wait_registered(self, relay_name: str, *, more_than: int = 0,
                              timeout: float = RELAY_START_S) -> None:
        deadline = time.monotonic() + timeout
        while self.registrations(relay_name) <= more_than:
            relay = self.members.get(relay_name)
            if relay is not None and not relay.running:
                raise AssertionError(f"{relay_name} exited with {relay.process.returncode}:\n"
                                     f"{relay.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{relay_name} did not register with a node within "
                                     f"{timeout:.0f} s")
            await asyncio.sleep(0.05)

    # -- relays ---------------------------------------------------------------------------
    async def start_relay(self, name: str, region: str, *, wait: bool = True) -> Member:
        """`telehealth relay` as ``name``, dialling nginx; by default returns once a node
        registered it."""
        before = self.registrations(name)
        old = self.members.get(name)
        if old is not None:
            self._old.append(old.process)
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        config = write_config(folder, relay={**NODE_RELAY, "id": name})
        log = folder / f"relay.{len(self._old)}.log"
        process = _spawn_relay(config, self.url, self.tokens.issue_node(name), region, log)
        member = Member(name, process, log)
        self.members[name] = member
        if wait:
            await self.wait_registered(name, more_than=before)
        return member

    # -- nginx ----------------------------------------------------------------------------
    def start_nginx(self) -> Member:
        """nginx in the foreground with docs/nginx/fleet.conf, its prefix, logs, pid and
        temp files in ``tmp/nginx``; returns once it accepts connections."""
        folder = self.tmp / "nginx"
        folder.mkdir(exist_ok=True)
        servers = "".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;\n"
                          for port in self.node_ports.values())
        values = {"LISTEN": f"127.0.0.1:{self.port}", "SERVER_NAME": "127.0.0.1",
                  "NODES": servers.rstrip("\n")}
        lines = []
        for line in TEMPLATE.read_text(encoding="utf-8").splitlines():
            if not line.lstrip().startswith("#"):  # the comments name the placeholders
                for key, value in values.items():
                    line = line.replace(f"__{key}__", value)
            lines.append(line)
        site = "\n".join(lines) + "\n"
        assert "__" not in re.sub(r"#.*", "", site), "a placeholder left unfilled"
        (folder / "fleet.conf").write_text(site, encoding="utf-8")
        temp_paths = "".join(f"    {kind}_temp_path {folder / kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(
            # As root, workers would switch to "nobody", who cannot read this directory.
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"worker_processes 1;\nerror_log {folder / 'error.log'} info;\n"
            f"pid {folder / 'nginx.pid'};\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            # Which node took each request (the tests read it).
            "    log_format fleet '$remote_addr:$remote_port \"$request\" $status "
            "upstream=$upstream_addr';\n"
            f"    access_log {folder / 'access.log'} fleet;\n{temp_paths}"
            f"    include {folder / 'fleet.conf'};\n"
            "}\n", encoding="utf-8")
        log = folder / "stderr.log"
        with log.open("w", encoding="utf-8") as out:
            process = subprocess.Popen(
                [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"),
                 "-e", str(folder / "error.log"), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
        member = Member("nginx", process, log, self.port)
        self.members["nginx"] = member
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited {process.returncode}: {member.output()}"
                                   f"{(folder / 'error.log').read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return member
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    async def restart_redis(self, down_s: float = 1.0) -> float:
        """kill -9 redis-server, ``down_s`` later start it again on its port and directory
        (its append-only file replayed); returns when it answers, the seconds it was away."""
        assert self.redis is not None
        port = _port(self.redis.url)
        started = time.monotonic()
        self.kill("redis", signal.SIGKILL)
        await asyncio.sleep(down_s)
        self._old.append(self.redis.process)
        self.redis = await asyncio.to_thread(start_redis, self.tmp / "redis", port=port,
                                       persistent=True)
        self.members["redis"] = Member("redis", self.redis.process,
                                       self.tmp / "redis" / f"redis-{port}.log", port)
        return time.monotonic() - started

    # -- members --------------------------------------------------------------------------
    def kill(self, name: str, signum: signal.Signals = signal.SIGKILL) -> None:
        """``signum`` to a member (a node, a relay, "nginx", "redis", "postgres"); after
        SIGKILL, waits for it."""
        member = self.members[name]
        member.process.send_signal(signum)
        if signum == signal.SIGKILL:
            member.process.wait(timeout=STOP_WAIT_S)

    def processes(self) -> list[subprocess.Popen[Any]]:
        """Every process started (old ones included) but Redis and PostgreSQL's."""
        return [m.process for name, m in self.members.items()
                if name not in ("redis", "postgres")] + self._old

    def stop_all(self, graceful: bool = False) -> None:
        """Every process: with ``graceful``, SIGTERM (nginx SIGQUIT) and up to
        ``GRACEFUL_STOP_S`` to exit; then whatever still runs continued and killed; Redis and
        PostgreSQL stopped last (PostgreSQL's cluster removed)."""
        processes = self.processes()
        if graceful:
            for process in processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGQUIT if process is self._nginx()
                                            else signal.SIGTERM)
            deadline = time.monotonic() + GRACEFUL_STOP_S
            for process in processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in processes:
            # The whole process group (each member has its own session): nginx's worker
            # outlives a SIGKILL of its master alone, a relay supervisor's workers too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_WAIT_S)
        for name in ("redis", "postgres"):  # a test may have stopped one (SIGSTOP)
            member = self.members.get(name)
            if member is not None and member.running:
                with contextlib.suppress(ProcessLookupError):
                    member.process.send_signal(signal.SIGCONT)
        if self.redis is not None:
            stop_redis(self.redis)
        if self.postgres is not None:
            stop_postgres(self.postgres)
            self.postgres = None

    def _nginx(self) -> subprocess.Popen[Any] | None:
        member = self.members.get("nginx")
        return None if member is None else member.process

    def print_logs(self, tail: int = 4000) -> None:
        """The members' last output, for a failed test's report."""
        for member in self.members.values():
            print(f"--- {member.name} ---\n{member.output()[-tail:]}")
        error_log = self.tmp / "nginx" / "error.log"
        if error_log.exists():
            print(f"--- nginx error.log ---\n"
                  f"{error_log.read_text(errors='replace')[-tail:]}")

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """The members' last output printed when the block fails."""
        try:
            yield
        except BaseException:
            self.print_logs()
            raise


    def access_log(self) -> list[str]:
        """nginx's access log lines: ``address:port "request" status upstream=host:port``."""
        try:
            text = (self.tmp / "nginx" / "access.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()

    def node_log(self, name: str, pattern: str) -> list[str]:
        """Lines of a node's output that match ``pattern``."""
        member = self.members.get(name)
        if member is None:
            return []
        return [line for line in list(member.lines) if re.search(pattern, line)]



def module_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The body of a test module's ``fleet`` fixture: a whole fleet started (its logs printed
    if it does not start), stopped at the end."""
    running = Fleet(tmp_path_factory.mktemp("fleet"))
    started = time.monotonic()
    try:
        asyncio.run(running.start())
        print(f"fleet started in {time.monotonic() - started:.1f} s: relays "
              f"{ {r: running.relay_home(r) for r in running.relay_names} }")
        yield running
    except BaseException:
        running.print_logs()
        raise
    finally:
        running.stop_all()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def _spawn_relay(config: Path, url: str, token: str, region: str,
                 log: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "telehealth.cli", "--config", str(config), "relay",
               "--signaling", url, "--node-token", token, "--region", region]
    with log.open("w", encoding="utf-8") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=_env(), start_new_session=True)


def _start_serve(name: str, config: Path, log: Path, port: int) -> Member:
    """`telehealth serve` in its own session; returns once it printed READY. Its output is
    kept (``Member.lines``) and copied to ``log`` by a thread that keeps reading it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "telehealth.cli", "--config", str(config), "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
        start_new_session=True)
    member = Member(name, process, log, port)
    ready = threading.Event()
    threading.Thread(target=_drain, args=(member, ready), daemon=True).start()
    if not ready.wait(SERVE_START_S) or process.poll() is not None:
        process.kill()
        process.wait(timeout=STOP_WAIT_S)
        raise RuntimeError(f"{name} did not start:\n{member.output()[-4000:]}")
    return member


def _drain(member: Member, ready: threading.Event) -> None:
    """Keep reading the node's output (a full pipe would block it), into its lines and log."""
    stdout = member.process.stdout
    assert stdout is not None
    with member.log.open("w", encoding="utf-8") as out:
        for line in stdout:
            member.lines.append(line)
            out.write(line)
            out.flush()
            if not ready.is_set() and _READY.match(line):
                ready.set()
    ready.set()  # exited before READY: the starter sees it


# -- make fleet ---------------------------------------------------------------------------
DEMO_TOKEN_TTL_S = 12 * 3600
"""The sign-in links `make fleet` prints last a shift, like `make run`'s."""


async def _run(port: int, folder: Path) -> int:
    fleet = Fleet(folder, directory=DEMO_DIRECTORY, port=port, secret=_demo_secret(folder),
                  token_ttl_s=DEMO_TOKEN_TTL_S)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"Starting Redis, PostgreSQL, {fleet.nodes} signaling nodes, {fleet.relays} relays "
          f"and nginx in {folder} ...", flush=True)
    started = time.monotonic()
    try:
        await fleet.start()
    except BaseException:
        fleet.print_logs()
        await asyncio.to_thread(fleet.stop_all)
        raise
    try:
        print(f"\nA local fleet, started in {time.monotonic() - started:.1f} s:", flush=True)
        assert fleet.redis is not None
        print(f"  Redis       {fleet.redis.url}")
        print(f"  PostgreSQL  {fleet.dsn}")
        for name in fleet.node_names:
            node = fleet.members[name]
            print(f"  {name}      {fleet.node_url(name)}  pid {node.process.pid}  (log {node.log})")
        for name in fleet.relay_names:
            print(f"  {name}     pid {fleet.members[name].process.pid}, dials nginx, registered "
                  f"with {fleet.relay_home(name)}")
        print(f"  nginx       {fleet.url}  <- open this one\n")
        print(f"Sign-in links through nginx (valid {DEMO_TOKEN_TTL_S // 3600} h):")
        directory = Directory.load(fleet.directory_file)
        for clinician in directory.clinicians.values():
            site = directory.sites[clinician.site_id]
            roles = ", ".join(sorted(clinician.roles))
            print(f"  {clinician.name} ({roles}, {site.name}):\n"
                  f"    {fleet.url}/#token={fleet.token(clinician.id)}")
        print("\nCtrl-C stops everything.", flush=True)
        told: set[str] = set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for member in fleet.members.values():
                if not member.running and member.name not in told and not stop.is_set():
                    told.add(member.name)
                    print(f"{member.name} exited with {member.process.returncode} (its log: "
                          f"{member.log}); the rest keeps running", flush=True)
    finally:
        print("Stopping the fleet ...", flush=True)
        stopping = time.monotonic()
        await asyncio.to_thread(fleet.stop_all, True)
        print(f"Stopped in {time.monotonic() - stopping:.1f} s.", flush=True)
    return 0


def _demo_secret(folder: Path) -> str:
    """One token secret for the whole fleet, kept in ``folder`` across runs (sign-in links
    stay valid after a restart)."""
    from signaling.tokens import load_or_create_secret

    return load_or_create_secret("", folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fleet_processes",
        description="A local fleet on 127.0.0.1: Redis, PostgreSQL, two `telehealth serve` "
                    "nodes, two relays and nginx in front (docs/fleet.md). Ctrl-C stops it.")
    parser.add_argument("--port", type=int, default=8090,
                        help="nginx's port, the fleet's one address (default 8090; 0: a "
                             "free one)")
    parser.add_argument("--dir", type=Path, default=Path("var/fleet"),
                        help="where the members' configs, data and logs go (default "
                             "var/fleet)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run(args.port, args.dir.resolve()))


if __name__ == "__main__":
    sys.exit(main())
