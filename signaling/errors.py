"""Errors of the signaling package. Each carries a stable ``code`` for clients and a message
that names the value that was wrong (never patient data)."""

from __future__ import annotations

from typing import Any


class SignalingError(Exception):
    """Root of every error signaling reports to a client."""

    code = "error"
    http_status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidPayload(SignalingError):
    code = "invalid_payload"
    http_status = 400


class Unauthenticated(SignalingError):
    code = "unauthenticated"
    http_status = 401

    def __init__(self, message: str, *, code: str = "unauthenticated") -> None:
        super().__init__(message)
        self.code = code


class Forbidden(SignalingError):
    code = "forbidden"
    http_status = 403


class RecordingNotAllowed(Forbidden):
    code = "recording_not_allowed"


class NotFound(SignalingError):
    code = "not_found"
    http_status = 404


class NotBuilt(NotFound):
    """A file the web client needs was not installed (its npm packages)."""

    code = "not_built"


class RelayWaiting(SignalingError):
    """The consultation has no relay at the moment (its relay was lost and none other could
    take it, or a restarted signaling waits for its relay node): retry on ``media:moved``."""

    code = "relay_waiting"
    http_status = 503


class AlreadyTaken(SignalingError):
    code = "already_taken"
    http_status = 409


class InvalidState(SignalingError):
    code = "invalid_state"
    http_status = 409


class InvalidEvent(SignalingError):
    """A reserved, non-string or ``*`` event name: never dispatched (signaling.socket_server)."""

    code = "invalid_event"


class RateLimited(SignalingError):
    """A client went over one of its ``[limits]``; it is closed if it keeps going."""

    code = "rate_limited"
    http_status = 429


class TooManyRequests(SignalingError):
    """The clinician already holds ``limits.waiting_requests_per_clinician`` waiting requests."""

    code = "too_many_requests"
    http_status = 429


class DirectoryError(Exception):
    """The directory file (sites and clinicians) is wrong; the message names the entry."""
