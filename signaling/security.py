"""What every HTTP answer carries for the browser's safety, and whom the server believes about
the client: security headers on every response, ``X-Forwarded-*`` only from the configured
reverse proxies, and socket.io connections only from the page's own origin.

Browsers give the camera and microphone only to a secure origin, so a consultation page is
served over https (``telehealth.tls``) or behind a TLS proxy; these headers keep that page from
being framed, sniffed, downgraded to http (HSTS) or made to run script from elsewhere (CSP).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp_remotes import XForwardedStrict

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    # A <video> fed a MediaStream through srcObject needs no media-src; blob: and mediastream:
    # keep a recording preview or an older client working.
    "media-src 'self' blob: mediastream:",
    # 'self' covers ws:// and wss:// to the page's own host and port (CSP Level 3; Chromium
    # and Firefox; tests/web/test_https.py checks Chromium): no socket to another host.
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "object-src 'none'",
])
"""The web client's policy: its own scripts, styles and sockets only, no inline script, never
framed (web_client/ has no inline script or style; a violation shows in the browser console)."""

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a sign-in link's #token never leaves, nor the path
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Permissions-Policy": "camera=(self), microphone=(self), display-capture=(self)",
    "Cross-Origin-Opener-Policy": "same-origin",
}
"""Sent on every response."""


def security_headers(hsts_max_age_s: int) -> Middleware:
    """A middleware that adds ``HEADERS`` to every response, and
    ``Strict-Transport-Security`` when the request came over https (TLS here, or a trusted
    proxy saying so: it runs inside ``forwarded_from``). A response already sent by its
    handler (a websocket's 101) is left as it went."""
    hsts = f"max-age={hsts_max_age_s}" if hsts_max_age_s > 0 else ""

    @web.middleware
    async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Raised past json_errors (a redirect, a proxy header refusal): it is a response.
            _add(exc, hsts if request.secure else "")
            raise
        if not response.prepared:
            _add(response, hsts if request.secure else "")
        return response

    return headers


def _add(response: web.StreamResponse, hsts: str) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if hsts:
        response.headers["Strict-Transport-Security"] = hsts


def trusted_networks(addresses: Iterable[str]) -> list[Network]:
    """``server.trusted_proxies`` as networks, each IPv4 one also as its IPv4-mapped IPv6 form
    (a proxy reaching a dual-stack ``::`` listener shows as ``::ffff:10.0.0.5``)."""
    networks: list[Network] = []
    for item in addresses:
        network = ipaddress.ip_network(item, strict=False)
        networks.append(network)
        if isinstance(network, ipaddress.IPv4Network):
            networks.append(ipaddress.IPv6Network(
                f"::ffff:{network.network_address}/{96 + network.prefixlen}"))
    return networks


class _ForwardedByProxy(XForwardedStrict):
    """aiohttp-remotes' strict reading (one trusted hop: the peer must be a trusted proxy,
    ``X-Forwarded-For`` holds exactly the client); a malformed header set is a JSON 400."""

    async def raise_error(self, request: web.Request) -> NoReturn:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {
                "code": "bad_forwarded_headers",
                "message": "a trusted proxy sent X-Forwarded-* headers that do not name "
                           "exactly one client (see docs/deploy.md)"}}),
            content_type="application/json")


def forwarded_from(trusted: Iterable[str]) -> Middleware:
    """A middleware that believes ``X-Forwarded-For``/``-Proto``/``-Host`` only on a
    connection from ``trusted`` (``server.trusted_proxies``): there ``request.remote``,
    ``request.scheme`` (hence ``request.secure``) and ``request.host`` become the client's, for
    everything after it (the per-address polling limit, HSTS, engine.io's origin check, logs).
    From anyone else the headers are ignored, so a client cannot claim another address.

    aiohttp-remotes' ``XForwardedStrict`` does the reading; its own peer check would refuse
    (400) every direct connection, so the peer is checked here first and a direct client is
    served as itself. A trusted proxy's request without ``X-Forwarded-For`` (a health check
    from the proxy machine) is served as the proxy's."""
    networks = trusted_networks(trusted)
    reader = _ForwardedByProxy([networks])

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if "X-Forwarded-For" in request.headers and _peer_in(request, networks):
            return await reader.middleware(request, handler)
        return await handler(request)

    return forwarded


def _peer_in(request: web.Request, networks: list[Network]) -> bool:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:  # a Unix socket
        return False
    return any(address in network for network in networks)


def same_origin(origin: str | None, environ: dict[str, Any]) -> bool:
    """engine.io's ``cors_allowed_origins``: a browser's connection is accepted only from the
    page's own origin, as the client sees it (``request.scheme`` and ``request.host`` after
    ``forwarded_from``, https when TLS is terminated here). python-engineio 4.15's aiohttp
    driver would take the scheme from any client's ``X-Forwarded-Proto`` and else assume
    http, refusing every https page's websocket."""
    request = environ.get("aiohttp.request")
    if origin is None or not isinstance(request, web.BaseRequest):
        return False
    return origin == f"{request.scheme}://{request.host}"
