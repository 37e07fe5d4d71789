"""Media settings of a relay (embedded or standalone); a plain dataclass so that the relay
does not depend on the server's settings schema."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MediaConfig:
    host_addresses: list[str] = field(default_factory=list)
    """ICE host addresses to gather on. Empty: every address of the machine but loopback."""
    announced_address: str = ""
    """Public address written into host candidates (1:1 NAT in front of the relay)."""
    ice_servers: list[dict[str, str]] = field(default_factory=list)
    """STUN/TURN servers for the relay's own ICE agent: [{"urls", "username", "credential"}]."""
    video_codecs: list[str] = field(default_factory=lambda: ["VP8", "H264"])
    """Video codecs accepted from publishers, most preferred first."""
    keyframe_interval_s: float = 0.3
    """At most one keyframe request (PLI) per publication per this many seconds."""
    max_backlog_bytes: int = 512 * 1024
    """A subscriber whose UDP send backlog passes this skips to the next keyframe."""
    bandwidth_floor_bps: int = 150_000
    """Video toward a subscriber whose estimated bandwidth stays below this is paused."""
    bandwidth_window_s: float = 4.0
    """How long the estimate must stay below the floor before video is paused."""
    bandwidth_retry_s: float = 20.0
    """After this long paused for bandwidth, video is tried again."""
