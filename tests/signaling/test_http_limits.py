"""HTTP limits: a body over the limit is answered 413 and the connection closed (the engine.io
polling endpoint included), lying lengths and slow heads are closed within their timeouts,
malformed heads are counted rather than logged as tracebacks, an unexpected exception is a JSON
500, and /app/ serves only the web client's own files."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from signaling.http_api import json_errors
from telehealth.startup import SERVICES
from tests.signaling.raw_http import closed_within, open_raw, read_response, request
from tests.support import Server, run_server, write_config

LIMIT = 100 * 1024


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Server]:
    config = write_config(tmp_path, server={
        "max_payload_bytes": LIMIT, "header_timeout_s": 1.0, "body_timeout_s": 1.0,
        "signin_timeout_s": 30.0})
    async with run_server(config) as running:
        yield running


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def open_polling_session(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
            assert response.status == 200
            text = await response.text()
    assert text.startswith("0{"), text
    sid: str = json.loads(text[1:])["sid"]
    return sid


async def test_a_body_over_the_limit_is_answered_413_and_the_connection_closed(
    limited: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for length in (LIMIT + 1, 10**12):
        reader, writer = await open_raw(limited.url)
        try:
            writer.write(f"POST /api/me HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                         f"\r\n0123456789".encode())
            response = await read_response(reader, timeout=3)
            assert response.status == 413
            assert response.json()["error"]["code"] == "payload_too_large"
            assert await closed_within(reader, 1.0)
        finally:
            writer.close()
    no_tracebacks(caplog)


async def test_a_lying_content_length_is_closed_within_the_body_timeout(
    limited: Server
) -> None:
    reader, writer = await open_raw(limited.url)
    try:
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        response = await read_response(reader, timeout=3)
        assert response.status == 200
        assert await closed_within(reader, 3.0)
        assert time.monotonic() - started < 2.5
    finally:
        writer.close()


async def test_slow_headers_are_closed_within_the_header_timeout(limited: Server) -> None:
    reader, writer = await open_raw(limited.url)
    try:
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for i in range(30):  # one header byte every 0.2 s: never a complete head
            try:
                writer.write(b"X-Slow: " if i == 0 else b"a")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if await closed_within(reader, 0.2):
                closed = True
                break
        assert closed
        assert time.monotonic() - started < 2.5
    finally:
        writer.close()


async def test_an_idle_connection_that_sends_nothing_is_closed_within_the_header_timeout(
    limited: Server
) -> None:
    reader, writer = await open_raw(limited.url)
    try:
        assert await closed_within(reader, 2.5)
    finally:
        writer.close()


async def test_the_polling_endpoint_answers_a_body_over_the_limit_413_and_closes(
    limited: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sid = await open_polling_session(limited.url)
    path = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
    reader, writer = await open_raw(limited.url)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {10**12}\r\n\r\n4hello".encode())
        response = await read_response(reader, timeout=3)
        assert response.status == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert await closed_within(reader, 1.0)
    finally:
        writer.close()
    # The session is closed too; a later POST to it is a plain 400, never a 500.
    later = await request(limited.url, f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                                       f"Content-Length: 3\r\n\r\n4hi".encode())
    assert later.status == 400
    no_tracebacks(caplog)


async def test_a_chunked_polling_body_over_the_limit_is_answered_413(limited: Server) -> None:
    sid = await open_polling_session(limited.url)
    reader, writer = await open_raw(limited.url)
    try:
        writer.write(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
                     f"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"4" + b"x" * 32767
        for _ in range(4):  # 128 KiB > 100 KiB
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        response = await read_response(reader, timeout=3)
        assert response.status == 413
        assert await closed_within(reader, 1.0)
    finally:
        writer.close()


async def test_a_lying_length_to_the_polling_endpoint_is_answered_408_within_the_timeout(
    limited: Server
) -> None:
    sid = await open_polling_session(limited.url)
    reader, writer = await open_raw(limited.url)
    try:
        started = time.monotonic()
        writer.write(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
                     f"Host: x\r\nContent-Length: 1000\r\n\r\n4hello".encode())
        response = await read_response(reader, timeout=3)
        assert response.status == 408
        assert response.json()["error"]["code"] == "body_timeout"
        assert await closed_within(reader, 1.0)
        assert time.monotonic() - started < 2.5
    finally:
        writer.close()


async def test_a_polling_body_within_the_limit_still_reaches_the_session(limited: Server) -> None:
    sid = await open_polling_session(limited.url)
    # A socket.io CONNECT without a token: the server answers CONNECT_ERROR on the next poll.
    response = await request(limited.url, f"POST /socket.io/?EIO=4&transport=polling&sid={sid} "
                                          f"HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n40"
                                          .encode())
    assert response.status == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{limited.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                               timeout=aiohttp.ClientTimeout(total=5)) as answer:
            assert (await answer.text()).startswith("44")


async def test_malformed_request_heads_are_counted_not_logged_as_tracebacks(
    limited: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bad = [b"GARBAGE\r\n\r\n",
           b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
           b"GET /\x00 HTTP/1.1\r\n\r\n",
           b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"]
    for raw in bad:
        response = await request(limited.url, raw)
        assert response.status == 400
    no_tracebacks(caplog)
    assert limited.app is not None
    metrics = limited.app[SERVICES].metrics
    assert metrics.registry.get_sample_value(
        "telehealth_http_malformed_requests_total") == len(bad)


async def test_an_unexpected_exception_is_a_json_500_without_a_traceback(
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signaling.http_api")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom at /etc/secret.py line 3")

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        response = await request(url, b"GET /broken HTTP/1.1\r\nHost: x\r\n"
                                      b"Accept: text/html\r\n\r\n")
        assert response.status == 500
        assert response.json()["error"]["code"] == "internal"
        assert b"Traceback" not in response.body and b"boom" not in response.body
        lines = [r for r in caplog.records if r.name == "signaling.http_api"]
        assert len(lines) == 1 and not lines[0].exc_info
        assert "RuntimeError" in lines[0].getMessage()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", [
    "/app/package.json", "/app/package-lock.json", "/app/.gitignore",
    "/app/node_modules/socket.io-client/package.json", "/app/src/../package.json",
    "/app/src/%2e%2e/package.json", "/app/", "/app/src/",
])
async def test_app_does_not_serve_files_outside_the_web_client(limited: Server,
                                                                path: str) -> None:
    response = await request(limited.url, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert response.status == 404, (path, response.status)


@pytest.mark.parametrize("path", ["/app/index.html", "/app/styles.css", "/app/src/app.js",
                                  "/app/src/protocol.js"])
async def test_app_serves_the_web_clients_own_files(limited: Server, path: str) -> None:
    response = await request(limited.url, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert response.status == 200, path
    assert response.body


async def test_a_request_within_the_limits_is_served_on_a_kept_alive_connection(
    limited: Server
) -> None:
    reader, writer = await open_raw(limited.url)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await read_response(reader)
            assert response.status == 200 and response.json() == {"status": "ok"}
            await asyncio.sleep(0.3)
    finally:
        writer.close()
