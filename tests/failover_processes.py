"""The real processes of the failover tests and of bench/failover.py: `telehealth serve` on a
fixed port (a restarted one is found where the clients and the relay nodes left it) and
`telehealth relay` nodes, each with its own config and log; kill -9, SIGSTOP/SIGCONT, SIGTERM
and restart. ``Cluster`` is an async context manager: every process it started is stopped at
the end, also when the test fails (a stopped process is continued first, then killed)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.consultation_media import start_node
from tests.support import SECRET, ServerProcess, start_server_process, write_config

SERVE_START_S = 30.0
"""`serve` imports aiortc and PyAV and restores its records: on the shared 2-core machine a
start can take several seconds."""
NODE_START_S = 30.0
STOP_WAIT_S = 10.0

NODE_RELAY = {
    "host_addresses": ["127.0.0.1"],
    # Redial a restarted `serve` within a second (the default caps the back-off at 5 s).
    "reconnect_delay_max_s": 1.0,
}
"""``[relay]`` of every node's own config; the cluster's ``node_relay`` adds to it."""

SERVE_SECTIONS: dict[str, dict[str, Any]] = {
    # Only standalone nodes carry media: killing `serve` must not take media with it.
    "relay": {"embedded": False},
    # Production's timer tick (tests/support.py's 0.1 s would check silent relays ten times
    # as often as `serve` does by default, were the check still on this tick).
    "queue": {"tick_s": 1.0},
    # Participants that a restarted `serve` adopts from a node's report wait this long for
    # their clients to come back before they are removed (and their media with them).
    "presence": {"reconnect_grace_s": 30.0},
}

_REGISTERED = "relay node {} connected"
"""What `serve` logs (signaling/placement.py, INFO) each time a node registers."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now; `serve` listens on it for the whole test, restarts
    included (the listening socket sets SO_REUSEADDR: TIME_WAIT does not block it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Node:
    """One `telehealth relay` process; its output goes to ``log``."""

    relay_id: str
    region: str
    process: subprocess.Popen[str]
    log: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


@dataclass
class Cluster:
    """`serve` and relay nodes as subprocesses of the test, in ``tmp``."""

    tmp: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config sections for `serve`, over ``SERVE_SECTIONS``."""
    node_relay: dict[str, Any] = field(default_factory=dict)
    """``[relay]`` keys for every node, over ``NODE_RELAY``."""
    directory: str | None = None
    """A directory TOML to use instead of tests/support.py's."""
    port: int = field(default_factory=free_port)
    serve: ServerProcess | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    _old: list[subprocess.Popen[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in SERVE_SECTIONS.items()}
        for name, values in self.sections.items():
            merged.setdefault(name, {}).update(values)
        merged.setdefault("server", {})["port"] = self.port
        (self.tmp / "serve").mkdir(parents=True, exist_ok=True)
        self.config = write_config(self.tmp / "serve", **merged)
        if self.directory is not None:
            (self.tmp / "serve" / "directory.toml").write_text(self.directory,
                                                               encoding="utf-8")
        self.tokens = TokenAuthority(SECRET, Directory.load(self.tmp / "serve" /
                                                            "directory.toml"), 3600)
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self.print_logs()
        await asyncio.to_thread(self.stop_all)

    def token(self, clinician_id: str) -> str:
        return self.tokens.issue(clinician_id)

    # -- serve ----------------------------------------------------------------------------
    async def start_serve(self) -> ServerProcess:
        """`serve` on the cluster's port; returns once it printed READY (raises otherwise,
        with its output). Started in a thread: the test's event loop keeps carrying media."""
        if self.serve is not None:
            self._old.append(self.serve.process)
        self.serve = await asyncio.to_thread(start_server_process, self.config, SERVE_START_S)
        return self.serve

    def _serve(self) -> ServerProcess:
        assert self.serve is not None, "serve was not started"
        return self.serve

    def kill_serve(self) -> None:
        serve = self._serve()
        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait(timeout=STOP_WAIT_S)

    async def stop_serve(self, within: float) -> tuple[int | None, float]:
        """SIGTERM to `serve`: its exit code (None if still running after ``within`` s) and
        how long it took."""
        serve = self._serve()
        started = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(serve.process.wait, within)
        return serve.process.poll(), time.monotonic() - started

    def registrations(self, relay_id: str) -> int:
        """How often the running `serve` logged that this node registered."""
        if self.serve is None:
            return 0
        needle = _REGISTERED.format(relay_id)
        return sum(1 for line in list(self.serve.output) if needle in line)

    async def wait_registered(self, relay_id: str, *, more_than: int = 0,
                              timeout: float = NODE_START_S) -> None:
        """Until `serve` has registered the node more than ``more_than`` times."""
        deadline = time.monotonic() + timeout
        while self.registrations(relay_id) <= more_than:
            node = self.nodes.get(relay_id)
            if node is not None and not node.running:
                raise AssertionError(f"relay node {relay_id} exited with "
                                     f"{node.process.returncode}:\n{node.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"relay node {relay_id} did not register with serve "
                                     f"within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    # -- relay nodes ----------------------------------------------------------------------
    def _node_config(self, relay_id: str) -> Path:
        folder = self.tmp / relay_id
        folder.mkdir(parents=True, exist_ok=True)
        return write_config(folder, relay={**NODE_RELAY, **self.node_relay, "id": relay_id})

    async def start_node(self, relay_id: str, region: str, *, wait: bool = True) -> Node:
        """`telehealth relay` for ``relay_id`` in ``region`` (a fresh process, also for a
        node started again); by default returns once `serve` registered it."""
        before = self.registrations(relay_id)
        old = self.nodes.get(relay_id)
        if old is not None:
            self._old.append(old.process)
        log = self.tmp / f"{relay_id}.{len(self._old)}.log"
        process = start_node(self._node_config(relay_id), self.url,
                             self.tokens.issue_node(relay_id), region, log)
        node = Node(relay_id, region, process, log)
        self.nodes[relay_id] = node
        if wait:
            await self.wait_registered(relay_id, more_than=before)
        return node

    def signal_node(self, relay_id: str, signum: signal.Signals) -> None:
        node = self.nodes[relay_id]
        node.process.send_signal(signum)
        if signum == signal.SIGKILL:
            node.process.wait(timeout=STOP_WAIT_S)

    async def node_exit(self, relay_id: str, within: float) -> tuple[int | None, float]:
        """Wait for the node to exit: its code (None if still running) and the time taken."""
        process = self.nodes[relay_id].process
        started = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, within)
        return process.poll(), time.monotonic() - started

    # -- the end --------------------------------------------------------------------------
    def processes(self) -> list[subprocess.Popen[Any]]:
        current: list[subprocess.Popen[Any]] = [n.process for n in self.nodes.values()]
        if self.serve is not None:
            current.append(self.serve.process)
        return current + self._old

    def stop_all(self) -> None:
        """Every process still running: continued (if stopped) and killed."""
        for process in self.processes():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.send_signal(signal.SIGKILL)
        for process in self.processes():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_WAIT_S)

    def print_logs(self, tail: int = 4000) -> None:
        """The processes' last output, for a failed test's report."""
        if self.serve is not None:
            print(f"--- serve ---\n{''.join(self.serve.output)[-tail:]}")
        for node in self.nodes.values():
            print(f"--- {node.relay_id} ---\n{node.output()[-tail:]}")

    def serve_log(self, pattern: str) -> list[str]:
        """Lines of the running `serve`'s output that match ``pattern``."""
        if self.serve is None:
            return []
        return [line for line in list(self.serve.output) if re.search(pattern, line)]
