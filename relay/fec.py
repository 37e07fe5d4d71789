"""Forward error correction toward a subscriber on a long, lossy link: ULPFEC (RFC 5109)
carried in RED (RFC 2198), in the media's own SSRC and sequence numbers, as libwebrtc sends
and receives it (Chromium negotiates ``red/90000`` and ``ulpfec/90000`` by default).

Why: on a satellite link (600 ms round trip, 1 % random loss) a lost packet of a frame that
others refer to holds the picture until its retransmission comes, a round trip later: a
freeze of 0.6-0.7 s once every few seconds per camera (bench/thin_link.py, vsat: 4.8-7.9 s of
freezes a minute with retransmissions alone). One XOR parity packet over a few media packets
rebuilds any one of them lost, as soon as it arrives, a few milliseconds after them.

How: ``UlpfecEncoder`` takes each media packet as it is sent (serialized, with the leg's
sequence number and header extensions) and closes a group at the end of a frame once it holds
``GROUP_MIN`` packets, or at ``GROUP_MAX`` packets whatever the frame (libwebrtc also waits for
four media packets before it protects small frames). The FEC packet protects the packets of
the group as the receiver rebuilds them from RED: the media payload type, the header
extensions and the payload. While FEC is on for a leg, every media packet goes out in RED
(``red_wrap``): libwebrtc's ULPFEC receiver only counts packets that came in RED.
Retransmissions stay plain (RTX of the media packet): a receiver takes them as they are.

Written here rather than taken from a library: no maintained Python ULPFEC encoder exists
(aiortc sends none; GStreamer's ``rtpulpfecenc`` is an element of a pipeline, not a function
on packets), and the parity is an XOR of byte strings, as RFC 5109 section 7 describes."""

from __future__ import annotations

import struct

from codec.rtp import SEQ_MOD, rtp_payload_offset

RED_PT = 120
"""The payload types the relay offers for RED and ULPFEC on a subscriber's video m-lines
(outside aiortc's own, 96-102)."""
ULPFEC_PT = 121
GROUP_MIN = 4
"""A group closes at the end of a frame once it holds this many media packets (so a frame of
one packet on a thin link does not cost a FEC packet of its own: at most 25 % more packets)."""
GROUP_MAX = 8
"""A group closes at this many packets, mid-frame (a keyframe of 30 packets gets four FEC
packets, each able to rebuild one loss of its eight)."""
MASK_SPAN = 16
"""The 16-bit packet mask (L = 0) covers this many sequence numbers from its base."""


def red_wrap(packet: bytes, red_pt: int) -> bytes:
    """``packet`` in RED: its header with the RED payload type (marker kept), then one
    primary block header (F = 0, the media payload type) and the media payload."""
    length = rtp_payload_offset(packet)
    return b"".join((packet[:1], bytes(((packet[1] & 0x80) | red_pt,)), packet[2:length],
                     bytes((packet[1] & 0x7F,)), packet[length:]))


def fec_payload(packets: list[tuple[int, bytes]]) -> bytes:
    """The ULPFEC payload (FEC header, level 0 header, level 0 payload; RFC 5109 7.3-7.4)
    protecting ``packets``, (sequence number, serialized media packet), all within
    ``MASK_SPAN`` of the first."""
    base = packets[0][0]
    length = max(len(data) - 12 for _, data in packets)
    bits0 = bits1 = timestamps = lengths = mask = body = 0
    for seq, data in packets:
        bits0 ^= data[0]
        bits1 ^= data[1]
        timestamps ^= int.from_bytes(data[4:8], "big")
        lengths ^= len(data) - 12
        mask |= 1 << (15 - (seq - base) % SEQ_MOD)
        # Everything after the fixed header, zero-padded to the longest: one big integer XOR.
        body ^= int.from_bytes(data[12:], "big") << (8 * (length - (len(data) - 12)))
    header = struct.pack("!BBHIHHH", bits0 & 0x3F,  # E = 0, L = 0 (16-bit mask)
                         bits1, base, timestamps, lengths, length, mask)
    return header + body.to_bytes(length, "big")


class UlpfecEncoder:
    """The FEC of one leg: ``add`` each media packet sent in order; it returns the FEC
    payload when a group closes. ``reset`` when the leg's sequence numbers go back (the pacer
    gave queued packets up) or the stream starts over."""

    __slots__ = ("_group", "fec_bytes", "groups", "media_bytes", "protected")

    def __init__(self) -> None:
        self._group: list[tuple[int, bytes]] = []
        self.groups = 0
        """FEC packets made."""
        self.protected = 0
        """Media packets protected."""
        self.media_bytes = 0
        """Bytes of the media packets it protected, and of the FEC packets it made: what FEC
        adds (a quarter to a third at a thin rendition's rates; the pacer sends it only with
        room to spare, relay/pacer.py)."""
        self.fec_bytes = 0

    def reset(self) -> None:
        self._group = []

    def add(self, seq: int, packet: bytes, marker: bool) -> bytes | None:
        self.media_bytes += len(packet)
        group = self._group
        if group and not 0 < (seq - group[0][0]) % SEQ_MOD < MASK_SPAN:
            group.clear()  # not after the group within the mask: start again from here
        group.append((seq, packet))
        if len(group) < GROUP_MAX and not (marker and len(group) >= GROUP_MIN) and (
                (seq - group[0][0]) % SEQ_MOD < MASK_SPAN - 1):
            return None
        self._group = []
        self.groups += 1
        self.protected += len(group)
        payload = fec_payload(group)
        self.fec_bytes += len(payload) + 13  # its RTP header and RED block header
        return payload


FEC_RTT_S = 0.25
"""FEC goes on for a link whose round trip is at least this long (a retransmission then
holds a frame for a visible time; on a short link NACK alone recovers within a frame)..."""
FEC_LOSS = 0.005
"""...and which loses at least this share of the packets sent (measured over receiver
reports, relay/link.py)."""
FEC_OFF_S = 30.0
"""FEC goes off again once the link has been under both for this long."""


class FecPolicy:
    """Whether a subscriber's video goes out with FEC: ``mode`` ``auto`` (on a long and lossy
    link, off again ``FEC_OFF_S`` after it no longer is), ``on`` (always, where the answer
    kept it) or ``off``."""

    __slots__ = ("_lossy_at", "mode", "on")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.on = mode == "on"
        self._lossy_at = 0.0

    def update(self, now: float, *, loss: float | None, rtt_s: float | None) -> bool:
        """The link's latest loss and round trip (None: not measured): whether FEC is on."""
        if self.mode != "auto":
            return self.on
        if loss is not None and rtt_s is not None and loss >= FEC_LOSS and rtt_s >= FEC_RTT_S:
            self._lossy_at = now
            self.on = True
        elif self.on and now - self._lossy_at >= FEC_OFF_S:
            self.on = False
        return self.on
