"""The HTTP API: health, metrics, and the records a signed-in clinician may read.

Every route but ``/healthz`` and the static sign-in page requires ``Authorization: Bearer``.
Errors are JSON: ``{"error": {"code", "message"}}`` with a 4xx status.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from signaling.errors import Forbidden, SignalingError, Unauthenticated
from signaling.recording import CONTENT_TYPES
from signaling.tokens import Principal

if TYPE_CHECKING:
    from signaling.app import Services

logger = logging.getLogger(__name__)

WEB_CLIENT_DIR = Path(__file__).resolve().parent.parent / "web_client"
SOCKET_IO_CLIENT = WEB_CLIENT_DIR / "node_modules" / "socket.io-client" / "dist"

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)

OPEN_PATHS = frozenset({"/", "/healthz", "/favicon.ico"})
OPEN_PREFIXES = ("/app/", "/vendor/", "/socket.io")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: SignalingError) -> web.Response:
    return web.json_response(exc.to_wire(), status=exc.http_status)


def make_auth_middleware(verify: Callable[[object], Principal], metrics_token: str) -> Middleware:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if path == "/metrics" and metrics_token and scheme.lower() == "bearer" and \
                hmac.compare_digest(token.strip(), metrics_token):
            return await handler(request)
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("send 'Authorization: Bearer <access token>'",
                                      code="token_missing")
            request[PRINCIPAL] = verify(token.strip())
            return await handler(request)
        except SignalingError as exc:
            logger.info("HTTP %s %s refused: %s", request.method, path, exc.code)
            return error_response(exc)

    return auth


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and wrong methods answer JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            {"error": {"code": "http_" + str(exc.status), "message": exc.reason}},
            status=exc.status,
        )


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def require_role(request: web.Request, *roles: str) -> Principal:
    principal = principal_of(request)
    if not any(principal.has(r) for r in roles):
        raise Forbidden(f"this needs one of the roles {', '.join(roles)}; clinician "
                        f"{principal.id!r} has {', '.join(sorted(principal.roles)) or 'none'}")
    return principal


# -- routes -------------------------------------------------------------------------------
def add_routes(app: web.Application, services_key: web.AppKey[Services]) -> None:
    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_CLIENT_DIR / "index.html",
                                headers={"Cache-Control": "no-cache"})

    async def vendor(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = SOCKET_IO_CLIENT / name
        if name not in ("socket.io.esm.min.js", "socket.io.esm.min.js.map") or not path.exists():
            return web.json_response(
                {"error": {"code": "not_built", "message": f"{name} is missing: run `make run` "
                           "(it installs the web client's npm packages)"}}, status=404)
        return web.FileResponse(path, headers={"Content-Type": "text/javascript"})

    async def favicon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(request: web.Request) -> web.Response:
        if PRINCIPAL in request:
            try:
                require_role(request, "admin", "coordinator")
            except SignalingError as exc:
                return error_response(exc)
        body = request.app[services_key].metrics.render()
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def me(request: web.Request) -> web.Response:
        p = principal_of(request)
        directory = request.app[services_key].directory
        return web.json_response({
            "clinician": p.clinician.to_wire(), "site": p.site.to_wire(),
            "roles": sorted(p.roles), "specialties": sorted(p.specialties),
            "expires_at": p.expires_at,
            "offered_specialties": sorted(directory.specialties()),
        })

    async def queue(request: web.Request) -> web.Response:
        services = request.app[services_key]
        p = principal_of(request)
        mine = await services.pairing.my_requests(p) if p.has("referring") else []
        return web.json_response({"queue": services.pairing.visible_queue(p), "mine": mine})

    async def consultations(request: web.Request) -> web.Response:
        services = request.app[services_key]
        found = await services.consultations.list_for(principal_of(request))
        return web.json_response({"consultations": found})

    async def consultation(request: web.Request) -> web.Response:
        services = request.app[services_key]
        try:
            record = await services.consultations.record(principal_of(request),
                                                         request.match_info["id"])
        except SignalingError as exc:
            logger.info("HTTP GET consultation refused: %s", exc.code)
            return error_response(exc)
        return web.json_response(record)

    async def recordings(request: web.Request) -> web.Response:
        services = request.app[services_key]
        try:
            listing = await services.recording.recordings(principal_of(request),
                                                          request.match_info["id"])
        except SignalingError as exc:
            logger.info("HTTP GET recordings refused: %s", exc.code)
            return error_response(exc)
        return web.json_response(listing)

    async def recording_file(request: web.Request) -> web.StreamResponse:
        services = request.app[services_key]
        name = request.match_info["name"]
        try:
            path = await services.recording.file(principal_of(request),
                                                 request.match_info["id"], name)
        except SignalingError as exc:
            logger.info("HTTP GET recording file refused: %s", exc.code)
            return error_response(exc)
        return web.FileResponse(path, headers={
            "Content-Type": CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        })

    async def sites(request: web.Request) -> web.Response:
        services = request.app[services_key]
        return web.json_response({"sites": await services.presence.snapshot()})

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/queue", queue)
    app.router.add_get("/api/consultations", consultations)
    app.router.add_get(r"/api/consultations/{id:[A-Za-z0-9_.-]{1,64}}", consultation)
    app.router.add_get(r"/api/consultations/{id:[A-Za-z0-9_.-]{1,64}}/recordings", recordings)
    app.router.add_get(r"/api/consultations/{id:[A-Za-z0-9_.-]{1,64}}/recordings/"
                       r"{name:[A-Za-z0-9][A-Za-z0-9_.-]{0,127}}", recording_file)
    app.router.add_get("/api/sites", sites)
    app.router.add_get("/vendor/{name}", vendor)
    app.router.add_static("/app/", WEB_CLIENT_DIR, append_version=False)
