"""Errors of the relay. Each has a stable ``code`` for clients and names the wrong value."""

from __future__ import annotations


class RelayError(Exception):
    code = "relay_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadSdp(RelayError):
    code = "bad_sdp"


class AlreadyPublished(RelayError):
    code = "already_published"


class UnknownRoom(RelayError):
    code = "unknown_room"


class NotInRoom(RelayError):
    code = "not_in_room"


class UnsupportedCodec(RelayError):
    code = "unsupported_codec"


class NegotiationPending(RelayError):
    """An offer of the subscribe connection still waits for its answer."""

    code = "invalid_state"


class MediaPortsExhausted(RelayError):
    """Every UDP port of ``relay.udp_port_range`` is taken: the connection that needed one
    is refused, the others go on."""

    code = "media_ports_exhausted"


class RelayCannotStart(RelayError, RuntimeError):
    """Found at start-up: the relay cannot serve at all (``telehealth`` exits with the
    message)."""

    code = "relay_cannot_start"


class HookMissing(RelayCannotStart):
    """An aiortc/aioice internal the relay relies on is missing: wrong version."""


class UdpPortsUnavailable(RelayCannotStart):
    """``relay.udp_port`` cannot be bound, or ``relay.udp_port_range`` is invalid or has no
    free port."""

    code = "udp_ports_unavailable"
