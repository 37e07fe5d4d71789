"""AccessToken: an HS256 JWT naming the clinician, site, roles, specialties and expiry."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from relay.api import MAX_WORKERS, worker_relay_id
from signaling.directory import Directory
from signaling.errors import Unauthenticated
from signaling.models import Clinician, Site

logger = logging.getLogger(__name__)

ALGORITHM = "HS256"
ISSUER = "telehealth-bridge"
SECRET_FILE = "token-secret"


def load_or_create_secret(configured: str, data_dir: Path) -> str:
    """The configured secret, else the one generated once into ``data_dir`` (mode 0600)."""
    if configured:
        return configured
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text(encoding="ascii").strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secret + "\n")
    logger.info("generated a new token secret in %s", path)
    return secret


@dataclass(frozen=True)
class Principal:
    """Who is calling: the clinician, their site, and the roles and specialties granted to
    this session (the token's grants, limited to what the directory gives the clinician)."""

    clinician: Clinician
    site: Site
    roles: frozenset[str]
    specialties: frozenset[str]
    expires_at: float

    @property
    def id(self) -> str:
        return self.clinician.id

    def has(self, role: str) -> bool:
        return role in self.roles


NODE_KIND = "relay-node"


class TokenAuthority:
    """Issues and verifies access tokens against the directory."""

    def __init__(self, secret: str, directory: Directory, ttl_s: int) -> None:
        self._secret = secret
        self._directory = directory
        self._ttl_s = ttl_s

    def issue(
        self, clinician_id: str, *, ttl_s: int | None = None, now: float | None = None
    ) -> str:
        clinician = self._directory.clinician(clinician_id)
        if clinician is None:
            raise KeyError(f"no clinician {clinician_id!r} in the directory")
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": clinician.id,
            "site": clinician.site_id,
            "roles": sorted(clinician.roles),
            "specialties": sorted(clinician.specialties),
            "iat": issued,
            "exp": issued + (ttl_s if ttl_s is not None else self._ttl_s),
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: object) -> Principal:
        """Return the principal, or raise Unauthenticated with a code and a reason."""
        if not token or not isinstance(token, str):
            raise Unauthenticated("an access token is required", code="token_missing")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the access token has expired", code="token_expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the access token is invalid: {exc}",
                                  code="token_invalid") from None
        clinician = self._directory.clinician(str(claims["sub"]))
        if clinician is None:
            raise Unauthenticated(f"clinician {claims['sub']!r} is not in the directory",
                                  code="unknown_clinician")
        if claims.get("site") != clinician.site_id:
            raise Unauthenticated(
                f"the token is for site {claims.get('site')!r}, but clinician {clinician.id!r} "
                f"belongs to site {clinician.site_id!r}",
                code="site_mismatch",
            )
        site = self._directory.site(clinician.site_id)
        assert site is not None  # the directory guarantees it
        roles = frozenset(str(r) for r in claims.get("roles") or []) & clinician.roles
        specialties = (
            frozenset(str(s) for s in claims.get("specialties") or []) & clinician.specialties
        )
        return Principal(clinician, site, roles, specialties, float(claims["exp"]))

    def issue_node(self, relay_id: str, *, ttl_s: int = 365 * 24 * 3600,
                   now: float | None = None) -> str:
        """A token a standalone relay node presents when it dials in."""
        issued = int(now if now is not None else time.time())
        claims = {"iss": ISSUER, "sub": relay_id, "kind": NODE_KIND, "iat": issued,
                  "exp": issued + ttl_s}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify_node(self, token: object, worker: object = None) -> str:
        """The relay id a node token names, or Unauthenticated. ``worker`` (the connect
        auth's, relay/workers.py): the node is worker k of that machine and registers as
        ``relay.api.worker_relay_id`` of the token's relay id."""
        if worker is not None and (isinstance(worker, bool) or not isinstance(worker, int)
                                   or not 0 <= worker < MAX_WORKERS):
            raise Unauthenticated(f"worker must be a whole number 0-{MAX_WORKERS - 1}, "
                                  f"got {worker!r}", code="invalid_registration")
        if not token or not isinstance(token, str):
            raise Unauthenticated("a node token is required", code="token_missing")
        try:
            claims = jwt.decode(token, self._secret, algorithms=[ALGORITHM], issuer=ISSUER,
                                options={"require": ["exp", "sub", "iss"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the node token has expired", code="token_expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the node token is invalid: {exc}",
                                  code="token_invalid") from None
        if claims.get("kind") != NODE_KIND:
            raise Unauthenticated("this is not a relay node token", code="token_invalid")
        relay_id = str(claims["sub"])
        return relay_id if worker is None else worker_relay_id(relay_id, worker)
