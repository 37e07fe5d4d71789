"""Debian's coturn (``/usr/bin/turnserver``) as a child process of a test, on 127.0.0.1.

The TURN server a hospital deploys (docs/firewall.md), started the way a test needs it: loopback
listening and relay addresses, free ports picked at start, the TURN REST API secret
(``use-auth-secret``), loopback peers allowed (coturn refuses them by default and everything in
a test is on loopback: never in a shipped configuration), its log in a file the test reads.

Use it from an async test::

    from tests.turn_server import TURN_PRESENT, run_turn_server

    pytestmark = pytest.mark.skipif(not TURN_PRESENT, reason="coturn is not installed")

    async def test_something(tmp_path: Path) -> None:
        async with run_turn_server(tmp_path) as turn:
            turn.urls                   # ["turn:127.0.0.1:P?transport=udp", "...=tcp"]
            turn.secret                 # give it to the server: write_config(tmp_path,
                                        #   turn={"secret": turn.secret, "urls": turn.urls})
            username, password = rest_credentials(turn.secret, "cardio1", time.time() + 600)
            turn.allocated(username)    # coturn granted it an allocation (from its log)
            turn.refused(username)      # coturn answered it 401 (expired or forged)
            turn.relayed_bytes(username)  # bytes relayed to it, once its allocations ended
            turn.log_text()             # everything coturn logged so far (verbose)

or from synchronous code with ``with TurnServer.start(tmp_path) as turn: ...``. With
``tls=trustme.CA()`` coturn also listens for TURN over TLS (``turn.tls_port``, a ``turns:``
URL in ``turn.urls``) with a certificate of that CA for 127.0.0.1 and ``localhost``.

Start-up is bounded: coturn answers a STUN Binding request within ``ready_timeout_s`` or the
start fails with its log; the process is stopped (SIGTERM, then SIGKILL) and waited for on exit,
also when the test fails."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from aioice import stun

TURNSERVER = "/usr/bin/turnserver"
TURN_PRESENT = Path(TURNSERVER).exists()
HOST = "127.0.0.1"
SECRET = "turn-test-secret-0123456789abcdef"
REALM = "telehealth.test"
RELAY_PORTS = 16
"""Relay ports per server: a few allocations per test, each one port."""


def rest_credentials(secret: str, user: str, expires_at: float) -> tuple[str, str]:
    """TURN REST API credentials as coturn's ``use-auth-secret`` checks them: username
    ``<unix expiry>:<user>``, password base64(HMAC-SHA1(secret, username)). Written here
    independently of signaling/turn.py, so that tests check one against the other."""
    username = f"{int(expires_at)}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


@dataclass
class TurnServer:
    """A running coturn; ``stop()`` is idempotent."""

    process: subprocess.Popen[bytes]
    directory: Path
    port: int
    relay_ports: tuple[int, int]
    tls_port: int | None = None
    secret: str = SECRET
    realm: str = REALM
    host: str = HOST
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.directory / "turnserver.log"

    @property
    def urls(self) -> list[str]:
        """The URLs a client is given: TURN over UDP and TCP, and TLS when started with one."""
        urls = [f"turn:{self.host}:{self.port}?transport=udp",
                f"turn:{self.host}:{self.port}?transport=tcp"]
        if self.tls_port is not None:
            urls.append(f"turns:{self.host}:{self.tls_port}?transport=tcp")
        return urls

    def credentials(self, user: str, ttl_s: float = 600.0) -> tuple[str, str]:
        """Valid credentials for ``user`` for ``ttl_s`` from now."""
        return rest_credentials(self.secret, user, time.time() + ttl_s)

    def log_text(self) -> str:
        """Everything coturn has logged so far."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def allocated(self, username: str) -> bool:
        """Whether coturn granted ``username`` an allocation (its verbose log says so)."""
        return f"user <{username}>: incoming packet ALLOCATE processed, success" in self.log_text()

    def refused(self, username: str) -> bool:
        """Whether coturn refused a request signed as ``username`` with 401 (an expired or
        forged credential; the first, unsigned request of every client is a 401 too, logged
        with an empty user)."""
        return f"user <{username}>: incoming packet message processed, error 401" in (
            self.log_text())

    def relayed_bytes(self, username: str) -> int:
        """Bytes coturn relayed from peers (the relay) to ``username``'s clients, over its
        allocations that have ended: coturn logs a session's "peer usage" when it closes."""
        total = 0
        for match in re.finditer(r"peer usage: realm=<[^>]*>, username=<([^>]*)>, rp=\d+, "
                                 r"rb=(\d+)", self.log_text()):
            if match.group(1) == username:
                total += int(match.group(2))
        return total

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    @classmethod
    @contextmanager
    def start(cls, directory: Path, *, secret: str = SECRET, realm: str = REALM,
              tls: trustme.CA | None = None, options: Sequence[str] = (),
              ready_timeout_s: float = 10.0, attempts: int = 3) -> Iterator[TurnServer]:
        """coturn started in ``directory`` (config, log, database, certificate), ready to
        answer; stopped on exit. Ports are picked free at start; a start that loses a port to
        another process is tried again on new ports, at most ``attempts`` times.
        ``options``: further lines of coturn's configuration, written before the harness's
        own (for an option given once, the harness's value wins)."""
        if not TURN_PRESENT:
            raise RuntimeError(f"{TURNSERVER} is not installed (Debian package coturn)")
        directory = directory / f"coturn-{os.getpid()}-{random.randrange(1 << 30):x}"
        directory.mkdir(parents=True)
        failures: list[str] = []
        for _ in range(attempts):
            server = _launch(directory, secret, realm, tls, options)
            try:
                if _wait_ready(server, ready_timeout_s):
                    break
                failures.append(server.log_text()[-3000:])
            except BaseException:
                server.stop()
                raise
            server.stop()
        else:
            raise RuntimeError("coturn did not answer STUN within "
                               f"{ready_timeout_s} s, {attempts} tries; last log:\n"
                               + failures[-1])
        try:
            yield server
        finally:
            server.stop()


@asynccontextmanager
async def run_turn_server(directory: Path, *, secret: str = SECRET, realm: str = REALM,
                          tls: trustme.CA | None = None, options: Sequence[str] = (),
                          ready_timeout_s: float = 10.0) -> AsyncIterator[TurnServer]:
    """``TurnServer.start`` for async tests: start and stop run in a thread, so the event
    loop (a signaling server in the same process) goes on meanwhile."""
    manager = TurnServer.start(directory, secret=secret, realm=realm, tls=tls,
                               options=options, ready_timeout_s=ready_timeout_s)
    server = await asyncio.to_thread(manager.__enter__)
    try:
        yield server
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


def _launch(directory: Path, secret: str, realm: str, tls: trustme.CA | None,
            options: Sequence[str]) -> TurnServer:
    port = _free_port()
    tls_port = _free_port() if tls is not None else None
    low = _free_range(RELAY_PORTS)
    lines = [*options,
        f"listening-ip={HOST}", f"relay-ip={HOST}", f"listening-port={port}",
        f"min-port={low}", f"max-port={low + RELAY_PORTS - 1}",
        "use-auth-secret", f"static-auth-secret={secret}", f"realm={realm}",
        "fingerprint", "no-cli", "no-rfc5780", "no-software-attribute",
        "no-multicast-peers", "verbose",
        # Tests run every peer on loopback; coturn refuses loopback peers without this.
        # Never in a shipped configuration (docs/firewall.md denies private peers instead).
        "allow-loopback-peers",
        f"log-file={directory / 'turnserver.log'}", "simple-log", "no-stdout-log",
        # coturn opens an SQLite user database even with use-auth-secret: keep it here.
        f"userdb={directory / 'turndb'}", f"pidfile={directory / 'turnserver.pid'}",
        "no-dtls",
    ]
    if tls is None:
        lines.append("no-tls")
    else:
        cert = tls.issue_cert(HOST, "localhost")
        cert.private_key_pem.write_to_path(str(directory / "turn.key"))
        cert.cert_chain_pems[0].write_to_path(str(directory / "turn.crt"))
        lines += [f"tls-listening-port={tls_port}", f"cert={directory / 'turn.crt'}",
                  f"pkey={directory / 'turn.key'}", "no-tlsv1", "no-tlsv1_1"]
    config = directory / "turnserver.conf"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "turnserver.log").unlink(missing_ok=True)
    process = subprocess.Popen([TURNSERVER, "-c", str(config)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=directory)
    return TurnServer(process, directory, port, (low, low + RELAY_PORTS - 1), tls_port,
                      secret, realm)


def _wait_ready(server: TurnServer, timeout_s: float) -> bool:
    """True once coturn answers a STUN Binding request on its UDP port (its listeners and
    relay ports are set up by then), False if it exits or stays silent for ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while time.monotonic() < deadline and server.alive():
            request = stun.Message(message_method=stun.Method.BINDING,
                                   message_class=stun.Class.REQUEST)
            probe.sendto(bytes(request), (server.host, server.port))
            try:
                data = probe.recv(2048)
            except (TimeoutError, ConnectionRefusedError):
                continue
            answer = stun.parse_message(data)
            if answer.transaction_id == request.transaction_id:
                return _tls_ready(server, deadline)
    return False


def _tls_ready(server: TurnServer, deadline: float) -> bool:
    if server.tls_port is None:
        return True
    while time.monotonic() < deadline and server.alive():
        try:
            with socket.create_connection((server.host, server.tls_port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (coturn listens on both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port for coturn on 127.0.0.1 after 100 tries")


def _free_range(count: int) -> int:
    """The first of ``count`` consecutive UDP ports free on 127.0.0.1, below the kernel's
    ephemeral range (32768 and up) so that other tests' sockets rarely land in it."""
    for _ in range(100):
        low = random.randrange(20000, 30000 - count)
        held: list[socket.socket] = []
        try:
            for port in range(low, low + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(sock)
                sock.bind((HOST, port))
            return low
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free UDP ports on 127.0.0.1 after 100 tries")
