"""Single sign-on: this server as an OpenID Connect relying party of the hospital's issuer
(``[oidc]``), authorization code flow with PKCE. See docs/protocol.md, "Single sign-on".

The browser goes to ``GET /api/auth/oidc/start``, which sends it to the issuer's
authorization endpoint with a fresh ``state``, ``nonce`` and PKCE S256 challenge. The issuer
sends it back to ``GET /api/auth/oidc/callback`` with a code; the server exchanges the code
(with the PKCE verifier) for an ID token, verifies its signature against the issuer's JWKS and
its ``iss``, ``aud``, ``exp`` and ``nonce``, reads the clinician id from the configured claim
(the ID token's, else the userinfo endpoint's for the same ``sub``), and, when the directory
holds that clinician active, starts a session exactly like a password sign-in
(``Accounts.start_session``: the ``telehealth_refresh`` cookie), then redirects to the web
client, which calls ``/api/auth/refresh`` for its access token as after any page load. A
failure redirects to ``/#signin-error=<code>`` (a fragment reaches no server log).

The ``state``, ``nonce`` and PKCE verifier stay in this process (a bounded table that forgets
a flow after ``flow_ttl_s``): the verifier never leaves the server. The browser only holds the
state in the ``telehealth_oidc`` cookie (HttpOnly, SameSite=Lax: the issuer's redirect is a
cross-site top-level navigation, which Strict would strip; scoped to ``/api/auth/oidc/``), and
the callback must present the same state in its query and its cookie: a callback URL made by
someone else (login CSRF: the victim signed in as the attacker) finds no cookie, and a flow is
used once. One process holds the table: behind several processes the issuer's redirect must
reach the process that started the flow (the product runs one signaling process).

The protocol pieces come from Authlib, not written here: PKCE (``authlib.oauth2.rfc7636``),
random values (``authlib.common.security``), the ID token's claim rules
(``authlib.oidc.core.CodeIDToken``: ``iss``, ``aud``, ``exp``, ``iat``, ``nonce``, ``azp``,
``at_hash``) and the signature check with joserfc, the JOSE library Authlib itself depends on
and uses for this (``authlib.jose`` is deprecated in its favour). HTTP goes through aiohttp,
the server's own client library: Authlib's async clients are built on httpx, a second HTTP
stack for four requests.

Nothing personal is logged: neither the issuer's subject nor a claim value that matched no
clinician (it may be an e-mail address); refused sign-ins are audited as
``auth.signin_failed`` with ``method = "oidc"`` and the code.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.common.urls import add_params_to_uri  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from authlib.oidc.core import CodeIDToken  # type: ignore[import-untyped]
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from config.settings import OidcSettings
from recorder.audit import AuditLog
from signaling.accounts import Accounts, SignedIn
from signaling.auth_api import COOKIE_PATH, REFRESH_COOKIE, address_of
from signaling.errors import NotFound

logger = logging.getLogger(__name__)

PREFIX = "/api/auth/oidc/"
FLOW_COOKIE = "telehealth_oidc"
ERROR_FRAGMENT = "#signin-error="
MAX_FLOWS = 10_000
"""Sign-ins started and not finished that are remembered; the oldest are forgotten first
(a flood of ``/start`` costs memory only up to this)."""
METADATA_TTL_S = 3600.0
"""The discovery document is read again after this long (an issuer may move endpoints)."""
JWKS_MIN_REFETCH_S = 10.0
"""An ID token signed with a key we do not know makes us read the JWKS again (the issuer
rotated its keys), at most this often: forged kids must not make us hammer the issuer."""
LEEWAY_S = 60
"""Clock difference tolerated between the issuer and this server (``exp``, ``iat``)."""
ASYMMETRIC = ("RS", "PS", "ES", "Ed")


class OidcFailure(Exception):
    """A refused single sign-on. ``code`` goes to the browser (``#signin-error=<code>``) and
    the audit log; ``detail`` only to the log, and holds nothing personal."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class Flow:
    """A started sign-in, kept here until its callback (or ``flow_ttl_s``)."""

    verifier: str
    nonce: str
    redirect_uri: str
    started_at: float


class RelyingParty:
    """This server at the issuer of ``settings``. ``await close()`` at the end."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self.flows: OrderedDict[str, Flow] = OrderedDict()
        self._http: aiohttp.ClientSession | None = None
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.issuer)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- the issuer over HTTP ---------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.http_timeout_s),
                headers={"Accept": "application/json"})
        return self._http

    async def _json(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with self._session().request(method, url, **kwargs) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                if response.status != 200 or not isinstance(body, dict):
                    error = body.get("error") if isinstance(body, dict) else None
                    raise OidcFailure("token_failed" if what == "token" else "oidc_unavailable",
                                      f"{what} answered HTTP {response.status}"
                                      f"{f' {error}' if isinstance(error, str) else ''}")
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OidcFailure("oidc_unavailable",
                              f"{what} unreachable: {type(exc).__name__}") from None

    async def metadata(self) -> dict[str, Any]:
        """The issuer's discovery document (cached for ``METADATA_TTL_S``)."""
        now = time.monotonic()
        if self._metadata is not None and now - self._metadata_at < METADATA_TTL_S:
            return self._metadata
        issuer = self.settings.issuer.rstrip("/")
        meta = await self._json("GET", issuer + "/.well-known/openid-configuration",
                                "discovery")
        # OpenID Connect Discovery 4.3: the document must name the issuer we asked.
        if meta.get("issuer") != self.settings.issuer:
            raise OidcFailure("oidc_unavailable", "the discovery document names another "
                              "issuer than [oidc] issuer")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(meta.get(key), str):
                raise OidcFailure("oidc_unavailable", f"the discovery document has no {key}")
        methods = meta.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise OidcFailure("oidc_unavailable", "the issuer does not support PKCE S256")
        self._metadata, self._metadata_at = meta, now
        return meta

    async def _key_set(self, *, refresh: bool = False) -> KeySet:
        now = time.monotonic()
        if self._keys is not None and not refresh:
            return self._keys
        if self._keys is not None and now - self._keys_at < JWKS_MIN_REFETCH_S:
            return self._keys
        meta = await self.metadata()
        document = await self._json("GET", meta["jwks_uri"], "jwks")
        try:
            self._keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise OidcFailure("oidc_unavailable",
                              f"the issuer's JWKS is unusable: {type(exc).__name__}") from None
        self._keys_at = now
        return self._keys

    # -- the flow ---------------------------------------------------------------------------
    async def start(self, redirect_uri: str) -> tuple[str, str]:
        """The issuer's authorization URL for a new flow, and its state."""
        meta = await self.metadata()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        self.flows[state] = Flow(verifier, nonce, redirect_uri, time.monotonic())
        while len(self.flows) > MAX_FLOWS:
            self.flows.popitem(last=False)
        url: str = add_params_to_uri(meta["authorization_endpoint"], [
            ("response_type", "code"), ("client_id", self.settings.client_id),
            ("redirect_uri", redirect_uri), ("scope", " ".join(self.settings.scopes)),
            ("state", state), ("nonce", nonce),
            ("code_challenge", create_s256_code_challenge(verifier)),
            ("code_challenge_method", "S256")])
        return url, state

    def take(self, state: str | None, cookie_state: str | None) -> Flow:
        """The flow of ``state``, used up; the state of the query must be the cookie's."""
        flow = self.flows.pop(cookie_state, None) if cookie_state else None
        if flow is None or not state or state != cookie_state:
            raise OidcFailure("state_mismatch", "no sign-in started in this browser has this "
                              "state" if flow is None else "the state differs from the cookie's")
        if time.monotonic() - flow.started_at > self.settings.flow_ttl_s:
            raise OidcFailure("state_mismatch", "the sign-in took longer than flow_ttl_s")
        return flow

    async def finish(self, flow: Flow, code: str) -> str:
        """The clinician id the issuer vouches for, from the authorization ``code``."""
        s = self.settings
        meta = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": flow.redirect_uri, "code_verifier": flow.verifier}
        headers = {}
        if s.client_secret:
            # client_secret_basic: RFC 6749 2.3.1 form-encodes both before Basic.
            headers["Authorization"] = aiohttp.encode_basic_auth(
                quote(s.client_id, safe=""), quote(s.client_secret, safe=""))
        else:
            form["client_id"] = s.client_id
        tokens = await self._json("POST", meta["token_endpoint"], "token", data=form,
                                  headers=headers)
        id_token, access_token = tokens.get("id_token"), tokens.get("access_token")
        if not isinstance(id_token, str):
            raise OidcFailure("bad_id_token", "the token response has no id_token")
        claims = await self._verify(id_token, flow.nonce,
                                    access_token if isinstance(access_token, str) else None)
        value = claims.get(s.clinician_claim)
        if value is None and isinstance(access_token, str) and \
                isinstance(meta.get("userinfo_endpoint"), str):
            # Many issuers put profile claims only in userinfo (OIDC Core 5.4).
            info = await self._json("GET", meta["userinfo_endpoint"], "userinfo",
                                    headers={"Authorization": f"Bearer {access_token}"})
            if info.get("sub") != claims.get("sub"):
                raise OidcFailure("bad_id_token", "userinfo is about another subject")
            value = info.get(s.clinician_claim)
        if not isinstance(value, str) or not value:
            raise OidcFailure("no_clinician_claim",
                              f"neither the ID token nor userinfo has the claim "
                              f"{s.clinician_claim!r}")
        return value

    async def _verify(self, id_token: str, nonce: str,
                      access_token: str | None) -> dict[str, Any]:
        meta = await self.metadata()
        offered = meta.get("id_token_signing_alg_values_supported")
        algorithms = [a for a in offered if isinstance(a, str) and a.startswith(ASYMMETRIC)] \
            if isinstance(offered, list) else ["RS256"]
        registry = JWSRegistry(algorithms=algorithms or ["RS256"], strict_check_header=False)
        try:
            try:
                token = jwt.decode(id_token, await self._key_set(), registry=registry)
            except InvalidKeyIdError:
                token = jwt.decode(id_token, await self._key_set(refresh=True),
                                   registry=registry)
            claims = CodeIDToken(
                token.claims, token.header,
                {"iss": {"essential": True, "value": self.settings.issuer},
                 "aud": {"essential": True, "value": self.settings.client_id},
                 "exp": {"essential": True}},
                {"nonce": nonce, "client_id": self.settings.client_id,
                 "access_token": access_token})
            claims.validate(leeway=LEEWAY_S)
        except (JoseError, ValueError) as exc:
            # The exception's name and message name the claim, never its value.
            raise OidcFailure("bad_id_token", f"{type(exc).__name__}: {exc}") from None
        return dict(claims)


OIDC = web.AppKey("oidc", RelyingParty)


def add_oidc_routes(app: web.Application, settings: OidcSettings, accounts: Accounts,
                    audit: AuditLog, *, public_url: str) -> None:
    """``GET /api/auth/oidc/config``, ``/start`` and ``/callback`` (open routes, under
    ``/api/auth/``). The config route answers whether single sign-on is configured, so the
    sign-in page shows its button only then."""
    rp = RelyingParty(settings)
    app[OIDC] = rp

    def base(request: web.Request) -> str:
        return public_url.rstrip("/") or f"{request.scheme}://{request.host}"

    def redirect(location: str) -> web.Response:
        return web.Response(status=302, headers={"Location": location,
                                                 "Cache-Control": "no-store"})

    async def refused(request: web.Request, failure: OidcFailure) -> web.Response:
        address = address_of(request)
        logger.info("oidc: sign-in from %s refused: %s (%s)", address, failure.code,
                    failure.detail)
        try:
            await audit.append_async("unknown", "auth.signin_failed", None,
                                     {"method": "oidc", "reason": failure.code,
                                      "address": address})
        except OSError:
            logger.exception("audit: could not append auth.signin_failed (oidc)")
        response = redirect(f"{base(request)}/{ERROR_FRAGMENT}{failure.code}")
        response.del_cookie(FLOW_COOKIE, path=PREFIX)
        return response

    async def config(request: web.Request) -> web.Response:
        return web.json_response({"enabled": rp.enabled,
                                  "start": PREFIX + "start" if rp.enabled else None})

    async def start(request: web.Request) -> web.Response:
        if not rp.enabled:
            return await refused(request, OidcFailure("oidc_unavailable",
                                                      "no [oidc] issuer is configured"))
        try:
            url, state = await rp.start(base(request) + PREFIX + "callback")
        except OidcFailure as failure:
            return await refused(request, failure)
        response = redirect(url)
        response.set_cookie(FLOW_COOKIE, state, path=PREFIX, max_age=settings.flow_ttl_s,
                            httponly=True, secure=request.secure, samesite="Lax")
        return response

    async def callback(request: web.Request) -> web.Response:
        query = request.query
        try:
            if not rp.enabled:
                raise OidcFailure("oidc_unavailable", "no [oidc] issuer is configured")
            flow = rp.take(query.get("state"), request.cookies.get(FLOW_COOKIE))
            error = query.get("error")
            if error is not None:
                # The issuer's own code (access_denied, login_required...) is not personal.
                raise OidcFailure("provider_error", f"the issuer answered {error[:64]!r}")
            code = query.get("code")
            if not code:
                raise OidcFailure("provider_error", "the callback has no code")
            clinician_id = await rp.finish(flow, code)
            if accounts.clinician(clinician_id) is None:
                raise OidcFailure("unknown_clinician", "the claim names no active clinician "
                                  "of the directory")
            try:
                signed = await accounts.start_session(clinician_id,
                                                      address=address_of(request),
                                                      method="oidc")
            except NotFound:  # deactivated meanwhile
                raise OidcFailure("unknown_clinician", "the clinician was just removed from "
                                  "the directory") from None
        except OidcFailure as failure:
            return await refused(request, failure)
        response = redirect(base(request) + "/")
        response.del_cookie(FLOW_COOKIE, path=PREFIX)
        _set_refresh_cookie(response, request, signed)
        return response

    async def close(app: web.Application) -> None:
        await rp.close()

    app.router.add_get(PREFIX + "config", config)
    app.router.add_get(PREFIX + "start", start)
    app.router.add_get(PREFIX + "callback", callback)
    app.on_cleanup.append(close)


def _set_refresh_cookie(response: web.Response, request: web.Request,
                        signed: SignedIn) -> None:
    """The refresh cookie exactly as ``auth_api`` sets it after a password sign-in. Set on
    the answer to the issuer's cross-site redirect it is still stored (SameSite restricts
    which requests carry a cookie, not which responses set one); the web client's own
    ``/api/auth/refresh`` is same-site and carries it."""
    response.set_cookie(REFRESH_COOKIE, signed.refresh_token, path=COOKIE_PATH,
                        max_age=max(1, int(signed.session_ends_at - time.time())),
                        httponly=True, secure=request.secure, samesite="Strict")
