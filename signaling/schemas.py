"""Pydantic models of every client payload (socket.io events and HTTP bodies)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)

from signaling.errors import InvalidPayload
from signaling.models import Priority

Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Specialty = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


def _text(max_length: int) -> Any:
    return Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=max_length)
    ]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound="Payload")


class Empty(Payload):
    pass


class RequestConsult(Payload):
    specialty: Specialty
    priority: Priority
    reason: _text(2000)  # type: ignore[valid-type]
    patient_pseudonym: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    ] | None = None


class RequestRef(Payload):
    request_id: Id


class ConsultationRef(Payload):
    consultation_id: Id


class Invite(Payload):
    consultation_id: Id
    site_id: Id


class Chat(Payload):
    consultation_id: Id
    text: _text(4000)  # type: ignore[valid-type]


class End(Payload):
    consultation_id: Id
    conclusion: _text(20000)  # type: ignore[valid-type]


def parse(model: type[M], data: object) -> M:
    """Validate ``data`` against ``model``; InvalidPayload names each bad field but never
    echoes the value (it may hold patient data)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = ".".join(str(p) for p in error["loc"]) or "payload"
            problems.append(f"{field}: {error['msg']}")
        raise InvalidPayload("; ".join(problems)) from None



Sdp = Annotated[str, StringConstraints(min_length=1, max_length=64 * 1024)]
Mid = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
Source = Literal["microphone", "camera", "screen"]


class MediaRef(Payload):
    consultation_id: Id


class MediaJoin(Payload):
    """``media:join``: ``resume`` asks to keep the media the relay still carries for this
    participant (a signaling reconnect, the same relay found again), docs/protocol.md."""

    consultation_id: Id
    resume: StrictBool = False


class Publish(Payload):
    consultation_id: Id
    sdp: Sdp
    sources: dict[Mid, Source] = Field(min_length=1, max_length=3)


class Probe(Payload):
    """``media:probe``: the pre-call check's offer (one data channel, no media; relay/probe.py
    refuses any other)."""

    consultation_id: Id
    sdp: Sdp
    type: Literal["offer"]


class Unpublish(Payload):
    consultation_id: Id
    source: Source


class Answer(Payload):
    consultation_id: Id
    transport_id: Id
    sdp: Sdp


class Candidate(Payload):
    candidate: Annotated[str, StringConstraints(max_length=1024)] = ""
    sdpMid: Mid | None = None
    sdpMLineIndex: Annotated[int, Field(ge=0, le=64)] | None = None
    usernameFragment: Annotated[str, StringConstraints(max_length=256)] | None = None

    @model_validator(mode="after")
    def _placed(self) -> Candidate:
        # aiortc's addIceCandidate raises on a candidate it cannot place on an m-line.
        if self.candidate and self.sdpMid is None and self.sdpMLineIndex is None:
            raise ValueError("a candidate needs sdpMid or sdpMLineIndex")
        return self


class Ice(Payload):
    consultation_id: Id
    transport_id: Id
    candidate: Candidate | None = None


class Mode(Payload):
    consultation_id: Id
    audio_only: StrictBool


class Consent(Payload):
    consultation_id: Id
    agree: StrictBool


# -- relay nodes (signaling/placement.py, namespace /relay) -------------------------------------
class NodeRoom(Payload):
    """A room a relay node still holds: its id is the consultation's."""

    room_id: Id
    participants: list[Id] = Field(default_factory=list, max_length=256)
    recording: StrictBool = False


class NodeHello(Payload):
    """``relay:hello``: what a node holds right after it (re)connected."""

    rooms: list[NodeRoom] = Field(default_factory=list, max_length=10_000)


# -- accounts (signaling/auth_api.py) ----------------------------------------------------------
Password = Annotated[str, StringConstraints(min_length=1, max_length=256)]
TotpCode = Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]
Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,128}$")]


class SignIn(Payload):
    """``POST /api/auth/signin``."""

    clinician_id: Id
    password: Password
    totp: TotpCode | None = None


class Activate(Payload):
    """``POST /api/auth/activate``: set the password with a one-time code (and the first
    TOTP code where a second factor is required or ``enable_totp`` asks for one)."""

    code: Code
    password: Password
    totp: TotpCode | None = None
    enable_totp: StrictBool = False


class TokenRefresh(Payload):
    """``auth:refresh``: a new access token for this connection's clinician."""

    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
