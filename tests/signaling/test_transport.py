"""engine.io limits (signaling/transport.py): a session that never signs in is closed after the
sign-in timeout, one address holds a bounded number of polling sessions, a client that never
reads is disconnected and its queue released; and the python-engineio / aiohttp internals the
module overrides are still where it expects them."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from pathlib import Path

import aiohttp
import engineio
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from engineio import async_socket, base_server, base_socket
from engineio.async_drivers import aiohttp as engineio_aiohttp

from signaling.transport import ENGINEIO_VERSION, BoundedEngineServer, SendQueue
from tests.signaling.raw_http import engine_server, request
from tests.support import Client, Server, run_server, write_config


@pytest.fixture
async def bounded(tmp_path: Path) -> AsyncIterator[Server]:
    config = write_config(tmp_path, server={
        "signin_timeout_s": 0.5, "polling_sessions_per_address": 3,
        "send_queue_max_messages": 50, "send_queue_max_bytes": 256 * 1024,
        "send_flush_timeout_s": 1.0})
    async with run_server(config) as running:
        yield running


def engine(server: Server) -> BoundedEngineServer:
    assert server.app is not None
    eio = engine_server(server.app)
    assert isinstance(eio, BoundedEngineServer)
    return eio


async def open_polling(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
            text = await response.text()
            if response.status != 200:
                return response.status, text
    return 200, json.loads(text[1:])["sid"]


async def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_a_polling_session_that_never_signs_in_is_closed_after_the_timeout(
    bounded: Server
) -> None:
    eio = engine(bounded)
    status, sid = await open_polling(bounded.url)
    assert status == 200 and sid in eio.sockets
    assert await wait_until(lambda: sid not in eio.sockets, 3.0)
    later = await request(bounded.url, f"GET /socket.io/?EIO=4&transport=polling&sid={sid} "
                                       f"HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert later.status == 400


async def test_a_websocket_that_never_signs_in_is_closed_after_the_timeout(
    bounded: Server
) -> None:
    eio = engine(bounded)
    ws_url = bounded.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url) as ws:
            opened = await ws.receive(timeout=5)
            assert str(opened.data).startswith("0{")
            loop = asyncio.get_running_loop()
            started = loop.time()
            received = []
            async with asyncio.timeout(4):
                async for message in ws:
                    received.append(message.data)
            assert loop.time() - started < 3.0
            assert "1" in received  # engine.io CLOSE
    assert not eio.sockets


async def test_a_signed_in_connection_outlives_the_sign_in_timeout(bounded: Server) -> None:
    client = await Client(bounded.url, bounded.token("ref1")).connect()
    try:
        await asyncio.sleep(1.0)
        assert client.sio.connected
        await client.ok("queue:get", {})
    finally:
        await client.close()


async def test_one_address_holds_a_bounded_number_of_polling_sessions(bounded: Server) -> None:
    opened = [await open_polling(bounded.url) for _ in range(3)]
    assert all(status == 200 for status, _ in opened)
    status, body = await open_polling(bounded.url)
    assert status == 429
    assert json.loads(body)["error"]["code"] == "too_many_sessions"
    # Once those sessions are gone (never signed in), the address may open new ones.
    eio = engine(bounded)
    assert await wait_until(lambda: not eio.sockets, 3.0)
    status, _ = await open_polling(bounded.url)
    assert status == 200


async def test_a_client_that_never_reads_is_disconnected_and_its_queue_released(
    bounded: Server
) -> None:
    eio = engine(bounded)
    ws_url = bounded.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as session:
        # A small receive buffer, and nothing read after sign-in.
        ws = await session.ws_connect(ws_url, max_msg_size=0)
        try:
            opened = await ws.receive(timeout=5)
            assert str(opened.data).startswith("0{")
            await ws.send_str("40" + json.dumps({"token": bounded.token("ref1")}))
            connected = await ws.receive(timeout=5)
            assert str(connected.data).startswith("40{"), connected.data
            (sid,) = eio.sockets
            socket = eio.sockets[sid]
            queue = socket.queue
            assert isinstance(queue, SendQueue)
            big = "2" + json.dumps(["flood", "x" * 16_000])
            for _ in range(2000):  # 32 MB: far beyond socket buffers and the queue limits
                if sid not in eio.sockets:
                    break
                await eio.send(sid, big)
                await asyncio.sleep(0)
            assert await wait_until(lambda: sid not in eio.sockets, 3.0)
            assert socket.closed
            assert queue.qsize() <= 1 and queue.bytes == 0  # at most the stop marker
        finally:
            await ws.close()


async def test_closing_a_session_whose_client_does_not_read_is_bounded(bounded: Server) -> None:
    """engine.io's disconnect() waits for the session's queue to drain: at most
    send_flush_timeout_s here, however the client behaves."""
    eio = engine(bounded)
    status, sid = await open_polling(bounded.url)
    assert status == 200
    for _ in range(10):  # queued for a poll that never comes
        await eio.send(sid, "2" + json.dumps(["x", "y"]))
    async with asyncio.timeout(3):
        await eio.disconnect(sid)
    assert sid not in eio.sockets


# -- the internals signaling/transport.py overrides --------------------------------------
def test_the_engineio_internals_transport_overrides_are_where_it_expects_them() -> None:
    installed = version("python-engineio")
    assert installed.startswith(ENGINEIO_VERSION + "."), (
        f"python-engineio {installed}: re-read signaling/transport.py against it")
    # Each socket's queue comes from server.create_queue().
    assert "self.queue = self.server.create_queue()" in inspect.getsource(
        base_socket.BaseSocket.__init__)
    # The aiohttp driver's translation, reached through the per-server driver table.
    assert engineio_aiohttp._async["translate_request"] is engineio_aiohttp.translate_request
    assert "translate_request = self._async['translate_request']" in inspect.getsource(
        engineio.AsyncServer.handle_request)
    # A polling POST reads wsgi.input.read(CONTENT_LENGTH).
    post = inspect.getsource(async_socket.AsyncSocket.handle_post_request)
    assert "environ.get('CONTENT_LENGTH'" in post and "environ['wsgi.input'].read" in post
    # Closing: close(wait, abort, reason), waiting on queue.join(); polls end on None.
    close = inspect.signature(async_socket.AsyncSocket.close)
    assert list(close.parameters) == ["self", "wait", "abort", "reason"]
    assert "self.queue.join()" in inspect.getsource(async_socket.AsyncSocket.close)
    assert "if packets == [None]" in inspect.getsource(async_socket.AsyncSocket.poll)
    # Handlers are registered through on(); client faults logged through _log_error_once.
    assert "def _log_error_once(self, message, message_key)" in inspect.getsource(
        base_server.BaseServer._log_error_once)
    assert "self._trigger_event('connect', sid, environ" in inspect.getsource(
        engineio.AsyncServer._handle_connect)
    # asyncio.Queue hooks the SendQueue relies on.
    assert "self._put(item)" in inspect.getsource(asyncio.Queue.put_nowait)
    assert "self._get()" in inspect.getsource(asyncio.Queue.get_nowait)


def test_the_aiohttp_internals_http_api_relies_on_are_where_it_expects_them() -> None:
    params = inspect.signature(RequestHandler.__init__).parameters
    for name in ("keepalive_timeout", "lingering_time", "logger"):
        assert name in params
    # The keep-alive timer, armed when a connection opens, closes it while no head arrived.
    assert "self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)" in \
        inspect.getsource(RequestHandler.connection_made)
    assert "self._waiter and not self._waiter.done()" in inspect.getsource(
        RequestHandler._process_keepalive)
    # Malformed heads are logged through logger.exception / logger.debug with exc_info.
    handle_error = inspect.getsource(RequestHandler.handle_error)
    assert "exc_info=exc" in handle_error
    assert hasattr(web.BaseRequest, "client_max_size")
    assert hasattr(RequestHandler, "force_close")
