"""What a stream of forwarded packets is sent to, and where it comes from: the two sides a
Publication and its thin rendition (relay/rendition.py) share, below both of them."""

from __future__ import annotations

from typing import Protocol

from aiortc.rtp import RtpPacket

from codec.rtp import Vp8Descriptor


class Forwarder(Protocol):
    """Sends a publication's packets on somewhere (a Subscription)."""

    async def forward(self, packet: RtpPacket, keyframe: bool, ntp: int,
                      descriptor: Vp8Descriptor | None = None) -> None:
        """``keyframe``: a receiver may start decoding at this packet; ``ntp``: its arrival
        time (NTP format); ``descriptor``: its VP8 payload descriptor (VP8 only, None for a
        padding packet)."""


class KeyframeSource(Protocol):
    """An incoming video a rendition is made from (a Publication): its id and a way to ask
    its publisher for a keyframe."""

    @property
    def id(self) -> str: ...

    def request_keyframe(self) -> None: ...
