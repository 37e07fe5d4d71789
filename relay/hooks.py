"""Every aiortc/aioice internal the relay touches, in one place.

aiortc has no public API for forwarding encoded media, so the relay uses a few private hooks of
aiortc 1.16 (pinned in pyproject.toml). ``check()`` runs at start-up and stops the relay with a
clear message if any of them is missing.

Receive side: the receiver's jitter buffer is replaced by a tap. aiortc's
``RTCRtpReceiver._handle_rtp_packet`` still does the statistics, RTX unwrapping and NACKs, then
hands each packet to the "jitter buffer"; the tap keeps it for forwarding and returns no frame,
so nothing is ever decoded.

Send side: a subscriber's RTCRtpSender carries a track that never yields; the relay writes
rewritten RTP packets straight to the sender's DTLS transport, fills the sender's NACK history
and the counters its RTCP sender reports read, and intercepts keyframe requests and REMB.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import aioice.ice
import aiortc
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs.h264 import h264_depayload
from aiortc.codecs.vpx import vp8_depayload
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTP_HISTORY_SIZE,
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    RtpPacket,
    unpack_remb_fci,
)

from relay.errors import HookMissing

SUPPORTED_AIORTC = "1.16."

_RECEIVER_JITTER = "_RTCRtpReceiver__jitter_buffer"
_SENDER_HISTORY = "_RTCRtpSender__rtp_history"
_SENDER_EXTENSIONS = "_RTCRtpSender__rtp_header_extensions_map"
_SENDER_COUNTERS = (
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__packet_count",
)
_RECEIVER_METHODS = ("_handle_rtp_packet", "_send_rtcp_pli")
_SENDER_METHODS = ("_handle_rtcp_packet", "_send_keyframe", "_ssrc")

_original_host_addresses = aioice.ice.get_host_addresses


async def check() -> None:
    """Verify, on real objects, that every internal used here exists."""
    if not aiortc.__version__.startswith(SUPPORTED_AIORTC):
        raise HookMissing(
            f"the relay needs aiortc {SUPPORTED_AIORTC}x, found {aiortc.__version__}: "
            "its private hooks are version-specific"
        )
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video")
        receiver, sender = transceiver.receiver, transceiver.sender
        missing = [f"RTCRtpReceiver.{name}" for name in (_RECEIVER_JITTER, *_RECEIVER_METHODS)
                   if not hasattr(receiver, name)]
        missing += [f"RTCRtpSender.{name}"
                    for name in (_SENDER_HISTORY, _SENDER_EXTENSIONS, *_SENDER_COUNTERS,
                                 *_SENDER_METHODS)
                    if not hasattr(sender, name)]
        if not hasattr(sender.transport, "_send_rtp"):
            missing.append("RTCDtlsTransport._send_rtp")
        if not hasattr(getattr(receiver, _RECEIVER_JITTER), "add"):
            missing.append("JitterBuffer.add")
    finally:
        await pc.close()
    if missing:
        raise HookMissing(
            f"aiortc {aiortc.__version__} lacks internals the relay forwards through: "
            f"{', '.join(missing)}"
        )


def depayloader(codec: str) -> Callable[[bytes], bytes] | None:
    """aiortc's RTP depayloader for ``codec`` (``vp8`` -> the VP8 frame bytes, ``h264`` ->
    Annex-B); None for a codec whose RTP payload is the frame (Opus). The recorder reads
    packets through these, never decoding them."""
    return {"vp8": vp8_depayload, "h264": h264_depayload}.get(codec)


def set_host_addresses(addresses: Iterable[str]) -> None:
    """Gather ICE host candidates on exactly these addresses (aioice leaves 127.0.0.1 out on
    its own). Empty: aioice's default. Applies to every peer connection of this process."""
    chosen = list(addresses)
    if not chosen:
        aioice.ice.get_host_addresses = _original_host_addresses
        return

    def configured(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = configured


class _Tap:
    """Stands in for a receiver's jitter buffer: keeps packets for the forwarder, assembles no
    frame, so the decoder thread never gets work."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: collections.deque[RtpPacket] = collections.deque(maxlen=4096)

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        self.pending.append(packet)
        return False, None


def tap_receiver(receiver: RTCRtpReceiver,
                 forward: Callable[[RtpPacket, int], Any]) -> None:
    """Make ``receiver`` hand every RTP packet (RTX unwrapped) to ``await forward(packet,
    arrival_ms)`` instead of decoding it. aiortc's own NACK, receiver reports and REMB go on."""
    tap = _Tap()
    setattr(receiver, _RECEIVER_JITTER, tap)
    original = receiver._handle_rtp_packet

    async def handle(packet: RtpPacket, arrival_time_ms: int) -> None:
        await original(packet, arrival_time_ms=arrival_time_ms)
        pending = tap.pending
        while pending:
            await forward(pending.popleft(), arrival_time_ms)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]


async def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Ask the publisher for a keyframe (RTCP PLI on the receiving leg)."""
    await receiver._send_rtcp_pli(media_ssrc)


class SenderLeg:
    """Direct access to a sender's transport, history and counters for forwarded packets."""

    __slots__ = ("_counters", "_extensions", "_history", "sender", "ssrc")

    def __init__(self, sender: RTCRtpSender) -> None:
        self.sender = sender
        self.ssrc: int = sender._ssrc
        self._history: dict[int, RtpPacket] = getattr(sender, _SENDER_HISTORY)
        self._extensions = getattr(sender, _SENDER_EXTENSIONS)
        self._counters = sender

    async def send(self, packet: RtpPacket, ntp_time: int) -> None:
        """Send ``packet`` (already carrying this leg's ssrc, payload type, sequence number and
        timestamp), keep it for retransmission and count it for sender reports."""
        self._history[packet.sequence_number % RTP_HISTORY_SIZE] = packet
        # The transport is looked up each time: BUNDLE replaces it after negotiation.
        await self.sender.transport._send_rtp(packet.serialize(self._extensions))
        sender = self._counters
        sender._RTCRtpSender__ntp_timestamp = ntp_time  # type: ignore[attr-defined]
        sender._RTCRtpSender__rtp_timestamp = packet.timestamp  # type: ignore[attr-defined]
        sender._RTCRtpSender__octet_count += len(packet.payload)  # type: ignore[attr-defined]
        sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]


def intercept_feedback(sender: RTCRtpSender, *, on_keyframe_request: Callable[[], None],
                       on_remb: Callable[[int, list[int]], None],
                       on_loss: Callable[[float], None]) -> None:
    """Route a subscriber's PLI/FIR, REMB and reported loss for this sender to the relay.
    NACKs and receiver reports still reach aiortc's own handling (retransmission, RTT)."""
    original = sender._handle_rtcp_packet
    ssrc = sender._ssrc

    async def handle(packet: Any) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == ssrc:
                    on_loss(report.fraction_lost / 256)
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if ssrc in ssrcs:
                on_remb(bitrate, list(ssrcs))
            return
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]
    sender._send_keyframe = on_keyframe_request  # type: ignore[method-assign]


async def send_bye(sender: RTCRtpSender) -> None:
    """RTCP BYE for the sender's SSRC: the subscriber's receiving track ends."""
    try:
        await sender.transport._send_rtp(bytes(RtcpByePacket(sources=[sender._ssrc])))
    except ConnectionError:
        pass


def backlog_bytes(sender: RTCRtpSender) -> int:
    """Bytes waiting in the event loop's UDP write buffer of the sender's ICE connection: the
    only place a forwarded packet can queue in this process."""
    try:
        connection = sender.transport.transport._connection
        pair = connection._nominated.get(1)
        if pair is None:
            return 0
        transport: Any = pair.protocol.transport
        return int(transport.get_write_buffer_size())
    except AttributeError:
        return 0
