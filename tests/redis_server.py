"""A real redis-server for the tests that cover Redis: on 127.0.0.1 and a free port, in a
directory of the test's, without persistence unless asked; stopped by the test. `make test` installs
Debian's redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_redis(directory: Path, timeout: float = 10.0, *, port: int = 0,
                persistent: bool = False) -> RedisServer:
    """redis-server on 127.0.0.1 and ``port`` (0: a free one); ready when it answers PING.
    Without RDB or AOF, or with ``persistent`` as docs/fleet.md recommends (``appendonly
    yes``, ``appendfsync everysec``: a restart on the same directory replays its file), in its
    own session then (a fleet's member, killed with its group). A free port is picked just
    before, so another process may take it: three tries."""
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if persistent \
        else ["--appendonly", "no"]
    for _ in range(1 if port else 3):
        chosen = port or _free_port()
        process = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(chosen), "--dir", str(directory),
             "--save", "", *persistence, "--protected-mode", "yes",
             "--logfile", str(directory / f"redis-{chosen}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=persistent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", chosen), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return RedisServer(f"redis://127.0.0.1:{chosen}/0", process)
            except OSError:
                time.sleep(0.05)
        stop_redis(RedisServer("", process))
    raise RuntimeError(f"redis-server did not start (log in {directory})")


def stop_redis(server: RedisServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)
