"""Media settings of a relay (embedded or standalone), taken from the ``[relay]`` settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from config.settings import IceServer, RelaySettings
from relay.bandwidth import LayerSettings


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
    adaptation: bool = True
    """Each subscriber's video adapted to its link: temporal layers, then the thin rendition,
    then the pause (``layers``). False: every layer to everyone, only the pause acts."""
    fec: str = "auto"
    """Video FEC toward subscribers (ULPFEC in RED, relay/fec.py): ``auto`` on a long and
    lossy link, ``on`` always, ``off`` never (nor offered)."""
    layers: LayerSettings = field(default_factory=LayerSettings)
    """The layer policy's thresholds and quiet periods (relay/bandwidth.py)."""
    udp_port_range: tuple[int, int] | None = None
    """``(min, max)``: every ICE host socket of the relay is bound to a port in it."""
    udp_port: int | None = None
    """Single-port mode: every participant's ICE and media on this one UDP port."""
    announced_port: int | None = None
    """With ``udp_port``: the port written into host candidates instead of it (a NAT or
    port-forward maps this public port onto ``udp_port``)."""


def from_settings(relay: RelaySettings) -> MediaConfig:
    """The media part of the ``[relay]`` settings."""

    def servers(items: list[IceServer]) -> list[dict[str, str]]:
        return [item.model_dump(exclude_none=True) for item in items]

    return MediaConfig(
        host_addresses=list(relay.host_addresses),
        announced_address=relay.announced_address,
        ice_servers=servers(relay.ice_servers),
        video_codecs=list(relay.video_codecs),
        keyframe_interval_s=relay.keyframe_interval_s,
        max_backlog_bytes=relay.max_backlog_bytes,
        bandwidth_floor_bps=relay.bandwidth_floor_bps,
        bandwidth_window_s=relay.bandwidth_window_s,
        bandwidth_retry_s=relay.bandwidth_retry_s,
        adaptation=relay.adaptation,
        fec=relay.fec,
        layers=LayerSettings(quiet_s=relay.layer_quiet_s, max_quiet_s=relay.layer_max_quiet_s,
                             loss=relay.layer_loss, rtt_rise_s=relay.layer_rtt_rise_s,
                             backlog_bytes=relay.layer_backlog_bytes,
                             queue_delay_s=relay.layer_queue_delay_s),
        udp_port_range=relay.udp_port_range,
        udp_port=relay.udp_port,
        announced_port=relay.announced_port,
    )
