"""TURN credentials for browsers behind hospital firewalls.

coturn runs with ``use-auth-secret`` and ``static-auth-secret`` = ``turn.secret`` (the TURN
REST API scheme, draft-uberti-behave-turn-rest-00): signaling and coturn share only that
secret, coturn keeps no user list. A credential is the username ``<unix expiry>:<clinician
id>`` and the password base64(HMAC-SHA1(secret, username)); coturn recomputes the HMAC and
refuses a username whose expiry has passed. The scheme is three lines of ``hmac`` and
``hashlib``: a standard, not a library. Each ``media:join`` (a reconnect too) is handed a
fresh one, valid ``turn.credential_ttl_s``; an allocation made with it stays up past the
expiry as long as the client refreshes it, so a long consultation is not cut off."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from config.settings import TurnSettings
from signaling.tokens import Principal

logger = logging.getLogger(__name__)

IcePolicy = Literal["all", "relay"]


def rest_password(secret: str, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)): the password coturn expects for ``username``."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class TurnCredentials:
    urls: list[str]
    username: str
    """``<unix expiry>:<clinician id>``."""
    credential: str
    expires_at: int
    """Unix seconds, the expiry written into ``username``."""

    def ice_server(self) -> dict[str, Any]:
        """As a browser's ``RTCIceServer``."""
        return {"urls": list(self.urls), "username": self.username,
                "credential": self.credential}


class TurnIssuer:
    """Issues TURN credentials from the ``[turn]`` settings and says which clients must use
    TURN only. Without a secret or URLs TURN is off: no credentials, every policy ``all``."""

    def __init__(self, settings: TurnSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings if settings is not None else TurnSettings()
        self._clock = clock
        self._relay_only = frozenset(self.settings.relay_only_sites)
        if self._relay_only and not self.enabled:
            # A relay-only client without a TURN server gathers no candidate at all: tell
            # IT at start-up rather than leave those sites without media.
            logger.warning("turn.relay_only_sites is set but TURN is off (turn.secret and "
                           "turn.urls are needed); those sites get ice_transport_policy all")

    @property
    def enabled(self) -> bool:
        return bool(self.settings.secret and self.settings.urls)

    def issue(self, clinician_id: str) -> TurnCredentials | None:
        """Fresh credentials for ``clinician_id``, valid ``credential_ttl_s`` from now; None
        when TURN is off."""
        if not self.enabled:
            return None
        expires_at = int(self._clock()) + self.settings.credential_ttl_s
        username = f"{expires_at}:{clinician_id}"
        return TurnCredentials(list(self.settings.urls), username,
                               rest_password(self.settings.secret, username), expires_at)

    def policy(self, principal: Principal) -> IcePolicy:
        """``relay`` for clinicians of ``relay_only_sites`` (when TURN is on), else ``all``."""
        if self.enabled and principal.site.id in self._relay_only:
            return "relay"
        return "all"
