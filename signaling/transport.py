"""engine.io transport limits: every python-engineio internal this project overrides lives here,
written against python-engineio 4.15 (``engineio/async_server.py``, ``async_socket.py``,
``base_socket.py``, ``async_drivers/aiohttp.py``); ``tests/signaling/test_transport.py`` fails
if one of them moves.

``BoundedEngineServer`` is the engine.io server under signaling's socket.io server
(``signaling.socket_server.SignalingServer._engineio_server_class``); ``engineio_options``
turns the settings into its constructor options. What it bounds:

- **Request bodies** (polling POSTs): at most ``max_http_buffer_size``
  (``server.max_payload_bytes``; websocket frames have the same limit through aiohttp's
  ``max_msg_size``), read completely
  within ``server.body_timeout_s``; else 413 ``payload_too_large`` / 408 ``body_timeout``, the
  HTTP connection closed and the session too. engine.io itself reads ``Content-Length`` bytes
  with no timeout (a lying length hangs) and only ``read(n)`` of them.
- **Sign-in**: a session whose socket.io connect has not succeeded within
  ``server.signin_timeout_s`` is closed.
- **Polling sessions per address**: at most ``server.polling_sessions_per_address`` open
  long-polling sessions per client address; another is refused 429 ``too_many_sessions``.
- **Send queues**: engine.io queues every outgoing packet in an unbounded ``asyncio.Queue`` per
  session. Here it is a ``SendQueue``: a session whose queue passes
  ``server.send_queue_max_messages`` or ``server.send_queue_max_bytes`` (a client that does not
  read) is closed and its queue dropped; closing a session waits at most
  ``server.send_flush_timeout_s`` for its queue to drain (engine.io's ``disconnect`` waits
  forever for a client that does not read).
- **Closed websockets freed at once**: the aiohttp driver's ``wait`` raises ``OSError`` when
  the websocket closes; ``AsyncSocket._websocket_handler`` awaits it through a task and
  ``asyncio.wait_for``, so the exception's traceback holds ``wait_for``'s frame, which holds the
  task, which holds the exception: a reference cycle through the handler's frame that kept each
  closed session (its socket, queue, packets, aiohttp request and buffers) until the next
  collection of the cycle collector, rare under ``server.gc_thresholds`` (issue #10: 2-4 MiB
  per chat flood). ``_WebSocket.wait`` ends an established session's loop with ``None`` (the
  loop's "connection closed by client") instead; ``tests/signaling/test_connection_memory.py``
  checks the engine.io code it relies on.
- **Closed connections collected**: CPython 3.11's socket transport holds a bound method of
  itself (``_read_ready_cb``; python/cpython#100348, fixed in 3.12), a cycle of about 2 KB per
  closed TCP connection that only the cycle collector frees, and ``server.gc_thresholds`` makes
  its automatic runs rare (50,000 new objects: about 7,000 closed connections, +11 MiB over 52
  chat floods). Every ``TransportLimits.collect_after_closed`` closed sessions the young
  generations are collected (``gc.collect(1)``: 0.3-6 ms in the chat flood; not a full one).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import engineio
from aiohttp import web
from engineio.async_drivers import aiohttp as engineio_aiohttp

from config.settings import Settings
from signaling.http_api import refuse_and_close

logger = logging.getLogger(__name__)

ENGINEIO_VERSION = "4.15"
"""The python-engineio version whose internals this module overrides."""

OPTION = "transport_limits"
"""The keyword of ``BoundedEngineServer`` (and of ``engineio_options``) carrying the limits."""

_BODY: web.RequestKey[bytes] = web.RequestKey("engineio_body", bytes)


@dataclass(frozen=True)
class TransportLimits:
    """What one engine.io session may hold; defaults as in ``config.settings.ServerSettings``."""

    signin_timeout_s: float = 10.0
    polling_sessions_per_address: int = 20
    send_queue_max_messages: int = 2000
    send_queue_max_bytes: int = 8 * 1024 * 1024
    send_flush_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    collect_after_closed: int = 256
    """Closed sessions between two collections of the young generations (module doc)."""


def engineio_options(settings: Settings) -> dict[str, Any]:
    """Options for ``socketio.AsyncServer(**engineio_options(settings))`` (python-socketio hands
    the keywords it does not know to the engine.io server)."""
    server = settings.server
    return {
        "max_http_buffer_size": server.max_payload_bytes,
        OPTION: TransportLimits(
            signin_timeout_s=server.signin_timeout_s,
            polling_sessions_per_address=server.polling_sessions_per_address,
            send_queue_max_messages=server.send_queue_max_messages,
            send_queue_max_bytes=server.send_queue_max_bytes,
            send_flush_timeout_s=server.send_flush_timeout_s,
            body_timeout_s=server.body_timeout_s,
        ),
    }


def packet_size(item: Any) -> int:
    """Approximate bytes of one queued engine.io packet (its data; str counted in chars)."""
    data = getattr(item, "data", None)
    if isinstance(data, (str, bytes)):
        return len(data) + 1
    return 16


class SendQueue(asyncio.Queue[Any]):
    """One session's outgoing packets (engine.io's ``Socket.queue``), bounded: past either
    limit the packet is not queued and ``on_overflow`` is called once; ``join`` (what engine.io's
    close waits on) gives up after ``flush_timeout_s`` and drops what is left."""

    def __init__(self, limits: TransportLimits, on_overflow: Callable[[SendQueue], None]) -> None:
        super().__init__()
        self.limits = limits
        self.bytes = 0
        self.overflowed = False
        self._on_overflow = on_overflow

    def put_nowait(self, item: Any) -> None:
        if item is None:  # engine.io's "stop" marker always goes in
            super().put_nowait(item)
            return
        if self.overflowed:
            return
        size = packet_size(item)
        if (self.qsize() >= self.limits.send_queue_max_messages
                or self.bytes + size > self.limits.send_queue_max_bytes):
            self.overflowed = True
            self._on_overflow(self)
            return
        super().put_nowait(item)

    def _put(self, item: Any) -> None:
        self.bytes += packet_size(item) if item is not None else 0
        super()._put(item)

    def _get(self) -> Any:
        item = super()._get()
        self.bytes -= packet_size(item) if item is not None else 0
        return item

    def drop(self) -> int:
        """Forget every queued packet (their memory is released); how many there were."""
        dropped = 0
        while True:
            try:
                self.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.task_done()
            dropped += 1
        self.bytes = 0
        return dropped

    async def join(self) -> None:
        try:
            await asyncio.wait_for(super().join(), self.limits.send_flush_timeout_s)
        except TimeoutError:
            self.drop()


@dataclass
class _Peer:
    """What the server knows of one session beyond engine.io's socket."""

    address: str
    websocket: asyncio.BaseTransport | None = None
    signin_timer: asyncio.TimerHandle | None = None
    signed_in: bool = False


Handler = Callable[..., Awaitable[Any]]


class BoundedEngineServer(engineio.AsyncServer):  # type: ignore[misc]
    """python-engineio 4.15's AsyncServer with the limits of the module doc."""

    def __init__(self, *args: Any, transport_limits: TransportLimits | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = transport_limits or TransportLimits()
        self._peers: dict[str, _Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed_since_collect = 0
        # engine.io's driver table is shared by every server of the process: copy it before
        # replacing the request translation.
        drivers: dict[str, Any] = dict(getattr(self, "_async"))  # noqa: B009
        drivers["translate_request"] = self._translate_request
        drivers["websocket"] = _WebSocket
        self._async = drivers

    # -- python-engineio internals ------------------------------------------------------------
    def create_queue(self, *args: Any, **kwargs: Any) -> asyncio.Queue[Any]:
        """Each socket's ``queue`` (``BaseSocket.__init__`` calls this) is a ``SendQueue``."""
        return SendQueue(self.limits, self._overflowed)

    def on(self, event: str, handler: Handler | None = None) -> Any:
        """Wrap the handlers python-socketio registers: ``connect`` starts the sign-in timer
        and notes the client's address, ``disconnect`` forgets them."""
        if handler is not None and event in ("connect", "disconnect"):
            handler = self._wrap(event, handler)
        return super().on(event, handler)

    def _log_error_once(self, message: str, message_key: str) -> None:
        """engine.io logs each kind of client fault (a bad or stale session id, a bad
        transport, a bad origin) as an ERROR the first time: they are client faults, one INFO
        line each."""
        logger.info("engine.io: request refused (%s): %s", message_key, message[:200])

    def _translate_request(self, request: web.Request) -> dict[str, Any]:
        """aiohttp's translation (``engineio.async_drivers.aiohttp.translate_request``) with the
        body already read here and the real client address."""
        from engineio.async_drivers import aiohttp as driver

        environ: dict[str, Any] = driver.translate_request(request)
        environ["REMOTE_ADDR"] = request.remote or ""
        body = request.get(_BODY)
        if body is not None:
            environ["wsgi.input"] = _Body(body)
            environ["CONTENT_LENGTH"] = str(len(body))
        return environ

    async def send(self, sid: str, data: Any) -> None:
        """A socket.io CONNECT packet going out ("0..." after the connect handler accepted the
        client) marks the session signed in."""
        if isinstance(data, str) and data[:1] == "0":
            peer = self._peers.get(sid)
            if peer is not None and not peer.signed_in:
                peer.signed_in = True
                if peer.signin_timer is not None:
                    peer.signin_timer.cancel()
                    peer.signin_timer = None
        await super().send(sid, data)

    # -- requests ------------------------------------------------------------------------------
    async def handle_request(self, request: web.Request) -> web.StreamResponse:
        query = urllib.parse.parse_qs(request.query_string)
        sid = query.get("sid", [None])[0]
        transport = query.get("transport", ["polling"])[0]
        if request.method == "POST":
            refused = await self._read_body(request, sid)
            if refused is not None:
                return refused
        elif request.method == "GET" and sid is None and transport == "polling":
            address = request.remote or ""
            open_sessions = self.polling_sessions(address)
            if open_sessions >= self.limits.polling_sessions_per_address:
                logger.info("engine.io: polling session from %s refused: %d open", address,
                            open_sessions)
                return web.json_response({"error": {
                    "code": "too_many_sessions",
                    "message": f"this address holds {open_sessions} polling sessions; at most "
                               f"{self.limits.polling_sessions_per_address}"}}, status=429)
        elif request.method == "GET" and sid is not None and transport == "websocket":
            peer = self._peers.get(sid)
            if peer is not None:
                peer.websocket = request.transport
        response: web.StreamResponse = await super().handle_request(request)
        return response

    async def _read_body(self, request: web.Request, sid: str | None) -> web.StreamResponse | None:
        """Read a polling POST's body whole (at most the limit, within the body timeout) for
        engine.io; or answer the refusal, close the connection and the session."""
        limit = self.max_http_buffer_size
        length = request.content_length
        if length is not None and length > limit:
            return await self._refuse_body(request, sid, 413, "payload_too_large",
                                           f"the body is {length} bytes; at most {limit}")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while size <= limit:
                    chunk = await request.content.read(min(65536, limit + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
        except TimeoutError:
            return await self._refuse_body(
                request, sid, 408, "body_timeout",
                f"the body did not arrive within {self.limits.body_timeout_s:g} s "
                f"({size} of {length if length is not None else '?'} bytes)")
        if size > limit:
            return await self._refuse_body(request, sid, 413, "payload_too_large",
                                           f"the body is over {limit} bytes")
        request[_BODY] = b"".join(chunks)
        return None

    async def _refuse_body(self, request: web.Request, sid: str | None, status: int, code: str,
                           message: str) -> web.StreamResponse:
        logger.info("engine.io %s: POST from %s refused (%s): %s", sid, request.remote, code,
                    message)
        if sid is not None and sid in self.sockets:
            self._close_session(sid, self.reason.TRANSPORT_ERROR)
        return await refuse_and_close(request, status, code, message)

    # -- sessions ------------------------------------------------------------------------------
    def polling_sessions(self, address: str) -> int:
        """Open long-polling sessions (not upgraded to a websocket) of one client address."""
        count = 0
        for sid, peer in list(self._peers.items()):
            socket = self.sockets.get(sid)
            if socket is None or socket.closed:
                self._forget(sid)
            elif peer.address == address and not socket.upgraded:
                count += 1
        return count

    def _wrap(self, event: str, handler: Handler) -> Handler:
        async def connect(sid: str, environ: dict[str, Any], *args: Any) -> Any:
            result = await handler(sid, environ, *args)
            if result is None or result is True:
                self._opened(sid, environ)
            return result

        async def disconnect(sid: str, *args: Any) -> Any:
            self._forget(sid)
            return await handler(sid, *args)

        return connect if event == "connect" else disconnect

    def _opened(self, sid: str, environ: dict[str, Any]) -> None:
        request = environ.get("aiohttp.request")
        peer = _Peer(address=str(environ.get("REMOTE_ADDR", "")))
        if request is not None and environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            peer.websocket = request.transport
        peer.signin_timer = asyncio.get_running_loop().call_later(
            self.limits.signin_timeout_s, self._signin_expired, sid)
        self._peers[sid] = peer

    def _forget(self, sid: str) -> None:
        peer = self._peers.pop(sid, None)
        if peer is None:
            return
        if peer.signin_timer is not None:
            peer.signin_timer.cancel()
        self._closed_since_collect += 1
        if self._closed_since_collect >= self.limits.collect_after_closed:
            self._closed_since_collect = 0
            started = time.perf_counter()
            found = gc.collect(1)
            logger.debug("engine.io: young generations collected after %d closed sessions: "
                         "%d objects freed in %.1f ms", self.limits.collect_after_closed, found,
                         (time.perf_counter() - started) * 1000)

    def _signin_expired(self, sid: str) -> None:
        peer = self._peers.get(sid)
        if peer is None or peer.signed_in or sid not in self.sockets:
            return
        logger.info("engine.io %s: closed, no socket.io sign-in from %s within %g s", sid,
                    peer.address, self.limits.signin_timeout_s)
        self._close_session(sid, self.reason.SERVER_DISCONNECT, tell=True)

    def _overflowed(self, queue: SendQueue) -> None:
        for sid, socket in self.sockets.items():
            if socket.queue is queue:
                logger.info("engine.io %s: closed, the client does not read (%d messages, "
                            "%d bytes waiting)", sid, queue.qsize(), queue.bytes)
                self._close_session(sid, self.reason.TRANSPORT_ERROR)
                return
        queue.drop()

    def _close_session(self, sid: str, reason: Any, *, tell: bool = False) -> None:
        """Close a session without waiting on the client: its queue dropped (or, with ``tell``,
        a CLOSE packet as the last thing queued), engine.io's ``disconnect`` handlers run,
        its polling request or websocket ended."""
        socket = self.sockets.get(sid)
        if socket is None:
            return
        peer = self._peers.get(sid)
        websocket = peer.websocket if peer is not None else None

        async def close() -> None:
            queue: SendQueue = socket.queue
            if not tell:
                queue.drop()
            await socket.close(wait=False, abort=not tell, reason=reason)
            queue.put_nowait(None)  # ends a waiting poll, or the websocket writer
            self.sockets.pop(sid, None)
            self._forget(sid)
            if websocket is not None and not tell:
                websocket.close()
            elif websocket is not None:
                # Let the CLOSE packet go out, then end the connection whatever the client does.
                asyncio.get_running_loop().call_later(
                    self.limits.send_flush_timeout_s, websocket.close)

        task = asyncio.get_running_loop().create_task(close(), name=f"engineio-close-{sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _WebSocket(engineio_aiohttp.WebSocket):  # type: ignore[misc]
    """python-engineio 4.15's aiohttp websocket whose close raises nothing once the session is
    established (see the module doc). During an upgrade from polling (``upgraded`` still False)
    the handler awaits ``wait`` directly and returns on ``OSError``: no task, no cycle, kept."""

    async def wait(self) -> Any:
        message = await self._sock.receive()
        if isinstance(message.data, (bytes, str)):
            return message.data
        socket = getattr(self.handler, "__self__", None)
        if getattr(socket, "upgraded", False):
            return None
        raise OSError("the websocket closed")


class _Body:
    """``wsgi.input`` over a body read whole (engine.io awaits ``read(length)``)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self, length: int = -1) -> bytes:
        body, self._body = self._body, b""
        return body
