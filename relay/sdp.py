"""Session descriptions as the relay reads and writes them: checking a client's SDP, the codec
each m-line settled on, the codecs the relay accepts or offers, the announced address, and the
peer connections both sides of a participant use."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from aiortc.sdp import MediaDescription, SessionDescription, candidate_from_sdp

from relay.config import MediaConfig
from relay.errors import BadSdp

logger = logging.getLogger(__name__)

MAX_SDP_BYTES = 64 * 1024


@dataclass(frozen=True)
class Codec:
    """The codec an m-line settled on: what a subscriber leg must offer to carry the same
    payloads untouched."""

    mime_type: str
    """``video/VP8``, ``video/H264``, ``audio/opus``."""
    clock_rate: int
    parameters: dict[str, Any] = field(default_factory=dict, hash=False)
    """Format parameters (H.264 profile and packetization mode)."""

    def __post_init__(self) -> None:
        if "/" not in self.mime_type or self.clock_rate <= 0:
            raise ValueError(f"not a codec: {self.mime_type!r} at {self.clock_rate} Hz")

    @classmethod
    def of(cls, parameters: RTCRtpCodecParameters) -> Codec:
        return cls(parameters.mimeType, parameters.clockRate, dict(parameters.parameters))


def parse_sdp(sdp: object, kind: str) -> SessionDescription:
    """The client's ``kind`` (offer, answer) parsed; BadSdp naming what is wrong."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise BadSdp(f"the {kind} must be an SDP string")
    if len(sdp) > MAX_SDP_BYTES:
        raise BadSdp(f"the {kind} is {len(sdp)} bytes; at most {MAX_SDP_BYTES}")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:
        raise BadSdp(f"the {kind} is not valid SDP: {exc}") from None
    if not parsed.media:
        raise BadSdp(f"the {kind} has no media section")
    return parsed


def media_sections(description: SessionDescription) -> list[MediaDescription]:
    """The audio and video m-lines (not the data channel's)."""
    return [m for m in description.media if m.kind in ("audio", "video")]


def chosen_codecs(sdp: str) -> dict[str, Codec]:
    """The codec each audio/video m-line of our own ``sdp`` settled on, by mid."""
    return {m.rtp.muxId: Codec.of(m.rtp.codecs[0])
            for m in media_sections(SessionDescription.parse(sdp)) if m.rtp.codecs}


def payload_types(sdp: str) -> dict[str, int]:
    """The payload type of the first codec of each audio/video m-line of ``sdp``, by mid."""
    return {m.rtp.muxId: m.rtp.codecs[0].payloadType
            for m in media_sections(SessionDescription.parse(sdp))
            if m.rtp.codecs and m.rtp.codecs[0].payloadType is not None}


def accepted_codecs(kind: str, video_codecs: list[str]) -> list[RTCRtpCodecCapability]:
    """What the relay receives from a publisher: Opus audio; the configured video codecs,
    most preferred first, and their RTX."""
    capabilities = RTCRtpReceiver.getCapabilities(kind)
    caps = capabilities.codecs if capabilities is not None else []
    if kind == "audio":
        return [c for c in caps if c.mimeType.lower() == "audio/opus"]
    ordered: list[RTCRtpCodecCapability] = []
    for name in video_codecs:
        ordered += [c for c in caps if c.mimeType.lower() == f"video/{name.lower()}"]
    return ordered + [c for c in caps if c.mimeType.lower() == "video/rtx"]


def offered_unsupported(media: MediaDescription,
                        accepted: list[RTCRtpCodecCapability]) -> bool:
    """None of the codecs the m-line offers is one the relay accepts."""
    names = {c.mimeType.lower() for c in accepted if not c.mimeType.lower().endswith("/rtx")}
    return not any(c.mimeType.lower() in names for c in media.rtp.codecs)


def leg_codecs(kind: str, codec: Codec) -> list[RTCRtpCodecCapability]:
    """The codec (and its RTX) a subscriber leg may use: the publisher's, exactly."""
    capabilities = RTCRtpSender.getCapabilities(kind)
    caps = capabilities.codecs if capabilities is not None else []
    same = [c for c in caps if c.mimeType.lower() == codec.mime_type.lower()]
    exact = [c for c in same if c.parameters == codec.parameters]
    rtx = [c for c in caps if c.mimeType.lower().endswith("/rtx")]
    return (exact or same) + rtx


def announce(sdp: str, config: MediaConfig) -> str:
    """Write the announced (public) address into host candidates."""
    if not config.announced_address:
        return sdp
    hosts = set(config.host_addresses)

    def swap(match: re.Match[str]) -> str:
        if hosts and match.group(2) not in hosts:
            return match.group(0)
        return f"{match.group(1)}{config.announced_address}{match.group(3)}"

    return re.sub(r"(a=candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host)", swap, sdp)


def parse_candidate(candidate: dict[str, Any]) -> RTCIceCandidate | None:
    """A client's trickled ``{candidate, sdpMid, sdpMLineIndex}``; None for the end of
    candidates."""
    text = str(candidate.get("candidate") or "")
    if not text:
        return None
    try:
        parsed = candidate_from_sdp(text.removeprefix("candidate:"))
    except Exception as exc:
        raise BadSdp(f"candidate {text[:80]!r} is not valid: {exc}") from None
    parsed.sdpMid = candidate.get("sdpMid")
    parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
    return parsed


def peer_connection(config: MediaConfig, label: str, *,
                    max_bundle: bool = False) -> RTCPeerConnection:
    """A peer connection on the relay's ICE servers, logging its state changes as
    ``label``."""
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in config.ice_servers]
    policy = RTCBundlePolicy.MAX_BUNDLE if max_bundle else RTCBundlePolicy.BALANCED
    pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, bundlePolicy=policy))

    def changed() -> None:
        logger.info("%s is %s", label, pc.connectionState)

    pc.on("connectionstatechange", changed)
    return pc
