"""`serve`'s embedded relay on several cores: ``relay.embedded_workers = N``.

The in-process relay (relay/embedded.py) forwards on the one core of `serve`'s event loop, which
signaling shares. With ``relay.embedded_workers`` N >= 1 that relay is off and `serve` runs N
relay worker processes instead, through the supervisor of relay/workers.py, as a relay machine
with `telehealth relay --workers N` does: each worker a whole relay node that registers as
``<relay.id>.w<k>`` (``embedded.w0``, ``embedded.w1``...), placement spreading consultations
over them by load, a worker that dies started again (its consultations moved at once, like a
dead node's: docs/failover.md). 0, the default, keeps the in-process relay.

How the workers reach this `serve`: a second listener of the same application, plain HTTP on
127.0.0.1 and a port the system picks, opened before the workers start. It is the workers'
only way in, whatever ``server.host``, ``server.port`` (0 is known only once `serve` listens)
and TLS are (a worker checks a https server's certificate against a host name; 127.0.0.1 is
rarely one of them). It is the same application (the same middlewares, tokens and handlers),
reachable from this machine only. Each worker presents a node token this `serve` signs itself
for ``relay.id``; the token and the workers' settings, this process's ``[relay]`` (the ICE host
addresses as the in-process relay would use them: 127.0.0.1 on a loopback `serve`) and
``[logging]``, are handed over in their environment (``TELEHEALTH_NODE_TOKEN``,
``TELEHEALTH_RELAY``, ``TELEHEALTH_LOGGING``; nothing else of this process's ``TELEHEALTH_*``),
which only their user can read, never on their command line, which every local user can. A
worker runs this module (``python -m telehealth.relay_workers --worker k ...``, ``worker_main``:
`telehealth relay --worker k` without the token in its arguments). The ports and the capacity
are shared out as relay/workers.py does: the range split, ``udp_port + k`` each,
``capacity / N`` each.

Start: the listener opens and the workers start as `serve` starts, after the records are
restored (consultations still open wait for a relay meanwhile, as after any restart: they are
placed when the workers register); `serve` waits up to ``READY_S`` for every worker to register
before it says READY (past that, a WARNING, and they join when they come). A worker refused at
its start (exit 2: its configuration cannot work) stops `serve`'s start-up with the error.

Stop: first in `serve`'s stop (after the clients were told and every session closed, so the
workers find signaling gone): each worker is asked to stop on its stdin, closes its rooms (no
drain: there is no other relay of this `serve` to move them to, and `serve` is going) and
exits; one still running after ``STOP_SHARE`` of ``server.drain_s`` is killed. Each worker is in
a session of its own (a terminal's Ctrl-C reaches `serve`, which stops them); a worker whose
`serve` is killed (its stdin closes) stops by itself. Media in them stops with `serve`, as with
the in-process relay: standalone relays (`telehealth relay`) are the ones that outlive a
restart."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from aiohttp import web

from config.settings import ConfigError, Settings, load_settings
from relay.api import NODE_TOKEN_ENV
from relay.config import MediaConfig
from relay.errors import RelayCannotStart
from relay.node import serve_node
from relay.workers import Supervisor, worker_settings
from signaling.tokens import TokenAuthority

logger = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
READY_S = 20.0
"""`serve`'s start waits this long at most for every worker to register."""
READY_POLL_S = 0.05
STOP_SHARE = 0.4
"""Of ``server.drain_s``: the workers' stop; what still runs after it is killed."""
KILLED_WAIT_S = 5.0
TOKEN_TTL_S = 10 * 365 * 24 * 3600
"""The workers' node token: it must outlast `serve` (a worker whose link drops redials with
the token it was started with, and a worker started again gets the same)."""
CLEARED_ENV = "TELEHEALTH_"
"""This process's settings variables are not the workers': theirs are set explicitly."""
EXIT_CONFIG = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""telehealth/cli.py's: a worker's lines go to `serve`'s stderr among its own."""


class StopSteps(Protocol):
    """Where `serve`'s stop names the step under way (telehealth/startup.py ``Stopping``)."""

    step: str


def worker_environment(settings: Settings, media: MediaConfig,
                       node_token: str) -> dict[str, str]:
    """The workers' environment: this process's without its ``TELEHEALTH_*`` variables (a
    ``TELEHEALTH_CONFIG`` would make them read `serve`'s file instead), plus this process's
    effective ``[relay]`` and ``[logging]`` as JSON, and the node token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_ENV)}
    env[NODE_TOKEN_ENV] = node_token
    relay = settings.relay.model_copy(update={
        "host_addresses": list(media.host_addresses),
        # A worker is a standalone node to itself: no relay of its own to embed.
        "embedded": False, "embedded_workers": 0,
        "workers": settings.relay.embedded_workers})
    env["TELEHEALTH_RELAY"] = relay.model_dump_json()
    env["TELEHEALTH_LOGGING"] = settings.logging.model_dump_json()
    env["PYTHONUNBUFFERED"] = "1"
    return env


class EmbeddedWorkers:
    """The N relay worker processes of one `serve`, and the loopback listener they dial."""

    def __init__(self, settings: Settings, tokens: TokenAuthority, media: MediaConfig) -> None:
        self.count = settings.relay.embedded_workers
        if self.count < 1:
            raise RelayCannotStart("relay.embedded_workers is 0: the in-process relay runs")
        for k in range(self.count):
            worker_settings(settings, k, self.count)  # a range too small stops start-up here
        self.settings = settings
        # Signed once: a worker started again presents the same one (TOKEN_TTL_S).
        self._env = worker_environment(
            settings, media, tokens.issue_node(settings.relay.id, ttl_s=TOKEN_TTL_S))
        self.url = ""
        """The loopback listener the workers dial, once open."""
        self.supervisor: Supervisor | None = None
        self._runner: web.BaseRunner | None = None
        self._run: asyncio.Task[int] | None = None
        self._started = False
        """``start`` returned: from then on the supervisor ending is news."""
        self._stopping = False

    def command(self, worker: int) -> list[str]:
        """Worker ``worker``'s command line (``worker_main``); the rest is in its
        environment."""
        return [sys.executable, "-m", "telehealth.relay_workers", "--signaling", self.url,
                "--workers", str(self.count), "--worker", str(worker)]

    async def start(self, app: web.Application) -> None:
        """Open the loopback listener, start the workers and wait (``READY_S`` at most) for
        every one to register. RelayCannotStart if the supervisor ends before (a worker
        refused, exit 2): nothing is left running then."""
        started = time.monotonic()
        await self._listen(app)
        self.supervisor = Supervisor(
            self.settings.relay.id, self.count, self.command, signaling_url=self.url,
            drain_s=self.settings.relay.drain_s, env=self._env, own_session=True,
            ready_line=False)
        self._run = asyncio.create_task(self.supervisor.run(), name="relay-workers")
        self._run.add_done_callback(self._ended)
        deadline = started + READY_S
        while not all(w.ready for w in self.supervisor.workers):
            if self._run.done():
                code = self._run.result()
                await self._close_listener()
                raise RelayCannotStart(f"relay.embedded_workers: the relay workers stopped "
                                       f"at their start (exit {code}); their log lines say "
                                       "why")
            if time.monotonic() >= deadline:
                self._started = True
                waiting = [w.relay_id for w in self.supervisor.workers if not w.ready]
                logger.warning("relay: %s not registered %.0f s after their start; serving "
                               "meanwhile (consultations wait for a relay)",
                               ", ".join(waiting), READY_S)
                return
            await asyncio.sleep(READY_POLL_S)
        self._started = True
        logger.info("relay: %d embedded workers registered in %.1f s (%s), on %s", self.count,
                    time.monotonic() - started,
                    ", ".join(w.relay_id for w in self.supervisor.workers), self.url)

    def _ended(self, task: asyncio.Task[int]) -> None:
        """The supervisor ends only when asked to, or when a worker cannot start at all (the
        start says so); anything else leaves `serve` without its relay: an ERROR."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.error("relay: the embedded workers' supervisor failed; no relay worker "
                         "runs any more", exc_info=error)
        elif self._started and not self._stopping:
            logger.error("relay: the embedded workers' supervisor ended (%d); no relay worker "
                         "runs any more", task.result())

    async def _listen(self, app: web.Application) -> None:
        # aiohttp (pinned, 3.14) has no public way to serve one started application on a
        # second runner: AppRunner.setup() would run its start-up again. This is what
        # AppRunner does itself to build its server.
        make_handler = getattr(app, "_make_handler", None)
        if make_handler is None:
            raise RelayCannotStart("relay.embedded_workers: this aiohttp has no "
                                   "Application._make_handler (pinned 3.14 has)")
        server = make_handler(loop=asyncio.get_running_loop(), access_log=None)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, LISTEN_HOST, 0)
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self, budget: float) -> None:
        """Ask every worker to stop; kill those still running after ``budget`` seconds;
        close the listener. Bounded: ``budget + KILLED_WAIT_S`` at most."""
        if self.supervisor is not None and self._run is not None:
            started = time.monotonic()
            self._stopping = True
            self.supervisor.stop(signal.SIGTERM, "serve stops")
            done, _ = await asyncio.wait([self._run], timeout=budget)
            if not done:
                logger.warning("relay: embedded workers still running %.1f s after the stop; "
                               "killed", budget)
                self.supervisor.stop(signal.SIGTERM, "serve's stop time is over")
                done, _ = await asyncio.wait([self._run], timeout=KILLED_WAIT_S)
            if done:
                logger.info("relay: %d embedded workers stopped in %.1f s", self.count,
                            time.monotonic() - started)
            else:
                logger.warning("relay: embedded workers' supervisor still waiting after %.0f "
                               "s; leaving it", budget + KILLED_WAIT_S)
        await self._close_listener()

    async def _close_listener(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def relay_workers(settings: Settings, tokens: TokenAuthority, media: MediaConfig,
                  stopping: StopSteps) -> Callable[[web.Application], AsyncIterator[None]]:
    """The ``cleanup_ctx`` of ``relay.embedded_workers``: appended last, so that the workers
    start once everything else has and stop first. ``media``: the in-process relay's media
    settings (its ICE host addresses), which the workers take over."""
    workers = EmbeddedWorkers(settings, tokens, media)

    async def embedded_workers(app: web.Application) -> AsyncIterator[None]:
        await workers.start(app)
        yield
        stopping.step = "stopping the relay workers"
        await workers.stop(settings.server.drain_s * STOP_SHARE)

    return embedded_workers


def worker_main(argv: list[str] | None = None) -> int:
    """One worker, as `serve` starts it: `telehealth relay --worker k` (relay/node.py
    ``serve_node``, stopped through its stdin) with its settings and node token read from its
    environment. Exit 2 when it cannot serve (a port taken, its settings wrong, refused)."""
    parser = argparse.ArgumentParser(prog="python -m telehealth.relay_workers",
                                     description="one relay worker of `telehealth serve` "
                                                 "(relay.embedded_workers); serve starts it")
    parser.add_argument("--signaling", required=True, help="serve's loopback listener")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--worker", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(None)
        logging.basicConfig(level=settings.logging.level, format=LOG_FORMAT)
        mine = worker_settings(settings, args.worker, args.workers)
        return asyncio.run(serve_node(mine, signaling_url=args.signaling,
                                      node_token=os.environ.get(NODE_TOKEN_ENV, ""),
                                      region=settings.relay.region, worker=args.worker))
    except (ConfigError, RelayCannotStart) as exc:
        print(f"telehealth: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(worker_main())
