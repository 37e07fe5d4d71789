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


class HookMissing(RuntimeError):
    """An aiortc internal the relay relies on is missing: wrong aiortc version."""
