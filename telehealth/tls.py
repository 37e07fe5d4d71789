"""HTTPS terminated by `telehealth serve` itself: the TLS context, the certificate reloaded on
SIGHUP, the plain-HTTP listener that only redirects, and the URL doctors are given.

Browsers give the camera and microphone only to a secure origin, so a consultation needs
https:// as soon as the browser is not on the server's own machine. The certificate is reloaded
into the same ``ssl.SSLContext``: OpenSSL copies the certificate into each connection when it
is accepted, so new handshakes get the new certificate while every established connection (a
consultation's socket.io websocket) keeps going on the one it started with.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509

from config.settings import ConfigError, Settings
from signaling.http_api import error_body, runner_options
from signaling.security import security_headers

logger = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites: forward secrecy and an AEAD only (TLS 1.3's suites are all of that kind and
OpenSSL's defaults). Every browser of the last ten years has one of them."""

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

_HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9.-]{1,253}))"
                          r"(?::[0-9]{1,5})?")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                        r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$")


def server_context() -> ssl.SSLContext:
    """A server context without a certificate: TLS 1.2 at least, ``CIPHERS``, the server's
    order of preference, no compression (CRIME), no renegotiation."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(CIPHERS)
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE)
    return context


@dataclass(frozen=True)
class CertificateInfo:
    """What the logs and the printed URL need to know of the server's certificate."""

    serial: int
    not_after: datetime.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]

    @classmethod
    def read(cls, cert_file: Path) -> CertificateInfo:
        """The first certificate of a PEM chain (the server's own). ValueError if there is
        none."""
        certificate = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
        try:
            names = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
            dns = tuple(names.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in names.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            dns, ips = (), ()
        return cls(serial=certificate.serial_number,
                   not_after=certificate.not_valid_after_utc, dns_names=dns, ip_addresses=ips)

    def describe(self) -> str:
        names = ", ".join((*self.dns_names, *self.ip_addresses)) or "no names"
        return (f"serial {self.serial:x}, for {names}, valid until "
                f"{self.not_after:%Y-%m-%d %H:%M} UTC")


class ServerCertificate:
    """The TLS context of the https listener and the files its certificate comes from.

    ``reload()`` (SIGHUP) loads the files again into the same context; a file that does not
    load (missing, not PEM, key not matching, encrypted key) is logged and the certificate in
    use is kept."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = server_context()
        try:
            self.info = self._load(self.context)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"tls.cert_file = {str(cert_file)!r}, tls.key_file = "
                              f"{str(key_file)!r}: {_reason(exc)}") from None
        logger.info("TLS certificate %s", self.info.describe())

    def _load(self, context: ssl.SSLContext) -> CertificateInfo:
        try:
            info = CertificateInfo.read(self.cert_file)
        except ValueError:
            raise ValueError(f"{self.cert_file} holds no PEM certificate") from None
        # A password callback: an encrypted key fails instead of prompting on the terminal.
        context.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
        return info

    def reload(self) -> bool:
        """Load the files into the live context; True if the new certificate is in use.

        They are tried on a scratch context first: a certificate and key loaded into the live
        one that did not match would leave it without a usable key (OpenSSL drops a key that
        does not match a new certificate)."""
        try:
            self._load(server_context())
            info = self._load(self.context)
        except (OSError, ssl.SSLError, ValueError) as exc:
            logger.error("TLS certificate reload failed, the certificate in use (%s) is kept: "
                         "%s", self.info.describe(), _reason(exc))
            return False
        self.info = info
        logger.info("TLS certificate reloaded: %s; established connections keep theirs",
                    info.describe())
        return True


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give tls.key_file an unencrypted key readable "
                     "only by this service")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc} ({exc.filename})"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not match the certificate"
        return f"not a usable PEM certificate and key ({exc.reason or exc})"
    return str(exc)


# -- the URL doctors are given -----------------------------------------------------------
def doctor_url(settings: Settings, port: int, certificate: CertificateInfo | None) -> str:
    """The base URL printed by `serve` and in sign-in links: ``server.public_url`` when set;
    else https when TLS is on, on a host name the certificate covers (``server.host`` if the
    certificate names it, else the certificate's first host name), else http on
    ``server.host``; a listener on every address is named by this machine's host name."""
    if settings.server.public_url:
        return settings.server.public_url.rstrip("/")
    host = settings.server.host
    scheme = "https" if certificate is not None else "http"
    if certificate is not None and host not in certificate.ip_addresses and \
            host not in certificate.dns_names:
        named = [name for name in certificate.dns_names if not name.startswith("*")]
        if named:
            host = named[0]
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    default_port = 443 if scheme == "https" else 80
    return f"{scheme}://{_bracketed(host)}{'' if port == default_port else f':{port}'}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the plain-HTTP listener ------------------------------------------------------------
def redirect_app(settings: Settings, https_port: int) -> web.Application:
    """The app of ``tls.redirect_port``: every request answered 308 to the same path and query
    on https. The host is ``server.public_url``'s when set, else the request's Host header
    without its port, accepted only if it is a host name or an IP address (anything else is
    400): the redirect never leads to a host the request did not name."""
    public = urllib.parse.urlsplit(settings.server.public_url) \
        if settings.server.public_url else None

    async def redirect(request: web.Request) -> web.StreamResponse:
        if public is not None and public.hostname:
            authority = public.netloc.rpartition("@")[2]
        else:
            host = _requested_host(request.headers.get("Host", ""))
            if host is None:
                logger.info("HTTP redirect refused: no usable Host header")
                return web.json_response(error_body(
                    "bad_host", "send a Host header naming this server"), status=400)
            authority = _bracketed(host) + ("" if https_port == 443 else f":{https_port}")
        # The target as sent (a query's escapes kept); an absolute-form target
        # (``GET http://host/path``) gives its path and query only.
        target = request.raw_path if request.raw_path.startswith("/") else \
            str(request.rel_url)
        location = f"https://{authority}{target}"
        # Not HTTPPermanentRedirect: it passes the location through yarl, which decodes
        # escapes in the query (``%2F`` becomes ``/``).
        return web.Response(status=308, headers={"Location": location})

    app = web.Application(middlewares=[security_headers(0)])
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


def _requested_host(header: str) -> str | None:
    """The host of a Host header (``name``, ``name:port``, ``[v6]:port``), lower case, or None
    if it is not exactly a host name or an IP address (no user part, no path)."""
    match = _HOST_HEADER.fullmatch(header)
    if match is None:
        return None
    if match["v6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["v6"]))
        except ValueError:
            return None
    name = match["name"].lower()
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    return name.rstrip(".") if _HOST_NAME.fullmatch(name) else None


# -- the listeners -----------------------------------------------------------------------
@dataclass
class Listening:
    """What `serve` listens on: the app's port (https when ``certificate``), and the redirect
    listener's runner and port when ``tls.redirect_port`` is set."""

    port: int
    certificate: ServerCertificate | None
    redirect: web.AppRunner | None = None
    redirect_port: int | None = None

    async def close_redirect(self) -> None:
        if self.redirect is not None:
            await self.redirect.cleanup()
            self.redirect = None


async def listen(runner: web.AppRunner, settings: Settings) -> Listening:
    """Start the app's listener on ``server.host:server.port`` (https with the ``[tls]``
    files), then the redirect listener on ``tls.redirect_port``. ConfigError if the
    certificate or key does not load."""
    certificate = None
    if settings.tls.cert_file is not None and settings.tls.key_file is not None:
        certificate = ServerCertificate(settings.tls.cert_file, settings.tls.key_file)
    site = web.TCPSite(runner, settings.server.host, settings.server.port,
                       ssl_context=certificate.context if certificate is not None else None)
    await site.start()
    listening = Listening(port=int(runner.addresses[0][1]), certificate=certificate)
    if certificate is not None and settings.tls.redirect_port is not None:
        from telehealth.startup import SERVICES

        # The app's header and body timeouts, malformed heads counted, on this listener too.
        redirect = web.AppRunner(redirect_app(settings, listening.port), access_log=None,
                                 handle_signals=False, shutdown_timeout=1.0,
                                 **runner_options(settings.server, runner.app[SERVICES].metrics))
        await redirect.setup()
        await web.TCPSite(redirect, settings.server.host, settings.tls.redirect_port).start()
        listening.redirect = redirect
        listening.redirect_port = int(redirect.addresses[0][1])
    return listening
