"""Raw HTTP over asyncio streams, for what an HTTP client library would not send: lying
lengths, slow heads, garbage. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port is not None
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", parts.port), 5)


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> RawResponse:
    """One response with a Content-Length body (what this server sends)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
    return RawResponse(status, headers, body)


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True if the server closes the connection within ``timeout`` s (what it sends meanwhile
    is read and dropped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def request(url: str, raw: bytes, timeout: float = 5.0) -> RawResponse:
    """Send ``raw`` on a new connection and read one response."""
    reader, writer = await open_raw(url)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()


def engine_server(app: web.Application) -> Any:
    """The engine.io server behind the app's ``/socket.io/`` route."""
    for route in app.router.routes():
        if route.resource is not None and route.resource.canonical == "/socket.io/":
            return route.handler.__self__  # type: ignore[attr-defined]
    raise AssertionError("no /socket.io/ route")
