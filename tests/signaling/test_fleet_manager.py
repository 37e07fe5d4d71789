"""signaling.fleet.BatchedRedisManager on a real redis-server: socket.io emits published in
batches keep their order, each emit returns once its message is on Redis, and a Redis that
goes away makes emits return (dropped, logged) instead of hanging them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import socketio
from aiohttp import web

from signaling.fleet import BatchedRedisManager
from tests.redis_server import RedisServer, start_redis, stop_redis

EMITS = 500
CHANNELS = itertools.count()


async def _subscribed(url: str, channel: str) -> tuple[aioredis.Redis, aioredis.client.PubSub]:
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    return client, pubsub


async def _received(pubsub: aioredis.client.PubSub, count: int, timeout: float) -> list[int]:
    """The ``n`` of the next ``count`` messages, in the order Redis delivered them."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = await pubsub.get_message(timeout=0.5)
        if message is not None:
            got.append(int(json.loads(message["data"])["n"]))
    return got


async def test_concurrent_emits_leave_in_batches_and_in_order(
        redis_server: RedisServer) -> None:
    channel = f"t{next(CHANNELS)}:socketio"
    client, pubsub = await _subscribed(redis_server.url, channel)
    manager = BatchedRedisManager(redis_server.url, channel=channel,
                                  redis_options={"single_connection_client": True})
    try:
        started = time.perf_counter()
        # Each emit is its own task, as the handlers' emits are; created in order.
        await asyncio.gather(*(manager._publish({"method": "emit", "n": n})
                               for n in range(EMITS)))
        took = time.perf_counter() - started
        got = await _received(pubsub, EMITS, timeout=10)
        print(f"{EMITS} emits published in {manager.batches} batches in {took * 1000:.0f} ms")
        assert got == list(range(EMITS))
        assert 1 <= manager.batches < EMITS / 10
        # One at a time, each emit still returns only once Redis has its message.
        for n in range(EMITS, EMITS + 3):
            await manager._publish({"method": "emit", "n": n})
            assert await _received(pubsub, 1, timeout=5) == [n]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
        if manager.redis is not None:
            await manager.redis.aclose()


async def test_emits_return_while_redis_is_away_and_publish_again_when_it_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("redis", "redis-again"):
        (tmp_path / name).mkdir()
    server = start_redis(tmp_path / "redis")
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    channel = f"t{next(CHANNELS)}:socketio"
    manager = BatchedRedisManager(server.url, channel=channel,
                                  redis_options={"single_connection_client": True,
                                                 "socket_connect_timeout": 1,
                                                 "socket_timeout": 1})
    try:
        await manager._publish({"method": "emit", "n": 0})
        stop_redis(server)
        started = time.perf_counter()
        async with asyncio.timeout(10):
            await asyncio.gather(*(manager._publish({"method": "emit", "n": n})
                                   for n in range(1, 20)))
        print(f"19 emits with Redis away returned in {(time.perf_counter() - started) * 1000:.0f}"
              " ms")
        assert "could not be published to Redis" in caplog.text
        server = start_redis(tmp_path / "redis-again", port=port)
        client, pubsub = await _subscribed(server.url, channel)
        try:
            await manager._publish({"method": "emit", "n": 20})
            assert await _received(pubsub, 1, timeout=5) == [20]
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()
    finally:
        if manager.redis is not None:
            await manager.redis.aclose()
        stop_redis(server)


async def test_another_nodes_emits_arrive_in_order_and_before_the_room_it_closes_after(
        redis_server: RedisServer) -> None:
    """A socket.io server on ``BatchedRedisManager`` with one client in room ``r``; another
    node (a write-only manager on the same channel) emits ``count`` messages to ``r`` and
    closes ``r`` in one batch, then emits once more: the client gets the ``count`` in order
    and not the last one (the close waited for the deliveries before it; without that wait
    it overtakes them)."""
    count = 300
    channel = f"t{next(CHANNELS)}:socketio"
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=BatchedRedisManager(
        redis_server.url, channel=channel, redis_options={"single_connection_client": True}))

    async def connect(sid: str, _environ: dict[str, Any], _auth: Any = None) -> None:
        await sio.enter_room(sid, "r")

    sio.on("connect", connect)
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    got: list[int] = []
    all_in = asyncio.Event()

    def heard(data: dict[str, Any]) -> None:
        got.append(int(data["n"]))
        if len(got) >= count:
            all_in.set()

    client = socketio.AsyncClient(reconnection=False)
    client.on("n", heard)
    other = BatchedRedisManager(redis_server.url, channel=channel, write_only=True)
    probe = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.connect(f"http://127.0.0.1:{port}", transports=["websocket"],
                             wait_timeout=10)
        for _ in range(100):  # the server's listener subscribes at its first connection
            [(_, subscribers)] = await probe.pubsub_numsub(channel)
            if subscribers:
                break
            await asyncio.sleep(0.05)
        assert subscribers == 1
        started = time.perf_counter()
        # In one batch: the server's listener reads them in one go, the close right after.
        await asyncio.gather(*(other.emit("n", {"n": n}, room="r") for n in range(count)),
                             other.close_room("r", namespace="/"))
        await other.emit("n", {"n": count}, room="r")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 10)
        print(f"{len(got)} emits of another node delivered in "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")
        await asyncio.sleep(0.5)  # the one after the close would have come by now
        assert got == list(range(count))
    finally:
        await client.disconnect()
        await probe.aclose()
        if other.redis is not None:
            await other.redis.aclose()
        await runner.cleanup()
