"""HTTPS in `telehealth serve`: TLS 1.2+ with modern ciphers only, the redirect listener, the
security headers, the certificate reloaded on SIGHUP without dropping a connection, the printed
https URL, and X-Forwarded-* believed only from trusted proxies."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aioice.ice
import pytest

from relay.remote import RemoteRelay
from signaling.security import CONTENT_SECURITY_POLICY
from telehealth.startup import SERVICES
from tests.consultation_media import stop_node
from tests.media import wait_for
from tests.signaling.raw_http import RawResponse, read_response
from tests.support import run_server, start_server_process, write_config
from tests.tls_support import (
    HOST_NAME,
    CertificateFiles,
    TestCA,
    peer_serial,
    run_tls_server,
    tls_client,
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(self), microphone=(self), display-capture=(self)",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def tls_config(tmp: Path, ca: TestCA, **sections: dict[str, Any]) -> Path:
    tmp.mkdir(exist_ok=True)
    files = ca.issue()
    tls = {"cert_file": str(files.cert_file), "key_file": str(files.key_file),
           "redirect_port": 0, **sections.pop("tls", {})}
    return write_config(tmp, tls=tls, **sections)


async def handshake(port: int, context: ssl.SSLContext,
                    server_hostname: str = HOST_NAME) -> tuple[str, int, str]:
    """One TLS handshake with 127.0.0.1:port: the version, the server certificate's serial
    and the cipher; the connection closed."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_hostname), 5)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return (ssl_object.version(), peer_serial(ssl_object.getpeercert(binary_form=True)),
                ssl_object.cipher()[0])
    finally:
        writer.close()
        await writer.wait_closed()


def legacy_client(ca: TestCA, *, maximum: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A client willing to speak what a modern OpenSSL refuses by default (security level 0)."""
    context = ca.client_context()
    context.set_ciphers(ciphers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1: the point
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    return context


@asynccontextmanager
async def permissive_server(files: CertificateFiles) -> AsyncIterator[int]:
    """A TLS server accepting TLS 1.0+ and every cipher, with the same certificate: the
    control that shows the legacy clients below do get through where nothing refuses them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.load_cert_chain(files.cert_file, files.key_file)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_1_2_and_1_3_are_served_and_tls_1_1_and_weak_ciphers_refused(
    tmp_path: Path, ca: TestCA
) -> None:
    legacy = {
        "TLS 1.1": legacy_client(ca, maximum=ssl.TLSVersion.TLSv1_1, ciphers="ALL:@SECLEVEL=0"),
        # TLS 1.2 with a CBC suite (no AEAD).
        "CBC": legacy_client(ca, maximum=ssl.TLSVersion.TLSv1_2,
                             ciphers="ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"),
    }
    async with permissive_server(ca.issue("control")) as control:
        for name, context in legacy.items():
            version, _, cipher = await handshake(control, context)
            print(f"control server: {name} client got {version} {cipher}")
    async with run_tls_server(tls_config(tmp_path, ca)) as server:
        assert server.listening is not None
        port = server.listening.port
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = ca.client_context(minimum_version=version, maximum_version=version)
            got, _, cipher = await handshake(port, context)
            assert got == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
            assert version is ssl.TLSVersion.TLSv1_3 or cipher.startswith("ECDHE-"), cipher
            assert "GCM" in cipher or "CHACHA20" in cipher, cipher
        # The certificate names 127.0.0.1 too (the URL `serve` prints).
        await handshake(port, ca.client_context(), server_hostname="127.0.0.1")
        for name, context in legacy.items():
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await handshake(port, context)
                pytest.fail(f"a {name} client was served")


async def test_every_response_carries_the_security_headers_and_hsts_only_over_https(
    tmp_path: Path, ca: TestCA
) -> None:
    connector = aiohttp.TCPConnector(ssl=ca.client_context())
    async with run_tls_server(tls_config(tmp_path / "tls", ca, tls={"hsts_max_age_s": 86400})) \
            as server, aiohttp.ClientSession(connector=connector) as session:
        for path, status in (("/", 200), ("/app/styles.css", 200), ("/healthz", 200),
                             ("/api/me", 401), ("/app/nowhere.js", 404)):
            async with session.get(server.url + path) as response:
                assert response.status == status, path
                for name, value in SECURITY_HEADERS.items():
                    assert response.headers.get(name) == value, (path, name)
                assert response.headers["Strict-Transport-Security"] == "max-age=86400", path
        # socket.io accepts a browser from the https page's own origin (python-engineio's
        # aiohttp driver alone would expect http:// and refuse it), and from no other.
        port = server.url.rsplit(":", 1)[1]
        for origin, status in ((f"https://127.0.0.1:{port}", 200),
                               (f"http://127.0.0.1:{port}", 400),
                               ("https://evil.example", 400)):
            async with session.get(server.url + "/socket.io/?EIO=4&transport=polling",
                                   headers={"Origin": origin}) as response:
                assert response.status == status, origin
    (tmp_path / "plain").mkdir()
    async with run_tls_server(write_config(tmp_path / "plain")) as plain, \
            aiohttp.ClientSession() as session:
        assert plain.url.startswith("http://")
        async with session.get(plain.url + "/", headers={"X-Forwarded-Proto": "https"}) \
                as response:
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            # Plain http, and a client's X-Forwarded-Proto is not believed: no HSTS.
            assert "Strict-Transport-Security" not in response.headers


async def raw_get(port: int, target: str, host: str | None) -> RawResponse:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        head = f"GET {target} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
        writer.write((head + "Connection: close\r\n\r\n").encode("latin-1"))
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def test_the_http_listener_redirects_to_https_on_the_same_host_and_nowhere_else(
    tmp_path: Path, ca: TestCA
) -> None:
    async with run_tls_server(tls_config(tmp_path, ca)) as server:
        assert server.listening is not None and server.listening.redirect_port is not None
        http, https = server.listening.redirect_port, server.listening.port
        found = await raw_get(http, "/app/index.html?lang=en&x=%2F", f"{HOST_NAME}:{http}")
        assert found.status == 308
        assert found.headers["location"] == f"https://{HOST_NAME}:{https}/app/index.html" \
                                            "?lang=en&x=%2F"
        # A path that looks like another host, an absolute-form target: still this host.
        for target, path in (("//evil.example/x", "//evil.example/x"),
                             ("http://evil.example/p?q=1", "/p?q=1")):
            found = await raw_get(http, target, HOST_NAME)
            assert found.status == 308, target
            assert found.headers["location"] == f"https://{HOST_NAME}:{https}{path}", target
        found = await raw_get(http, "/", f"[::1]:{http}")
        assert found.headers["location"] == f"https://[::1]:{https}/"
        # A Host header that is not a host name is refused, not followed.
        for host in ("evil.example@telehealth.test", "telehealth.test/evil", "a b",
                     "telehealth.test:80:80", "[evil.example]"):
            found = await raw_get(http, "/", host)
            assert found.status == 400, host
            assert found.json()["error"]["code"] == "bad_host"
        assert (await raw_get(http, "/", None)).status == 400  # aiohttp's own refusal
    # With server.public_url, that host whatever the request says.
    config = tls_config(tmp_path / "public", ca,
                        server={"public_url": "https://telehealth.bv.example"})
    async with run_tls_server(config) as server:
        assert server.listening is not None and server.listening.redirect_port is not None
        found = await raw_get(server.listening.redirect_port, "/x?y=1", "evil.example")
        assert found.headers["location"] == "https://telehealth.bv.example/x?y=1"


async def open_polling_session(url: str, forwarded_for: str,
                               headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as session, session.get(
            f"{url}/socket.io/?EIO=4&transport=polling",
            headers={"X-Forwarded-For": forwarded_for, **(headers or {})}) as response:
        await response.read()
        return response.status


async def test_forwarded_headers_are_believed_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    server_settings = {"polling_sessions_per_address": 1}
    # The test's own address is the trusted proxy: the per-address polling limit (signaling/
    # transport.py) counts the forwarded client, and X-Forwarded-Proto https brings HSTS.
    (tmp_path / "trusted").mkdir()
    config = write_config(tmp_path / "trusted",
                          server={**server_settings, "trusted_proxies": ["127.0.0.0/8"]})
    async with run_tls_server(config) as server:
        assert await open_polling_session(server.url, "203.0.113.7") == 200
        assert await open_polling_session(server.url, "203.0.113.7") == 429
        assert await open_polling_session(server.url, "203.0.113.8") == 200
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/healthz", headers={
                    "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}) as response:
                assert response.headers["Strict-Transport-Security"].startswith("max-age=")
            # More hops than the one trusted proxy: refused, not guessed.
            async with session.get(server.url + "/healthz", headers={
                    "X-Forwarded-For": "198.51.100.1, 203.0.113.9"}) as response:
                assert response.status == 400
                assert (await response.json())["error"]["code"] == "bad_forwarded_headers"
    # Another proxy is trusted: the same headers from here are ignored.
    (tmp_path / "other").mkdir()
    config = write_config(tmp_path / "other",
                          server={**server_settings, "trusted_proxies": ["10.9.9.9"]})
    async with run_tls_server(config) as server:
        assert await open_polling_session(server.url, "203.0.113.7") == 200
        assert await open_polling_session(server.url, "203.0.113.8") == 429
        async with aiohttp.ClientSession() as session, session.get(
                server.url + "/healthz", headers={"X-Forwarded-For": "203.0.113.9",
                                                  "X-Forwarded-Proto": "https"}) as response:
            assert "Strict-Transport-Security" not in response.headers


def serve_config_with_demo(tmp: Path, ca: TestCA) -> Path:
    """A TLS config without a directory file: `serve` prints the demo sign-in links."""
    config = tls_config(tmp, ca)
    text = re.sub(r"(?m)^file = .*directory\.toml.*\n", "", config.read_text())
    config.write_text(text)
    return config


async def wait_for_line(lines: list[str], pattern: str, after: int, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lines[after:]:
            if re.search(pattern, line):
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "".join(lines[after:]))


async def test_serve_prints_https_links_and_sighup_swaps_the_certificate_keeping_connections(
    tmp_path: Path, ca: TestCA
) -> None:
    config = serve_config_with_demo(tmp_path, ca)
    first = CertificateFiles(ca.tmp / "server.pem", ca.tmp / "server.key").serial()
    server = start_server_process(config)
    try:
        output = server.output
        url = server.url
        port = int(url.rsplit(":", 1)[1])
        assert re.fullmatch(r"https://127\.0\.0\.1:\d+", url), url
        links = [line.strip() for line in output if "#token=" in line]
        assert links and all(link.startswith(f"{url}/#token=") for link in links), output
        assert any(re.search(r"redirects to https", line) for line in output), output
        token = links[0].split("#token=", 1)[1]
        context = ca.client_context()
        # Open before the reload: a signed-in socket.io websocket and a keep-alive connection.
        client = await tls_client(url, token, context).connect()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                       server_hostname=HOST_NAME)
        try:
            assert (await handshake(port, context))[1] == first
            renewed = ca.issue("server")  # the same paths, a new certificate and key
            second = renewed.serial()
            assert second != first
            mark = len(output)
            server.process.send_signal(signal.SIGHUP)
            await wait_for_line(output, "TLS certificate reloaded", mark)
            assert (await handshake(port, context))[1] == second
            # Both connections opened before the reload are still up and answered.
            await client.ok("presence:list", {})
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {HOST_NAME}\r\n\r\n".encode())
            assert (await read_response(reader)).status == 200
            old_ssl = writer.get_extra_info("ssl_object")
            assert peer_serial(old_ssl.getpeercert(binary_form=True)) == first
            # A broken renewal: a certificate whose key is not the one beside it, then garbage.
            other = ca.issue("other")
            renewed.cert_file.write_bytes(other.cert_file.read_bytes())
            for broken, reason in ((None, "the key does not match the certificate"),
                                   (b"not a certificate\n", "holds no PEM certificate")):
                if broken is not None:
                    renewed.cert_file.write_bytes(broken)
                mark = len(output)
                server.process.send_signal(signal.SIGHUP)
                await wait_for_line(output, f"TLS certificate reload failed.*is kept: .*{reason}",
                                    mark)
                assert (await handshake(port, context))[1] == second
            await client.ok("presence:list", {})
            assert client.sio.connected
        finally:
            writer.close()
            await client.close()
    finally:
        server.process.terminate()
        server.process.wait(timeout=15)
    assert server.process.returncode == 0



def start_node_logged(config: Path, url: str, token: str) -> subprocess.Popen[str]:
    """`telehealth relay` dialling ``url``, its log kept (stdout and stderr)."""
    return subprocess.Popen(
        [sys.executable, "-m", "telehealth.cli", "--config", str(config), "relay",
         "--signaling", url, "--node-token", token, "--region", "11"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))


async def test_a_relay_node_trusts_https_signaling_through_its_ca_file_and_only_then(
    tmp_path: Path, ca: TestCA
) -> None:
    async with run_tls_server(tls_config(tmp_path / "server", ca)) as server:
        assert server.app is not None
        services = server.app[SERVICES]
        token = services.tokens.issue_node("relay-https")
        # Without the CA: refused, with a line that says what to set; never registered.
        (tmp_path / "plain-node").mkdir()
        untrusting = start_node_logged(write_config(tmp_path / "plain-node"), server.url, token)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(untrusting.stdout or []),
                                  daemon=True)
        reader.start()
        try:
            await wait_for_line(lines, "certificate is not trusted.*relay.signaling_ca_file", 0,
                                timeout=20)
            assert not any(isinstance(r, RemoteRelay) for r in services.relays.relays())
        finally:
            await stop_node(untrusting)
        # With relay.signaling_ca_file: registered.
        (tmp_path / "node").mkdir()
        node_config = write_config(tmp_path / "node",
                                   relay={"signaling_ca_file": str(ca.ca_file)})
        node = start_node_logged(node_config, server.url, token)
        try:
            await wait_for(lambda: any(r.info.id == "relay-https"
                                       for r in services.relays.relays()
                                       if isinstance(r, RemoteRelay)), 20,
                           "the node to register over https")
        finally:
            await stop_node(node)


async def test_the_relay_gathers_on_loopback_by_itself_for_a_one_machine_demo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="telehealth.startup")
    (tmp_path / "demo").mkdir()
    config = write_config(tmp_path / "demo", relay={"host_addresses": []})
    async with run_server(config) as server:  # server.host 127.0.0.1
        assert server.app is not None
        embedded = server.app[SERVICES].embedded
        assert embedded is not None and embedded.config.host_addresses == ["127.0.0.1"]
    assert not [r for r in caplog.records if "host_addresses is empty" in r.getMessage()]
    # On every address with none configured: one line naming what ICE will offer.
    (tmp_path / "lan").mkdir()
    config = write_config(tmp_path / "lan", server={"host": "0.0.0.0"},
                          relay={"host_addresses": []})
    async with run_server(config) as server:
        assert server.app is not None
        embedded = server.app[SERVICES].embedded
        assert embedded is not None and embedded.config.host_addresses == []
    [line] = [r.getMessage() for r in caplog.records if "host_addresses is empty" in
              r.getMessage()]
    expected = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    assert all(address in line for address in expected), line
    assert "relay.announced_address" in line


def test_serve_with_a_key_that_does_not_match_stops_with_exit_2_naming_the_files(
    tmp_path: Path, ca: TestCA
) -> None:
    config = tls_config(tmp_path, ca)
    ca.issue("other").key_file.replace(tmp_path / "server.key")
    done = subprocess.run([sys.executable, "-m", "telehealth.cli", "--config", str(config),
                           "serve"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "tls.cert_file" in done.stderr and "does not match" in done.stderr, done.stderr
