"""All cores of a relay machine: `telehealth relay --workers N`.

One Python process forwards on one core (its event loop is serial), so a machine with N cores
runs N relay processes, *workers*. With N > 1 the `telehealth relay` process is a small
supervisor: it starts N copies of itself (``--worker k``), each a whole ``RelayNode`` with
its own LocalRelay and event loop, and does no media work of its own. Each worker registers
with signaling as a node of its own, ``<relay id>.w<k>`` (the one node token of the machine
plus the worker index in the connect auth; signaling composes and checks the id), so that
placement spreads rooms across the workers by load like across any relays, and the failover
of docs/failover.md moves a dead worker's consultations like a dead node's.

The machine's UDP ports are shared out (``worker_ports``): ``relay.udp_port_range`` is split
into N disjoint slices in worker order, and single-port mode gives worker k the port
``relay.udp_port + k`` (N ports for the firewall). ``relay.capacity`` is the machine's: each
worker takes its share, rounded up.

The supervisor (``Supervisor``): prints ``READY`` once every worker has registered; exits 2
when a worker exits 2 before that (signaling refused the token, or the configuration cannot
work), as one node does; restarts a worker that dies later, with back-off (``RESTART_FIRST_S``
doubling up to ``RESTART_MAX_S``, reset after ``STABLE_S`` of life), logged; passes SIGTERM
and SIGINT on to the workers (each drains as one node does) and exits once they have, 0 (a
second signal kills the workers; the supervisor exits with 128 + the signal). It asks its
workers to stop through their stdin, never with a signal: under systemd's default KillMode,
and with Ctrl-C in a terminal, every worker gets the signal itself too, and a second one
would exit without draining. A worker whose supervisor is gone (``kill -9``: its stdin
closes) drains and exits by itself (relay/node.py ``serve_node``).

N = 1 runs no supervisor: the one node keeps the id and the ports of the configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from config.settings import Settings
from relay.api import MAX_WORKERS, worker_relay_id
from relay.errors import UdpPortsUnavailable

logger = logging.getLogger(__name__)

RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0
"""A worker that ran this long before it died restarts after ``RESTART_FIRST_S`` again."""
KILL_AFTER_S = 40.0
"""After a stop, added to ``relay.drain_s``: a worker still running then is killed (its own
steps are bounded: drain, closing the rooms, the link, the relay)."""
READY_PREFIX = "READY "


def cores() -> int:
    """The cores this process may run on (a container's or systemd's CPU affinity counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def worker_count(configured: int) -> int:
    """``relay.workers`` or ``--workers``: 0 means one per core."""
    if configured < 0 or configured > MAX_WORKERS:
        raise UdpPortsUnavailable(f"relay.workers must be 0-{MAX_WORKERS}, got {configured}")
    return configured or min(cores(), MAX_WORKERS)


def port_slice(low: int, high: int, worker: int, workers: int) -> tuple[int, int]:
    """Worker ``worker``'s share of ``[low, high]``: N disjoint slices in order, the first
    ones one port larger when the range does not divide evenly."""
    total = high - low + 1
    if total < workers:
        raise UdpPortsUnavailable(f"relay.udp_port_range [{low}, {high}] has {total} ports for "
                                  f"{workers} workers: widen it, or set relay.workers")
    size, extra = divmod(total, workers)
    first = low + worker * size + min(worker, extra)
    return first, first + size - 1 + (1 if worker < extra else 0)


def worker_settings(settings: Settings, worker: int, workers: int) -> Settings:
    """The settings worker ``worker`` of ``workers`` runs with: its slice of the port range
    (or its own single port) and its share of the capacity."""
    relay = settings.relay
    if not 0 <= worker < workers:
        raise UdpPortsUnavailable(f"worker {worker} of {workers} does not exist")
    update: dict[str, object] = {"capacity": math.ceil(relay.capacity / workers)}
    if relay.udp_port_range is not None:
        update["udp_port_range"] = port_slice(*relay.udp_port_range, worker, workers)
    elif relay.udp_port is not None:
        if relay.udp_port + workers - 1 > 65535:
            raise UdpPortsUnavailable(f"relay.udp_port {relay.udp_port} + {workers} workers "
                                      "passes 65535: one port per worker, from udp_port")
        update["udp_port"] = relay.udp_port + worker
        if relay.announced_port is not None:
            # A port-forward of N public ports onto the N workers' ports, in the same order.
            if relay.announced_port + workers - 1 > 65535:
                raise UdpPortsUnavailable(
                    f"relay.announced_port {relay.announced_port} + {workers} workers passes "
                    "65535: one public port per worker, from announced_port")
            update["announced_port"] = relay.announced_port + worker
    return settings.model_copy(update={"relay": relay.model_copy(update=update)})


@dataclass
class Worker:
    index: int
    relay_id: str
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    """Registered with signaling (its READY line) since it last started."""
    starts: int = 0
    delay: float = RESTART_FIRST_S
    reader: asyncio.Task[None] | None = None
    exits: asyncio.Queue[int] = field(default_factory=asyncio.Queue)


class Supervisor:
    """Runs ``workers`` worker processes, each started as ``command(k)``."""

    def __init__(self, relay_id: str, workers: int, command: Callable[[int], list[str]], *,
                 signaling_url: str, drain_s: float, env: dict[str, str] | None = None,
                 own_session: bool = False, ready_line: bool = True) -> None:
        """``env``: the workers' environment (default: this process's). ``own_session``:
        each worker in a session (and process group) of its own, so that a terminal's
        Ctrl-C reaches only the parent, which stops them (`serve`'s embedded workers,
        telehealth/relay_workers.py). ``ready_line``: print ``READY ...`` once every worker
        registered (`telehealth relay`'s start-up contract); without it, a log line."""
        self.relay_id = relay_id
        self.command = command
        self.signaling_url = signaling_url
        self.drain_s = drain_s
        self.env = env
        self.own_session = own_session
        self.ready_line = ready_line
        self.workers = [Worker(k, worker_relay_id(relay_id, k)) for k in range(workers)]
        self._changed = asyncio.Event()
        self._stopping = False
        self._second: int | None = None

    async def _start(self, worker: Worker) -> None:
        worker.ready = False
        worker.starts += 1
        # stdout is read (its READY line); the logs (stderr) go where the supervisor's go.
        # stdin: how the supervisor asks it to stop (relay/node.py, ``_stop_when_told``).
        worker.process = await asyncio.create_subprocess_exec(
            *self.command(worker.index), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=self.env, start_new_session=self.own_session)
        worker.started_at = asyncio.get_running_loop().time()
        logger.info("relay %s: worker %s started (pid %d)", self.relay_id, worker.relay_id,
                    worker.process.pid)
        worker.reader = asyncio.create_task(self._read(worker, worker.process))

    async def _read(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            if text.startswith(READY_PREFIX):
                worker.ready = True
                self._changed.set()
            else:
                print(text, flush=True)
        await worker.exits.put(await process.wait())
        self._changed.set()

    def _running(self) -> list[asyncio.subprocess.Process]:
        return [w.process for w in self.workers
                if w.process is not None and w.process.returncode is None]

    def _kill(self) -> None:
        for process in self._running():
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    def _stop_workers(self) -> None:
        """Ask every worker to drain and stop: a line on its stdin, which it reads as one
        SIGTERM (a signal forwarded on top of one that systemd or a terminal's Ctrl-C sent
        to every process would count as the second, which exits without draining)."""
        for process in self._running():
            if process.stdin is not None and not process.stdin.is_closing():
                with contextlib.suppress(OSError):
                    process.stdin.write(b"stop\n")
                    process.stdin.close()

    def on_signal(self, signum: int) -> None:
        self.stop(signum, signal.Signals(signum).name)

    def stop(self, signum: int = signal.SIGTERM, why: str = "stopping") -> None:
        """The first call asks every worker to drain and stop; a second kills them (``run``
        then returns 128 + ``signum``)."""
        if self._stopping:
            logger.warning("relay %s: second stop (%s); the workers are killed",
                           self.relay_id, why)
            self._second = signum
            self._kill()
        else:
            logger.info("relay %s: %s; its %d workers drain (a second signal exits at once)",
                        self.relay_id, why, len(self.workers))
            self._stopping = True
            self._stop_workers()
        self._changed.set()

    def _exited(self) -> list[tuple[Worker, int]]:
        gone = []
        for worker in self.workers:
            while not worker.exits.empty():
                gone.append((worker, worker.exits.get_nowait()))
        return gone

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            await self._start(worker)
        announced = False
        restarts: dict[int, float] = {}
        """Worker index -> when (loop time) it is started again."""
        while True:
            self._changed.clear()
            for worker, code in self._exited():
                if self._stopping:
                    continue  # _wait_all says how each exited
                if not announced and code == 2:
                    # Refused by signaling (or a configuration that cannot work): as one node,
                    # the machine stops; retrying would not help.
                    logger.error("relay %s: worker %s was refused at its start (exit 2); "
                                 "stopping the others", self.relay_id, worker.relay_id)
                    self._stopping = True
                    self._stop_workers()
                    await self._wait_all()
                    return 2
                lived = loop.time() - worker.started_at
                if lived >= STABLE_S:
                    worker.delay = RESTART_FIRST_S
                logger.warning("relay %s: worker %s died (exit %d after %.1f s); restarting it "
                               "in %.1f s", self.relay_id, worker.relay_id, code, lived,
                               worker.delay)
                restarts[worker.index] = loop.time() + worker.delay
                worker.delay = min(worker.delay * 2, RESTART_MAX_S)
            if self._stopping:
                await self._wait_all()
                return 128 + self._second if self._second is not None else 0
            for index, when in list(restarts.items()):
                if loop.time() >= when:
                    del restarts[index]
                    await self._start(self.workers[index])
            if not announced and all(w.ready for w in self.workers):
                announced = True
                ready = (f"relay {self.relay_id} ({len(self.workers)} workers: "
                         f"{', '.join(w.relay_id for w in self.workers)}) -> "
                         f"{self.signaling_url}")
                if self.ready_line:
                    print(f"{READY_PREFIX}{ready}", flush=True)
                else:
                    logger.info("ready: %s", ready)
            wait = min((when - loop.time() for when in restarts.values()), default=1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, wait)):
                    await self._changed.wait()

    async def _wait_all(self) -> None:
        """Every worker's exit, each drain bounded: killed past ``drain_s + KILL_AFTER_S``."""
        try:
            async with asyncio.timeout(self.drain_s + KILL_AFTER_S):
                for process in self._running():
                    await process.wait()
        except TimeoutError:
            logger.warning("relay %s: workers still running %.0f s after the stop; killed",
                           self.relay_id, self.drain_s + KILL_AFTER_S)
            self._kill()
        for worker in self.workers:
            if worker.reader is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(5):
                        await worker.reader
            if worker.process is not None:
                logger.info("relay %s: worker %s exited (%s)", self.relay_id, worker.relay_id,
                            worker.process.returncode)
        logger.info("relay %s stopped (%d workers)", self.relay_id, len(self.workers))


async def supervise(relay_id: str, workers: int, command: Callable[[int], list[str]], *,
                    signaling_url: str, drain_s: float,
                    env: dict[str, str] | None = None) -> int:
    """The supervisor of ``workers`` worker processes until a stop; its exit code."""
    supervisor = Supervisor(relay_id, workers, command, signaling_url=signaling_url,
                            drain_s=drain_s, env=env)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, supervisor.on_signal, signum)
    try:
        return await supervisor.run()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def worker_command(argv: list[str], worker: int) -> list[str]:
    """This process's own command line with ``--worker k`` added: what a worker runs."""
    return [sys.executable, "-m", "telehealth.cli", *argv, "--worker", str(worker)]
