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

ICE host sockets (aioice 0.13, pinned too): aioice binds one socket per host address on a
random port in ``Connection.get_component_candidates`` and has no option for it. When the relay
fixes its UDP ports (``relay.udp_port_range``, ``relay.udp_port``; relay/udp_mux.py), that
method is replaced, for the relay's own connections only, by one that takes its host sockets
from ``set_host_sockets``; server-reflexive and TURN candidates are gathered as aioice does.
"Own" means gathered inside ``relay_gathering()``: aiortc clients in the same process (tests,
tools) keep aioice's sockets. The single-port mux reads STUN through the helpers below.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import ipaddress
import logging
import random
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from types import CodeType
from typing import Any, Protocol

import aioice.ice
import aioice.stun
import aiortc
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
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
from relay.fec import red_wrap

logger = logging.getLogger(__name__)

SUPPORTED_AIORTC = "1.16."
SUPPORTED_AIOICE = "0.13."

_RECEIVER_JITTER = "_RTCRtpReceiver__jitter_buffer"
_SENDER_HISTORY = "_RTCRtpSender__rtp_history"
_SENDER_EXTENSIONS = "_RTCRtpSender__rtp_header_extensions_map"
SENDER_RTT = "_RTCRtpSender__rtt"
"""The round trip aiortc measured from the subscriber's receiver reports (the layer policy's
input, ``relay.subscriber.Subscriber``)."""
SENDER_REPORTS_KEPT = 8
"""Sender reports remembered per leg for the round trip (one every 0.5-1.5 s)."""
_SENDER_COUNTERS = (
    SENDER_RTT,
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__packet_count",
)
_RECEIVER_METHODS = ("_handle_rtp_packet", "_send_rtcp_pli")
_SENDER_METHODS = ("_handle_rtcp_packet", "_send_keyframe", "_retransmit", "_send_rtcp",
                   "_ssrc")

_original_host_addresses = aioice.ice.get_host_addresses
_original_query_consent = aioice.ice.Connection.query_consent
_original_component_candidates = aioice.ice.Connection.get_component_candidates
_CONNECTION_ATTRIBUTES = ("_protocols", "_local_username", "stun_server", "turn_server",
                          "_nominated", "_query_consent_task", "remote_password",
                          "build_request",
                          "data_received", "request_received", "local_password")
_PROTOCOL_ATTRIBUTES = ("transactions", "receiver", "connection_made", "connection_lost",
                        "datagram_received")


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
    _check_aioice()


def _check_aioice() -> None:
    """The aioice internals behind fixed UDP ports: host sockets are bound in
    ``Connection.get_component_candidates(component, addresses, timeout)`` (so replacing it
    covers them all), and what the single-port mux reads and calls."""
    version = getattr(aioice, "__version__", "?")
    if not version.startswith(SUPPORTED_AIOICE):
        raise HookMissing(f"the relay needs aioice {SUPPORTED_AIOICE}x, found {version}: its "
                          "host-socket hook (relay.udp_port_range, relay.udp_port) is "
                          "version-specific")
    missing: list[str] = []
    gather = _original_component_candidates
    parameters = list(_parameters(gather))
    if parameters != ["self", "component", "addresses", "timeout"]:
        missing.append("Connection.get_component_candidates(component, addresses, timeout)")
    elif "create_datagram_endpoint" not in _names(gather.__code__):
        missing.append("host sockets bound in Connection.get_component_candidates")
    if "get_component_candidates" not in _names(aioice.ice.Connection.gather_candidates.__code__):
        missing.append("Connection.gather_candidates calling get_component_candidates")
    if "query_consent" not in _names(aioice.ice.Connection.connect.__code__):
        missing.append("Connection.connect starting query_consent")
    missing += [f"aioice.ice.{name}" for name in ("CONSENT_INTERVAL", "CONSENT_FAILURES")
                if not hasattr(aioice.ice, name)]
    connection = aioice.ice.Connection(ice_controlling=False)
    missing += [f"Connection.{name}" for name in _CONNECTION_ATTRIBUTES
                if not hasattr(connection, name)]
    if getattr(connection, "_local_username", None) != connection.local_username:
        missing.append("Connection._local_username behind local_username")
    protocol = aioice.ice.StunProtocol(connection)
    missing += [f"StunProtocol.{name}" for name in _PROTOCOL_ATTRIBUTES
                if not hasattr(protocol, name)]
    missing += [f"aioice.{name}" for name in ("ice.server_reflexive_candidate",
                                                "stun.parse_message",
                                                "stun.Message.check_message_integrity")
                if not _has_path(aioice, name)]
    if missing:
        raise HookMissing(f"aioice {version} lacks internals the relay binds its UDP ports "
                          f"through: {', '.join(missing)}")


def _parameters(function: Callable[..., Any]) -> list[str]:
    code = function.__code__
    return list(code.co_varnames[:code.co_argcount])


def _names(code: CodeType) -> set[str]:
    """The names a function's code (comprehensions included) looks up."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= _names(constant)
    return names


def _has_path(root: Any, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(root, name):
            return False
        root = getattr(root, name)
    return True


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

    __slots__ = ("_counters", "_extensions", "_history", "fec_on", "red_pt", "sender", "ssrc")

    def __init__(self, sender: RTCRtpSender) -> None:
        self.sender = sender
        self.ssrc: int = sender._ssrc
        self._history: dict[int, RtpPacket] = getattr(sender, _SENDER_HISTORY)
        self._extensions = getattr(sender, _SENDER_EXTENSIONS)
        self._counters = sender
        self.red_pt: int | None = None
        """RED's payload type, when the subscriber's answer kept RED and ULPFEC on this leg
        (relay/fec.py): a packet of this payload type is a FEC packet."""
        self.fec_on = False
        """Media packets go out in RED (``red_pt``): FEC is on for this leg."""

    def serialize(self, packet: RtpPacket) -> bytes:
        """``packet`` as this leg sends it (its header extensions)."""
        return bytes(packet.serialize(self._extensions))

    async def send(self, packet: RtpPacket, ntp_time: int) -> None:
        """Send ``packet`` (already carrying this leg's ssrc, payload type, sequence number and
        timestamp), keep it for retransmission and count it for sender reports. While FEC is
        on, a media packet goes out in RED (kept plain for retransmission, which a receiver
        takes as it is), and a FEC packet (RED's payload type) is not kept."""
        data = packet.serialize(self._extensions)
        red_pt = self.red_pt
        if red_pt is None or packet.payload_type != red_pt:
            self._history[packet.sequence_number % RTP_HISTORY_SIZE] = packet
            if self.fec_on and red_pt is not None:
                data = red_wrap(data, red_pt)
        # The transport is looked up each time: BUNDLE replaces it after negotiation.
        await self.sender.transport._send_rtp(data)
        sender = self._counters
        sender._RTCRtpSender__ntp_timestamp = ntp_time  # type: ignore[attr-defined]
        sender._RTCRtpSender__rtp_timestamp = packet.timestamp  # type: ignore[attr-defined]
        sender._RTCRtpSender__octet_count += len(packet.payload)  # type: ignore[attr-defined]
        sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]


def intercept_feedback(sender: RTCRtpSender, *, on_keyframe_request: Callable[[], None],
                       on_remb: Callable[[int, list[int]], None],
                       on_receipt: Callable[[int, int], None],
                       on_rtt: Callable[[float], None] | None = None) -> None:
    """Route a subscriber's PLI/FIR, REMB and receiver reports for this sender to the relay:
    ``on_receipt(highest, lost)``, each report's extended highest sequence number and
    cumulative packets lost (relay/link.py measures the loss and the rate over intervals of
    its own: the report's own fraction covers the time since the receiver's last report,
    which may be a few packets; a browser sends one with each NACK). NACKs and
    receiver reports still reach aiortc's own handling (retransmission, RTT). ``on_rtt``: the
    round trip of each report that answers one of the sender's recent sender reports,
    unsmoothed. aiortc keeps only a smoothed one, from reports answering its last sender
    report alone: over a satellite link's round trip another has often gone out by then, so it
    stops moving and stays where the link left it. A sender report whose NTP time an earlier
    one had (the leg forwarded nothing between them) is ambiguous and not used."""
    original = sender._handle_rtcp_packet
    ssrc = sender._ssrc
    sent_reports: collections.OrderedDict[int, float | None] = collections.OrderedDict()
    """The NTP middle 32 bits of the recent sender reports -> when each was sent (None: two
    carried them)."""
    send_rtcp = sender._send_rtcp

    async def send_rtcp_noted(packets: list[Any]) -> None:
        for packet in packets:
            if isinstance(packet, RtcpSrPacket):
                lsr = (packet.sender_info.ntp_timestamp >> 16) & 0xFFFFFFFF
                sent_reports[lsr] = None if lsr in sent_reports else time.time()
                while len(sent_reports) > SENDER_REPORTS_KEPT:
                    sent_reports.popitem(last=False)
        await send_rtcp(packets)

    if on_rtt is not None:
        sender._send_rtcp = send_rtcp_noted  # type: ignore[method-assign]

    async def handle(packet: Any) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == ssrc:
                    sent_at = sent_reports.get(report.lsr) if report.lsr else None
                    if on_rtt is not None and sent_at is not None:
                        on_rtt(time.time() - sent_at - report.dlsr / 65536)
                    on_receipt(report.highest_sequence, report.packets_lost)
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


Resend = Callable[[int], Awaitable[None]]


def intercept_retransmit(
        sender: RTCRtpSender,
        on_retransmit: Callable[[Resend, Resend, int, int, int], Awaitable[None]],
        filler: Callable[[int], bytes | None] = lambda seq: None) -> None:
    """Route the sender's retransmissions (a subscriber's NACK) through
    ``on_retransmit(resend, pad, ssrc, seq, payload_bytes)`` (the subscriber's pacer, which
    decides whether and when). ``resend(seq)`` is aiortc's own, from its history, RTX-wrapped
    if negotiated; ``pad(seq)`` sends in its place a packet of the same sequence number and
    timestamp carrying ``filler(seq)`` (nothing is sent if it gives None): the hole is closed and
    the frame fails to decode, so the receiver asks for a keyframe rather than wait on a hole
    that will never be filled (aiortc's jitter buffer waits 512 packets). Not an empty packet:
    a frame made of empty packets only reaches aiortc's decoder as an empty packet, which
    FFmpeg takes for the end of the stream, and that decoder never decodes again. A packet no
    longer in the history is not asked about."""
    original: Resend = sender._retransmit
    history: dict[int, RtpPacket] = getattr(sender, _SENDER_HISTORY)
    extensions = getattr(sender, _SENDER_EXTENSIONS)
    ssrc = sender._ssrc

    async def pad(sequence_number: int) -> None:
        packet = history.get(sequence_number % RTP_HISTORY_SIZE)
        payload = filler(sequence_number)
        if packet is None or packet.sequence_number != sequence_number or payload is None:
            return
        empty = RtpPacket(payload_type=packet.payload_type, sequence_number=sequence_number,
                          timestamp=packet.timestamp, ssrc=packet.ssrc, payload=payload)
        empty.extensions.mid = packet.extensions.mid
        await sender.transport._send_rtp(empty.serialize(extensions))

    async def retransmit(sequence_number: int) -> None:
        packet = history.get(sequence_number % RTP_HISTORY_SIZE)
        if packet is None or packet.sequence_number != sequence_number:
            return
        await on_retransmit(original, pad, ssrc, sequence_number, len(packet.payload))

    sender._retransmit = retransmit  # type: ignore[method-assign]


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


AUDIO_BACKLOG_FACTOR = 4
"""Audio first: a subscriber's audio is skipped for backlog only past this many times the limit
at which its video is. Video skips to its next keyframe as soon as the queue toward the
subscriber passes the limit, which empties the queue within a frame or two; audio is ~40 kbps
(Opus with FEC) of a consultation's ~1 Mbps, so skipping it frees almost nothing and costs the
words a doctor says. Only a path that takes nothing at all (the queue still growing with no
video in it) loses audio too, rather than queue without bound."""


def backlog_exceeded(sender: RTCRtpSender, limit_bytes: int) -> bool:
    """Whether the packet about to go on ``sender`` is to be skipped for the backlog toward
    its subscriber (``backlog_bytes``): video past ``limit_bytes``, audio past
    ``AUDIO_BACKLOG_FACTOR`` times that. ``limit_bytes`` 0: never."""
    if not limit_bytes:
        return False
    limit = limit_bytes * (AUDIO_BACKLOG_FACTOR if sender.kind == "audio" else 1)
    return backlog_bytes(sender) > limit


# -- ICE consent on long links (RFC 7675) ---------------------------------------------------

CONSENT_RETRANSMISSIONS = 2
"""Each consent check is sent again twice (after 0.5 and 1 s more: a check waits up to 3.5 s),
within the 4-6 s between checks."""


async def _query_consent(self: IceConnection) -> None:
    """aioice's consent freshness (RFC 7675), but each check retransmitted
    (``CONSENT_RETRANSMISSIONS``), and consent lost after 30 s without an answer rather than
    after six checks unanswered. aioice sends each check once and gives it 0.5 s: on a link
    whose round trip is longer (a VSAT station's is ~600 ms, Trường Sa's ~700 ms) every check
    fails, and the connection closes after six of them, ~30 s into every consultation (H11's
    finding, #15). RFC 7675 asks for retransmissions within the check interval and a 30 s
    expiry."""
    assert self.remote_password is not None
    loop = asyncio.get_running_loop()
    answered = loop.time()
    expiry = aioice.ice.CONSENT_FAILURES * aioice.ice.CONSENT_INTERVAL
    while True:
        await asyncio.sleep(aioice.ice.CONSENT_INTERVAL * (0.8 + 0.4 * random.random()))
        for pair in self._nominated.values():
            request = self.build_request(pair, nominate=False)
            try:
                await pair.protocol.request(
                    request, pair.remote_addr,
                    integrity_key=self.remote_password.encode("utf8"),
                    retransmissions=CONSENT_RETRANSMISSIONS)
                answered = loop.time()
            except aioice.stun.TransactionError:
                pass
            if loop.time() - answered >= expiry:
                logger.info("ICE consent expired: no answer to %.0f s of checks", expiry)
                self._query_consent_task = None
                await self.close()
                return


def patient_consent(on: bool = True) -> None:
    """Consent checks that outlive a long round trip (``_query_consent``) for every ICE
    connection of the process from now: the relay's, and aiortc clients in the same process
    (tests, tools), which meet the same links. ``on=False``: aioice's own."""
    aioice.ice.Connection.query_consent = (  # type: ignore[method-assign]
        _query_consent if on else _original_query_consent)


# -- ICE host sockets (relay.udp_port_range, relay.udp_port) ----------------------------------

StunProtocol = aioice.ice.StunProtocol
IceConnection = aioice.ice.Connection
StunMessage = aioice.stun.Message


class HostSockets(Protocol):
    """How the relay's ICE connections get their host sockets (relay/udp_mux.py)."""

    def addresses(self, addresses: list[str]) -> list[str]:
        """The host addresses to make candidates on, of those aioice would use."""

    async def bind(self, connection: IceConnection, address: str) -> StunProtocol | None:
        """A protocol of ``connection`` (``stun_protocol``) connected to a transport on
        ``address`` whose ``sockname`` is the candidate's address; None: skip the address."""


_host_sockets: HostSockets | None = None
_relay_gathering: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "relay_gathering", default=False)


def set_host_sockets(sockets: HostSockets | None) -> None:
    """Bind the host sockets of the relay's ICE connections with ``sockets``; None: aioice's
    random ports. Like the host addresses, one choice for the process."""
    global _host_sockets
    _host_sockets = sockets
    aioice.ice.Connection.get_component_candidates = (  # type: ignore[method-assign]
        _original_component_candidates if sockets is None else _component_candidates)


def host_sockets() -> HostSockets | None:
    return _host_sockets


@contextlib.contextmanager
def relay_gathering() -> Iterator[None]:
    """ICE gathered inside (a relay peer connection's ``setLocalDescription``) is the relay's:
    its host sockets come from ``set_host_sockets``. Tasks started inside inherit it."""
    token = _relay_gathering.set(True)
    try:
        yield
    finally:
        _relay_gathering.reset(token)


def host_addresses() -> list[str]:
    """The addresses the relay gathers host candidates on (configured, or aioice's)."""
    return list(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True))


async def _component_candidates(self: IceConnection, component: int, addresses: list[str],
                                timeout: int = 5  # noqa: ASYNC109 (aioice's signature)
                                ) -> list[Candidate]:
    """``Connection.get_component_candidates`` with the host sockets of ``_host_sockets``
    for the relay's connections; aioice's own for every other."""
    sockets = _host_sockets
    if sockets is None or not _relay_gathering.get():
        return await _original_component_candidates(self, component, addresses, timeout)
    protocols: list[StunProtocol] = []
    try:
        for address in sockets.addresses(addresses):
            protocol = await sockets.bind(self, address)
            if protocol is None:
                continue
            host, port = protocol.transport.get_extra_info("sockname")[:2]
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", host), component=component,
                transport="udp", priority=candidate_priority(component, "host"), host=host,
                port=port, type="host")
            protocols.append(protocol)
    except BaseException:
        for protocol in protocols:
            await protocol.close()
        raise
    self._protocols += protocols
    candidates = [p.local_candidate for p in protocols]
    # Server-reflexive candidates over the host sockets, TURN as aioice does (its own
    # sockets: the relay's TURN client is not bound in the range).
    tasks: list[asyncio.Task[Any]] = []
    if self.stun_server:
        tasks += [asyncio.create_task(aioice.ice.server_reflexive_candidate(p, self.stun_server))
                  for p in protocols
                  if ipaddress.ip_address(p.local_candidate.host).version == 4]
    turn = (asyncio.create_task(_original_component_candidates(self, component, [], timeout))
            if self.turn_server else None)
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        candidates += [task.result()[0] for task in done if task.exception() is None]
        for task in pending:
            task.cancel()
    if turn is not None:
        candidates += await turn
    return candidates


def stun_protocol(connection: IceConnection) -> StunProtocol:
    """aioice's protocol of ``connection``, not yet connected to a transport."""
    return aioice.ice.StunProtocol(connection)


_UFRAG_CHARACTERS = string.ascii_letters + string.digits


def unique_ufrag(connection: IceConnection, taken: Callable[[str], bool]) -> str:
    """The connection's local ufrag, replaced by a longer random one if ``taken`` says it is
    in use. Called while gathering, before the SDP carrying it is written."""
    ufrag: str = connection.local_username
    while taken(ufrag):
        ufrag = "".join(secrets.choice(_UFRAG_CHARACTERS) for _ in range(16))
        connection._local_username = ufrag
    return ufrag


def parse_stun(data: bytes) -> StunMessage | None:
    try:
        return aioice.stun.parse_message(data)
    except ValueError:
        return None


def request_ufrag(message: StunMessage) -> str | None:
    """The local (relay's) ufrag named by a Binding request's USERNAME
    (``<local ufrag>:<remote ufrag>``); None for anything else."""
    if (message.message_class != aioice.stun.Class.REQUEST
            or message.message_method != aioice.stun.Method.BINDING):
        return None
    username = message.attributes.get("USERNAME")
    if not isinstance(username, str):
        return None
    local, colon, _ = username.partition(":")
    return local if colon else None


def is_response(message: StunMessage) -> bool:
    return message.message_class in (aioice.stun.Class.RESPONSE, aioice.stun.Class.ERROR)


def authentic(message: StunMessage, connection: IceConnection) -> bool:
    """MESSAGE-INTEGRITY of ``message`` checked with the connection's password, as aioice
    checks it before answering."""
    if "MESSAGE-INTEGRITY" not in message.attributes:
        return False
    return bool(message.check_message_integrity(connection.local_password.encode("utf8")))


def awaits_response(protocol: StunProtocol, response: StunMessage) -> bool:
    """``protocol`` sent the request ``response`` answers (and still waits for it)."""
    return response.transaction_id in protocol.transactions


def data_receiver(protocol: StunProtocol) -> Callable[[bytes], None]:
    """What ``protocol`` does with a datagram that is not STUN (DTLS, SRTP), minus its own
    attempt at parsing it as STUN: hand it to its connection."""
    return functools.partial(protocol.receiver.data_received,
                             component=protocol.local_candidate.component)
