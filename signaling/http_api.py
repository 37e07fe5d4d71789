"""The HTTP API: health, metrics, and the records a signed-in clinician may read.

Every route but ``/healthz`` and the static sign-in page requires ``Authorization: Bearer``.
Errors are JSON: ``{"error": {"code", "message"}}`` with a 4xx status.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from prometheus_client import Counter

from config.settings import ServerSettings
from signaling import permissions
from signaling.consultations import Consultations
from signaling.directory import Directory
from signaling.errors import Forbidden, NotBuilt, SignalingError, Unauthenticated
from signaling.metrics import Metrics
from signaling.pairing import Pairing
from signaling.presence import Presence
from signaling.recording import CONTENT_TYPES, RecordingControl
from signaling.tokens import Principal

logger = logging.getLogger(__name__)

WEB_CLIENT_DIR = Path(__file__).resolve().parent.parent / "web_client"
SOCKET_IO_CLIENT = WEB_CLIENT_DIR / "node_modules" / "socket.io-client" / "dist"

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)

WEB_CLIENT_FILES = r"index\.html|styles\.css|src/[A-Za-z0-9_-]+\.js"
"""What ``/app/`` serves: the web client's own files, never its ``package.json``, lockfile or
``node_modules``."""

ENGINEIO_PATH = "/socket.io/"
"""python-socketio's default path: engine.io's requests, bounded in ``signaling.transport``."""

OPEN_PATHS = frozenset({"/", "/healthz", "/favicon.ico"})
OPEN_PREFIXES = ("/app/", "/vendor/", "/socket.io", "/api/auth/")
"""``/api/auth/``: how a token is obtained (signaling/auth_api.py), so before one."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def refuse_and_close(request: web.BaseRequest, status: int, code: str,
                           message: str) -> web.StreamResponse:
    """Answer a JSON error and close the connection at once, without reading the rest of the
    request body (aiohttp would read and discard it for up to ``lingering_time``)."""
    response = web.json_response(error_body(code, message), status=status)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place HTTP errors are answered: a body announced over ``client_max_size``
    (413 ``payload_too_large``, the connection closed), a ``SignalingError`` raised by a route
    or by the auth middleware, an unknown route or a wrong method, as JSON with a 4xx status;
    any other exception as a JSON 500 ``internal`` (one ERROR line, no traceback to the
    client)."""
    length = request.content_length
    if length is not None and length > request.client_max_size and \
            not request.path.startswith(ENGINEIO_PATH):  # its own limit (signaling.transport)
        logger.info("HTTP %s %s refused: payload_too_large (%d bytes)", request.method,
                    request.path, length)
        return await refuse_and_close(
            request, 413, "payload_too_large",
            f"the body is {length} bytes; at most {request.client_max_size}")
    try:
        return await handler(request)
    except SignalingError as exc:
        logger.info("HTTP %s %s refused: %s", request.method, request.path, exc.code)
        return web.json_response(exc.to_wire(), status=exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return await refuse_and_close(request, 413, "payload_too_large",
                                          f"the body is over {request.client_max_size} bytes")
        return web.json_response(error_body("http_" + str(exc.status), exc.reason),
                                 status=exc.status)
    except ConnectionError:
        raise  # the client went away: aiohttp drops the connection quietly
    except Exception as exc:
        logger.error("HTTP %s %s failed: %s: %s", request.method, request.path,
                     type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        return web.json_response(error_body("internal", "the server failed; it was logged"),
                                 status=500)


class HeadErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger of aiohttp's ``RequestHandler`` (aiohttp 3.14, ``handler_args`` ``logger``).
    aiohttp logs every malformed request head (``HttpProcessingError``: bad request line, header
    too long, bad method...) with ``logger.exception``: an ERROR traceback per unauthenticated
    request. Here each is counted in ``malformed`` and logged as one INFO line; everything else
    passes through."""

    def __init__(self, logger: logging.Logger, malformed: Counter) -> None:
        super().__init__(logger, {})
        self.malformed = malformed

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self.malformed.inc()
            remote = args[0] if args else "?"
            self.logger.info("HTTP: malformed request head from %s (%s, %s)", remote,
                             type(exc).__name__, exc.code)
            return
        super().log(level, msg, *args, **kwargs)


def runner_options(server: ServerSettings, metrics: Metrics) -> dict[str, Any]:
    """Keywords for ``web.AppRunner`` (aiohttp 3.14 hands them to each ``RequestHandler``):
    ``keepalive_timeout`` is the header timeout (aiohttp arms it when a connection opens and
    after each response, and closes the connection if no complete request head arrived by
    then; it has no separate header timeout); ``lingering_time`` bounds reading an unread body
    after the response; the logger counts malformed heads instead of logging tracebacks."""
    return {
        "keepalive_timeout": server.header_timeout_s,
        "lingering_time": server.body_timeout_s,
        "logger": HeadErrorLog(logging.getLogger("aiohttp.server"), metrics.malformed_requests),
    }


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
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send 'Authorization: Bearer <access token>'",
                                  code="token_missing")
        request[PRINCIPAL] = verify(token.strip())
        return await handler(request)

    return auth


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


# -- routes -------------------------------------------------------------------------------
def add_routes(app: web.Application, *, directory: Directory, metrics: Metrics,
               pairing: Pairing, consultations: Consultations, recording: RecordingControl,
               presence: Presence) -> None:
    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_CLIENT_DIR / "index.html",
                                headers={"Cache-Control": "no-cache"})

    async def vendor(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = SOCKET_IO_CLIENT / name
        if name not in ("socket.io.esm.min.js", "socket.io.esm.min.js.map") or not path.exists():
            raise NotBuilt(f"{name} is missing: run `make run` (it installs the web client's "
                           "npm packages)")
        return web.FileResponse(path, headers={"Content-Type": "text/javascript"})

    async def web_client(request: web.Request) -> web.StreamResponse:
        path = WEB_CLIENT_DIR / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def favicon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_text(request: web.Request) -> web.Response:
        if PRINCIPAL in request:
            p = principal_of(request)
            if not permissions.may_read_metrics(p):
                raise Forbidden(f"this needs one of the roles admin, coordinator; clinician "
                                f"{p.id!r} has {', '.join(sorted(p.roles)) or 'none'}")
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def me(request: web.Request) -> web.Response:
        p = principal_of(request)
        return web.json_response({
            "clinician": p.clinician.to_wire(), "site": p.site.to_wire(),
            "roles": sorted(p.roles), "specialties": sorted(p.specialties),
            "expires_at": p.expires_at,
            "offered_specialties": sorted(directory.specialties()),
        })

    async def queue(request: web.Request) -> web.Response:
        return web.json_response(await pairing.queue_view(principal_of(request)))

    async def consultation_list(request: web.Request) -> web.Response:
        found = await consultations.list_for(principal_of(request))
        return web.json_response({"consultations": found})

    async def consultation(request: web.Request) -> web.Response:
        return web.json_response(await consultations.record(principal_of(request),
                                                            request.match_info["id"]))

    async def recordings(request: web.Request) -> web.Response:
        return web.json_response(await recording.recordings(principal_of(request),
                                                            request.match_info["id"]))

    async def recording_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = await recording.file(principal_of(request), request.match_info["id"], name)
        return web.FileResponse(path, headers={
            "Content-Type": CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        })

    async def sites(request: web.Request) -> web.Response:
        return web.json_response({"sites": await presence.snapshot()})

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/queue", queue)
    app.router.add_get("/api/consultations", consultation_list)
    app.router.add_get(r"/api/consultations/{id:[A-Za-z0-9_.-]{1,64}}", consultation)
    app.router.add_get(r"/api/consultations/{id:[A-Za-z0-9_.-]{1,64}}/recordings", recordings)
    app.router.add_get(r"/api/consultations/{id:[A-Za-z0-9_.-]{1,64}}/recordings/"
                       r"{name:[A-Za-z0-9][A-Za-z0-9_.-]{0,127}}", recording_file)
    app.router.add_get("/api/sites", sites)
    app.router.add_get("/vendor/{name}", vendor)
    app.router.add_get("/app/{name:" + WEB_CLIENT_FILES + "}", web_client)
