"""A real PostgreSQL server for the tests that cover the PostgreSQL store and the fleet: Debian's
binaries (``/usr/lib/postgresql/<version>/bin``, else the PATH), a fresh cluster in a temporary
directory, on 127.0.0.1 and a free port, its unix socket inside that directory; stopped and
removed by the caller (``stop_postgres``), even after a failure. `make test` installs Debian's
``postgresql`` package; nothing here starts or touches the system's own cluster.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster belongs to ``nobody``
(its directory chowned, the server started with that uid and gid and no supplementary groups).
The temporary directory is made under the system's temp dir, not pytest's: pytest's is private
to root (mode 0700), so ``nobody`` could not reach a directory inside it.

Trust authentication on loopback (a throw-away cluster nobody else can reach), ``fsync`` off: a
committed transaction is still written to the WAL before COMMIT returns, which survives a kill
of any process (what the tests check); only a crash of the machine itself could lose it.

Usage::

    server = start_postgres()
    try:
        dsn = create_database(server, "t1")  # a fresh, empty database
        ...
        restart_postgres(server)  # same cluster and port; clients' connections cut
    finally:
        stop_postgres(server)
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPERUSER = "postgres"
LOG = "postgres.log"


def _bin_dir() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` directory, or None to use the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _tool(name: str) -> str:
    bin_dir = _bin_dir()
    if bin_dir is not None and (bin_dir / name).exists():
        return str(bin_dir / name)
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} is neither in /usr/lib/postgresql/*/bin nor on "
                           "the PATH (`make test` installs Debian's postgresql package)")
    return path


@dataclass
class PostgresServer:
    host: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    user: str = SUPERUSER
    _counter: list[int] = field(default_factory=lambda: [0])

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URL of ``database`` on this server (the superuser, no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def next_name(self, prefix: str = "t") -> str:
        """A database name not used before on this server."""
        self._counter[0] += 1
        return f"{prefix}{self._counter[0]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _as_unprivileged() -> dict[str, Any]:
    """Popen arguments that run the child as ``nobody`` when we are root, else nothing."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _environment() -> dict[str, str]:
    # nobody's home does not exist; the C locale keeps initdb independent of the machine's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", HOME="/tmp")
    return env


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_postgres(timeout: float = 30.0) -> PostgresServer:
    """initdb a new cluster in a temporary directory, start ``postgres`` on 127.0.0.1 and a
    free port; ready when ``pg_isready`` says so. The port is picked just before, so another
    process may take it: three tries. Raises with the server's log when it does not start."""
    directory = Path(tempfile.mkdtemp(prefix="telehealth-pg-"))
    try:
        return _start(directory, timeout)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _start(directory: Path, timeout: float) -> PostgresServer:
    privileges = _as_unprivileged()
    data, sockets = directory / "data", directory / "sock"
    sockets.mkdir()
    if privileges:
        for path in (directory, sockets):
            os.chown(path, privileges["user"], privileges["group"])
    env = _environment()
    init = subprocess.run(
        [_tool("initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
         "--locale=C", "--no-sync"],
        env=env, cwd=directory, capture_output=True, timeout=timeout, **privileges)
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed ({init.returncode}): "
                           f"{init.stderr.decode(errors='replace')[-2000:]}")
    for _ in range(3):
        port = _free_port()
        server = PostgresServer("127.0.0.1", port, directory, _launch(directory, port))
        if _ready(server, timeout):
            return server
        _stop_process(server)
    raise RuntimeError(f"postgres did not start; its log:\n{_log_tail(directory / LOG)}")


def _launch(directory: Path, port: int) -> subprocess.Popen[bytes]:
    with open(directory / LOG, "ab") as log:
        return subprocess.Popen(
            [_tool("postgres"), "-D", str(directory / "data"), "-p", str(port),
             "-k", str(directory / "sock"),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "max_connections=300",
             "-c", "shared_buffers=32MB", "-c", "log_min_messages=warning"],
            env=_environment(), cwd=directory, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, **_as_unprivileged())


def _ready(server: PostgresServer, timeout: float) -> bool:
    """Bounded: True once ``pg_isready`` answers, False if the server exits or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.process.poll() is None:
        ready = subprocess.run(
            [_tool("pg_isready"), "-q", "-h", server.host, "-p", str(server.port),
             "-U", SUPERUSER, "-d", "postgres", "-t", "1"],
            env=_environment(), capture_output=True, timeout=10)
        if ready.returncode == 0:
            return True
        time.sleep(0.05)
    return False


def restart_postgres(server: PostgresServer, timeout: float = 30.0) -> None:
    """Stop the server if it runs (fast shutdown: its clients' connections are cut) and start
    it again on the same cluster and port, as an operator's restart or a failover would."""
    _stop_process(server)
    server.process = _launch(server.directory, server.port)
    if not _ready(server, timeout):
        raise RuntimeError(f"postgres did not restart; its log:\n"
                           f"{_log_tail(server.directory / LOG)}")


def psql(server: PostgresServer, sql: str, database: str = "postgres") -> str:
    """Run ``sql`` with psql (autocommit, stop at the first error); its output."""
    result = subprocess.run(
        [_tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", server.host,
         "-p", str(server.port), "-U", server.user, "-d", database, "-c", sql],
        env=_environment(), capture_output=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"psql failed: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode()


def create_database(server: PostgresServer, name: str | None = None,
                    template: str = "template0") -> str:
    """A fresh, empty database (copied from ``template``); its DSN."""
    name = name or server.next_name()
    psql(server, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return server.dsn(name)


def drop_database(server: PostgresServer, name: str) -> None:
    """Drop ``name``, closing whatever connections a test left open to it."""
    psql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _stop_process(server: PostgresServer) -> None:
    # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, not waited for.
    process = server.process
    if process.poll() is None:
        process.send_signal(2)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def stop_postgres(server: PostgresServer, *, remove: bool = True) -> None:
    """Stop the server and remove its cluster (``remove=False``: keep it, for
    ``restart_postgres``; idempotent either way)."""
    try:
        _stop_process(server)
    finally:
        if remove:
            shutil.rmtree(server.directory, ignore_errors=True)
