"""`telehealth relay`: a standalone relay node. It dials out to signaling, registers its
region and capacity, heartbeats, and carries out room commands on a LocalRelay."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import socketio

from config.settings import Settings
from relay.config import from_settings
from relay.embedded import LocalRelay
from relay.errors import RelayError
from relay.remote import COMMANDS, NAMESPACE, RECORD_COMMANDS, pack_packets

logger = logging.getLogger(__name__)


class NodeEvents:
    """RelayEvents sent up the node's signaling connection."""

    def __init__(self, sio: socketio.AsyncClient) -> None:
        self._sio = sio

    async def _emit(self, event: str, payload: dict[str, Any]) -> None:
        if self._sio.connected:
            await self._sio.emit(event, payload, namespace=NAMESPACE)

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


class RelayNode:
    def __init__(self, settings: Settings, *, signaling_url: str, node_token: str,
                 region: str, relay_id: str | None = None) -> None:
        if relay_id is None:
            # The token names the node; signaling verifies it, here it only names the logs.
            relay_id = str(jwt.decode(node_token, options={"verify_signature": False})
                           .get("sub") or settings.relay.id)
        self.settings = settings
        self.signaling_url = signaling_url.rstrip("/")
        self.node_token = node_token
        self.region = region
        # https signaling: its certificate verified, against relay.signaling_ca_file (a
        # hospital's private CA) when set, else the system's CAs.
        trust = ssl.create_default_context(cafile=settings.relay.signaling_ca_file)
        self.sio = socketio.AsyncClient(reconnection=True, reconnection_delay=1,
                                        reconnection_delay_max=10,
                                        websocket_extra_options={"ssl": trust})
        self.relay = LocalRelay(relay_id, region=region,
                                capacity=settings.relay.capacity,
                                public_address=settings.relay.announced_address,
                                config=from_settings(settings.relay),
                                events=NodeEvents(self.sio), embedded=False)
        self.sinks: dict[str, ForwardingSink] = {}
        self.sio.on("connect", self._connected, namespace=NAMESPACE)
        self.sio.on("disconnect", self._disconnected, namespace=NAMESPACE)
        for command in COMMANDS:
            self.sio.on(command, self._handler(command, getattr(self.relay, command)),
                        namespace=NAMESPACE)
        for command in RECORD_COMMANDS:
            self.sio.on(command, self._handler(command, getattr(self, command)),
                        namespace=NAMESPACE)

    async def record_start(self, room_id: str) -> None:
        """Stream the room's media up to signaling's recorder."""
        if room_id in self.sinks:
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

    async def _connected(self) -> None:
        logger.info("relay node %s registered with %s (region %r)", self.relay.info.id,
                    self.signaling_url, self.region)

    async def _disconnected(self, *args: Any) -> None:
        # Signaling re-places the rooms this node held; nothing here outlives the link.
        logger.warning("relay node %s lost signaling; closing %d rooms", self.relay.info.id,
                       len(self.relay.rooms))
        for room_id in list(self.sinks):
            await self.record_stop(room_id)
        await self.relay.close()

    async def _dial(self, stop: asyncio.Event) -> bool:
        """Connect to signaling, retrying while it is unreachable. False if signaling refused
        this node (bad token, duplicate id): retrying would not help."""
        auth = {"token": self.node_token, "region": self.region,
                "capacity": self.settings.relay.capacity,
                "public_address": self.settings.relay.announced_address}
        refusals: list[Any] = []
        self.sio.on("connect_error", refusals.append, namespace=NAMESPACE)
        delay = 1.0
        while not stop.is_set():
            refusals.clear()
            try:
                await self.sio.connect(self.signaling_url, auth=auth, namespaces=[NAMESPACE],
                                       transports=["websocket"], wait_timeout=10)
                return True
            except socketio.exceptions.ConnectionError as exc:
                refusal = next((r for r in refusals if isinstance(r, dict)), None)
                if refusal is not None and "data" in refusal:
                    logger.error("signaling refused relay node %s: %s", self.relay.info.id,
                                 refusal.get("message"))
                    return False
                untrusted = _certificate_error(exc)
                if untrusted is not None:
                    logger.error("signaling at %s: its TLS certificate is not trusted (%s); "
                                 "set relay.signaling_ca_file to the CA bundle that signed it; "
                                 "retrying in %.0f s", self.signaling_url, untrusted, delay)
                else:
                    logger.warning("signaling at %s unreachable (%s); retrying in %.0f s",
                                   self.signaling_url, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 30.0)
        return False

    async def run(self, stop: asyncio.Event) -> int:
        await self.relay.start()
        if not await self._dial(stop):
            return 0 if stop.is_set() else 2
        print(f"READY relay {self.relay.info.id} -> {self.signaling_url}", flush=True)
        beat = asyncio.create_task(self._heartbeat(stop))
        try:
            await stop.wait()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await self.sio.disconnect()
            await self.relay.close()
        return 0

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if self.sio.connected:
                    await self.sio.emit("relay:heartbeat", {"load": len(self.relay.rooms)},
                                        namespace=NAMESPACE)
            except Exception:
                logger.exception("heartbeat failed; trying again")
            await asyncio.sleep(self.settings.relay.heartbeat_s)


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
                     region: str, relay_id: str | None = None) -> int:
    node = RelayNode(settings, signaling_url=signaling_url, node_token=node_token,
                     region=region, relay_id=relay_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return await node.run(stop)
