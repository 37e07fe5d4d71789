"""Single sign-on against a real OpenID Connect provider: the certified ``oidc-provider``
package from npm (tests/oidc_provider/, started here with node on 127.0.0.1 and an ephemeral
port). A browser is played with aiohttp and a cookie jar: /api/auth/oidc/start, the
provider's login and consent forms (its devInteractions), the callback, the refresh cookie,
/api/auth/refresh, and a socket.io connection with the access token. Refusals: a tampered
state, a replayed callback, a wrong nonce, an unknown clinician, a missing claim, the user
aborting at the provider; each a clear code in the fragment, audited, and no hospital login
or claim value in the logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.common.urls import add_params_to_uri  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from joserfc.jwk import KeySet, RSAKey
from yarl import URL

from recorder.audit import AUDIT_LOG, AuditLog
from signaling.auth_api import REFRESH_COOKIE
from signaling.oidc import OIDC, OidcFailure
from tests.support import Client, Server, run_server, write_config
from tests.web.browser import CHROMIUM, CHROMIUM_PRESENT, FLAGS, chromium

PROVIDER_DIR = Path(__file__).resolve().parents[1] / "oidc_provider"
CLIENT_ID = "telehealth-bridge"
HOSPITAL_LOGIN = "an.nguyen@bv-cho-ray.example"
GHOST_LOGIN = "khach@bv-cho-ray.example"
GHOST_CLAIM = "bs-khong-co-trong-danh-ba"
ACCOUNTS = {
    HOSPITAL_LOGIN: {"clinician_id": "cardio1", "name": "Nguyễn Văn An"},
    GHOST_LOGIN: {"clinician_id": GHOST_CLAIM, "name": "Khách"},
    "binh.tran@bv-cho-ray.example": {"clinician_id": "ref1"},
}
CALLBACK = "/api/auth/oidc/callback"
OTHER_CLIENT = "hospital-pharmacy"
OTHER = "/pharmacy"


class Provider:
    """oidc-provider in a node process; its issuer URL once started."""

    def __init__(self, process: asyncio.subprocess.Process, issuer: str) -> None:
        self.process = process
        self.issuer = issuer

    async def _line(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            stderr = await self.process.stderr.read() if self.process.stderr else b""
            raise AssertionError(f"oidc-provider exited: {stderr.decode()[-2000:]}")
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    async def register(self, redirect_uri: str, secret: str) -> None:
        """Our server as a client (public, or confidential with ``secret``; PKCE required
        either way), another application of the hospital as a second one, and the
        accounts."""
        assert self.process.stdin is not None
        clients: list[dict[str, Any]] = [
            {"client_id": client_id, "token_endpoint_auth_method": "none",
             "redirect_uris": [uri], "grant_types": ["authorization_code"],
             "response_types": ["code"]}
            for client_id, uri in ((CLIENT_ID, redirect_uri), (OTHER_CLIENT,
                                                               redirect_uri + OTHER))]
        if secret:
            clients[0].update(token_endpoint_auth_method="client_secret_basic",
                              client_secret=secret)
        setup = {"clients": clients, "accounts": ACCOUNTS}
        self.process.stdin.write((json.dumps(setup) + "\n").encode())
        await self.process.stdin.drain()
        assert (await self._line()) == {"ready": True}


@contextlib.asynccontextmanager
async def provider(host: str = "127.0.0.1") -> AsyncIterator[Provider]:
    node = shutil.which("node")
    assert node, "node is required (make test installs it)"
    assert (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir(), \
        "run `npm ci` in tests/oidc_provider (make test does)"
    process = await asyncio.create_subprocess_exec(
        node, str(PROVIDER_DIR / "provider.mjs"), cwd=PROVIDER_DIR,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "ISSUER_HOST": host})
    try:
        started = Provider(process, "")
        started.issuer = (await started._line())["issuer"]
        yield started
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, secret: str = "", host: str = "127.0.0.1",
                ) -> AsyncIterator[Server]:
    """The provider, then the server configured with its issuer, then the server's
    callback registered at the provider (it names the server's ephemeral port)."""
    async with provider(host) as idp:
        config = write_config(tmp_path, oidc={"issuer": idp.issuer, "client_id": CLIENT_ID,
                                              "client_secret": secret,
                                              "scopes": ["openid", "clinician"],
                                              "clinician_claim": "clinician_id"})
        async with run_server(config) as server:
            await idp.register(server.url + CALLBACK, secret)
            yield server


def browser() -> aiohttp.ClientSession:
    # unsafe: the jar keeps cookies of IP-address hosts (127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 timeout=aiohttp.ClientTimeout(total=10))


async def to_callback(session: aiohttp.ClientSession, server: Server, login: str | None,
                      *, abort: bool = False) -> str:
    """Start a sign-in and go through the provider's forms as ``login``; the callback URL
    the provider redirects to (not followed, so a test can tamper with it)."""
    return await through_provider(session, server.url + "/api/auth/oidc/start",
                                  server.url + CALLBACK, login, abort=abort)


async def through_provider(session: aiohttp.ClientSession, url: str, redirect_uri: str,
                           login: str | None, *, abort: bool = False) -> str:
    """Follow redirects from ``url`` through the provider's login (as ``login``, or its
    cancel link) and consent forms, up to the redirect to ``redirect_uri``: that URL."""
    for _ in range(12):
        async with session.get(url, allow_redirects=False) as response:
            if response.status in (302, 303):
                url = str(response.url.join(URL(response.headers["Location"])))
                if url.startswith(redirect_uri):
                    return url
                continue
            assert response.status == 200, (response.status, await response.text())
            page = await response.text()
        action = re.search(r'<form[^>]*action="([^"]+)"', page)
        assert action, page[:500]
        form = {"prompt": "consent"}
        if 'name="prompt" value="login"' in page:
            if abort:
                url = url.split("?")[0].rstrip("/") + "/abort"
                continue
            form = {"prompt": "login", "login": login or "", "password": "any"}
        async with session.post(action.group(1).replace("&amp;", "&"), data=form,
                                allow_redirects=False) as response:
            assert response.status in (302, 303), (response.status, await response.text())
            url = str(response.url.join(URL(response.headers["Location"])))
    raise AssertionError("the provider did not redirect to the callback in 12 steps")


async def finish(session: aiohttp.ClientSession, callback_url: str) -> str:
    """The callback's redirect (the web client's page, maybe with #signin-error=)."""
    async with session.get(callback_url, allow_redirects=False) as response:
        assert response.status == 302, (response.status, await response.text())
        assert response.headers["Cache-Control"] == "no-store"
        return response.headers["Location"]


def with_state(url: str, state: str) -> str:
    parts = urlsplit(url)
    query = [(k, state if k == "state" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def oidc_audit(server: Server) -> list[dict[str, Any]]:
    log = AuditLog(server.settings.archive_dir() / AUDIT_LOG)
    return [e for e in log.entries() if e["detail"].get("method") == "oidc"]


async def test_sign_in_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    async with setup(tmp_path) as server, browser() as session:
        async with session.get(server.url + "/api/auth/oidc/config") as response:
            assert await response.json() == {"enabled": True,
                                             "start": "/api/auth/oidc/start"}
        callback = await to_callback(session, server, HOSPITAL_LOGIN)
        assert await finish(session, callback) == server.url + "/"
        cookies = {c.key: c for c in session.cookie_jar}
        refresh_cookie = cookies[REFRESH_COOKIE]
        assert refresh_cookie["httponly"] and refresh_cookie["samesite"] == "Strict"
        assert refresh_cookie["path"] == "/api/auth/"

        # What the web client does after any page load: its access token from the cookie.
        async with session.post(server.url + "/api/auth/refresh") as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert body["clinician_id"] == "cardio1"
        assert server.tokens.verify(body["access_token"]).id == "cardio1"
        client = await Client(server.url, body["access_token"]).connect()
        try:
            assert client.sio.connected
        finally:
            await client.close()

        # The same callback again (a replayed URL): the flow is used up.
        assert await finish(session, callback) == server.url + "/#signin-error=state_mismatch"

        # The issuer rotated its keys: the cached JWKS knows no key of the token's kid, so
        # it is read again (here: our cache holds some other key, fetched a minute ago).
        assert server.app is not None
        rp = server.app[OIDC]
        rp._keys = KeySet([RSAKey.generate_key(2048, parameters={"kid": "retired"})])
        rp._keys_at -= 60
        callback = await to_callback(session, server, HOSPITAL_LOGIN)
        assert await finish(session, callback) == server.url + "/"
        assert rp._keys is not None and "retired" not in {k.kid for k in rp._keys.keys}

        entries = oidc_audit(server)
        assert [(e["action"], e["actor"]) for e in entries] == [
            ("auth.signin", "cardio1"), ("auth.signin_failed", "unknown"),
            ("auth.signin", "cardio1")]
        assert entries[1]["detail"]["reason"] == "state_mismatch"
    assert HOSPITAL_LOGIN not in caplog.text and "Nguyễn" not in caplog.text
    assert "cardio1 signed in (oidc)" in caplog.text
    print(f"OIDC sign-in end to end (provider start included): "
          f"{time.monotonic() - started:.2f} s")


async def test_chromium_keeps_the_session_across_the_cross_site_redirects(
        tmp_path: Path) -> None:
    """Real Chromium, the issuer on another site (localhost) than the server (127.0.0.1):
    the flow cookie (SameSite=Lax) comes back with the issuer's redirect, the refresh cookie
    (SameSite=Strict) set on that cross-site navigation's answer is stored, and the page's
    own request to /api/auth/refresh carries it. The web client's script is kept from
    running (its own refresh would race the test's: a refresh token is good once)."""
    assert CHROMIUM_PRESENT, f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    async with setup(tmp_path, host="localhost") as server, chromium(FLAGS) as launched:
        page = await launched.new_page()
        await page.route("**/app/src/**", lambda route: route.abort())
        await page.goto(server.url + "/api/auth/oidc/start")
        assert page.url.startswith("http://localhost:"), page.url
        await page.fill("input[name=login]", HOSPITAL_LOGIN)
        await page.fill("input[name=password]", "any")
        await page.click("button[type=submit]")
        await page.wait_for_url("http://localhost:*/interaction/**", timeout=10_000)
        async with page.expect_navigation(url=server.url + "/", timeout=10_000):
            await page.click("button[type=submit]")
        status, body = await page.evaluate(
            "fetch('/api/auth/refresh', {method: 'POST'})"
            ".then(async (r) => [r.status, await r.json()])")
        assert status == 200, body
        assert server.tokens.verify(body["access_token"]).id == "cardio1"
        cookies = {c["name"]: c for c in await page.context.cookies(server.url + "/api/auth/")}
        assert cookies[REFRESH_COOKIE]["httpOnly"]
        assert cookies[REFRESH_COOKIE]["sameSite"] == "Strict"


async def test_refusals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    error = "/#signin-error="
    async with setup(tmp_path) as server, browser() as session:
        # A tampered state: the cookie's flow is used up, nothing else happens.
        callback = await to_callback(session, server, HOSPITAL_LOGIN)
        tampered = with_state(callback, "0" * 43)
        assert await finish(session, tampered) == server.url + error + "state_mismatch"
        assert await finish(session, callback) == server.url + error + "state_mismatch"

        # A callback without this browser's cookie (login CSRF: someone else's URL).
        callback = await to_callback(session, server, HOSPITAL_LOGIN)
        async with browser() as other:
            assert await finish(other, callback) == server.url + error + "state_mismatch"

        # The ID token carries the nonce the provider was given; ours differs: refused.
        callback = await to_callback(session, server, HOSPITAL_LOGIN)
        state = dict(parse_qsl(urlsplit(callback).query))["state"]
        assert server.app is not None
        server.app[OIDC].flows[state].nonce = "not-the-nonce-sent"
        assert await finish(session, callback) == server.url + error + "bad_id_token"

        # Other people, each in their own browser (this one keeps its provider session).
        # A real account at the hospital whose claim names no clinician of the directory.
        async with browser() as ghost:
            callback = await to_callback(ghost, server, GHOST_LOGIN)
            assert await finish(ghost, callback) == server.url + error + "unknown_clinician"
            assert REFRESH_COOKIE not in {c.key for c in ghost.cookie_jar}
            async with ghost.post(server.url + "/api/auth/refresh") as response:
                assert response.status == 401

        # An account without the claim at all.
        async with browser() as visitor:
            callback = await to_callback(visitor, server, "visitor")
            assert await finish(visitor, callback) == server.url + error + "no_clinician_claim"

        # The user cancels at the provider: it answers access_denied.
        async with browser() as cancels:
            callback = await to_callback(cancels, server, None, abort=True)
            assert "error=access_denied" in callback
            assert await finish(cancels, callback) == server.url + error + "provider_error"

        assert REFRESH_COOKIE not in {c.key for c in session.cookie_jar}
        reasons = [e["detail"]["reason"] for e in oidc_audit(server)]
        assert reasons == ["state_mismatch", "state_mismatch", "state_mismatch",
                           "bad_id_token", "unknown_clinician", "no_clinician_claim",
                           "provider_error"]
        assert all(e["action"] == "auth.signin_failed" for e in oidc_audit(server))
    text = caplog.text
    for personal in (HOSPITAL_LOGIN, GHOST_LOGIN, GHOST_CLAIM, "visitor", "Khách"):
        assert personal not in text, personal
    assert "refused: bad_id_token (InvalidClaimError" in text and "nonce" in text
    assert "refused: unknown_clinician" in text


async def test_confidential_client_and_a_deactivated_clinician(tmp_path: Path) -> None:
    """With a client secret (HTTP Basic at the token endpoint, form-encoded first: the
    secret has characters that need it) the sign-in works as with PKCE alone; a clinician
    the directory has deactivated is refused although the hospital still vouches for them."""
    async with setup(tmp_path, secret="s3cr:t/+%9&=;ok") as server:
        async with browser() as session:
            callback = await to_callback(session, server, HOSPITAL_LOGIN)
            assert await finish(session, callback) == server.url + "/"
        async with browser() as admin:
            async with admin.post(server.url + "/api/directory/clinicians/ref1/deactivate",
                                  headers={"Authorization":
                                           f"Bearer {server.token('admin')}"}) as response:
                assert response.status == 200, await response.text()
        async with browser() as session:
            callback = await to_callback(session, server, "binh.tran@bv-cho-ray.example")
            assert await finish(session, callback) == \
                server.url + "/#signin-error=unknown_clinician"


async def test_id_token_for_another_client(tmp_path: Path) -> None:
    """An ID token the issuer really signed, for the same user, but issued to another
    application of the hospital (obtained here as that application would): refused for its
    audience. (Through the callback it cannot arrive: the token endpoint gives a code's
    tokens only to the client the code was issued to.)"""
    async with setup(tmp_path) as server, browser() as session:
        assert server.app is not None
        rp = server.app[OIDC]
        meta = await rp.metadata()
        verifier, nonce = generate_token(64), generate_token(32)
        redirect_uri = server.url + CALLBACK + OTHER
        authorize = add_params_to_uri(meta["authorization_endpoint"], [
            ("response_type", "code"), ("client_id", OTHER_CLIENT),
            ("redirect_uri", redirect_uri), ("scope", "openid clinician"),
            ("state", generate_token(32)), ("nonce", nonce),
            ("code_challenge", create_s256_code_challenge(verifier)),
            ("code_challenge_method", "S256")])
        back = await through_provider(session, authorize, redirect_uri, HOSPITAL_LOGIN)
        code = dict(parse_qsl(urlsplit(back).query))["code"]
        async with session.post(meta["token_endpoint"], data={
                "grant_type": "authorization_code", "code": code, "client_id": OTHER_CLIENT,
                "redirect_uri": redirect_uri, "code_verifier": verifier}) as response:
            assert response.status == 200, await response.text()
            id_token = (await response.json())["id_token"]
        with pytest.raises(OidcFailure) as refused:
            await rp._verify(id_token, nonce, None)
        assert refused.value.code == "bad_id_token"
        assert "'aud'" in refused.value.detail


async def test_not_configured(tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server, browser() as session:
        async with session.get(server.url + "/api/auth/oidc/config") as response:
            assert await response.json() == {"enabled": False, "start": None}
        async with session.get(server.url + "/api/auth/oidc/start",
                               allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == \
                server.url + "/#signin-error=oidc_unavailable"
