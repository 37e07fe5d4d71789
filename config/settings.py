"""The settings schema: one TOML file plus ``TELEHEALTH_*`` environment overrides.

Environment variables use ``__`` between section and key, for example
``TELEHEALTH_SERVER__PORT=9000`` or ``TELEHEALTH_QUEUE__TICK_S=0.5``. They take precedence over
the TOML file, which takes precedence over the defaults below (the embedded defaults).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Priority = Literal["routine", "urgent", "asap", "stat"]

CONFIG_ENV = "TELEHEALTH_CONFIG"


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names key, value and expectation."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    """Address the HTTP and socket.io server listens on. Default 127.0.0.1 (this machine only)."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port; 0 picks a free port (tests). Default 8080."""
    public_url: str = ""
    """Base URL printed in sign-in links; default derived from host and port."""
    gc_thresholds: tuple[int, int, int] = (50_000, 20, 10)
    """CPython collector thresholds for `serve`. With thousands of connections a full
    collection stops the event loop for 200-330 ms (docs/benchmarks.md); these make it rare.
    Python's default is (700, 10, 10)."""
    drain_s: float = Field(default=10.0, gt=0, le=300)
    """On SIGTERM/SIGINT, `serve` exits within this many seconds whatever the clients do:
    clients told (``server:stopping``) and disconnected, recordings finished, records closed;
    what has not finished by then is abandoned. Default 10 s."""
    max_payload_bytes: int = Field(default=256 * 1024, ge=80 * 1024, le=16 * 1024 * 1024)
    """Largest HTTP request body and largest engine.io message (a websocket frame, a polling
    POST) a client may send; more is answered 413 and the connection closed. Default 256 KiB:
    an SDP of relay/sdp.py's 64 KiB as JSON, and a relay node's 50 ms media batch."""
    signin_timeout_s: float = Field(default=10.0, gt=0, le=300)
    """An engine.io session that has not completed the socket.io connect (signed in) within
    this many seconds is closed. Default 10 s."""
    polling_sessions_per_address: int = Field(default=20, ge=1)
    """Open engine.io long-polling sessions one client address may hold (sessions that moved
    to a websocket do not count); more are refused 429. Default 20."""
    send_queue_max_messages: int = Field(default=2000, ge=10)
    """Messages waiting to be written to one connection; a client that falls further behind
    (it does not read) is disconnected and its queue dropped. Default 2000."""
    send_queue_max_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Bytes waiting to be written to one connection, the same rule. Default 8 MiB."""
    send_flush_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """When a connection is closed, how long the server waits for its queued messages to be
    written before dropping them. Default 5 s."""
    header_timeout_s: float = Field(default=15.0, gt=0, le=600)
    """A connection must send a complete request head within this many seconds of opening or
    of its previous response, else it is closed (aiohttp's keep-alive timer: an idle
    keep-alive connection is closed after it too). Default 15 s."""
    body_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """A request body (or its unread rest, after the response) must arrive within this many
    seconds, else the connection is closed. Default 10 s."""
    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses or networks (``10.0.0.5``, ``10.0.0.0/24``) of reverse proxies whose
    ``X-Forwarded-For``/``-Proto``/``-Host`` headers are believed (client address for the
    per-address limits, https for the security headers and the printed URL). Empty
    (default): no proxy; those headers are ignored from everyone."""

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @field_validator("gc_thresholds")
    @classmethod
    def _thresholds(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) <= 0:
            raise ValueError(f"every threshold must be > 0, got {list(value)}")
        return value


class TlsSettings(_Section):
    """HTTPS terminated by `serve` itself (browsers allow camera and microphone only on a
    secure origin). Either both files or neither; behind a TLS reverse proxy leave both empty
    and set ``server.trusted_proxies``."""

    cert_file: Path | None = None
    """PEM certificate chain (the server's certificate first). Reloaded on SIGHUP."""
    key_file: Path | None = None
    """PEM private key of the certificate. Reloaded on SIGHUP."""
    redirect_port: int | None = Field(default=None, ge=0, le=65535)
    """A plain-HTTP port (80 in production) whose only answer is a redirect to the HTTPS
    address. Default: none."""
    hsts_max_age_s: int = Field(default=180 * 86400, ge=0)
    """``Strict-Transport-Security: max-age`` sent over HTTPS. Default 180 days; 0: no HSTS."""

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if self.redirect_port is not None and self.cert_file is None:
            raise ValueError("redirect_port needs cert_file and key_file (it redirects to "
                             "HTTPS)")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class SecuritySettings(_Section):
    token_secret: str = ""
    """HS256 secret for access tokens. Empty (default): generated once into the data directory."""
    token_ttl_s: int = Field(default=12 * 3600, gt=0)
    """Lifetime of issued access tokens, seconds. Default 12 hours (one shift)."""
    metrics_token: str = ""
    """Static bearer token a Prometheus scraper may present at /metrics.
    Empty (default): only admin and coordinator access tokens may read metrics."""

    @field_validator("token_secret")
    @classmethod
    def _secret_long_enough(cls, value: str) -> str:
        if value and len(value) < 32:
            raise ValueError(f"must be at least 32 characters, got {len(value)}")
        return value


class StorageSettings(_Section):
    data_dir: Path = Path("var")
    """Directory for the SQLite records and accounts, the generated token secret, the demo
    directory and this process's live-state instance id."""
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    """Where the durable records (directory, requests, consultations, chat, attendance,
    minutes) live: ``sqlite`` (a file in ``data_dir``: one `serve` process, the default) or
    ``postgresql`` (a PostgreSQL server that several `serve` processes share, issue #14).
    Either way a record is on disk before the client's ack, and the claim of a request is
    one transaction."""
    postgresql_dsn: str = Field(
        default="postgresql://telehealth@127.0.0.1:5432/telehealth",
        pattern=r"^postgres(ql)?://")
    """The PostgreSQL server of ``backend = "postgresql"`` (libpq URL; a password is better
    given as ``TELEHEALTH_STORAGE__POSTGRESQL_DSN`` or in ~/.pgpass than in this file).
    Default: a local server, database and user ``telehealth``."""
    postgresql_pool_size: int = Field(default=10, ge=1, le=200)
    """Connections this process keeps open to PostgreSQL. Default 10."""


class DirectorySettings(_Section):
    file: Path | None = None
    """TOML file listing regions, sites and clinicians: it seeds an empty store (the directory's
    source of truth) at start-up and is only an import source afterwards. Default: none; the
    store is then seeded from a demo one."""


def _per_priority(
    stat: float, asap: float, urgent: float, routine: float
) -> dict[Priority, float]:
    return {"stat": stat, "asap": asap, "urgent": urgent, "routine": routine}


class QueueSettings(_Section):
    escalate_after_s: dict[Priority, float] = Field(
        default_factory=lambda: _per_priority(60, 180, 600, 3600)
    )
    """Seconds a request may wait before it escalates (coordinators alerted, all central
    specialists see it). Default stat 60, asap 180, urgent 600, routine 3600."""
    expire_after_s: dict[Priority, float] = Field(
        default_factory=lambda: _per_priority(1800, 3600, 4 * 3600, 24 * 3600)
    )
    """Seconds after which an unaccepted request expires. Default stat 1800, asap 3600,
    urgent 14400, routine 86400."""
    tick_s: float = Field(default=1.0, gt=0, le=60)
    """How often waiting requests are checked for escalation and expiry. Default 1 s."""

    @field_validator("escalate_after_s", "expire_after_s")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for priority, seconds in value.items():
            if seconds <= 0:
                raise ValueError(f"{priority} must be > 0 seconds, got {seconds}")
        return value


class PresenceSettings(_Section):
    """Liveness of the clients' connections. The defaults fit the network's longest links (an
    island's satellite hop: ~700 ms round trip, outages of 5-10 s; docs/protocol.md, "A long
    link"): an outage of up to 10 s closes no connection, so the others see nothing of it;
    a client gone for good is seen within 40 s, and is ``left`` 30 s later."""

    ping_interval_s: float = Field(default=20.0, ge=1)
    """socket.io ping interval: how often the server checks each connection. A dead one is
    seen within ``ping_interval_s + ping_timeout_s``; the client closes its own side after the
    same time without a ping. Default 20 s: shorter would find a dead client sooner, at the
    price of the ping wave that costs a loaded server its tail latency (docs/benchmarks.md),
    while the reconnect grace hides the difference from the other participants."""
    ping_timeout_s: float = Field(default=20.0, ge=1)
    """A connection that does not answer a ping within this time is offline. It must outlast
    an outage: a ping sent as a 10 s outage starts is sent again by TCP after ~1, 3, 7 and
    15 s (the retransmission timer doubles), so its answer comes ~16 s after it left. Default
    20 s; lower it only on a network without satellite or radio links."""
    reconnect_grace_s: float = Field(default=30.0, ge=0)
    """A participant whose connection closed (the server's ping timeout, or the client's own
    reconnect) and who reconnects within this time keeps their place: others see them
    ``reconnecting``, then ``returned``. Default 30 s: the web client retries every 1-3 s,
    each attempt given up after 10 s, so the end of a 10 s outage is well within it."""


class LiveSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    """Where live state (presence, membership) lives: ``memory`` (one process, the default)
    or ``redis`` (redis-server: it outlives a restart of `serve`; the first step towards
    several signaling nodes, issue #14)."""
    redis_url: str = Field(default="redis://127.0.0.1:6379/0",
                           pattern=r"^(redis|rediss|unix)://")
    """The Redis server of ``backend = "redis"``. Default: a local one, database 0."""
    key_prefix: str = Field(default="telehealth:", min_length=1, max_length=64)
    """Prefix of every key this deployment writes (several deployments on one Redis)."""
    timers_lease_s: float = Field(default=5.0, ge=1, le=60)
    """With several `serve` processes on one Redis, one of them runs the timers (escalation,
    expiry, queue positions, reconnect grace) under a lease in Redis, renewed every
    ``queue.tick_s`` or half the lease if shorter; when it dies another takes over within
    this time (with records in PostgreSQL; with SQLite each process runs its own timers).
    Default 5 s."""


VideoCodec = Literal["VP8", "H264"]
VIDEO_CODECS: tuple[VideoCodec, ...] = ("VP8", "H264")


class IceServer(_Section):
    urls: str = Field(pattern=r"^(stun|turn|turns):")
    username: str | None = None
    credential: str | None = None


class RelaySettings(_Section):
    embedded: bool = True
    """Run a relay inside `serve` (the embedded default). Standalone nodes may register too."""
    id: str = Field(default="embedded", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """This relay's id (embedded relay, or a standalone node's default)."""
    region: str = ""
    """Province code the relay serves; empty: any region."""
    capacity: int = Field(default=200, gt=0)
    """Consultations (rooms) this relay accepts at most; for `telehealth relay --workers N`,
    the machine's total, shared out between its workers (each takes capacity / N, rounded
    up)."""
    host_addresses: list[str] = Field(default_factory=list)
    """Addresses to gather ICE host candidates on. Empty: 127.0.0.1 when ``server.host`` is a
    loopback address (the one-machine demo), else every address of the machine but loopback
    (start-up logs which)."""
    announced_address: str = ""
    """Public address written into the relay's host candidates (1:1 NAT); empty: none."""
    ice_servers: list[IceServer] = Field(default_factory=list)
    """STUN/TURN servers the relay's own ICE agent uses."""
    client_ice_servers: list[IceServer] = Field(default_factory=list)
    """STUN/TURN servers handed to browsers with `media:join`."""
    video_codecs: list[VideoCodec] = Field(default_factory=lambda: list(VIDEO_CODECS),
                                           min_length=1)
    """Video codecs accepted from publishers, most preferred first. Default VP8, then H264."""
    keyframe_interval_s: float = Field(default=0.3, gt=0, le=5)
    """At most one keyframe request to a publisher per this many seconds. Default 0.3."""
    max_backlog_bytes: int = Field(default=512 * 1024, ge=0)
    """A subscriber whose send backlog passes this skips to the next keyframe. 0: no bound."""
    bandwidth_floor_bps: int = Field(default=150_000, ge=0)
    """Pause video toward a subscriber whose estimate stays below this. 0: never."""
    bandwidth_window_s: float = Field(default=4.0, gt=0)
    bandwidth_retry_s: float = Field(default=20.0, gt=0)
    adaptation: bool = True
    """Adapt each subscriber's video to its link (issue #15): the temporal layers of a camera
    sent in layers (the web client's) dropped for a subscriber whose link is congested, then
    the publication's thin rendition (about 320x180, re-encoded once for every such
    subscriber), then the video pause. False: every subscriber gets every layer and only the
    video pause (``bandwidth_*``) acts, as before #15; Opus FEC and DTX, and audio sent before
    video under a backlog, stay on. Default true."""
    fec: Literal["auto", "on", "off"] = "auto"
    """Video FEC toward subscribers on long, lossy links (issue #15): ULPFEC in RED, as
    Chromium receives it, offered on every subscribe connection. ``auto``: on for a
    subscriber whose round trip is 250 ms or more and whose link loses 0.5 % or more (a
    satellite site: a lost packet is rebuilt at once instead of a round trip later), off
    again 30 s after; ``on``: for every subscriber whose browser accepted it (about a
    quarter more video packets); ``off``: never, and not offered. Default ``auto``."""
    layer_quiet_s: float = Field(default=4.0, gt=0, le=600)
    """A subscriber stepped down is tried one layer up (a probe) after this long without
    congestion; once a probe held 2 s, the next comes 2 s later (a link back to good climbs
    from the thin rendition to every layer in about 8 s). Default 4."""
    layer_max_quiet_s: float = Field(default=48.0, gt=0, le=3600)
    """Each probe that brings congestion back within 4 s doubles that quiet period, up to this;
    one that holds a whole quiet period resets it. At least ``layer_quiet_s``. Default 48."""
    layer_loss: float = Field(default=0.05, gt=0, le=1)
    """A receiver report losing this fraction or more of the subscriber's own packets (the
    publisher's upstream loss taken off) is congestion. From the top layer it takes a second
    such report 1.5 to 3 s after the first (a busy machine drops a burst of UDP now and
    then); below it, one a second. Loss alone never takes a subscriber below the base layer
    to the thin rendition: a lossy but wide link is not helped by fewer bits. Default 0.05."""
    layer_rtt_rise_s: float = Field(default=0.3, gt=0, le=10)
    """A round trip this many seconds over its lowest of the last 30 s (a queue building on
    the path) is congestion, confirmed as ``layer_loss`` is from the top layer. Default 0.3."""
    layer_backlog_bytes: int = Field(default=64 * 1024, gt=0)
    """Bytes waiting in the relay's UDP send buffer toward a subscriber that are congestion,
    at once. Below ``max_backlog_bytes`` (where the subscriber skips to the next keyframe).
    Default 65536."""
    layer_queue_delay_s: float = Field(default=0.5, gt=0, le=10)
    """Seconds of video waiting in the relay's own pacer toward a subscriber (at the rate the
    relay paces it to that subscriber's link) that are congestion, at once, as a send backlog
    is. Default 0.5."""
    workers: int = Field(default=0, ge=0, le=64)
    """`telehealth relay`: relay processes on this machine, each a node of its own
    (``<id>.w<k>``) sharing the machine's UDP ports (the range split between them, or one
    single port each: ``udp_port + k``). 0 (default): one per core."""
    embedded_workers: int = Field(default=0, ge=0, le=64)
    """`serve`: run the embedded relay as this many worker processes (``<id>.w<k>``, started,
    restarted and stopped by `serve`; ports and capacity shared out as for ``workers``)
    instead of inside `serve`'s own process, whose one core signaling needs too. 0 (default):
    the in-process relay. Needs ``embedded = true`` (docs/deploy.md)."""
    heartbeat_s: float = Field(default=0.5, gt=0, le=60)
    """Standalone nodes heartbeat this often (seconds). Default 0.5."""
    heartbeat_misses: int = Field(default=3, ge=1, le=100)
    """A node silent for this many heartbeats is taken out and its consultations move.
    ``heartbeat_s * heartbeat_misses`` is how long a silent relay (power cut, network cut)
    keeps media stopped before the move starts; the default 1.5 s keeps media back within
    5 s (docs/failover.md). Default 3."""
    signaling_grace_s: float = Field(default=120.0, ge=0, le=3600)
    """A standalone node that loses signaling keeps its rooms' media flowing this long while
    it reconnects (signaling restarted or upgraded); past it, it closes them. Default 120."""
    reconnect_delay_max_s: float = Field(default=2.0, gt=0, le=300)
    """A standalone node redials signaling with back-off from 0.25 s up to this: a restarted
    `serve` is found again within this of listening. The back-off resets only after a
    connection that lasted 10 s (two nodes started with one id evict each other). Default 2."""
    adopt_wait_s: float = Field(default=15.0, ge=0, le=600)
    """After `serve` starts, a consultation whose node has not dialled in yet waits this long
    for it (its media may still be flowing there) before being placed on another relay.
    Keep it above ``reconnect_delay_max_s``. Default 15."""
    open_room_timeout_s: float = Field(default=1.0, gt=0, le=60)
    """A relay that does not answer ``open_room`` within this is skipped for the next one
    when a consultation is placed or moved. Default 1."""
    drain_s: float = Field(default=15.0, gt=0, le=600)
    """A standalone node's SIGTERM: how long it waits for the participants moved off it to
    connect to their new relay before closing its rooms. Default 15."""
    udp_port_range: tuple[int, int] | None = None
    """``[min, max]``: every UDP socket the relay's ICE binds lies in these ports (the
    hospital firewall opens exactly them). A full range refuses the participant that needs
    another port (``media_ports_exhausted``); the others are untouched. Default: any port."""
    udp_port: int | None = Field(default=None, ge=1, le=65535)
    """Single-port mode: every participant's ICE and media share this one UDP port,
    demultiplexed by the STUN username, then by the remote address. A port in use stops
    start-up. Default: none (one socket per participant)."""
    announced_port: int | None = Field(default=None, ge=1, le=65535)
    """With ``udp_port``: the port written into the relay's host candidates instead of
    ``udp_port``, when a NAT or port-forward maps another public port onto it (with
    ``announced_address``, the public address). The relay still binds ``udp_port``. With
    `telehealth relay --workers N`, worker k binds ``udp_port + k`` and announces
    ``announced_port + k`` (forward N public ports, in order); `serve` refuses it with
    ``embedded_workers`` above 1. Default: none (``udp_port`` is announced)."""
    signaling_ca_file: Path | None = None
    """A standalone node: PEM CA bundle that signs the signaling server's certificate (a
    hospital's private CA). Default: the system's trusted CAs."""

    @field_validator("udp_port_range")
    @classmethod
    def _range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None:
            low, high = value
            if not 1 <= low <= high <= 65535:
                raise ValueError(f"expected [min, max] with 1 <= min <= max <= 65535, got "
                                 f"{list(value)}")
        return value

    @model_validator(mode="after")
    def _one_port_mode(self) -> RelaySettings:
        if self.udp_port is not None and self.udp_port_range is not None:
            raise ValueError("udp_port (one shared port) and udp_port_range exclude each "
                             "other: set one")
        return self

    @model_validator(mode="after")
    def _announced_port(self) -> RelaySettings:
        if self.announced_port is not None and self.udp_port is None:
            raise ValueError(f"announced_port = {self.announced_port} is the public port of "
                             "the single port: it needs udp_port")
        if self.announced_port is not None and self.embedded_workers > 1:
            raise ValueError(f"announced_port = {self.announced_port} names one port, but "
                             f"embedded_workers = {self.embedded_workers} bind one port each: "
                             "announce it with embedded_workers = 0 or 1")
        return self

    @model_validator(mode="after")
    def _layer_settings(self) -> RelaySettings:
        if self.layer_max_quiet_s < self.layer_quiet_s:
            raise ValueError(f"layer_max_quiet_s = {self.layer_max_quiet_s} is the longest "
                             f"quiet period, below layer_quiet_s = {self.layer_quiet_s}: "
                             "raise it or lower layer_quiet_s")
        if self.max_backlog_bytes and self.layer_backlog_bytes >= self.max_backlog_bytes:
            raise ValueError(f"layer_backlog_bytes = {self.layer_backlog_bytes} steps a "
                             "subscriber's video down before its backlog reaches "
                             f"max_backlog_bytes = {self.max_backlog_bytes} (the skip to a "
                             "keyframe): keep it below")
        return self

    @model_validator(mode="after")
    def _embedded_workers(self) -> RelaySettings:
        if self.embedded_workers and not self.embedded:
            raise ValueError(f"embedded_workers = {self.embedded_workers} runs the embedded "
                             "relay as worker processes: it needs embedded = true (or "
                             "embedded_workers = 0)")
        return self


class TurnSettings(_Section):
    """TURN for browsers behind firewalls: coturn with ``use-auth-secret`` and
    ``static-auth-secret`` equal to ``secret``. Each ``media:join`` ack carries credentials
    made from it (the TURN REST API scheme: username ``<expiry>:<clinician>``, password
    base64(HMAC-SHA1(secret, username)))."""

    secret: str = ""
    """The shared secret (coturn's ``static-auth-secret``). Empty (default): no TURN."""
    urls: list[str] = Field(default_factory=list)
    """TURN URLs handed to browsers, e.g. ``turn:turn.benhvien.vn:3478?transport=udp``,
    ``turn:turn.benhvien.vn:3478?transport=tcp``, ``turns:turn.benhvien.vn:443?transport=tcp``."""
    credential_ttl_s: int = Field(default=12 * 3600, ge=60, le=7 * 86400)
    """How long issued credentials are valid; renewed on every ``media:join`` (reconnect).
    Default 12 hours (one shift: a TURN allocation is refreshed with the same credential)."""
    relay_only_sites: list[str] = Field(default_factory=list)
    """Sites whose firewalls let nothing but TURN through: their clients are told
    ``ice_transport_policy = "relay"``. Default: none."""

    @field_validator("urls")
    @classmethod
    def _turn_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("turn:", "turns:")):
                raise ValueError(f"{url!r} is not a turn: or turns: URL")
        return value

    @field_validator("secret")
    @classmethod
    def _secret_long_enough(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError(f"must be at least 16 characters, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _both(self) -> TurnSettings:
        if bool(self.secret) != bool(self.urls):
            raise ValueError("secret and urls go together: TURN needs both")
        return self


RecordingPolicy = Literal["always", "with_consent", "never"]


class RecordingSettings(_Section):
    """The recorder: archives consultations (Circular 49/2017/TT-BYT: recorded at a connection
    point, minutes kept, stored for at least ten years)."""

    archive_dir: Path | None = None
    """Where recordings, manifests and the audit log go. Default: <storage.data_dir>/archive."""
    policy: RecordingPolicy = "with_consent"
    """``always``: recorded from the start, no question asked; ``with_consent``: every
    participant is asked and recording starts only when all present agree; ``never``."""
    site_policies: dict[str, RecordingPolicy] = Field(default_factory=dict)
    """Per-site policy (site id -> policy). A consultation follows the strictest policy among
    its sites (never > with_consent > always)."""
    retention_years: float = Field(default=10, gt=0)
    """How long archives are kept after the consultation ended; `telehealth archive prune`
    removes only what is older."""
    fsync_interval_s: float = Field(default=1.0, gt=0, le=60)
    """Recorded files are fsync'ed this often (data reaches the page cache continuously)."""
    cluster_ms: int = Field(default=500, ge=100, le=5000)
    """Matroska cluster length: the most a kill -9 can lose of a file (plus the reorder
    window)."""
    hold_s: float = Field(default=1.5, gt=0, le=10)
    """How long a participant's file waits for the first keyframe of their camera before it is
    opened without video."""


class LimitsSettings(_Section):
    """What one client may do: signaling refuses the excess with ``rate_limited`` (and closes a
    connection that keeps going); bystanders are unaffected."""

    events_per_s: float = Field(default=20.0, gt=0)
    """socket.io events a connection may send per second, on average (a token bucket).
    Default 20."""
    events_burst: int = Field(default=40, ge=1)
    """Events a connection may send at once before ``events_per_s`` applies. Default 40."""
    refusals_before_disconnect: int = Field(default=120, ge=1)
    """A connection refused ``rate_limited`` this many times within ``refusal_window_s`` is
    closed. Default 120 (three bursts)."""
    refusal_window_s: float = Field(default=10.0, gt=0)
    """The window ``refusals_before_disconnect`` counts in. Default 10 s."""
    chat_per_minute: int = Field(default=30, ge=1)
    """Chat messages a participant (a clinician, over all their connections, on every process
    with ``live.backend = "redis"``) may send per minute. Default 30."""
    connections_per_clinician: int = Field(default=5, ge=1)
    """Open socket.io connections one clinician may hold (on every process with
    ``live.backend = "redis"``); another is refused ``too_many_connections``. Default 5."""
    waiting_requests_per_clinician: int = Field(default=5, ge=1)
    """Waiting consult requests one clinician may hold; another ``consult:request`` is refused
    ``too_many_requests``. Default 5."""
    max_attachments: int = Field(default=1, ge=0)
    """Binary attachments a socket.io packet may announce (clients send none; relay nodes one
    per media batch). A packet announcing more closes the connection. Default 1."""


class AccountsSettings(_Section):
    """Clinicians' own sign-in (signaling/accounts.py): Argon2id password hashes, lockout,
    TOTP, short access tokens and a refresh cookie."""

    argon2_time_cost: int = Field(default=1, ge=1, le=20)
    """Argon2id passes. With the memory below (OWASP's first recommended setting, m=46 MiB,
    t=1, p=1) one hash takes 55-69 ms on the 2-core reference machine (docs/benchmarks.md).
    Default 1."""
    argon2_memory_kib: int = Field(default=47104, ge=1024, le=4 * 1024 * 1024)
    """Argon2id memory per hash, KiB. Default 47104 (46 MiB, OWASP's floor for Argon2id)."""
    argon2_parallelism: int = Field(default=1, ge=1, le=16)
    """Argon2id lanes. Default 1."""
    hash_threads: int = Field(default=2, ge=1, le=32)
    """Threads that hash and verify passwords, off the event loop; more sign-ins wait their
    turn. Default 2."""
    hash_nice: int = Field(default=10, ge=0, le=19)
    """Nice value of those threads (Linux, per thread): off the loop is not enough on a small
    machine, where two hashing threads take the cores the event loop needs; niced, they take
    only what the loop leaves (docs/benchmarks.md). 0: the process's own. Default 10."""
    access_ttl_s: int = Field(default=600, ge=1)
    """Lifetime of the access token a password sign-in returns. Default 600 s."""
    session_max_s: int = Field(default=12 * 3600, ge=1)
    """Absolute lifetime of a signed-in session (its refresh cookie): one shift. Default 12 h."""
    idle_timeout_s: int = Field(default=30 * 60, ge=1)
    """A session not refreshed for this long is ended (idle log-off). Default 30 min."""
    activation_ttl_s: int = Field(default=72 * 3600, ge=1)
    """How long an activation or reset code is valid. Default 72 h."""
    lockout_failures: int = Field(default=5, ge=1)
    """Failed sign-ins of one account in a row that lock it. Default 5."""
    address_lockout_failures: int = Field(default=20, ge=1)
    """Failed sign-ins from one client address in a row that lock the address (a site's
    clinicians share one NAT address, hence higher). Default 20."""
    lockout_base_s: float = Field(default=30.0, gt=0)
    """The first lockout; each next one doubles. Default 30 s."""
    lockout_max_s: float = Field(default=900.0, gt=0)
    """The longest lockout. Default 900 s (15 min)."""
    tracked_addresses: int = Field(default=10_000, ge=100)
    """Addresses (and unknown identifiers) whose failures are counted in memory; the oldest
    are forgotten beyond this. Default 10000."""
    totp_required_roles: list[str] = Field(default_factory=lambda: ["admin", "coordinator"])
    """Roles whose accounts must use a second factor (TOTP). Default admin, coordinator."""
    totp_issuer: str = Field(default="Telehealth Bridge", min_length=1, max_length=64)
    """The issuer name authenticator apps show. Default "Telehealth Bridge"."""


class OidcSettings(_Section):
    """Single sign-on with the hospital's OpenID Connect issuer (signaling/oidc.py):
    authorization code flow with PKCE; the ID token's ``clinician_claim`` names the
    clinician. Off while ``issuer`` is empty."""

    issuer: str = ""
    """The issuer URL exactly as its discovery document states it (``<issuer>/.well-known/
    openid-configuration`` is read). https, or http on a loopback host (tests). Default
    empty: no single sign-on."""
    client_id: str = ""
    """This server's client id at the issuer (required with an issuer)."""
    client_secret: str = ""
    """Its secret (sent as HTTP Basic to the token endpoint); empty for a public client,
    protected by PKCE alone. Default empty."""
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile"])
    """Scopes asked for; must contain openid. Default openid, profile."""
    clinician_claim: str = Field(default="preferred_username", min_length=1)
    """The claim (ID token, else userinfo) whose value is the clinician id of the directory.
    Default preferred_username."""
    flow_ttl_s: int = Field(default=600, ge=10, le=3600)
    """How long a started sign-in may take at the issuer. Default 600 s."""
    http_timeout_s: float = Field(default=10.0, gt=0, le=60)
    """Timeout of each request to the issuer (discovery, keys, token, userinfo). Default 10 s."""

    @model_validator(mode="after")
    def _complete(self) -> OidcSettings:
        if not self.issuer:
            return self
        scheme, _, rest = self.issuer.partition("://")
        host = rest.split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if scheme != "https" and not (scheme == "http" and
                                      host in ("127.0.0.1", "::1", "localhost")):
            raise ValueError("issuer must be an https URL (http only on a loopback host)")
        if not self.client_id:
            raise ValueError("client_id is required with an issuer")
        if "openid" not in self.scopes:
            raise ValueError("scopes must contain openid")
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """All settings of a `telehealth serve` process."""

    model_config = SettingsConfigDict(
        env_prefix="TELEHEALTH_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    directory: DirectorySettings = Field(default_factory=DirectorySettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    presence: PresenceSettings = Field(default_factory=PresenceSettings)
    live: LiveSettings = Field(default_factory=LiveSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    turn: TurnSettings = Field(default_factory=TurnSettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    accounts: AccountsSettings = Field(default_factory=AccountsSettings)
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides beat the TOML file (passed as init kwargs) beat defaults.
        return (env_settings, init_settings)

    def archive_dir(self) -> Path:
        return self.recording.archive_dir or self.storage.data_dir / "archive"


def _describe(error: Any, source_hint: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    shown = "(missing)" if error["type"] == "missing" else repr(value)
    if isinstance(value, dict):
        shown = "(a table)"
    return f"{key} = {shown}: {error['msg']}{source_hint}"


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The TOML document in ``path``; ``error`` naming ``what`` and the file if it is missing
    or not valid TOML."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


def load_settings(
    path: Path | str | None = None, *, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load settings from ``path`` (or ``$TELEHEALTH_CONFIG``), environment and ``overrides``.

    Raises ConfigError naming every wrong key, its value and what was expected.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    data: dict[str, Any] = {}
    hint = ""
    if path is not None:
        path = Path(path)
        hint = f" (in {path} or TELEHEALTH_* environment)"
        data = read_toml(path, "config file", ConfigError)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = [_describe(error, hint) for error in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
