"""`telehealth relay`: a standalone relay node. It dials out to signaling, registers its
region and capacity, heartbeats, and carries out room commands on a LocalRelay.

Its rooms outlive signaling. Media never passes through signaling, so when the link goes
(signaling restarted, upgraded or stopped, a network cut, or signaling dropping this node) the
node keeps every room's media flowing for ``relay.signaling_grace_s`` and redials by itself,
with back-off from 0.25 s doubling up to ``relay.reconnect_delay_max_s``. The dial loop is the
node's own (python-socketio's reconnection is off): that client never retries a disconnect the
server started. The back-off starts again from 0.25 s only after a connection that lasted
(``STABLE_S``): two nodes sharing an id replace each other at signaling, slowly. After each
(re)connect the node calls ``relay:hello`` with the rooms it holds (relay/remote.py
``Hello``); signaling adopts the rooms of open consultations and lists the others, which the
node closes: nothing else closes a room because signaling went away, until the grace runs out
(then every room closes, one WARNING). Heartbeats go only while connected; what the relay
reports while the link is down is lost (signaling's ``resume`` sends an unanswered subscribe
offer again), and so is what a recorder stream (``ForwardingSink``, which outlives the link)
sends meanwhile: the recorder attaches again once the node is back, and ``record_start`` on a
room already streamed announces its publications again (a keyframe asked for each), so that
the recorder learns them and starts its new files cleanly.

Stopping (SIGTERM, SIGINT): a connected node drains: ``relay:drain`` asks signaling to move its
consultations and answers once the moved participants are connected to their new relay (or
after ``relay.drain_s``); then the rooms close and the node disconnects. Without signaling the
rooms close at once. Each step is bounded; a second signal exits at once.

A node may be one worker of a machine (relay/workers.py, ``relay.workers``): it then says its
index in the connect auth (``worker``), signaling registers it as ``<relay id>.w<k>``, and it
stops when its supervisor asks on its stdin (or is gone), as after a SIGTERM.

Exit codes: 0 after a stop; 2 when signaling refused the node (bad token, duplicate id) at its
first start, where retrying would not help. Later a refusal is retried (a ``duplicate_relay``
then means that signaling has not noticed the node's old connection gone yet)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import socketio

from config.settings import Settings
from relay.api import worker_relay_id
from relay.config import from_settings
from relay.embedded import LocalRelay
from relay.errors import RelayError
from relay.remote import (
    COMMANDS,
    NAMESPACE,
    RECORD_COMMANDS,
    DrainResult,
    Hello,
    HelloResult,
    HelloRoom,
    RemoteRelayError,
    pack_packets,
    parse_answer,
)
from relay.tasks import Abandoned, unless

logger = logging.getLogger(__name__)

FIRST_DELAY_S = 0.25
"""The first redial waits this long; each failed attempt doubles it, up to
``relay.reconnect_delay_max_s``."""
CONNECT_TIMEOUT_S = 10.0
"""One dial attempt, TCP and TLS to the namespace accepted (a stopped signaling process would
otherwise hold it for minutes)."""
STABLE_S = 10.0
"""A connection that signaling dropped sooner than this does not reset the back-off: two nodes
started with the same id (a copied configuration) replace each other at signaling, and would
otherwise do so several times a second."""
HELLO_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 10.0
"""Closing every room at the end of a stop."""
DISCONNECT_TIMEOUT_S = 5.0


class NodeEvents:
    """RelayEvents sent up the node's signaling connection; lost while it is down."""

    def __init__(self, sio: socketio.AsyncClient) -> None:
        self._sio = sio

    async def _emit(self, event: str, payload: dict[str, Any]) -> None:
        if not self._sio.connected:
            return
        try:
            await self._sio.emit(event, payload, namespace=NAMESPACE)
        except socketio.exceptions.SocketIOError:
            # The link dropped between the check and the emit.
            logger.debug("%s for room %s lost: signaling is gone", event,
                         payload.get("room_id"))

    async def offer(self, room_id: str, participant_id: str, offer: dict[str, Any]) -> None:
        await self._emit("relay:offer", {"room_id": room_id, "participant_id": participant_id,
                                         "offer": offer})

    async def publication(self, room_id: str, event: str, publication: dict[str, Any]) -> None:
        await self._emit("relay:publication", {"room_id": room_id, "event": event,
                                               "publication": publication})

    async def notice(self, room_id: str, participant_id: str, notice: dict[str, Any]) -> None:
        await self._emit("relay:notice", {"room_id": room_id,
                                          "participant_id": participant_id, "notice": notice})


class ForwardingSink:
    """The recorder's MediaSink on a node: streams a recorded room's packets up to signaling
    as ``relay:media`` messages, a batch every ``FLUSH_S``. What signaling cannot take (the
    link is down or slow) is dropped past ``MAX_QUEUED_BYTES``, never queued without bound:
    the recorder then waits for the next keyframe."""

    FLUSH_S = 0.05
    MAX_QUEUED_BYTES = 8 * 1024 * 1024

    def __init__(self, room_id: str, sio: socketio.AsyncClient) -> None:
        self.room_id = room_id
        self._sio = sio
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._batch: list[tuple[int, int, int, bool, bytes, float]] = []
        self._messages: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._queued_bytes = 0
        self.dropped = 0
        self.sent = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    def publication_added(self, publication: dict[str, Any]) -> None:
        self._flush()
        self._put({"room_id": self.room_id, "added": publication}, 0)

    def publication_removed(self, publication_id: str) -> None:
        self._flush()
        self._put({"room_id": self.room_id, "removed": publication_id}, 0)

    def packet(self, publication_id: str, sequence_number: int, timestamp: int, marker: bool,
               payload: bytes, arrival: float) -> None:
        if self._queued_bytes > self.MAX_QUEUED_BYTES:
            self.dropped += 1
            return
        index = self._index.get(publication_id)
        if index is None:
            index = self._index[publication_id] = len(self._ids)
            self._ids.append(publication_id)
        self._batch.append((index, sequence_number, timestamp, marker, payload, arrival))
        self._queued_bytes += len(payload)

    def _flush(self) -> None:
        if not self._batch:
            return
        size = sum(len(p[4]) for p in self._batch)
        self._messages.append(({"room_id": self.room_id, "publications": list(self._ids),
                                "packets": pack_packets(self._batch)}, size))
        self._batch = []

    def _put(self, message: dict[str, Any], size: int) -> None:
        self._messages.append((message, size))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_S)
            self._flush()
            while self._messages:
                message, size = self._messages.popleft()
                self._queued_bytes -= size
                if not self._sio.connected:
                    self.dropped += 1
                    continue
                try:
                    await self._sio.emit("relay:media", message, namespace=NAMESPACE)
                    self.sent += 1
                except Exception:
                    self.dropped += 1
                    logger.warning("room %s: a relay:media batch was lost", self.room_id)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Dialled(enum.Enum):
    CONNECTED = "connected"
    REFUSED = "refused"
    """Signaling refused this node at its first start (exit 2)."""
    STOPPED = "stopped"


class SignalingLost(Exception):
    """The link dropped while a call to signaling waited for its answer."""


class RelayNode:
    def __init__(self, settings: Settings, *, signaling_url: str, node_token: str,
                 region: str, relay_id: str | None = None, worker: int | None = None) -> None:
        if relay_id is None:
            # The token names the node; signaling verifies it, here it only names the logs.
            relay_id = str(jwt.decode(node_token, options={"verify_signature": False})
                           .get("sub") or settings.relay.id)
            if worker is not None:
                relay_id = worker_relay_id(relay_id, worker)
        self.worker = worker
        """Worker k of a machine (relay/workers.py): said in the connect auth."""
        self.settings = settings
        self.signaling_url = signaling_url.rstrip("/")
        self.node_token = node_token
        self.region = region
        # https signaling: its certificate verified, against relay.signaling_ca_file (a
        # hospital's private CA) when set, else the system's CAs.
        trust = ssl.create_default_context(cafile=settings.relay.signaling_ca_file)
        self.sio = socketio.AsyncClient(reconnection=False,
                                        websocket_extra_options={"ssl": trust})
        self.relay = LocalRelay(relay_id, region=region,
                                capacity=settings.relay.capacity,
                                public_address=settings.relay.announced_address,
                                config=from_settings(settings.relay),
                                events=NodeEvents(self.sio), embedded=False)
        self.sinks: dict[str, ForwardingSink] = {}
        self.connects = 0
        """Successful (re)connects to signaling so far."""
        self.hellos: collections.deque[HelloResult | None] = collections.deque(maxlen=16)
        """Signaling's answers to the latest ``relay:hello``s (None: none came, or none
        that fits), for the logs and tests."""
        self.drained: DrainResult | None = None
        self._down = asyncio.Event()
        """Set when the link to signaling drops; cleared as a dial starts."""
        self._refusals: list[Any] = []
        self._grace: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected_at = 0.0
        self._backoff = FIRST_DELAY_S
        """The back-off step after the one that connected last."""
        self.sio.on("connect", self._connected, namespace=NAMESPACE)
        self.sio.on("disconnect", self._disconnected, namespace=NAMESPACE)
        self.sio.on("connect_error", self._refusals.append, namespace=NAMESPACE)
        own: dict[str, Callable[..., Awaitable[Any]]] = {
            "close_room": self.close_room, "record_start": self.record_start,
            "record_stop": self.record_stop}
        for command in (*COMMANDS, *RECORD_COMMANDS):
            method = own.get(command) or getattr(self.relay, command)
            self.sio.on(command, self._handler(command, method), namespace=NAMESPACE)

    @property
    def relay_id(self) -> str:
        return self.relay.info.id

    # -- commands the node answers itself -------------------------------------------------
    async def record_start(self, room_id: str) -> None:
        """Stream the room's media up to signaling's recorder. A room already streamed
        (the stream outlived a signaling restart) announces its publications again, so that
        the recorder attached since learns them."""
        sink = self.sinks.get(room_id)
        if sink is not None:
            count = await self.relay.announce_to(room_id, sink)
            logger.info("room %s: recorder stream already running; %d publications "
                        "announced again", room_id, count)
            return
        sink = ForwardingSink(room_id, self.sio)
        try:
            await self.relay.attach_sink(room_id, sink)
        except RelayError:
            await sink.close()
            raise
        self.sinks[room_id] = sink
        logger.info("room %s: media streamed to the recorder", room_id)

    async def record_stop(self, room_id: str) -> None:
        sink = self.sinks.pop(room_id, None)
        if sink is None:
            return
        await self.relay.detach_sink(room_id, sink)
        await sink.close()
        logger.info("room %s: recorder stream stopped (%d batches sent, %d dropped)", room_id,
                    sink.sent, sink.dropped)

    async def close_room(self, room_id: str) -> None:
        """Close the room and its recorder stream (idempotent)."""
        await self.record_stop(room_id)
        await self.relay.close_room(room_id)

    async def close_rooms(self) -> None:
        for room_id in list(self.relay.rooms):
            await self.close_room(room_id)

    def _handler(self, command: str, method: Callable[..., Awaitable[Any]]) -> Any:
        async def handle(payload: Any = None) -> dict[str, Any]:
            if not isinstance(payload, dict):
                return {"error": {"code": "invalid_payload",
                                  "message": f"{command} takes an object"}}
            try:
                result = await method(**payload)
            except RelayError as exc:
                return {"error": {"code": exc.code, "message": exc.message}}
            except TypeError as exc:
                return {"error": {"code": "invalid_payload", "message": str(exc)}}
            except Exception:
                logger.exception("relay command %s failed", command)
                return {"error": {"code": "internal", "message": f"{command} failed"}}
            return {"ok": True, "result": result}

        return handle

    # -- the link to signaling ------------------------------------------------------------
    async def _connected(self) -> None:
        logger.info("relay node %s registered with %s (region %r)", self.relay_id,
                    self.signaling_url, self.region)

    async def _disconnected(self, reason: Any = None) -> None:
        # Runs inside python-socketio's reader: only note it; the link task redials.
        self._down.set()
        if self._stopping:
            return
        logger.warning("relay node %s lost signaling (%s); its %d rooms keep their media for "
                       "up to %.0f s while it redials", self.relay_id, reason,
                       len(self.relay.rooms), self.settings.relay.signaling_grace_s)

    async def _dial(self, stop: asyncio.Event, *, first: bool) -> Dialled:
        """Connect to signaling, retrying with back-off while it is unreachable (or, after
        the first start, while it refuses). The first start dials at once; a redial waits
        the first back-off step, while the client finishes tearing down the old link."""
        auth: dict[str, Any] = {"token": self.node_token, "region": self.region,
                                "capacity": self.settings.relay.capacity,
                                "public_address": self.settings.relay.announced_address}
        if self.worker is not None:
            auth["worker"] = self.worker
        loop = asyncio.get_running_loop()
        delay = FIRST_DELAY_S
        most = self.settings.relay.reconnect_delay_max_s
        attempts = 0
        if not first:
            lasted = loop.time() - self._connected_at
            if lasted < STABLE_S:
                delay = self._backoff
                if delay > FIRST_DELAY_S:  # short-lived connections one after another
                    logger.warning("relay node %s: signaling dropped it again %.1f s after it "
                                   "connected; redialling in %.2f s (is another node running "
                                   "with this id?)", self.relay_id, lasted, delay)
            if await _wait(stop, delay):
                return Dialled.STOPPED
            delay = min(delay * 2, most)
        while not stop.is_set():
            attempts += 1
            self._refusals.clear()
            self._down.clear()
            try:
                await asyncio.wait_for(
                    self.sio.connect(self.signaling_url, auth=auth, namespaces=[NAMESPACE],
                                     transports=["websocket"],
                                     wait_timeout=CONNECT_TIMEOUT_S / 2),
                    CONNECT_TIMEOUT_S)
                self.connects += 1
                self._connected_at = loop.time()
                self._backoff = delay
                if not first:
                    logger.info("relay node %s: signaling back after %d attempts",
                                self.relay_id, attempts)
                return Dialled.CONNECTED
            except (socketio.exceptions.ConnectionError, TimeoutError, ValueError) as exc:
                # ValueError: the engine.io client was still closing the last connection.
                await self._forget_connection()
                refusal = next((r for r in self._refusals
                                if isinstance(r, dict) and "data" in r), None)
                if refusal is not None:
                    if first:
                        logger.error("signaling refused relay node %s: %s", self.relay_id,
                                     refusal.get("message"))
                        return Dialled.REFUSED
                    data = refusal.get("data")
                    code = data.get("code") if isinstance(data, dict) else None
                    logger.log(logging.INFO if code == "duplicate_relay" else logging.ERROR,
                               "signaling refused relay node %s (%s: %s); retrying in %.2f s",
                               self.relay_id, code, refusal.get("message"), delay)
                else:
                    self._say_unreachable(exc, delay, attempts)
            if await _wait(stop, delay):
                break
            delay = min(delay * 2, most)
        return Dialled.STOPPED

    def _say_unreachable(self, exc: BaseException, delay: float, attempts: int) -> None:
        untrusted = _certificate_error(exc)
        if untrusted is not None:
            logger.error("signaling at %s: its TLS certificate is not trusted (%s); "
                         "set relay.signaling_ca_file to the CA bundle that signed it; "
                         "retrying in %.2f s", self.signaling_url, untrusted, delay)
            return
        # The first failure of an outage is a warning; the retries that follow are routine.
        logger.log(logging.WARNING if attempts == 1 else logging.INFO,
                   "signaling at %s unreachable (%s); retrying in %.2f s (attempt %d)",
                   self.signaling_url, type(exc).__name__ if isinstance(exc, TimeoutError)
                   else exc, delay, attempts)

    async def _forget_connection(self) -> None:
        """After a failed or abandoned attempt: leave the client ready for the next one."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sio.disconnect(), DISCONNECT_TIMEOUT_S)

    async def _call(self, event: str, data: dict[str, Any], wait_s: float) -> Any:
        """A call to signaling that gives up as soon as the link drops (its answer would
        never come): raises SignalingLost, or socketio's TimeoutError."""
        try:
            return await unless(self._down, self.sio.call(event, data, namespace=NAMESPACE,
                                                          timeout=wait_s))
        except Abandoned:
            raise SignalingLost(event) from None

    async def _hello(self) -> None:
        """Tell signaling which rooms are here; close those it lists in ``close``."""
        hello = Hello(rooms=[HelloRoom(room_id=room_id, participants=list(room.participants),
                                       recording=room_id in self.sinks)
                             for room_id, room in self.relay.rooms.items()])
        try:
            answer = await self._call("relay:hello", hello.model_dump(), HELLO_TIMEOUT_S)
            result = parse_answer("relay:hello", answer, HelloResult)
        except SignalingLost:
            return  # the link task redials and says hello again
        except (socketio.exceptions.SocketIOError, RemoteRelayError) as exc:
            # Nothing is closed on a missing answer: signaling closes what it does not want
            # with close_room, and the grace closes the rest if signaling never comes back.
            self.hellos.append(None)
            logger.warning("relay node %s: relay:hello got no usable answer (%s); keeping "
                           "its %d rooms", self.relay_id, _reason(exc), len(hello.rooms))
            return
        self.hellos.append(result)
        closing = [room_id for room_id in result.close if room_id in self.relay.rooms]
        for room_id in closing:
            await self.close_room(room_id)
        logger.info("relay node %s said hello with %d rooms: %d adopted, %d closed",
                    self.relay_id, len(hello.rooms), len(result.adopted), len(closing))

    async def _stay_linked(self, stop: asyncio.Event) -> None:
        """Say hello on every (re)connect; whenever the link drops, keep the rooms for the
        grace and redial until signaling is back (or the node stops)."""
        while not stop.is_set():
            try:
                await self._hello()
            except Exception:
                # A room that failed to close is no reason to stop redialling.
                logger.exception("relay node %s: acting on signaling's hello failed",
                                 self.relay_id)
            await self._down.wait()
            if stop.is_set():
                return
            self._grace_starts()
            if await self._dial(stop, first=False) is not Dialled.CONNECTED:
                return
            self._grace_ends()

    def _grace_starts(self) -> None:
        if self._grace is None or self._grace.done():
            self._grace = asyncio.get_running_loop().create_task(self._grace_runs_out())

    def _grace_ends(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    async def _grace_runs_out(self) -> None:
        grace = self.settings.relay.signaling_grace_s
        await asyncio.sleep(grace)
        if self.sio.connected:
            return
        # Nobody can reach these rooms' participants any more: signaling has had the grace
        # to come back and place them (elsewhere, by now).
        logger.warning("relay node %s: no signaling for %.0f s (relay.signaling_grace_s); "
                       "closing its %d rooms", self.relay_id, grace, len(self.relay.rooms))
        await self.close_rooms()

    async def _heartbeat(self) -> None:
        while True:
            if self.sio.connected:
                try:
                    await self.sio.emit("relay:heartbeat", {"load": len(self.relay.rooms)},
                                        namespace=NAMESPACE)
                except Exception:
                    logger.exception("heartbeat failed; trying again")
            await asyncio.sleep(self.settings.relay.heartbeat_s)

    # -- running and stopping -------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        await self.relay.start()
        dialled = await self._dial(stop, first=True)
        if dialled is not Dialled.CONNECTED:
            await self.relay.close()
            return 2 if dialled is Dialled.REFUSED else 0
        print(f"READY relay {self.relay_id} -> {self.signaling_url}", flush=True)
        beat = asyncio.create_task(self._heartbeat())
        link = asyncio.create_task(self._stay_linked(stop))
        try:
            await stop.wait()
            # Heartbeats go on through the drain: signaling would take a silent node out.
            await self._drain()
        finally:
            self._stopping = True
            for task in (link, beat, self._grace):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._shut()
        return 0

    async def _drain(self) -> None:
        """Ask signaling to move this node's consultations and wait for its answer."""
        rooms = len(self.relay.rooms)
        if not self.sio.connected:
            logger.warning("relay node %s stopping without signaling: closing its %d rooms "
                           "at once", self.relay_id, rooms)
            return
        logger.info("relay node %s draining: signaling moves its %d rooms", self.relay_id,
                    rooms)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            answer = await self._call("relay:drain", {}, self.settings.relay.drain_s + 5)
            self.drained = parse_answer("relay:drain", answer, DrainResult)
        except (SignalingLost, socketio.exceptions.SocketIOError, RemoteRelayError) as exc:
            logger.warning("relay node %s: relay:drain got no answer after %.1f s (%s); "
                           "closing its %d rooms", self.relay_id, loop.time() - started,
                           _reason(exc), len(self.relay.rooms))
            return
        logger.info("relay node %s drained in %.1f s: %d consultations moved, %d "
                    "participants connected on their new relay (signaling waited %.1f s)",
                    self.relay_id, loop.time() - started, self.drained.moved,
                    self.drained.connected, self.drained.waited_s)

    async def _shut(self) -> None:
        """Close the rooms, then the link, then the relay; each step bounded."""
        try:
            await asyncio.wait_for(self.close_rooms(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            logger.warning("relay node %s: rooms still closing after %.0f s; exiting anyway",
                           self.relay_id, CLOSE_TIMEOUT_S)
        await self._forget_connection()
        try:
            await asyncio.wait_for(self.relay.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            logger.warning("relay node %s: relay still closing after %.0f s; exiting anyway",
                           self.relay_id, CLOSE_TIMEOUT_S)
        logger.info("relay node %s stopped", self.relay_id)


async def _wait(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` unless ``stop`` is set first; True if it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SignalingLost):
        return "signaling went away"
    if isinstance(exc, socketio.exceptions.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure behind a connection error (python-socketio and engine.io keep
    aiohttp's error as the exception's context), if that is what it was."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None



async def serve_node(settings: Settings, *, signaling_url: str, node_token: str,
                     region: str, relay_id: str | None = None, worker: int | None = None) -> int:
    """One node until it stops; ``worker``: it is worker k of a machine, started by the
    supervisor of relay/workers.py, which asks it to stop through its stdin (a line, or the
    pipe closing: also when the supervisor is killed)."""
    node = RelayNode(settings, signaling_url=signaling_url, node_token=node_token,
                     region=region, relay_id=relay_id, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if signalled:
            # Whoever sends a second signal wants the process gone now, not after the drain.
            logger.warning("relay node %s: second %s; exiting at once", node.relay_id, name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(128 + signum)
        signalled.append(signum)
        logger.info("relay node %s: %s; draining (a second signal exits at once)",
                    node.relay_id, name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    if worker is None:
        return await node.run(stop)
    told = loop.create_task(_stop_when_told(node.relay_id, stop))
    try:
        return await node.run(stop)
    finally:
        told.cancel()


async def _stop_when_told(relay_id: str, stop: asyncio.Event) -> None:
    """A worker stops (drains) when its supervisor says so on its stdin, or is gone. Not a
    signal: systemd (KillMode=control-group) and a terminal's Ctrl-C also signal every worker
    directly, and a signal forwarded on top would count as the second one, which exits at
    once without draining."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        line = await reader.readline()
    finally:
        transport.close()
    if not stop.is_set():
        logger.info("relay node %s: %s; draining", relay_id,
                    "its supervisor stops it" if line else "its supervisor is gone")
        stop.set()
