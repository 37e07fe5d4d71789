"""Stopping `telehealth serve`: SIGTERM with clients connected and a recording on exits within
``server.drain_s``, every client is told ``server:stopping``, the recording is finished and
verifies; a second signal exits at once."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import socketio

from config.settings import load_settings
from recorder import manifest as mf
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.consultation_media import open_consultation, start_media
from tests.media import MediaPeer, wait_for
from tests.support import SECRET, Client, ServerProcess, clients, start_server_process, write_config

DRAIN_S = 4.0
MARGIN_S = 2.0
"""Interpreter start-up aside, what a stop may take beyond ``drain_s`` (the Python exit)."""
FPS = 15


def authority(config: Path) -> TokenAuthority:
    settings = load_settings(config)
    assert settings.directory.file is not None
    return TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)


async def exited(server: ServerProcess, within: float) -> tuple[int | None, float]:
    """Wait (the event loop running, so clients receive) until the process exits or
    ``within`` seconds pass: its exit code (None if still running) and the time taken."""
    started = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(server.process.wait, within)
    return server.process.poll(), time.monotonic() - started


async def test_sigterm_tells_clients_finishes_the_recording_and_exits_within_the_drain_time(
    tmp_path: Path,
) -> None:
    # Engine.io's ping timings as in production: a stop that waits for them takes 40 s.
    config = write_config(tmp_path, server={"drain_s": DRAIN_S},
                          presence={"ping_interval_s": 20, "ping_timeout_s": 20},
                          recording={"policy": "always"})
    tokens = authority(config)
    server = start_server_process(config)
    names = ("cardio1", "ref1", "ref2")
    peers: list[MediaPeer] = []
    hung: socket.socket | None = None
    try:
        async with clients(server.url, {n: tokens.issue(n) for n in names}) as c:
            # ref2 stays idle; cardio1 and ref1 consult with camera and tone, recorded.
            cid = await open_consultation(c, guests=("ref1",))
            await c["ref1"].next_matching(
                "recording:state", lambda s: s["consultation_id"] == cid and s["status"] == "on",
                10)
            for name in ("cardio1", "ref1"):
                peers.append(await start_media(c[name], cid))
            await wait_for(lambda: all(
                (v := p.video_from(o)) is not None and len(v.counters) >= 2 * FPS
                for p, o in zip(peers, ("ref1", "cardio1"), strict=True)), 30, "media flowing")

            # And a client that lies: a polling session that never polls, a body never sent.
            hung = hang_a_request(server.url)
            await asyncio.sleep(0.2)

            server.process.send_signal(signal.SIGTERM)
            code, took = await exited(server, DRAIN_S + MARGIN_S)
            log = "".join(server.output)
            assert code == 0, (code, took, log[-3000:])
            assert took <= DRAIN_S + MARGIN_S
            print(f"stopped in {took:.2f} s")
            for client in c.values():
                notice = await client.next("server:stopping", timeout=1)
                assert notice["code"] == "server_stopping"
                assert notice["message"]
                assert notice["retry_after_s"] == DRAIN_S
            await wait_for(lambda: not any(client.sio.connected for client in c.values()), 2,
                           "every client disconnected")
    finally:
        for peer in peers:
            await peer.close()
        if hung is not None:
            hung.close()
        if server.process.poll() is None:
            server.kill()

    log = "".join(server.output)
    assert "Traceback" not in log, log[-3000:]
    assert "drain time" not in log  # nothing was abandoned
    archive = load_settings(config).archive_dir()
    directory = archive / cid
    assert not (directory / mf.RECORDING_MARKER).exists()
    manifest = mf.load(directory / mf.MANIFEST)
    assert manifest.recording.status in ("stopped", "complete"), manifest.recording
    assert {f.participant_id for f in manifest.files} == {"cardio1", "ref1"}
    for entry in manifest.files:
        assert entry.status == "complete", entry
        assert entry.sha256 == mf.sha256_file(directory / entry.name)
        assert entry.duration_s is not None and entry.duration_s >= 1.0
    verify = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "telehealth.cli", "--config", str(config), "archive", "verify"],
        capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "archive OK" in verify.stdout


def hang_a_request(url: str) -> socket.socket:
    """An engine.io polling session, then a POST to it that announces a body it never sends:
    a request in flight that only aiohttp's shutdown timeout ends."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as handshake:
        handshake.sendall(f"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: {host}\r\n"
                          "Connection: close\r\n\r\n".encode())
        answer = b""
        while b'"sid":"' not in answer or not answer.rstrip().endswith(b"}"):
            chunk = handshake.recv(4096)
            assert chunk, answer
            answer += chunk
    sid = answer.split(b'"sid":"')[1].split(b'"')[0].decode()
    hung = socket.create_connection((host, int(port)), timeout=5)
    hung.sendall(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: {host}"
                 "\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n".encode())
    return hung


async def test_a_second_sigterm_during_the_drain_exits_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"drain_s": 30.0, "body_timeout_s": 60.0})
    server = start_server_process(config)
    hung = hang_a_request(server.url)
    try:
        idle = await Client(server.url, authority(config).issue("ref2")).connect()
        await asyncio.sleep(0.2)  # the POST has reached its handler
        server.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: "stopping:" in "".join(server.output), 5, "the stop begins")
        await idle.next("server:stopping", timeout=2)
        await asyncio.sleep(0.3)
        assert server.process.poll() is None, "the hung request should hold the drain"
        server.process.send_signal(signal.SIGTERM)
        code, took = await exited(server, 2.0)
        assert code == 130, (code, "".join(server.output)[-2000:])
        assert took < 1.0
        assert "second SIGTERM; exiting at once" in "".join(server.output)
    finally:
        hung.close()
        if server.process.poll() is None:
            server.kill()


async def test_requests_arriving_during_a_stop_are_refused_with_503(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"drain_s": 30.0, "body_timeout_s": 60.0})
    server = start_server_process(config)
    hung = hang_a_request(server.url)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/healthz") as response:
                assert response.status == 200  # the connection stays open (keep-alive)
            await asyncio.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            await wait_for(lambda: "stop: " in "".join(server.output), 5, "the stop begins")
            async with session.get(f"{server.url}/healthz") as response:
                assert response.status == 503
                body = await response.json()
                assert body["error"]["code"] == "server_stopping"
                assert response.headers["Retry-After"] == "30"
    finally:
        hung.close()
        if server.process.poll() is None:
            server.kill()


def test_the_deadline_exits_0_with_one_line_naming_the_step(caplog: Any) -> None:
    from telehealth.cli import StopDeadline

    codes: list[int] = []
    StopDeadline(0.05, lambda: "finishing recordings", exit=codes.append)
    time.sleep(0.5)
    assert codes == [0]
    (line,) = [r.getMessage() for r in caplog.records if "drain time" in r.getMessage()]
    assert "finishing recordings" in line


def test_the_engineio_internals_the_stop_relies_on_are_still_there() -> None:
    # python-engineio 4.15: telehealth.startup.Stopping.tell_clients reads ``eio.sockets``
    # and calls ``eio.disconnect()`` without a sid to close every session.
    sio = socketio.AsyncServer(async_mode="aiohttp")
    assert sio.eio.sockets == {}
    parameter = inspect.signature(sio.eio.disconnect).parameters["sid"]
    assert parameter.default is None
