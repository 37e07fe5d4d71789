"""`telehealth serve` behind Debian's nginx, configured from docs/nginx/telehealth.conf (the file
docs/deploy.md gives hospital IT): TLS at nginx, plain HTTP behind it, socket.io upgraded to a
WebSocket through it, the client's address and https believed from nginx only, and a
consultation whose media goes straight to the relay over UDP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import socketio

from config.settings import ServerSettings
from tests.consultation_media import open_consultation, start_media
from tests.media import wait_for
from tests.support import Client, write_config
from tests.tls_support import HOST_NAME, TestCA, run_tls_server

NGINX = "/usr/sbin/nginx"
TEMPLATE = Path(__file__).resolve().parent.parent / "docs" / "nginx" / "telehealth.conf"

pytestmark = pytest.mark.skipif(not Path(NGINX).exists(),
                                reason=f"{NGINX} is missing: `make test` installs nginx-light")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Nginx:
    https_port: int
    http_port: int
    access_log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://{HOST_NAME}:{self.https_port}"


@contextmanager
def run_nginx(tmp: Path, ca: TestCA, upstream: str) -> Iterator[Nginx]:
    """nginx in the foreground, its prefix, logs, pid and temp files in ``tmp``, serving
    docs/nginx/telehealth.conf with the placeholders filled in; stopped at the end."""
    files = ca.issue("nginx")
    https_port, http_port = free_port(), free_port()
    site = TEMPLATE.read_text()
    for name, value in {"SERVER_NAME": HOST_NAME, "HTTPS_PORT": str(https_port),
                        "HTTP_PORT": str(http_port), "CERT_FILE": str(files.cert_file),
                        "KEY_FILE": str(files.key_file), "UPSTREAM": upstream}.items():
        site = site.replace(f"__{name}__", value)
    assert "__" not in re.sub(r"#.*", "", site), "a placeholder left unfilled"
    (tmp / "telehealth.conf").write_text(site)
    access_log = tmp / "access.log"
    temp_paths = "".join(f"    {kind}_temp_path {tmp / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(
        # As root, workers would switch to "nobody", who cannot read the test's directory.
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\nerror_log {tmp / 'error.log'} info;\npid {tmp / 'nginx.pid'};\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {access_log} combined;\n{temp_paths}"
        f"    include {tmp / 'telehealth.conf'};\n"
        "}\n")
    process = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log"),
         "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                assert process.stderr is not None
                raise RuntimeError(f"nginx exited {process.returncode}: "
                                   f"{process.stderr.read().decode()}"
                                   f"{(tmp / 'error.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Nginx(https_port, http_port, access_log, process)
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def through_nginx(ca: TestCA, source: str = "127.0.0.1") -> aiohttp.TCPConnector:
    """A connector trusting the test CA, resolving telehealth.test to 127.0.0.1, and
    connecting from ``source`` (any 127/8 address: nginx then sees a distinct client)."""
    return aiohttp.TCPConnector(ssl=ca.client_context(), local_addr=(source, 0),
                                resolver=_Loopback())


class _Loopback(aiohttp.abc.AbstractResolver):
    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[dict[str, object]]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


@asynccontextmanager
async def proxied_client(nginx: Nginx, ca: TestCA, token: str,
                         source: str = "127.0.0.1") -> AsyncIterator[Client]:
    """A test Client signed in through nginx the way a browser connects (long-polling first,
    then the WebSocket upgrade)."""
    session = aiohttp.ClientSession(connector=through_nginx(ca, source))
    client = Client(nginx.url, token)
    client.sio = socketio.AsyncClient(reconnection=False, http_session=session)
    client.sio.on("*", client._record)
    try:
        await client.sio.connect(nginx.url, auth={"token": token}, wait_timeout=5)
        yield client
    finally:
        await client.close()
        await session.close()


def test_the_template_accepts_the_default_payload_limit() -> None:
    match = re.search(r"client_max_body_size (\d+)k;", TEMPLATE.read_text())
    assert match is not None
    assert int(match.group(1)) * 1024 == ServerSettings().max_payload_bytes


async def test_serve_behind_nginx_upgrades_socket_io_believes_nginx_and_carries_a_consultation(
    tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    config = write_config(tmp_path, server={"trusted_proxies": ["127.0.0.1"],
                                            "polling_sessions_per_address": 1})
    async with run_tls_server(config) as server:
        assert server.url.startswith("http://")
        upstream = server.url.removeprefix("http://")
        (tmp_path / "nginx").mkdir()
        with run_nginx(tmp_path / "nginx", ca, upstream) as nginx:
            async with aiohttp.ClientSession(connector=through_nginx(ca)) as session:
                # Plain http at nginx: a redirect to its https name.
                async with session.get(f"http://127.0.0.1:{nginx.http_port}/app/x?y=1",
                                       allow_redirects=False) as response:
                    assert response.status == 308
                    assert response.headers["Location"] == f"{nginx.url}/app/x?y=1"
                # The page through nginx: the server's headers, HSTS because nginx said https.
                async with session.get(nginx.url + "/") as response:
                    assert response.status == 200
                    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
                    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
            # A browser's socket.io is accepted from the page's own origin as nginx names it
            # (https, the name and port the browser used), from no other.
            for source, origin, status in (
                    ("127.0.0.6", nginx.url, 200), ("127.0.0.7", "https://evil.example", 400),
                    ("127.0.0.8", f"http://{HOST_NAME}:{nginx.https_port}", 400)):
                async with aiohttp.ClientSession(connector=through_nginx(ca, source)) \
                        as session, session.get(nginx.url + "/socket.io/?EIO=4&transport=polling",
                                                headers={"Origin": origin}) as response:
                    assert response.status == status, origin
            # The per-address polling limit counts the client nginx names, not nginx.
            for source, status in (("127.0.0.2", 200), ("127.0.0.2", 429), ("127.0.0.3", 200)):
                async with aiohttp.ClientSession(connector=through_nginx(ca, source)) as session, \
                        session.get(nginx.url + "/socket.io/?EIO=4&transport=polling") as response:
                    assert response.status == status, source
            # A consultation through nginx: socket.io on a WebSocket, media straight to the relay.
            names = ("cardio1", "ref1")
            async with proxied_client(nginx, ca, server.token("cardio1"), "127.0.0.4") as host, \
                    proxied_client(nginx, ca, server.token("ref1"), "127.0.0.5") as guest:
                for client in (host, guest):
                    assert client.sio.eio.current_transport == "websocket"
                c = {"cardio1": host, "ref1": guest}
                cid = await open_consultation(c)
                peers = {n: await start_media(c[n], cid) for n in names}
                try:
                    await wait_for(lambda: peers["ref1"].frames("cardio1") > 20, 30,
                                   "video to the guest")
                    await wait_for(lambda: peers["cardio1"].frames("ref1") > 20, 30,
                                   "video to the host")
                finally:
                    for peer in peers.values():
                        await peer.close()
            await asyncio.sleep(0.2)  # nginx writes the access log line at the close
            upgrades = [line for line in nginx.access_log.read_text().splitlines()
                        if "transport=websocket" in line and '" 101 ' in line]
            assert {line.split()[0] for line in upgrades} >= {"127.0.0.4", "127.0.0.5"}, \
                nginx.access_log.read_text()[-2000:]
