"""Thin links on loopback: the island and mountain sites of issue #15, for tests and benchmarks.

``UdpLinkEmulator`` is a user-space UDP relay on 127.0.0.1 that stands in front of the relay's
single port (``relay.udp_port``), as a site's satellite or 3G link and a 1:1 NAT would. The relay
binds its own port and announces the emulator's (``relay.announced_port``); every client sends
to ``emulator.port``, and each client flow (one client address) leaves towards the relay from a
socket of its own, so the relay sees one address per client, as behind a NAT. Each flow gets a
``Profile`` per direction (up: client -> relay; down: relay -> client): ``default`` for all, or
one chosen by the client's ICE ufrag, read from the USERNAME (``relayUfrag:clientUfrag``) of
the Binding requests it sends (``assign``; it can change while media flows).
``TcpLinkEmulator`` puts socket.io on the same kind of link (signaling shares it).

The model, per direction of a flow, in the order a packet meets it:

1. **Outage**: during a scheduled outage (``outage_every_s``, ``outage_s``,
   ``outage_first_at_s``, on the emulator's clock, started with it) nothing passes: packets
   arriving are dropped, and so are packets already in flight whose release falls inside it.
2. **Loss**, before the queue: random (``loss``), then bursty (``burst``: a Gilbert-Elliott
   chain stepped once per packet; in its bad state a packet is lost with ``loss_in_bad``).
3. **Rate and queue**: the link serialises at ``rate_bps``; a packet starts when the one before
   it has left, and the bytes still waiting (computed from when the link is next free, no
   timer) may not pass ``queue_bytes``: a packet that would is dropped (tail drop), as a modem
   or a satellite terminal's buffer does. ``rate_bps = None``: no limit, no queue.
4. **Delay**, after the queue: ``delay_ms`` one way, plus a jitter drawn uniformly in
   ``[-jitter_ms, +jitter_ms]``. Release times never go backwards: a packet never overtakes the
   one before it (a link's queue is FIFO), so jitter is delay variation, never reordering.

Everything random is drawn from ``random.Random`` seeded by ``seed``, the flow's number (in
order of arrival) and the direction, loss and jitter from separate streams: the same traffic
in the same order loses the same packets whatever the rate or the delay.

The data path creates no task per packet: the sockets are read with ``loop.add_reader``
(several datagrams per wake-up), and each direction of a flow keeps its packets in a FIFO with
one timer, armed for the head's release time. 4 Mbps of 1200-byte datagrams cost it about 7 %
of one core of the 2-core test machine (the command line, measured with psutil).

What it does not emulate: reordering (see 4), duplication, corruption, MTU limits and
fragmentation (datagrams pass whole whatever their size), a link shared by several flows (each
client flow, so each peer connection, has its own up and down link; their outages coincide),
and TCP loss (a TCP link has the same delay, rate and outages but loses nothing: real TCP turns
loss into retransmission delay).

Nor can it catch the relay's packets sent straight to a client's own address: on loopback the
relay reaches any address a client signals, around the emulator (without care, aioice
nominates that direct pair: it answers first). A client behind the emulator must therefore
signal no candidates, so that the relay learns its address from its checks, through the
emulator (peer-reflexive), as behind a real NAT: ``hide_candidates`` for one SDP,
``hide_client_addresses`` for a whole in-process relay (the server of ``tests.support.
run_server``: ``server.app[SERVICES].embedded``). Checked with aiortc clients (the test) and
with Chromium pages, which send from each of their addresses (127.0.0.1 and the machine's
other one): one flow each, the same ufrag, the same profile. A relay in another process (a
`telehealth serve` subprocess) cannot be wrapped so.

Use it from an async test::

    async with UdpLinkEmulator(("127.0.0.1", relay_udp_port), default="good", seed=7) as link:
        # the relay: MediaConfig(udp_port=relay_udp_port, announced_port=link.port)
        hide_client_addresses(relay)           # an in-process LocalRelay (see below)
        for ufrag in sdp_ufrags(pc.localDescription.sdp):
            link.assign(ufrag, "vsat")         # that client's flows on vsat from now on
        link.stats()                           # per flow: bytes, packets, drops, delays

or from a shell, in front of a relay (``--tcp`` for a TCP proxy)::

    python -m tests.link_emulator --profile vsat --listen-port 3479 --to 127.0.0.1:3478
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import random
import re
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

Address = tuple[str, int]


class GilbertElliott(BaseModel):
    """Bursty loss: a two-state chain stepped once per packet. The long-run share of packets
    lost is ``p_enter_bad / (p_enter_bad + p_leave_bad) * loss_in_bad``; a burst lasts
    ``1 / p_leave_bad`` packets on average."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    p_enter_bad: float = Field(ge=0, le=1)
    p_leave_bad: float = Field(gt=0, le=1)
    loss_in_bad: float = Field(default=1.0, ge=0, le=1)

    @property
    def mean_loss(self) -> float:
        return self.p_enter_bad / (self.p_enter_bad + self.p_leave_bad) * self.loss_in_bad


class Profile(BaseModel):
    """One direction of a link (see the module docstring for the order things apply in)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_bps: int | None = Field(default=None, gt=0)
    """Serialisation rate, bits per second. None: unlimited (and no queue)."""
    queue_bytes: int = Field(default=64 * 1024, ge=0)
    """Bytes that may wait to be sent; more is tail-dropped."""
    delay_ms: float = Field(default=0.0, ge=0)
    """One-way delay, after the queue."""
    jitter_ms: float = Field(default=0.0, ge=0)
    """Delay varies uniformly by up to this either way (never below 0, never reordering)."""
    loss: float = Field(default=0.0, ge=0, le=1)
    """Random loss, 0-1, before the queue."""
    burst: GilbertElliott | None = None
    """Bursty loss, on top of ``loss``."""
    outage_every_s: float | None = Field(default=None, gt=0)
    """An outage starts this often. None: never."""
    outage_s: float = Field(default=0.0, ge=0)
    """How long each outage lasts."""
    outage_first_at_s: float = Field(default=0.0, ge=0)
    """When the first outage starts, from the emulator's start."""

    @model_validator(mode="after")
    def _outages_fit(self) -> Profile:
        if self.outage_every_s is not None and self.outage_s >= self.outage_every_s:
            raise ValueError(f"outage_s ({self.outage_s}) must be shorter than outage_every_s "
                             f"({self.outage_every_s}): the link would never be up")
        return self

    def in_outage(self, t: float) -> bool:
        """``t`` seconds after the start falls inside an outage."""
        if self.outage_every_s is None or self.outage_s <= 0 or t < self.outage_first_at_s:
            return False
        return (t - self.outage_first_at_s) % self.outage_every_s < self.outage_s

    def outage_end(self, t: float) -> float:
        """When the outage ``t`` falls in ends (``t`` itself if none does)."""
        if not self.in_outage(t):
            return t
        assert self.outage_every_s is not None
        since = (t - self.outage_first_at_s) % self.outage_every_s
        return t - since + self.outage_s


def _kbps(rate: int) -> int:
    return rate * 1000


def _queue(rate_bps: int, seconds: float) -> int:
    return int(rate_bps * seconds / 8)


_GOOD = Profile(delay_ms=5, jitter_ms=1)
_VSAT = Profile(rate_bps=_kbps(512), queue_bytes=_queue(_kbps(512), 0.5), delay_ms=300,
                jitter_ms=10, loss=0.01)
_TRUONG_SA = Profile(rate_bps=_kbps(256), queue_bytes=_queue(_kbps(256), 0.5), delay_ms=350,
                     jitter_ms=15,
                     burst=GilbertElliott(p_enter_bad=0.01, p_leave_bad=0.32, loss_in_bad=1.0),
                     outage_every_s=60, outage_s=5, outage_first_at_s=30)

PROFILES: dict[str, tuple[Profile, Profile]] = {
    # A hospital's fibre or LAN: no limit that matters here.
    "good": (_GOOD, _GOOD),
    # A district on 4G: a few Mbps up, more down, 60 ms RTT.
    "4g": (Profile(rate_bps=_kbps(4000), queue_bytes=_queue(_kbps(4000), 0.2), delay_ms=30,
                   jitter_ms=8, loss=0.002),
           Profile(rate_bps=_kbps(10_000), queue_bytes=_queue(_kbps(10_000), 0.2), delay_ms=30,
                   jitter_ms=8, loss=0.002)),
    # A congested 3G cell (Mường Nhé): under a Mbps up, 180 ms RTT, 1 % loss.
    "3g": (Profile(rate_bps=_kbps(768), queue_bytes=_queue(_kbps(768), 0.4), delay_ms=90,
                   jitter_ms=20, loss=0.01),
           Profile(rate_bps=_kbps(1500), queue_bytes=_queue(_kbps(1500), 0.4), delay_ms=90,
                   jitter_ms=20, loss=0.01)),
    # A satellite (VSAT) station: 512 kbps, 600 ms RTT, 1 % loss.
    "vsat": (_VSAT, _VSAT),
    # Trường Sa: a shared satellite link, 256 kbps, 700 ms RTT, 3 % loss in bursts, and a 5 s
    # outage each minute (the first 30 s after the start).
    "truong-sa": (_TRUONG_SA, _TRUONG_SA),
}

ProfileChoice = str | Profile | tuple[Profile, Profile]
"""A profile's name in PROFILES, one Profile for both directions, or ``(up, down)``."""


def profile_pair(choice: ProfileChoice) -> tuple[Profile, Profile]:
    """``(up, down)`` of a choice; ValueError naming the profiles for an unknown name."""
    if isinstance(choice, Profile):
        return choice, choice
    if isinstance(choice, tuple):
        return choice
    try:
        return PROFILES[choice]
    except KeyError:
        raise ValueError(f"no link profile {choice!r}: one of {', '.join(PROFILES)}") from None


def hide_candidates(sdp: str) -> str:
    """``sdp`` without its ICE candidates nor its end-of-candidates: what a client behind the
    emulator gives the relay, which then learns the client's address from the client's checks
    through the emulator (and keeps waiting for them), never a loopback address it could reach
    around the emulator."""
    return re.sub(r"^a=(candidate:|end-of-candidates).*\r?\n", "", sdp, flags=re.MULTILINE)


def sdp_ufrags(sdp: str) -> set[str]:
    """The ICE ufrags of a client's SDP (its ``localDescription``): what ``assign`` takes."""
    return set(re.findall(r"^a=ice-ufrag:(\S+)", sdp, flags=re.MULTILINE))


def peer_ufrags(peer: Any) -> set[str]:
    """The ICE ufrags of an aiortc test participant's peer connections (tests/media.py's
    ``MediaPeer``: ``publish_pc``, ``subscribe_pc``): what ``assign`` takes to put it behind
    a profile."""
    found: set[str] = set()
    for pc in (peer.publish_pc, peer.subscribe_pc):
        if pc is not None and pc.localDescription is not None:
            found |= sdp_ufrags(pc.localDescription.sdp)
    return found


def hide_client_addresses(relay: Any) -> None:
    """Make a LocalRelay (relay/embedded.py; the in-process one of a test's server is
    ``server.app[SERVICES].embedded``) read every client's SDP through ``hide_candidates`` and
    ignore trickled candidates, for every participant: then no client, aiortc or Chromium,
    can be reached around the emulator, whatever it signals. Wraps the instance's methods;
    nothing else changes."""
    publish, answer, probe = relay.publish, relay.answer, relay.probe

    async def hidden_publish(room_id: str, participant_id: str, sdp: str,
                             sources: dict[str, str]) -> Any:
        return await publish(room_id, participant_id, hide_candidates(sdp), sources)

    async def hidden_answer(room_id: str, participant_id: str, transport_id: str,
                            sdp: str) -> Any:
        return await answer(room_id, participant_id, transport_id, hide_candidates(sdp))

    async def hidden_probe(room_id: str, participant_id: str, sdp: str) -> Any:
        return await probe(room_id, participant_id, hide_candidates(sdp))

    async def no_candidate(room_id: str, participant_id: str, transport_id: str,
                           candidate: dict[str, Any]) -> None:
        return None

    relay.publish, relay.answer, relay.probe = hidden_publish, hidden_answer, hidden_probe
    relay.add_ice_candidate = no_candidate


# -- one direction of a flow ------------------------------------------------------------------


@dataclass
class DirectionStats:
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    dropped_queue: int = 0
    dropped_loss: int = 0
    dropped_outage: int = 0
    send_errors: int = 0
    """Released but refused by the socket (the receiver gone, or its buffer full)."""
    delay_sum_s: float = 0.0
    """Time spent in the emulator by the packets delivered (queue, delay, jitter)."""
    delay_max_s: float = 0.0
    queue_max_bytes: int = 0

    @property
    def delay_mean_s(self) -> float:
        return self.delay_sum_s / self.packets_out if self.packets_out else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "delay_mean_s": self.delay_mean_s}


class Direction:
    """One direction of a link: outage, loss, queue, delay; a FIFO of packets waiting for
    their release and one timer for its head."""

    def __init__(self, profile: Profile, deliver: Callable[[bytes], object], *, epoch: float,
                 seed: str, loop: asyncio.AbstractEventLoop) -> None:
        self.profile = profile
        """Changeable at any time: what is already queued keeps its release time."""
        self.stats = DirectionStats()
        self._deliver = deliver
        self._epoch = epoch
        self._loop = loop
        self._loss = random.Random(seed + ":loss")
        self._jitter = random.Random(seed + ":jitter")
        self._bad = False
        self._free_at = 0.0
        """When the link has sent everything queued so far (the serialisation clock)."""
        self._last_release = 0.0
        self._pending: collections.deque[tuple[float, float, bytes]] = collections.deque()
        """(release, arrival, datagram), release times in order."""
        self._timer: asyncio.TimerHandle | None = None

    def _lost(self, profile: Profile) -> bool:
        lost = profile.loss > 0 and self._loss.random() < profile.loss
        burst = profile.burst
        if burst is not None:
            # The chain steps for every packet, lost at random or not, so that the bursts'
            # pattern does not depend on the random loss drawn with it.
            self._bad = (self._loss.random() >= burst.p_leave_bad if self._bad
                         else self._loss.random() < burst.p_enter_bad)
            if self._bad and not lost:
                lost = burst.loss_in_bad >= 1 or self._loss.random() < burst.loss_in_bad
        return lost

    def push(self, data: bytes, now: float) -> None:
        stats, profile, size = self.stats, self.profile, len(data)
        stats.packets_in += 1
        stats.bytes_in += size
        if profile.outage_every_s is not None and profile.in_outage(now - self._epoch):
            stats.dropped_outage += 1
            return
        if (profile.loss > 0 or profile.burst is not None) and self._lost(profile):
            stats.dropped_loss += 1
            return
        departure = now
        if profile.rate_bps is not None:
            start = self._free_at if self._free_at > now else now
            queued = int((start - now) * profile.rate_bps / 8)
            if queued + size > profile.queue_bytes:
                stats.dropped_queue += 1
                return
            if queued + size > stats.queue_max_bytes:
                stats.queue_max_bytes = queued + size
            departure = self._free_at = start + size * 8 / profile.rate_bps
        release = departure + profile.delay_ms / 1000
        if profile.jitter_ms:
            release += self._jitter.uniform(-profile.jitter_ms, profile.jitter_ms) / 1000
        if release < self._last_release:
            release = self._last_release
        if release < now:
            release = now
        self._last_release = release
        self._pending.append((release, now, data))
        if self._timer is None:
            self._timer = self._loop.call_at(release, self._release)

    def _release(self) -> None:
        self._timer = None
        now = self._loop.time()
        pending, stats, profile = self._pending, self.stats, self.profile
        outages = profile.outage_every_s is not None
        while pending and pending[0][0] <= now + 0.0005:
            release, arrival, data = pending.popleft()
            if outages and profile.in_outage(release - self._epoch):
                stats.dropped_outage += 1
                continue
            held = now - arrival
            stats.packets_out += 1
            stats.bytes_out += len(data)
            stats.delay_sum_s += held
            if held > stats.delay_max_s:
                stats.delay_max_s = held
            try:
                self._deliver(data)
            except OSError:
                stats.send_errors += 1
        if pending:
            self._timer = self._loop.call_at(pending[0][0], self._release)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()


# -- UDP ----------------------------------------------------------------------------------------

_READ_BATCH = 64
"""Datagrams read per wake-up of a socket, before giving the loop back."""
_BUFFER_BYTES = 2 * 1024 * 1024


def client_ufrag(data: bytes) -> str | None:
    """The client's ufrag in a STUN Binding request (USERNAME ``relayUfrag:clientUfrag``), read
    without a STUN library: the packet's first bytes and one attribute."""
    if len(data) < 20 or data[0] > 3 or data[:2] != b"\x00\x01" \
            or data[4:8] != b"\x21\x12\xa4\x42":
        return None
    offset, end = 20, min(len(data), 20 + struct.unpack_from("!H", data, 2)[0])
    while offset + 4 <= end:
        kind, length = struct.unpack_from("!HH", data, offset)
        if kind == 0x0006:  # USERNAME
            username = data[offset + 4:offset + 4 + length].decode("utf-8", "replace")
            _, colon, mine = username.partition(":")
            return mine if colon and mine else None
        offset += 4 + (length + 3) // 4 * 4
    return None


class Flow:
    """One client address: its socket towards the relay and the two directions."""

    def __init__(self, emulator: UdpLinkEmulator, index: int, client: Address,
                 sock: socket.socket, pair: tuple[Profile, Profile], name: str) -> None:
        self.index = index
        self.client = client
        self.sock = sock
        self.ufrag: str | None = None
        """The client's ICE ufrag, from its latest Binding request."""
        self.last_active = emulator.loop.time()
        """When a datagram last came from either side."""
        self.profile_name = name
        loop, epoch, seed = emulator.loop, emulator.epoch, f"{emulator.seed}:{index}"
        listener = emulator.listener
        self.up = Direction(pair[0], sock.send, epoch=epoch, seed=seed + ":up", loop=loop)
        self.down = Direction(pair[1], lambda data: listener.sendto(data, client),
                              epoch=epoch, seed=seed + ":down", loop=loop)

    @property
    def local_port(self) -> int:
        """The port the relay sees this client on."""
        port: int = self.sock.getsockname()[1]
        return port

    def use(self, pair: tuple[Profile, Profile], name: str) -> None:
        self.up.profile, self.down.profile = pair
        self.profile_name = name

    def stats(self) -> dict[str, Any]:
        return {"index": self.index, "client": f"{self.client[0]}:{self.client[1]}",
                "ufrag": self.ufrag,
                "profile": self.profile_name, "relay_side_port": self.local_port,
                "up": self.up.stats.as_dict(), "down": self.down.stats.as_dict()}

    def close(self) -> None:
        self.up.close()
        self.down.close()
        self.sock.close()


def _name(choice: ProfileChoice) -> str:
    return choice if isinstance(choice, str) else "custom"


class UdpLinkEmulator:
    """A UDP relay on ``host`` (an ephemeral ``port`` unless given) in front of ``target``."""

    def __init__(self, target: Address, *, default: ProfileChoice = "good", seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0, idle_s: float = 120.0) -> None:
        """``idle_s``: a flow nothing came through for this long (a closed peer connection:
        a live one's consent checks pass every few seconds, outages included) is closed,
        its stats kept in ``stats()``."""
        self.target = target
        self.idle_s = idle_s
        self.seed = seed
        self.host = host
        self.port = port
        self.flows: dict[Address, Flow] = {}
        self._expired: list[dict[str, Any]] = []
        self._next_index = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._default = profile_pair(default)
        self._default_name = _name(default)
        self._assigned: dict[str, tuple[tuple[Profile, Profile], str]] = {}
        self.epoch = 0.0
        """The emulator's start (``loop.time()``): outages are scheduled from it."""
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the emulator is not started"
        return self._loop

    @property
    def listener(self) -> socket.socket:
        assert self._listener is not None, "the emulator is not started"
        return self._listener

    async def start(self) -> UdpLinkEmulator:
        self._loop = asyncio.get_running_loop()
        self.epoch = self._loop.time()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER_BYTES)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._loop.add_reader(sock.fileno(), self._from_clients)
        self._sweep = self._loop.call_later(self.idle_s / 4, self._close_idle)
        logger.info("link emulator: UDP %s:%d -> %s:%d, default %s", self.host, self.port,
                    self.target[0], self.target[1], self._default_name)
        return self

    async def __aenter__(self) -> UdpLinkEmulator:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        self.close()

    # -- profiles ---------------------------------------------------------------------------
    def set_default(self, choice: ProfileChoice) -> None:
        """The profile of every flow not assigned one (now, and flows to come)."""
        self._default, self._default_name = profile_pair(choice), _name(choice)
        for flow in self.flows.values():
            self._apply(flow)

    def assign(self, ufrag: str, choice: ProfileChoice | None) -> None:
        """The flows of the client whose ICE ufrag is ``ufrag`` use ``choice`` from now on
        (None: the default again); packets already queued keep their release times."""
        if choice is None:
            self._assigned.pop(ufrag, None)
        else:
            self._assigned[ufrag] = (profile_pair(choice), _name(choice))
        for flow in self.flows.values():
            if flow.ufrag == ufrag:
                self._apply(flow)

    def _apply(self, flow: Flow) -> None:
        pair, name = self._assigned.get(flow.ufrag or "", (self._default, self._default_name))
        flow.use(pair, name)

    def flows_of(self, ufrag: str) -> list[Flow]:
        return [flow for flow in self.flows.values() if flow.ufrag == ufrag]

    def stats(self) -> list[dict[str, Any]]:
        """Per flow, in order of arrival (idle flows closed since included)."""
        live = [flow.stats() for flow in sorted(self.flows.values(), key=lambda f: f.index)]
        return sorted(self._expired + live, key=lambda f: int(f["index"]))

    def _close_idle(self) -> None:
        now = self.loop.time()
        for client, flow in list(self.flows.items()):
            if now - flow.last_active > self.idle_s:
                logger.debug("link emulator: flow %d from %s:%d idle, closed", flow.index,
                             client[0], client[1])
                self._expired.append(flow.stats())
                del self.flows[client]
                self.loop.remove_reader(flow.sock.fileno())
                flow.close()
        self._sweep = self.loop.call_later(self.idle_s / 4, self._close_idle)

    # -- the data path ----------------------------------------------------------------------
    def _flow(self, client: Address) -> Flow | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER_BYTES)
            sock.bind((self.host, 0))
            sock.connect(self.target)
        except OSError as exc:
            sock.close()
            logger.warning("link emulator: no socket for %s:%d: %s", client[0], client[1], exc)
            return None
        sock.setblocking(False)
        flow = Flow(self, self._next_index, client, sock, self._default, self._default_name)
        self._next_index += 1
        self.flows[client] = flow
        self.loop.add_reader(sock.fileno(), self._from_relay, flow)
        logger.debug("link emulator: flow %d from %s:%d", flow.index, client[0], client[1])
        return flow

    def _from_clients(self) -> None:
        listener, flows, now = self.listener, self.flows, self.loop.time()
        for _ in range(_READ_BATCH):
            try:
                data, client = listener.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error of an earlier send: nothing to read
                continue
            client = (client[0], client[1])
            flow = flows.get(client)
            if flow is None:
                flow = self._flow(client)
                if flow is None:
                    continue
            flow.last_active = now
            if data and data[0] < 4:
                ufrag = client_ufrag(data)
                if ufrag is not None and ufrag != flow.ufrag:
                    flow.ufrag = ufrag
                    self._apply(flow)
            flow.up.push(data, now)

    def _from_relay(self, flow: Flow) -> None:
        sock, down, now = flow.sock, flow.down, self.loop.time()
        flow.last_active = now
        for _ in range(_READ_BATCH):
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable: the relay is not (yet) listening
                continue
            down.push(data, now)

    def close(self) -> None:
        """Idempotent: every flow and the listening socket closed, queued packets dropped."""
        loop = self._loop
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for flow in self.flows.values():
            if loop is not None and not loop.is_closed():
                loop.remove_reader(flow.sock.fileno())
            flow.close()
        self.flows.clear()
        if self._listener is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None


# -- TCP ----------------------------------------------------------------------------------------

_SEGMENT = 1400
"""Bytes scheduled as one unit: what a TCP segment carries on a 1500-byte link."""


class _Pipe:
    """One direction of a TCP connection: reads, schedules each segment's release (rate,
    delay, jitter; an outage holds them, never loses them), writes in order."""

    def __init__(self, proxy: TcpLinkEmulator, up: bool, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, seed: str) -> None:
        self.proxy = proxy
        self.up = up
        self.reader = reader
        self.writer = writer
        self._jitter = random.Random(seed)
        self._free_at = 0.0
        self._last_release = 0.0
        self._pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._more = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._eof = False

    @property
    def profile(self) -> Profile:
        return self.proxy.profiles[0 if self.up else 1]

    def _schedule(self, chunk: bytes, now: float) -> None:
        profile, epoch = self.profile, self.proxy.epoch
        for start in range(0, len(chunk), _SEGMENT):
            segment = chunk[start:start + _SEGMENT]
            departure = self._free_at if self._free_at > now else now
            departure = profile.outage_end(departure - epoch) + epoch
            if profile.rate_bps is not None:
                departure += len(segment) * 8 / profile.rate_bps
            self._free_at = departure
            release = departure + profile.delay_ms / 1000
            if profile.jitter_ms:
                release += self._jitter.uniform(-profile.jitter_ms, profile.jitter_ms) / 1000
            release = max(release, self._last_release, now)
            release = profile.outage_end(release - epoch) + epoch
            self._last_release = release
            self._pending.append((release, segment))
            self._queued += len(segment)
        self._more.set()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while chunk := await self.reader.read(16 * 1024):
                self.proxy.bytes[0 if self.up else 1] += len(chunk)
                self._schedule(chunk, loop.time())
                if self._queued > max(self.profile.queue_bytes, 64 * 1024):
                    # The sender's window closes, as a full TCP buffer makes it.
                    self._room.clear()
                    await self._room.wait()
        except (ConnectionError, OSError):
            pass
        finally:
            self._eof = True
            self._more.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._pending:
                    if self._eof:
                        break
                    self._more.clear()
                    await self._more.wait()
                    continue
                wait = self._pending[0][0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = loop.time() + 0.0005
                out = []
                while self._pending and self._pending[0][0] <= now:
                    out.append(self._pending.popleft()[1])
                if not out:
                    continue
                data = b"".join(out)
                self._queued -= len(data)
                if self._queued <= max(self.profile.queue_bytes, 64 * 1024):
                    self._room.set()
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writer.close()
            self.proxy.forget(self.writer)


class TcpLinkEmulator:
    """A TCP proxy ``listen -> target`` with one profile pair (up: towards ``target``) for
    every connection: the delay, rate and outages of the link, no loss."""

    def __init__(self, target: Address, profile: ProfileChoice = "good", *, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.profiles = profile_pair(profile)
        """``(up, down)``; may change at any time (new segments follow it)."""
        self.seed = seed
        self.host = host
        self.port = port
        self.epoch = 0.0
        self.connections = 0
        self.bytes = [0, 0]
        """Bytes read from the client (up) and from the target (down)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def set_profile(self, profile: ProfileChoice) -> None:
        self.profiles = profile_pair(profile)

    def forget(self, writer: asyncio.StreamWriter) -> None:
        """A connection's side closed: nothing left to abort at ``close``."""
        self._writers.discard(writer)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> TcpLinkEmulator:
        self.epoch = asyncio.get_running_loop().time()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("link emulator: TCP %s:%d -> %s:%d", self.host, self.port, *self.target)
        return self

    async def __aenter__(self) -> TcpLinkEmulator:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        index = self.connections
        self.connections += 1
        self._writers |= {writer, far_writer}
        for up, source, sink in ((True, reader, far_writer), (False, far_reader, writer)):
            pipe = _Pipe(self, up, source, sink, f"{self.seed}:{index}:{'up' if up else 'down'}")
            for step in (pipe.read(), pipe.write()):
                task = asyncio.get_running_loop().create_task(step)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None


# -- command line -------------------------------------------------------------------------------


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    link: UdpLinkEmulator | TcpLinkEmulator
    if args.tcp:
        link = await TcpLinkEmulator(args.to, args.profile, seed=args.seed, host=args.host,
                                     port=args.listen_port).start()
    else:
        link = await UdpLinkEmulator(args.to, default=args.profile, seed=args.seed,
                                     host=args.host, port=args.listen_port).start()
    print(f"READY {'tcp' if args.tcp else 'udp'} {args.host}:{link.port} -> "
          f"{args.to[0]}:{args.to[1]} profile {args.profile}", flush=True)

    def report() -> None:
        if isinstance(link, UdpLinkEmulator):
            print(json.dumps(link.stats()), flush=True)
        else:
            print(json.dumps({"connections": link.connections, "bytes_up": link.bytes[0],
                              "bytes_down": link.bytes[1]}), flush=True)

    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.stats_every or None)
            if args.stats_every:
                report()
    finally:
        report()
        if isinstance(link, TcpLinkEmulator):
            await link.close()
        else:
            link.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.link_emulator",
                                     description="A thin link (issue #15) on loopback.")
    parser.add_argument("--profile", default="vsat", choices=sorted(PROFILES))
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="listening address")
    parser.add_argument("--to", type=_address, required=True, help="HOST:PORT behind the link")
    parser.add_argument("--tcp", action="store_true", help="a TCP proxy (socket.io)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-every", type=float, default=0.0,
                        help="print the stats as JSON every this many seconds (0: at exit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
