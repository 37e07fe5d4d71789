"""TLS for tests: a CA made by the test (trustme) and server certificates for "telehealth.test"
and 127.0.0.1 written as PEM files, the SPKI hash Chromium trusts through
``--ignore-certificate-errors-spki-list``, client contexts, and the real `serve` app on https
started in this process with the listeners `telehealth serve` opens (``telehealth.tls.listen``).
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import socketio
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from config.settings import load_settings
from signaling.http_api import runner_options
from telehealth.startup import SERVICES, create_app
from telehealth.tls import Listening, listen
from tests.support import Client, Server

HOST_NAME = "telehealth.test"
"""The name the tests' server certificates carry (Chromium maps it to 127.0.0.1)."""


@dataclass
class CertificateFiles:
    cert_file: Path
    key_file: Path

    def serial(self) -> int:
        return _first(self.cert_file.read_bytes()).serial_number

    def spki_hash(self) -> str:
        return spki_hash(self.cert_file.read_bytes())


class TestCA:
    """A certificate authority of the test's own, writing leaf certificates into ``tmp``."""

    __test__ = False  # not a pytest class

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._issued = 0

    def issue(self, name: str = "server", *identities: str) -> CertificateFiles:
        """A certificate and key for ``identities`` (default "telehealth.test", 127.0.0.1) as
        ``<name>.pem`` and ``<name>.key``."""
        self._issued += 1
        leaf = self.ca.issue_cert(*(identities or (HOST_NAME, "127.0.0.1")))
        files = CertificateFiles(self.tmp / f"{name}.pem", self.tmp / f"{name}.key")
        files.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(files.key_file))
        return files

    def client_context(self, **versions: ssl.TLSVersion) -> ssl.SSLContext:
        """A client context trusting this CA only; ``minimum_version``/``maximum_version``
        optional."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        for key, value in versions.items():
            setattr(context, key, value)
        return context


def _first(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def spki_hash(pem: bytes) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of the chain's first certificate: what Chromium's
    ``--ignore-certificate-errors-spki-list`` takes."""
    spki = _first(pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def peer_serial(der: bytes | None) -> int:
    """The serial number of a DER certificate (``SSLSocket.getpeercert(binary_form=True)``)."""
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@dataclass
class TlsServer(Server):
    listening: Listening | None = None


@asynccontextmanager
async def run_tls_server(config: Path) -> AsyncIterator[TlsServer]:
    """The real app in this process, listening as `telehealth serve` does (``listen``: https
    with the config's ``[tls]`` files, the redirect listener); ``url`` is https://127.0.0.1."""
    settings = load_settings(config)
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False,
                           **runner_options(settings.server, app[SERVICES].metrics))
    await runner.setup()
    listening: Listening | None = None
    try:
        listening = await listen(runner, settings)
        scheme = "https" if listening.certificate is not None else "http"
        yield TlsServer(f"{scheme}://127.0.0.1:{listening.port}", settings,
                        app[SERVICES].tokens, app, listening)
    finally:
        if listening is not None:
            await listening.close_redirect()
        await runner.cleanup()


def tls_client(url: str, token: str, context: ssl.SSLContext) -> Client:
    """A test ``Client`` whose websocket trusts ``context`` (the test CA)."""
    client = Client(url, token)
    client.sio = socketio.AsyncClient(reconnection=False,
                                      websocket_extra_options={"ssl": context})
    client.sio.on("*", client._record)
    return client
