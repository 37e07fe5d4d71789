"""Presence: sites come online with their first connection and go offline with the last, on
disconnect or when a connection stops answering pings (heartbeat timeout)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.support import Client, clients, run_server, write_config


async def test_sites_go_online_and_offline_with_their_connections(tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server:
        async with clients(server.url, {"coord": server.token("coord")}) as c:
            coord = c["coord"]
            sites = {s["id"]: s for s in (await coord.ok("presence:list", {}))["sites"]}
            assert sites["c1"]["online"] and not sites["d1"]["online"]
            first = await Client(server.url, server.token("ref1")).connect()
            online = await coord.next_matching("presence:update", lambda u: u["site_id"] == "d1")
            assert online["online"] is True
            second = await Client(server.url, server.token("distspec")).connect()  # also d1
            await first.close()
            sites = {s["id"]: s for s in (await coord.ok("presence:list", {}))["sites"]}
            assert sites["d1"]["online"] and sites["d1"]["connections"] == 1
            assert [u for u in coord.drain("presence:update") if u["site_id"] == "d1"] == []
            await second.close()
            assert await coord.next("presence:update") == {"site_id": "d1", "online": False}


async def test_a_connection_that_stops_answering_pings_goes_offline(tmp_path: Path) -> None:
    config = write_config(tmp_path, presence={"ping_interval_s": 1, "ping_timeout_s": 1})
    async with run_server(config) as server:
        async with clients(server.url, {"coord": server.token("coord")}) as c:
            ws_url = server.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
            async with aiohttp.ClientSession() as session:
                # A raw engine.io client that signs in and then never answers a ping, as a
                # site whose satellite link silently died.
                async with session.ws_connect(ws_url) as ws:
                    opened = await ws.receive_str(timeout=5)
                    assert opened.startswith("0")
                    await ws.send_str("40" + json.dumps({"token": server.token("ref2")}))
                    online = await c["coord"].next_matching(
                        "presence:update", lambda u: u["site_id"] == "d2")
                    assert online["online"] is True
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    offline = await c["coord"].next_matching(
                        "presence:update", lambda u: u["site_id"] == "d2", timeout=6)
                    assert offline == {"site_id": "d2", "online": False}
                    assert loop.time() - started < 4
