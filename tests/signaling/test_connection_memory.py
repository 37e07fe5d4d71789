"""A closed connection leaves nothing behind (issue #10, finding 6): its limits, its sign-in
and expiry bookkeeping are forgotten however it ended (the client left, the server closed it
for going on over its limits), and its engine.io session is freed at once, without waiting for
the cycle collector (``server.gc_thresholds`` makes collections rare: a cycle per closed
websocket kept each session's buffers, queue and packets for minutes)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import engineio
import socketio
from engineio import async_socket
from engineio.async_drivers import aiohttp as engineio_aiohttp

from config.settings import LimitsSettings
from signaling.limits import ConnectionLimits, Verdict
from signaling.socket_server import SignalingServer
from signaling.transport import ENGINEIO_VERSION, BoundedEngineServer
from tests.signaling.raw_http import engine_server
from tests.support import Client, Server, run_server, write_config

FLOODERS = ("ref1", "ref2", "cardio1", "cardio2")
LEAVERS = ("coord", "admin", "infect1")


def servers(server: Server) -> tuple[BoundedEngineServer, SignalingServer, Any]:
    """The running app's engine.io server, socket.io server and SocketGateway."""
    assert server.app is not None
    eio = engine_server(server.app)
    assert isinstance(eio, BoundedEngineServer)
    sio = eio.handlers["message"].__self__
    assert isinstance(sio, SignalingServer)
    return eio, sio, sio.handlers["/"]["connect"].__self__


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def flood_until_closed(client: Client, events: int = 200) -> None:
    """``queue:get`` without waiting for acks until the server closes the connection."""
    for _ in range(events):
        if not client.sio.connected:
            return
        await client.sio.emit("queue:get", {})
        await asyncio.sleep(0)
    await wait_until(lambda: not client.sio.connected)


def test_a_refusal_counted_after_the_connection_was_forgotten_is_not_kept() -> None:
    limits = ConnectionLimits(LimitsSettings(events_per_s=1, events_burst=1))
    assert limits.admit_event("a") is Verdict.ADMIT
    limits.forget("a")
    # A handler that was still running refuses a last event of the closed connection.
    assert limits.refused("a") is Verdict.REFUSE
    assert len(limits) == 0


async def test_connections_that_ended_either_way_leave_no_bookkeeping_behind(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, limits={
        "events_per_s": 5, "events_burst": 5, "refusals_before_disconnect": 5})
    async with run_server(config) as server:
        eio, sio, gateway = servers(server)
        made = {n: await Client(server.url, server.token(n)).connect()
                for n in (*FLOODERS, *LEAVERS)}
        for name in LEAVERS:
            await made[name].ok("queue:get", {})
        await asyncio.gather(*(flood_until_closed(made[n]) for n in FLOODERS))
        assert not any(made[n].sio.connected for n in FLOODERS)
        for name in LEAVERS:
            await made[name].close()

        def empty() -> bool:
            return not (len(sio.connection_limits) or len(gateway._principals)
                        or len(gateway._connections) or len(gateway._expiry)
                        or len(eio._peers) or len(eio.sockets))

        assert await wait_until(empty), {
            "connection_limits": len(sio.connection_limits),
            "principals": len(gateway._principals), "expiry": len(gateway._expiry),
            "peers": len(eio._peers), "sockets": len(eio.sockets)}


async def test_a_closed_websocket_session_is_freed_without_the_cycle_collector(
    tmp_path: Path,
) -> None:
    # engine.io's ping task and its sweep of the sessions hold a closed session until the next
    # ping and for one sweep at most: 1 s each here.
    config = write_config(tmp_path, presence={"ping_interval_s": 1, "ping_timeout_s": 1}, limits={
        "events_per_s": 5, "events_burst": 5, "refusals_before_disconnect": 5})
    async with run_server(config) as server:
        eio, _, _ = servers(server)
        gc.collect()
        gc.disable()
        try:
            made = {n: await Client(server.url, server.token(n)).connect()
                    for n in (*FLOODERS, *LEAVERS)}
            sessions: weakref.WeakSet[engineio.async_socket.AsyncSocket] = weakref.WeakSet(
                eio.sockets.values())
            await asyncio.gather(*(flood_until_closed(made[n]) for n in FLOODERS))
            # One more that starts polling and upgrades to a websocket (the browser's way).
            upgraded = socketio.AsyncClient(reconnection=False)
            await upgraded.connect(server.url, auth={"token": server.token("ref3")},
                                   transports=["polling", "websocket"], wait_timeout=5)
            assert await wait_until(lambda: upgraded.transport() == "websocket")
            sessions.update(eio.sockets.values())
            assert len(sessions) == len(made) + 1
            await upgraded.disconnect()
            for name in LEAVERS:
                await made[name].close()
            assert await wait_until(lambda: not eio.sockets)
            # engine.io's sweep keeps the last session it looked at until it looks at another.
            late = await Client(server.url, server.token("ref1")).connect()
            assert await wait_until(lambda: not sessions), (
                f"{len(sessions)} closed engine.io sessions still held: a reference cycle "
                "keeps them until the next collection")
            await late.close()
        finally:
            gc.enable()


async def test_closed_connections_are_collected_every_so_many_closed_sessions(
    tmp_path: Path,
) -> None:
    """CPython 3.11's socket transports are freed by the cycle collector only (a bound method
    of themselves): the server collects the young generations every so many closed sessions
    instead of waiting for ``server.gc_thresholds``' rare automatic runs."""
    async with run_server(write_config(tmp_path)) as server:
        eio, _, _ = servers(server)
        eio.limits = dataclasses.replace(eio.limits, collect_after_closed=100)
        gc.collect()
        gc.disable()
        try:
            names = (*FLOODERS, *LEAVERS, "ref3")
            made = [await Client(server.url, server.token(n)).connect() for n in names]
            transports = weakref.WeakSet(
                p.websocket for p in eio._peers.values() if p.websocket is not None)
            assert len(transports) == len(made)
            for client in made:
                await client.close()
            assert await wait_until(lambda: not eio.sockets)
            await asyncio.sleep(0.2)  # aiohttp closes each transport after its session
            assert len(transports) == len(made)  # closed, in cycles, not collected yet
            # Every 4th closed session from now on: the next one collects what the 8 left.
            eio.limits = dataclasses.replace(eio.limits, collect_after_closed=4)
            for name in FLOODERS:
                await (await Client(server.url, server.token(name)).connect()).close()
            assert await wait_until(lambda: not transports), len(transports)
        finally:
            gc.enable()


def test_the_engineio_internals_the_websocket_driver_relies_on_are_where_it_expects_them(
) -> None:
    """signaling/transport.py's ``_WebSocket``: fails when python-engineio moves them."""
    from importlib.metadata import version

    assert version("python-engineio").startswith(ENGINEIO_VERSION + ".")
    assert engineio_aiohttp._async["websocket"] is engineio_aiohttp.WebSocket
    assert "self._async = None" in inspect.getsource(engineio.base_server.BaseServer.__init__)
    assert "ws = self.server._async['websocket'](\n            self._websocket_handler" in (
        inspect.getsource(async_socket.AsyncSocket._upgrade_websocket))
    driver = inspect.getsource(engineio_aiohttp.WebSocket)
    assert "self.handler = handler" in driver and "msg = await self._sock.receive()" in driver
    assert "raise OSError()" in inspect.getsource(engineio_aiohttp.WebSocket.wait)
    handler = inspect.getsource(async_socket.AsyncSocket._websocket_handler)
    # Established: awaited through a task and wait_for; None ends the loop like a close.
    assert "wait_task = asyncio.ensure_future(websocket_wait())" in handler
    assert "if p is None:\n                # connection closed by client\n" in handler
    # The upgrade handshake awaits wait() directly, before upgraded is set.
    assert handler.index("except OSError:") < handler.index("self.upgraded = True")
