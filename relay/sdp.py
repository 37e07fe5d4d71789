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
from relay.fec import RED_PT, ULPFEC_PT

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


OPUS_FMTP: dict[str, str] = {"useinbandfec": "1", "usedtx": "1"}
"""Format parameters the relay writes on every Opus payload type of the SDP it sends (RFC 7587:
each says what the side that wrote it wants to receive). ``useinbandfec=1``: a publisher's Opus
encoder adds in-band FEC (a low-rate copy of the previous frame, used by the receiver's decoder
when a packet is lost: on a 3 % bursty satellite link most single losses are concealed with
real speech instead of a guess); ``usedtx=1``: silence is sent as a packet every 400 ms instead
of every 20 ms, which leaves a thin link to video while nobody speaks. The relay never decodes,
so FEC and DTX reach every subscriber untouched. aiortc's own Opus codec has no format
parameters and its answer copies its own codec (not the offer's), so the relay writes them into
its SDP text, as it writes the announced address."""


def opus_fmtp(sdp: str) -> str:
    """``sdp`` with ``OPUS_FMTP`` on each m-line's Opus payload type: merged into its
    ``a=fmtp`` line (the other parameters kept), or a new line after its ``a=rtpmap``."""
    newline, sections = _sections(sdp)
    return newline.join(line for section in sections for line in _opus_section(section))


def _opus_section(lines: list[str]) -> list[str]:
    """One m-section (or the session part, which has no rtpmap) with ``OPUS_FMTP``."""
    opus = {m.group(1) for line in lines
            if (m := re.match(r"a=rtpmap:(\d+) opus/48000\b", line, re.IGNORECASE))}
    if not opus:
        return lines
    with_fmtp = {m.group(1) for line in lines if (m := re.match(r"a=fmtp:(\d+) ", line))}
    out: list[str] = []
    for line in lines:
        fmtp = re.match(r"a=fmtp:(\d+) (.*)$", line)
        if fmtp and fmtp.group(1) in opus:
            parameters = dict(p.strip().partition("=")[::2]
                              for p in fmtp.group(2).split(";") if p.strip())
            line = f"a=fmtp:{fmtp.group(1)} {_fmtp_text({**parameters, **OPUS_FMTP})}"
        out.append(line)
        rtpmap = re.match(r"a=rtpmap:(\d+) ", line)
        if rtpmap and rtpmap.group(1) in opus and rtpmap.group(1) not in with_fmtp:
            out.append(f"a=fmtp:{rtpmap.group(1)} {_fmtp_text(OPUS_FMTP)}")
    return out


def _sections(sdp: str) -> tuple[str, list[list[str]]]:
    """``sdp``'s newline and its lines cut into the session part and the m-sections."""
    newline = "\r\n" if "\r\n" in sdp else "\n"
    sections: list[list[str]] = [[]]
    for line in sdp.split(newline):
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    return newline, sections


def offer_fec(sdp: str) -> str:
    """The relay's subscribe offer with RED and ULPFEC (relay/fec.py) on each video m-line
    it sends on: the receiver may then be sent FEC when its link needs it. aiortc knows
    neither (its own description stays without them, and it ignores them in the answer): the
    relay writes them into the text the client gets, as it writes Opus's parameters."""
    newline, sections = _sections(sdp)
    out: list[str] = []
    for section in sections:
        head = section[0] if section else ""
        if not head.startswith("m=video ") or "a=inactive" in section or any(
                re.match(r"a=rtpmap:\d+ (red|ulpfec)/", line) for line in section):
            out += section
            continue
        out.append(f"{head} {RED_PT} {ULPFEC_PT}")
        maps = [i for i, line in enumerate(section) if line.startswith(("a=rtpmap:", "a=fmtp:",
                                                                       "a=rtcp-fb:"))]
        last = maps[-1] if maps else len(section) - 1
        out += section[1:last + 1]
        out += [f"a=rtpmap:{RED_PT} red/90000", f"a=rtpmap:{ULPFEC_PT} ulpfec/90000"]
        out += section[last + 1:]
    return newline.join(out)


def fec_accepted(sdp: str) -> dict[str, tuple[int, int]]:
    """The mids of the video m-lines whose answer kept RED and ULPFEC: mid -> (RED payload
    type, ULPFEC payload type)."""
    _, sections = _sections(sdp)
    accepted: dict[str, tuple[int, int]] = {}
    for section in sections[1:]:
        if not section[0].startswith("m=video "):
            continue
        mid = next((line[6:].strip() for line in section if line.startswith("a=mid:")), None)
        types = {m.group(2).lower(): int(m.group(1)) for line in section
                 if (m := re.match(r"a=rtpmap:(\d+) (red|ulpfec)/90000", line, re.IGNORECASE))}
        formats = section[0].split()[3:]
        if (mid is not None and {"red", "ulpfec"} <= types.keys()
                and str(types["red"]) in formats and str(types["ulpfec"]) in formats):
            accepted[mid] = (types["red"], types["ulpfec"])
    return accepted


def _fmtp_text(parameters: dict[str, str]) -> str:
    return ";".join(f"{key}={value}" if value else key for key, value in parameters.items())


def announce(sdp: str, config: MediaConfig) -> str:
    """The relay's own SDP as a client gets it (a publish answer, a subscribe offer, a probe
    answer): Opus asked for in-band FEC and DTX (``opus_fmtp``), and the announced (public)
    address written into host candidates."""
    sdp = opus_fmtp(sdp)
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
