"""The HTTP face of accounts (``signaling.accounts``): sign-in, refresh, sign-out,
activation, and an admin's activation codes. See docs/protocol.md, "Accounts".

The access token travels in the JSON body (the browser keeps it in memory and sends it as
``Authorization: Bearer`` and in the socket.io ``auth``, as before). The refresh token travels
only in the ``telehealth_refresh`` cookie: HttpOnly (no script reads it), SameSite=Strict (no
other site's page makes the browser send it), scoped to ``/api/auth/`` (no other request
carries it), Secure when the request came over https (the tests speak http on loopback), and
expiring with the session (one shift).

Everything under ``/api/auth/`` is open (``http_api.OPEN_PREFIXES``): these routes are how a
token is obtained. ``/api/accounts/...`` needs a bearer token like every other route.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web

from signaling import permissions
from signaling.accounts import Accounts, SignedIn, session_ended
from signaling.errors import Forbidden, InvalidPayload, NotFound
from signaling.http_api import principal_of
from signaling.schemas import Activate, SignIn, parse

logger = logging.getLogger(__name__)

REFRESH_COOKIE = "telehealth_refresh"
COOKIE_PATH = "/api/auth/"
AUTH_PREFIX = "/api/auth/"
ACTIVATE_FRAGMENT = "#activate="
"""The web client's page reads the code from ``/#activate=<code>`` (a fragment never reaches
a server log or a proxy)."""


def address_of(request: web.Request) -> str:
    """The client address (the trusted proxy's ``X-Forwarded-For`` already applied)."""
    return request.remote or "unknown"


async def _body(request: web.Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidPayload("the body must be a JSON object") from None


def _signed_in(request: web.Request, signed: SignedIn) -> web.Response:
    response = web.json_response({"ok": True, "clinician_id": signed.clinician_id,
                                  "access_token": signed.access_token,
                                  "expires_at": signed.expires_at,
                                  "session_ends_at": signed.session_ends_at,
                                  "idle_timeout_s": signed.idle_timeout_s},
                                 headers={"Cache-Control": "no-store"})
    response.set_cookie(REFRESH_COOKIE, signed.refresh_token, path=COOKIE_PATH,
                        max_age=max(1, int(signed.session_ends_at - time.time())),
                        httponly=True, secure=request.secure, samesite="Strict")
    return response


def add_auth_routes(app: web.Application, accounts: Accounts, *, public_url: str) -> None:
    async def sign_in(request: web.Request) -> web.Response:
        m = parse(SignIn, await _body(request))
        signed = await accounts.sign_in(m.clinician_id, m.password, m.totp,
                                        address=address_of(request))
        return _signed_in(request, signed)

    async def refresh(request: web.Request) -> web.Response:
        token = request.cookies.get(REFRESH_COOKIE)
        if not token:
            raise session_ended("no session cookie")
        signed = await accounts.refresh(token, address=address_of(request))
        return _signed_in(request, signed)

    async def sign_out(request: web.Request) -> web.Response:
        ended = await accounts.sign_out(request.cookies.get(REFRESH_COOKIE),
                                        address=address_of(request))
        response = web.json_response({"ok": True, "ended": ended})
        response.del_cookie(REFRESH_COOKIE, path=COOKIE_PATH)
        return response

    async def activate(request: web.Request) -> web.Response:
        m = parse(Activate, await _body(request))
        clinician_id = await accounts.activate(m.code, m.password, totp=m.totp,
                                               enable_totp=m.enable_totp,
                                               address=address_of(request))
        return web.json_response({"ok": True, "clinician_id": clinician_id})

    async def issue_activation(request: web.Request) -> web.Response:
        p = principal_of(request)
        clinician_id = request.match_info["id"]
        clinician = accounts.clinician(clinician_id)
        if clinician is None:
            raise NotFound(f"no clinician {clinician_id!r} in the directory")
        if not permissions.may_issue_activation(p, clinician):
            raise Forbidden(f"clinician {p.id!r} may not issue activation codes for "
                            f"{clinician_id!r} (admins for anyone, site admins for their own "
                            "site's clinicians)")
        issued = await accounts.issue_activation(clinician_id, actor=p.id,
                                                 address=address_of(request))
        base = public_url.rstrip("/") or f"{request.scheme}://{request.host}"
        body: dict[str, Any] = {"ok": True, "clinician_id": clinician_id, "code": issued.code,
                                "link": f"{base}/{ACTIVATE_FRAGMENT}{issued.code}",
                                "expires_at": issued.expires_at}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    app.router.add_post(AUTH_PREFIX + "signin", sign_in)
    app.router.add_post(AUTH_PREFIX + "refresh", refresh)
    app.router.add_post(AUTH_PREFIX + "signout", sign_out)
    app.router.add_post(AUTH_PREFIX + "activate", activate)
    app.router.add_post(r"/api/accounts/{id:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}}/activation",
                        issue_activation)
