"""Abuse helpers (#10), shared by the fuzz and flood tests and ``bench/abuse_load.py``: a
bystander consultation whose chat delivery is probed, the server's RSS, a packet-level socket.io
client that sends anything and tracks acks by id, flood clients and a connection that never
reads.

Who is who (the test directory of ``tests/support.py``): the bystanders are ``ref1`` (site d1)
and ``infect1`` (site c2) in an infectious-disease consultation; the hostile clinician is
``ref2`` (site d2) with a cardiology consultation hosted by ``cardio1`` (site c1). Nothing the
hostile side may legitimately cause reaches a bystander (no shared site, specialty or role), as
long as requests do not escalate (``QUIET_QUEUE``): so any event a bystander receives that is
not the bystanders' own chat is a leak.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import engineio
import psutil

from tests.support import Client

BYSTANDERS = ("ref1", "infect1")
BYSTANDER_SPECIALTY = "infectious-disease"
HOSTILE = "ref2"
HOSTILE_HOST = "cardio1"
HOSTILE_SPECIALTY = "cardiology"

NEVER = 10_000_000.0
QUIET_QUEUE: dict[str, Any] = {
    "escalate_after_s": {"stat": NEVER, "asap": NEVER, "urgent": NEVER, "routine": NEVER},
    "expire_after_s": {"stat": NEVER, "asap": NEVER, "urgent": NEVER, "routine": NEVER},
}
"""``write_config(queue=...)`` keys so that no request escalates to every central specialist
(which would reach the bystander specialist) during a run."""

ACK_TIMEOUT_S = 5.0


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ack_code(ack: Any) -> str:
    """``ok``, the error code of an error ack, or ``malformed`` for anything else."""
    if isinstance(ack, dict):
        if ack.get("ok") is True:
            return "ok"
        error = ack.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str) \
                and isinstance(error.get("message"), str) and error["message"]:
            return str(error["code"])
    return "malformed"


# -- the server process --------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of the process ``pid`` in MiB."""
    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


class RssSampler:
    """Samples a process's RSS every ``every_s`` while running; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak_mb = rss_mb(pid)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.peak_mb = rss_mb(self.pid)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            await asyncio.sleep(self.every_s)

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.peak_mb


def log_faults(lines: Iterable[str]) -> list[str]:
    """Server log lines that must never follow a client's fault: tracebacks, ERROR lines,
    unretrieved task exceptions."""
    return [line.rstrip() for line in lines
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
            or "exception was never retrieved" in line]


# -- the bystander consultation --------------------------------------------------------------


async def open_consultation(requester: Client, host: Client, specialty: str,
                            reason: str) -> tuple[str, str]:
    """``requester`` asks, ``host`` accepts, both join: (request id, consultation id)."""
    asked = await requester.ok("consult:request", {
        "specialty": specialty, "priority": "routine", "reason": reason})
    request_id = asked["request"]["id"]
    accepted = await host.ok("consult:accept", {"request_id": request_id})
    consultation_id = accepted["consultation"]["id"]
    await requester.ok("consult:join", {"consultation_id": consultation_id})
    await host.ok("consult:join", {"consultation_id": consultation_id})
    return request_id, consultation_id


@dataclass
class ChatProbe:
    """Bystanders chat in turn (``senders`` round robin), ``rate`` messages per second in all
    (open loop); a message's latency is its sender's clock from emitting ``chat:send`` to a
    ``listener`` other than the sender receiving ``chat:message``. Any other event a listener
    receives is kept in ``leaks`` (see the module doc). The probe takes over the listeners'
    ``chat:message`` and catch-all handlers."""

    senders: list[Client]
    listeners: list[Client]
    consultation_id: str
    rate: float = 10.0
    sent: dict[str, tuple[str, float]] = field(default_factory=dict)
    """tag -> (sender id, monotonic send time), for every message acked ok."""
    received: dict[str, dict[str, float]] = field(default_factory=dict)
    """listener id -> tag -> monotonic arrival time."""
    refused: Counter[str] = field(default_factory=Counter)
    leaks: list[tuple[str, str, Any]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    _count: int = 0

    def __post_init__(self) -> None:
        for client in self.listeners:
            who = clinician_of(client)
            self.received[who] = {}
            client.sio.on("chat:message", self._receiver(who))
            client.sio.on("*", self._leak(who))

    def _receiver(self, who: str) -> Callable[[Any], None]:
        def on_chat(data: Any) -> None:
            now = time.monotonic()
            message = data.get("message") if isinstance(data, dict) else None
            text = message.get("text") if isinstance(message, dict) else None
            if (not isinstance(message, dict) or not isinstance(text, str)
                    or not text.startswith("probe-")
                    or message.get("consultation_id") != self.consultation_id):
                self.leaks.append((who, "chat:message", data))
                return
            self.received[who][text] = now
        return on_chat

    def _leak(self, who: str) -> Callable[..., None]:
        def on_any(event: str, data: Any = None) -> None:
            self.leaks.append((who, event, data))
        return on_any

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            sender = self.senders[self._count % len(self.senders)]
            self._count += 1
            task = asyncio.create_task(self._send(sender, f"probe-{self._count}"))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            await asyncio.sleep(max(0.0, start + self._count / self.rate - loop.time()))

    async def _send(self, sender: Client, tag: str) -> None:
        t0 = time.monotonic()
        try:
            ack = await sender.call("chat:send", {"consultation_id": self.consultation_id,
                                                  "text": tag}, timeout=15)
        except Exception as exc:  # a timeout or a lost connection: counted, never raised
            self.refused[type(exc).__name__] += 1
            return
        code = ack_code(ack)
        if code == "ok":
            self.sent[tag] = (clinician_of(sender), t0)
        else:
            self.refused[code] += 1

    async def stop(self, grace_s: float = 3.0) -> None:
        """Stop sending; wait for the acks in flight and up to ``grace_s`` for deliveries."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=20)
        deadline = time.monotonic() + grace_s
        while self.lost() and time.monotonic() < deadline:  # noqa: ASYNC110 (bounded poll)
            await asyncio.sleep(0.05)

    def latencies_ms(self, since: float = 0.0, until: float = math.inf) -> list[float]:
        """Send -> a listener's receipt (the sender's own echo excluded), for messages emitted
        in [since, until)."""
        out = []
        for tag, (sender, t0) in self.sent.items():
            if not since <= t0 < until:
                continue
            for listener, got in self.received.items():
                if listener != sender and tag in got:
                    out.append((got[tag] - t0) * 1000)
        return out

    def lost(self) -> list[tuple[str, str]]:
        """(listener, tag) for every acked message a listener has not received."""
        return [(listener, tag) for tag in self.sent
                for listener, got in self.received.items() if tag not in got]


def clinician_of(client: Client) -> str:
    """The clinician id a client's token names."""
    token = client.token or ""
    payload = token.split(".")[1] if token.count(".") == 2 else ""
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)) or "{}")
    return str(claims.get("sub", "?"))


# -- a socket.io client at the packet level ----------------------------------------------------


@dataclass
class Answer:
    """What became of one event sent with an ack id."""

    ack: Any = None
    """The ack's first argument (None when there was none)."""
    outcome: str = "ack"
    """``ack``, ``closed`` (the server closed the connection first) or ``timeout``."""

    @property
    def code(self) -> str:
        return ack_code(self.ack) if self.outcome == "ack" else self.outcome


class RawSocket:
    """socket.io v5 spoken by hand over a python-engineio client: any packet text goes out, acks
    come back by id. Events from the server are kept in ``events``."""

    def __init__(self, url: str, token: str | None, auth: Any = None) -> None:
        self.url = url
        self.auth = auth if auth is not None else ({"token": token} if token else None)
        self.eio = engineio.AsyncClient()
        self.eio.on("message", self._on_message)
        self.eio.on("disconnect", self._on_disconnect)
        self.events: list[tuple[Any, Any]] = []
        self.closed = False
        self.refusal: Any = None
        self._connected: asyncio.Future[bool] | None = None
        self._acks: dict[int, asyncio.Future[Answer]] = {}
        self._next_id = 0

    async def connect(self, timeout: float = ACK_TIMEOUT_S) -> bool:
        """Open the engine.io socket and sign in; False (``refusal`` set) if refused."""
        self._connected = asyncio.get_running_loop().create_future()
        await self.eio.connect(self.url, transports=["websocket"], engineio_path="socket.io")
        await self.eio.send("0" + (json.dumps(self.auth) if self.auth is not None else ""))
        try:
            return await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except TimeoutError:
            self.refusal = "timeout"
            return False

    def _on_message(self, data: Any) -> None:
        if not isinstance(data, str) or not data:
            return
        kind, rest = data[0], data[1:]
        if kind == "0" and self._connected is not None and not self._connected.done():
            self._connected.set_result(True)
        elif kind == "4" and self._connected is not None and not self._connected.done():
            self.refusal = _json(rest)
            self._connected.set_result(False)
        elif kind == "2":
            decoded = _json(rest)
            if isinstance(decoded, list) and decoded:
                self.events.append((decoded[0], decoded[1] if len(decoded) > 1 else None))
        elif kind == "3":
            digits = len(rest) - len(rest.lstrip("0123456789"))
            if digits:
                future = self._acks.pop(int(rest[:digits]), None)
                args = _json(rest[digits:])
                if future is not None and not future.done():
                    future.set_result(Answer(args[0] if isinstance(args, list) and args
                                             else None))
        elif kind == "1":
            self._on_disconnect()

    def _on_disconnect(self, *_reason: Any) -> None:
        self.closed = True
        if self._connected is not None and not self._connected.done():
            self.refusal = "closed"
            self._connected.set_result(False)
        for future in self._acks.values():
            if not future.done():
                future.set_result(Answer(outcome="closed"))
        self._acks.clear()

    def ack_id(self) -> int:
        """A fresh ack id for a packet built by hand."""
        self._next_id += 1
        return self._next_id

    def emit(self, name: Any, *args: Any) -> asyncio.Future[Answer]:
        """Send an EVENT packet ``[name, *args]`` with a fresh ack id; the future resolves to
        its Answer (never raises). ``name`` may be anything JSON can carry."""
        ack_id = self.ack_id()
        return self.send_packet(f"2{ack_id}" + json.dumps([name, *args]), ack_id)

    def send_packet(self, text: str, ack_id: int | None = None) -> asyncio.Future[Answer]:
        """Send socket.io packet ``text`` as is; if it carries ``ack_id``, the future resolves
        to its Answer, else at once to an empty one."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(Answer(outcome="closed"))
            return future
        if ack_id is None:
            future.set_result(Answer(outcome="none"))
        else:
            self._acks[ack_id] = future
        task = asyncio.create_task(self.eio.send(text))
        task.add_done_callback(_swallow)
        return future

    async def answer(self, future: asyncio.Future[Answer],
                     timeout: float = ACK_TIMEOUT_S) -> Answer:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return Answer(outcome="timeout")

    async def call(self, name: Any, *args: Any, timeout: float = ACK_TIMEOUT_S) -> Answer:
        return await self.answer(self.emit(name, *args), timeout)

    async def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.eio.disconnect(), 5)
        self.closed = True


def _swallow(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


# -- floods ------------------------------------------------------------------------------------


async def flood(sock: RawSocket, make: Callable[[int], tuple[Any, ...]], duration_s: float,
                in_flight: int = 64, limit: int = 100_000) -> Counter[str]:
    """Emit ``make(i)`` -> (event, *args) as fast as the server acks (``in_flight`` unanswered
    at most) for ``duration_s`` or ``limit`` events, or until the server closes the
    connection: acks counted by code (``ok``, error codes, ``closed``, ``timeout``)."""
    codes: Counter[str] = Counter()
    pending: set[asyncio.Future[Answer]] = set()
    deadline = time.monotonic() + duration_s

    def tally(future: asyncio.Future[Answer]) -> None:
        codes[future.result().code] += 1

    sent = 0
    while time.monotonic() < deadline and sent < limit and not sock.closed:
        if len(pending) >= in_flight:
            _, pending = await asyncio.wait(pending, timeout=1,
                                            return_when=asyncio.FIRST_COMPLETED)
            continue
        future = sock.emit(*make(sent))
        future.add_done_callback(tally)
        pending.add(future)
        sent += 1
        if sent % 16 == 0:
            await asyncio.sleep(0)
    if pending:
        await asyncio.wait(pending, timeout=ACK_TIMEOUT_S)
    for future in pending:
        if not future.done():
            codes["timeout"] += 1
    return codes


async def connection_flood(url: str, token: str, count: int,
                           timeout_s: float = 20.0) -> tuple[Counter[str], list[RawSocket]]:
    """Open ``count`` connections with one token (5 at a time): outcomes counted (``accepted``
    or the refusal's code); the accepted sockets are returned for the caller to close."""
    outcomes: Counter[str] = Counter()
    opened: list[RawSocket] = []
    gate = asyncio.Semaphore(5)

    async def one() -> None:
        async with gate:
            sock = RawSocket(url, token)
            try:
                accepted = await sock.connect()
            except Exception as exc:
                outcomes[f"error:{type(exc).__name__}"] += 1
                return
            if accepted:
                outcomes["accepted"] += 1
                opened.append(sock)
            else:
                refusal = sock.refusal
                data = refusal.get("data") if isinstance(refusal, dict) else None
                code = data.get("code") if isinstance(data, dict) else None
                outcomes[str(code or refusal)] += 1
                await sock.close()

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout_s)
    return outcomes, opened


class NonReader:
    """A websocket that signs in, then sends but never reads: a small receive buffer, the HTTP
    upgrade answer read once, nothing after. Blind engine.io pongs keep it from timing out on
    pings, so only a bounded send queue on the server can end it."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.token = token
        self.sock: socket.socket | None = None
        self._next_id = 0

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (self.host, self.port)), 5)
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(sock, (
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
            if not chunk:
                break
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            sock.close()
            raise ConnectionError(f"websocket upgrade refused: {head[:80]!r}")
        self.sock = sock
        await self.send("40" + json.dumps({"token": self.token}))

    async def send(self, text: str) -> bool:
        """One masked text frame; False once the server has closed (or stopped reading)."""
        if self.sock is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_sendall(self.sock, ws_frame(text)), 2)
        except (OSError, TimeoutError):
            return False
        return True

    async def emit(self, name: str, payload: Any) -> bool:
        self._next_id += 1
        return await self.send(f"42{self._next_id}" + json.dumps([name, payload]))

    async def pong(self) -> bool:
        return await self.send("3")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def ws_frame(text: str) -> bytes:
    """A masked websocket text frame (client to server)."""
    payload = text.encode()
    header = bytearray([0x81])
    if len(payload) < 126:
        header.append(0x80 | len(payload))
    elif len(payload) < 1 << 16:
        header.append(0x80 | 126)
        header += len(payload).to_bytes(2, "big")
    else:
        header.append(0x80 | 127)
        header += len(payload).to_bytes(8, "big")
    mask = os.urandom(4)
    header += mask
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(header) + body
