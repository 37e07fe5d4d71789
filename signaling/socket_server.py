"""The socket.io server of signaling. Every python-socketio internal this project overrides
lives here, written against python-socketio 5.18 (``socketio/async_server.py`` and
``base_server.py``); ``tests/signaling/test_hostile_events.py`` fails if one of them moves:

- ``_handle_eio_message``: a packet that does not decode, an unexpected packet type or a
  binary packet announcing more than ``limits.max_attachments`` attachments closes the
  connection with one INFO line (the library raises, and engine.io logs a traceback);
- ``_handle_event``: the gate every client event passes before any handler runs: the
  connection's event bucket (``limits.events_per_s``/``events_burst``; ``rate_limited``, then
  closed if it keeps going), and the event name: reserved names (``connect``, ``disconnect``
  and the other names the socket.io protocol reserves), ``*`` and anything not a string are
  never dispatched: refused ``invalid_event`` when the packet asks for an ack, else dropped;
- ``_handle_disconnect`` and ``disconnect``: forget the connection's limits (a connection the
  server closes leaves through ``disconnect`` only: by the time its engine.io socket closes,
  ``_handle_disconnect`` no longer finds its sid);
- ``_engineio_server_class``: ``signaling.transport.BoundedEngineServer``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import socketio
from socketio import packet

from config.settings import LimitsSettings, Settings
from signaling.limits import ConnectionLimits, Verdict
from signaling.metrics import Metrics
from signaling.transport import BoundedEngineServer, engineio_options

logger = logging.getLogger(__name__)

SOCKETIO_VERSION = "5.18"
"""The python-socketio version whose internals this module overrides."""

CLIENT_NAMESPACE = "/"
"""The namespace of clients (browsers); limits apply here, not to relay nodes."""

RESERVED_EVENTS = frozenset({
    *socketio.AsyncServer.reserved_events,
    # Reserved by the socket.io protocol (clients emit none of these).
    "connect", "connect_error", "disconnect", "disconnecting", "newListener",
    "removeListener",
    # python-socketio's catch-all handler name.
    "*",
})

CLOSE_TIMEOUT_S = 5.0
"""How long closing a connection may wait for its queued packets to go out."""

MAX_NAME_SHOWN = 64


def event_name_problem(data: Any) -> str | None:
    """Why an EVENT packet's ``data`` (``[name, *args]``) is not a client event, or None."""
    if not isinstance(data, list) or not data:
        return f"an event packet carries [name, ...], got {type(data).__name__}"
    name = data[0]
    if not isinstance(name, str):
        return f"event names are strings, got {type(name).__name__}"
    if name in RESERVED_EVENTS:
        return f"event name {name[:MAX_NAME_SHOWN]!r} is reserved"
    return None


class SignalingServer(socketio.AsyncServer):  # type: ignore[misc]
    """A python-socketio AsyncServer that gates every client event (see the module doc)."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None,
                 **options: Any) -> None:
        self.limits: LimitsSettings = settings.limits
        self.connection_limits = ConnectionLimits(settings.limits)
        self._metrics = metrics
        self._closing: set[asyncio.Task[None]] = set()
        super().__init__(**{**engineio_options(settings), **options})

    # -- python-socketio internals -------------------------------------------------------
    def _engineio_server_class(self) -> type[BoundedEngineServer]:
        return BoundedEngineServer

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        """python-socketio 5.18's dispatch, refusing what it would raise on."""
        pending = self._binary_packet.get(eio_sid)
        if pending is not None:
            if not isinstance(data, (bytes, bytearray)):
                self._drop(eio_sid, "a text packet where a binary attachment was announced")
                return
            if pending.add_attachment(data):
                del self._binary_packet[eio_sid]
                if pending.packet_type == packet.BINARY_EVENT:
                    await self._handle_event(eio_sid, pending.namespace, pending.id,
                                             pending.data)
                else:
                    await self._handle_ack(eio_sid, pending.namespace, pending.id,
                                           pending.data)
            return
        try:
            pkt = self.packet_class(encoded_packet=data)
        except Exception as exc:  # a client fault: its bytes do not decode
            self._drop(eio_sid, f"packet does not decode ({type(exc).__name__})")
            return
        kind = pkt.packet_type
        if kind == packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif kind == packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
        elif kind == packet.EVENT:
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind == packet.ACK:
            await self._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind in (packet.BINARY_EVENT, packet.BINARY_ACK):
            if not self.manager.sid_from_eio_sid(eio_sid, pkt.namespace or "/"):
                self._drop(eio_sid, "binary packet on a namespace it has not joined")
            elif not 0 < pkt.attachment_count <= self.limits.max_attachments:
                self._drop(eio_sid, f"binary packet announces {pkt.attachment_count} "
                                    f"attachments; at most {self.limits.max_attachments}")
            else:
                self._binary_packet[eio_sid] = pkt
        else:
            self._drop(eio_sid, f"unexpected packet type {kind!r}"[:100])

    async def _handle_event(self, eio_sid: str, namespace: str | None, id: int | None,
                            data: Any) -> None:
        """The gate: the connection's event bucket, then the event name; then the library's
        dispatch (a task per event)."""
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is None or not self.manager.is_connected(sid, namespace):
            logger.debug("engine.io %s: event on namespace %s it has not joined", eio_sid,
                         namespace)
            return
        if namespace == CLIENT_NAMESPACE:
            verdict = self.connection_limits.admit_event(sid)
            if verdict is not Verdict.ADMIT:
                await self._rate_limited(eio_sid, sid, namespace, id, verdict,
                                         f"more than {self.limits.events_per_s:g} events a "
                                         f"second (burst {self.limits.events_burst})")
                return
        problem = event_name_problem(data)
        if problem is not None:
            logger.info("connection %s: event refused (invalid_event): %s", sid, problem)
            self._count("invalid", "invalid_event")
            if id is not None:
                await self._ack(eio_sid, namespace, id, {"error": {
                    "code": "invalid_event",
                    "message": f"{problem}; see docs/protocol.md"}})
            return
        await super()._handle_event(eio_sid, namespace, id, data)

    async def _handle_disconnect(self, eio_sid: str, namespace: str | None,
                                 reason: Any = None) -> None:
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace or "/")
        await super()._handle_disconnect(eio_sid, namespace, reason)
        if sid is not None:
            self.connection_limits.forget(sid)

    async def disconnect(self, sid: str, namespace: str | None = None,
                         ignore_queue: bool = False) -> None:
        """The server closes a connection: python-socketio 5.18's, then its limits forgotten."""
        await super().disconnect(sid, namespace=namespace, ignore_queue=ignore_queue)
        if not self.manager.is_connected(sid, namespace or "/"):
            self.connection_limits.forget(sid)

    # -- refusals ------------------------------------------------------------------------------
    def rate_limited(self, sid: str, what: str) -> None:
        """A limit refused an event of ``sid`` (its ack says ``rate_limited``): count it, and
        close the connection if it keeps going."""
        verdict = self.connection_limits.refused(sid)
        self._log_refusal(sid, verdict, what)
        if verdict is Verdict.DISCONNECT:
            self.close_soon(sid)

    async def _rate_limited(self, eio_sid: str, sid: str, namespace: str, id: int | None,
                            verdict: Verdict, what: str) -> None:
        self._log_refusal(sid, verdict, what)
        self._count("any", "rate_limited")
        if id is not None:
            await self._ack(eio_sid, namespace, id, {"error": {
                "code": "rate_limited",
                "message": f"{what}; slow down (the connection is closed if it goes on)"}})
        if verdict is Verdict.DISCONNECT:
            self.close_soon(sid)

    def _log_refusal(self, sid: str, verdict: Verdict, what: str) -> None:
        if verdict is Verdict.DISCONNECT:
            logger.info("connection %s: closed, still over its limits after %d refusals (%s)",
                        sid, self.limits.refusals_before_disconnect, what)
        elif self.connection_limits.first_refusal(sid):
            logger.info("connection %s: rate_limited (%s)", sid, what)

    async def _ack(self, eio_sid: str, namespace: str, id: int, answer: Any) -> None:
        await self._send_packet(eio_sid, self.packet_class(
            packet.ACK, namespace=namespace, id=id, data=[answer]))

    def _count(self, event: str, code: str) -> None:
        if self._metrics is not None:
            self._metrics.rejected_events.labels(event=event, code=code).inc()

    def _drop(self, eio_sid: str, why: str) -> None:
        logger.info("engine.io %s: closed: %s", eio_sid, why)
        self._count("packet", "invalid_packet")
        self._binary_packet.pop(eio_sid, None)
        self._spawn(self._close_eio(eio_sid), f"close-{eio_sid}")

    # -- closing ------------------------------------------------------------------------------
    def close_soon(self, sid: str, namespace: str = CLIENT_NAMESPACE) -> None:
        """Close the connection (its socket.io session and its engine.io socket) once what is
        queued for it went out, without holding up the caller."""
        self._spawn(self.close_connection(sid, namespace), f"close-{sid}")

    async def close_connection(self, sid: str, namespace: str = CLIENT_NAMESPACE) -> None:
        """Leave the namespace (the client sees a server disconnect) and close the engine.io
        socket under it, so a client that ignores the disconnect is gone too."""
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace)
        await self.disconnect(sid, namespace=namespace)
        if eio_sid is not None:
            await self._close_eio(eio_sid)

    async def _close_eio(self, eio_sid: str) -> None:
        try:
            await asyncio.wait_for(self.eio.disconnect(eio_sid), CLOSE_TIMEOUT_S)
        except TimeoutError:
            logger.info("engine.io %s: its queued packets did not go out within %.0f s",
                        eio_sid, CLOSE_TIMEOUT_S)

    def _spawn(self, step: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(step, name=name)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
