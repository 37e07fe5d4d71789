"""Test support: a directory of sites and clinicians, a real server on an ephemeral port (in
process or as a subprocess), and a socket.io client that records what it receives."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import socketio
from aiohttp import web

from config.settings import Settings, load_settings
from signaling.http_api import runner_options
from signaling.tokens import TokenAuthority
from telehealth.startup import SERVICES, create_app

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
RACERS = 20

DIRECTORY = """
[[sites]]
id = "c1"
name = "Central One"
tier = "central"
region = "01"

[[sites]]
id = "c2"
name = "Central Two"
tier = "central"
region = "79"

[[sites]]
id = "d1"
name = "District One"
tier = "district"
region = "11"

[[sites]]
id = "d2"
name = "District Two"
tier = "district"
region = "79"

[[sites]]
id = "d3"
name = "District Three"
tier = "district"
region = "22"

[[sites]]
id = "k1"
name = "Commune One"
tier = "commune"
region = "56"

[[clinicians]]
id = "ref1"
name = "Referring One"
site = "d1"
roles = ["referring"]

[[clinicians]]
id = "ref2"
name = "Referring Two"
site = "d2"
roles = ["referring"]

[[clinicians]]
id = "ref3"
name = "Referring Three"
site = "d3"
roles = ["referring"]

[[clinicians]]
id = "cardio1"
name = "Cardiologist One"
site = "c1"
roles = ["specialist"]
specialties = ["cardiology"]

[[clinicians]]
id = "cardio2"
name = "Cardiologist Two"
site = "c2"
roles = ["specialist"]
specialties = ["cardiology"]

[[clinicians]]
id = "infect1"
name = "Infectious One"
site = "c2"
roles = ["specialist"]
specialties = ["infectious-disease"]

[[clinicians]]
id = "distspec"
name = "District Cardiologist"
site = "d1"
roles = ["specialist"]
specialties = ["cardiology"]

[[clinicians]]
id = "coord"
name = "Coordinator"
site = "c1"
roles = ["coordinator"]

[[clinicians]]
id = "admin"
name = "Admin"
site = "c1"
roles = ["admin"]
""" + "".join(
    f'\n[[clinicians]]\nid = "racer{i}"\nname = "Racer {i}"\nsite = "c{1 + i % 2}"\n'
    'roles = ["specialist"]\nspecialties = ["cardiology"]\n'
    for i in range(RACERS)
)


def write_config(tmp: Path, **sections: dict[str, Any]) -> Path:
    """A config TOML in ``tmp`` with the test directory; ``sections`` override keys."""
    (tmp / "directory.toml").write_text(DIRECTORY, encoding="utf-8")
    base: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "security": {"token_secret": SECRET},
        "storage": {"data_dir": str(tmp / "data")},
        "directory": {"file": str(tmp / "directory.toml")},
        "queue": {"tick_s": 0.1},
        "presence": {"reconnect_grace_s": 1.0, "ping_interval_s": 5, "ping_timeout_s": 5},
        # One relay process per node (relay.workers' default is one per core).
        "relay": {"host_addresses": ["127.0.0.1"], "workers": 1},
        "logging": {"level": "INFO"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    path = tmp / "telehealth.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Server:
    url: str
    settings: Settings
    tokens: TokenAuthority
    app: web.Application | None = None

    def token(self, clinician_id: str, **kwargs: Any) -> str:
        return self.tokens.issue(clinician_id, **kwargs)


@asynccontextmanager
async def run_server(config: Path) -> AsyncIterator[Server]:
    """The real app on an ephemeral port in this process."""
    settings = load_settings(config)
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False,
                           **runner_options(settings.server, app[SERVICES].metrics))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Server(f"http://127.0.0.1:{port}", settings, app[SERVICES].tokens, app)
    finally:
        await runner.cleanup()


async def http_get(url: str, token: str) -> tuple[int, dict[str, Any]]:
    """GET ``url`` with ``Authorization: Bearer token``: the status and the JSON body."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            body: dict[str, Any] = await response.json()
            return response.status, body


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


def start_server_process(config: Path, timeout: float = 20.0) -> ServerProcess:
    """`telehealth serve` as a real subprocess; returns once it printed READY."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "telehealth.cli", "--config", str(config), "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.match(r"READY (\S+)", line)
        if match:
            threading.Thread(target=_drain, args=(process, lines), daemon=True).start()
            return ServerProcess(match.group(1), process, lines)
    process.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines))


def _drain(process: subprocess.Popen[str], lines: list[str]) -> None:
    """Keep reading the server's output so that a full pipe never blocks it."""
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)


class Client:
    """A python-socketio client that keeps every event it receives, per event name."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: dict[str, asyncio.Queue[Any]] = {}
        self.sio.on("*", self._record)

    async def _record(self, event: str, data: Any = None) -> None:
        self.events.setdefault(event, asyncio.Queue()).put_nowait(data)

    async def connect(self) -> Client:
        auth = {"token": self.token} if self.token is not None else None
        await self.sio.connect(self.url, auth=auth, transports=["websocket"], wait_timeout=5)
        return self

    async def call(self, event: str, payload: Any = None, timeout: float = 5.0) -> Any:
        if payload is None:
            return await self.sio.call(event, timeout=timeout)
        return await self.sio.call(event, payload, timeout=timeout)

    async def ok(self, event: str, payload: Any = None) -> dict[str, Any]:
        answer = await self.call(event, payload)
        assert isinstance(answer, dict) and answer.get("ok") is True, answer
        return answer

    async def refused(self, event: str, payload: Any, code: str) -> dict[str, Any]:
        answer = await self.call(event, payload)
        assert isinstance(answer, dict) and "error" in answer, answer
        assert answer["error"]["code"] == code, answer
        assert answer["error"]["message"], answer
        return answer

    async def next(self, event: str, timeout: float = 5.0) -> Any:
        queue = self.events.setdefault(event, asyncio.Queue())
        return await asyncio.wait_for(queue.get(), timeout)

    async def next_matching(self, event: str, predicate: Any, timeout: float = 5.0) -> Any:
        """The next ``event`` whose payload satisfies ``predicate``, skipping others."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            data = await self.next(event, max(0.01, deadline - loop.time()))
            if predicate(data):
                return data

    def drain(self, event: str) -> list[Any]:
        queue = self.events.get(event)
        items = []
        while queue is not None and not queue.empty():
            items.append(queue.get_nowait())
        return items

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@asynccontextmanager
async def clients(server_url: str, tokens: dict[str, str]) -> AsyncIterator[dict[str, Client]]:
    """Connected clients by name; all disconnected on exit."""
    made: dict[str, Client] = {}
    try:
        for name, token in tokens.items():
            made[name] = await Client(server_url, token).connect()
        yield made
    finally:
        for client in made.values():
            await client.close()
