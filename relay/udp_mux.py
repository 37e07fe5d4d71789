"""The relay's UDP ports, as hospital IT opens them in its firewall.

``relay.udp_port_range = [min, max]`` (``PortRange``): each ICE host socket of the relay is
bound to a free port of the range, the next one after the last taken (a port just freed is not
handed straight to someone else, whose stray packets it could still get). A participant whose
connection finds every port taken is refused with ``media_ports_exhausted``; the others are
untouched.

``relay.udp_port = N`` (``UdpMux``): every participant's ICE and media share ONE socket, as
LiveKit (pion's UDPMux), mediasoup's WebRtcServer and Galene do. Each aioice connection of the
relay gets, instead of a socket, its own aioice protocol whose transport is a ``SharedPort``: a
facade over the shared socket (its close only unregisters). Datagrams are sorted by

* STUN Binding requests: by the USERNAME's first half, the relay's local ufrag (made unique
  among the live connections while gathering). A request whose MESSAGE-INTEGRITY checks out
  with that connection's password binds its source address to the connection; a forged one
  binds nothing and is dropped (aioice itself would only answer it with a 401);
* STUN responses: to the connection that sent the request (by transaction id);
* anything else (DTLS, SRTP, SRTCP): to the connection the source address is bound to, handed
  straight to its ICE connection; from an address bound to nobody: dropped and counted.

``relay.announced_port = M`` (with ``relay.udp_port``): the relay still binds ``udp_port``, but
its host candidates say ``M``, the public port a NAT or port-forward maps onto it (as
``announced_address`` is the public address; relay/sdp.py writes that one). Each connection's
``SharedPort`` reports ``M`` as its socket's port, which is what aioice writes into the
candidate; nothing else reads it. What arrives through the mapping comes from the clients'
addresses as the NAT rewrote them, and is sorted the same way.

A connection that closes (a participant leaving, new peer connections after a reconnect)
removes only its own ufrag and addresses. Both modes are bound through relay/hooks.py, for the
relay's connections only (``hooks.relay_gathering``)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from relay import hooks
from relay.config import MediaConfig
from relay.errors import MediaPortsExhausted, UdpPortsUnavailable

logger = logging.getLogger(__name__)

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
"""Asked for the shared socket's kernel buffers (capped by net.core.rmem_max/wmem_max): one
socket carries what every participant's socket carried."""
_TAKEN = (errno.EADDRINUSE, errno.EACCES)


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


# -- relay.udp_port_range --------------------------------------------------------------------


class PortRange:
    """``hooks.HostSockets`` binding each host socket to a free port of ``[low, high]``."""

    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high
        self.exhausted = 0
        """Connections refused for want of a port."""
        self._next = low

    def addresses(self, addresses: list[str]) -> list[str]:
        return addresses

    def _order(self) -> list[int]:
        ports = list(range(self.low, self.high + 1))
        start = self._next - self.low
        return ports[start:] + ports[:start]

    def probe(self, addresses: list[str]) -> None:
        """At start-up: the range is valid and each address has a free port in it."""
        if not 1 <= self.low <= self.high <= 65535:
            raise UdpPortsUnavailable(
                f"relay.udp_port_range must be [min, max] with 1 <= min <= max <= 65535, got "
                f"[{self.low}, {self.high}]")
        for address in addresses:
            for port in self._order():
                try:
                    _bind(address, port).close()
                    break
                except OSError as exc:
                    if exc.errno not in _TAKEN:
                        raise UdpPortsUnavailable(
                            f"relay.udp_port_range: cannot bind UDP {address}:{port}: "
                            f"{exc.strerror}") from None
            else:
                raise UdpPortsUnavailable(
                    f"relay.udp_port_range [{self.low}, {self.high}]: every port is in use on "
                    f"{address}: free some or choose another range")

    async def bind(self, connection: hooks.IceConnection,
                   address: str) -> hooks.StunProtocol | None:
        loop = asyncio.get_running_loop()
        for port in self._order():
            try:
                sock = _bind(address, port)
            except OSError as exc:
                if exc.errno in _TAKEN:
                    continue
                # As aioice does with an address it cannot bind: gather without it.
                logger.info("relay.udp_port_range: cannot bind %s:%d (%s); skipped", address,
                            port, exc.strerror)
                return None
            self._next = self.low if port == self.high else port + 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES // 4)
            _, protocol = await loop.create_datagram_endpoint(
                lambda: hooks.stun_protocol(connection), sock=sock)
            return protocol
        self.exhausted += 1
        logger.warning("relay.udp_port_range [%d, %d]: every port is in use on %s; a "
                       "participant's connection was refused (%d so far): widen the range",
                       self.low, self.high, address, self.exhausted)
        raise MediaPortsExhausted(
            f"the relay has no free UDP port for this connection: every port of "
            f"relay.udp_port_range [{self.low}, {self.high}] is in use; try again when "
            "someone leaves, or ask IT to widen relay.udp_port_range")

    def close(self) -> None:
        if hooks.host_sockets() is self:
            hooks.set_host_sockets(None)


# -- relay.udp_port --------------------------------------------------------------------------


class SharedPort(asyncio.DatagramTransport):
    """One aioice protocol's view of the shared socket: sends go straight to it; closing
    unregisters the protocol and nothing else."""

    def __init__(self, mux: UdpMux, member: _Member, protocol: hooks.StunProtocol,
                 address: str) -> None:
        super().__init__()
        self._mux = mux
        self._member = member
        self._protocol = protocol
        # The candidate's address: the announced port when a NAT maps another one onto ours.
        self._sockname = (address, mux.announced_port)
        self._closed = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not self._closed:
            self._mux.send(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._sockname
        return self._mux.extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._mux.write_buffer_size()

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mux.detach(self._member, self._protocol)
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


@dataclass(eq=False)
class _Member:
    """One aioice connection of the relay on the shared socket."""

    connection: hooks.IceConnection
    ufrag: str
    protocols: list[hooks.StunProtocol] = field(default_factory=list)
    addresses: set[tuple[str, int]] = field(default_factory=set)


class _Route:
    """Where datagrams from one remote address go."""

    __slots__ = ("member", "protocol", "receive")

    def __init__(self, member: _Member, protocol: hooks.StunProtocol) -> None:
        self.member = member
        self.protocol = protocol
        self.receive: Callable[[bytes], None] = hooks.data_receiver(protocol)


class UdpMux(asyncio.DatagramProtocol):
    """``hooks.HostSockets`` putting every connection of the relay on one UDP socket."""

    def __init__(self, address: str, port: int, announced_port: int | None = None) -> None:
        self.address = address
        """The address the socket is bound to (``0.0.0.0``: every IPv4 address)."""
        self.port = port
        self.announced_port = announced_port or port
        """The port host candidates announce (``relay.announced_port``, else ``port``)."""
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        """Datagrams from addresses bound to no connection."""
        self.refused = 0
        """Binding requests for an unknown ufrag or failing their integrity check."""
        self._members: dict[str, _Member] = {}
        self._routes: dict[tuple[str, int], _Route] = {}
        self._sendto: Callable[..., None] = lambda data, addr: None

    @classmethod
    async def open(cls, address: str, port: int, announced_port: int | None = None) -> UdpMux:
        """The shared socket bound on ``address``:``port``, candidates announcing
        ``announced_port`` if given; UdpPortsUnavailable if it cannot be bound."""
        try:
            sock = _bind(address, port)
        except OSError as exc:
            raise UdpPortsUnavailable(
                f"relay.udp_port {port} cannot be bound on {address}: {exc.strerror}"
                + (" (another program, or another relay, holds it: stop it or choose another "
                   "port)" if exc.errno == errno.EADDRINUSE else "")) from None
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        # Linux reports twice what it grants; less than asked means a low net.core.*mem_max.
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        mux = cls(address, port, announced_port)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: mux, sock=sock)
        logger.info("relay.udp_port: every participant's ICE and media on UDP %s:%d (receive "
                    "buffer %d KiB)", address, port, granted // 1024)
        if mux.announced_port != port:
            logger.info("relay.announced_port: host candidates announce port %d, mapped onto "
                        "%d", mux.announced_port, port)
        if granted < SOCKET_BUFFER_BYTES:
            logger.warning("relay.udp_port: the kernel granted a %d KiB receive buffer of the "
                           "%d KiB asked; under load packets may drop: raise the sysctls "
                           "net.core.rmem_max and net.core.wmem_max to %d", granted // 1024,
                           SOCKET_BUFFER_BYTES // 1024, SOCKET_BUFFER_BYTES)
        return mux

    # -- asyncio ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self.transport.sendto

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(addr) != 2:
            addr = (addr[0], addr[1])
        # RFC 7983: a first byte of 0-3 is STUN; DTLS, RTP and RTCP never start so.
        if data and data[0] < 4:
            message = hooks.parse_stun(data)
            if message is not None:
                self._stun(message, data, addr)
                return
        route = self._routes.get(addr)
        if route is not None:
            route.receive(data)
        else:
            self._drop(addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("relay.udp_port: %s", exc)

    # -- STUN ------------------------------------------------------------------------------
    def _stun(self, message: hooks.StunMessage, data: bytes, addr: tuple[str, int]) -> None:
        route = self._routes.get(addr)
        if hooks.is_response(message):
            protocol = self._awaiting(message, route)
            if protocol is not None:
                protocol.datagram_received(data, addr)
            else:
                self._drop(addr)
            return
        ufrag = hooks.request_ufrag(message)
        if ufrag is None:  # an indication, or not a Binding request: aioice decides
            if route is not None:
                route.protocol.datagram_received(data, addr)
            else:
                self._drop(addr)
            return
        member = self._members.get(ufrag)
        if member is None:
            self._refuse(addr, "an unknown ufrag")
            return
        if route is None or route.member is not member:
            if not hooks.authentic(message, member.connection):
                self._refuse(addr, "a failed integrity check")
                return
            route = self._bind_address(member, addr)
        route.protocol.datagram_received(data, addr)

    def _awaiting(self, response: hooks.StunMessage,
                  route: _Route | None) -> hooks.StunProtocol | None:
        if route is not None and hooks.awaits_response(route.protocol, response):
            return route.protocol
        # A check's answer may come before the peer's own check bound its address.
        for member in self._members.values():
            for protocol in member.protocols:
                if hooks.awaits_response(protocol, response):
                    return protocol
        return None

    def _bind_address(self, member: _Member, addr: tuple[str, int]) -> _Route:
        previous = self._routes.get(addr)
        if previous is not None:
            previous.member.addresses.discard(addr)
        route = _Route(member, member.protocols[0])
        self._routes[addr] = route
        member.addresses.add(addr)
        logger.debug("relay.udp_port: %s:%d is ICE connection %s", addr[0], addr[1],
                     member.ufrag)
        return route

    def _drop(self, addr: tuple[str, int]) -> None:
        self.dropped += 1
        if _is_power_of_two(self.dropped):
            logger.info("relay.udp_port: %d datagrams dropped from addresses bound to no "
                        "connection (the latest from %s:%d)", self.dropped, addr[0], addr[1])

    def _refuse(self, addr: tuple[str, int], why: str) -> None:
        self.refused += 1
        if _is_power_of_two(self.refused):
            logger.info("relay.udp_port: %d binding requests refused (the latest from %s:%d: "
                        "%s)", self.refused, addr[0], addr[1], why)

    # -- hooks.HostSockets -----------------------------------------------------------------
    def addresses(self, addresses: list[str]) -> list[str]:
        if self.address in ("0.0.0.0", ""):
            return [a for a in addresses if ":" not in a]
        return [self.address]

    async def bind(self, connection: hooks.IceConnection,
                   address: str) -> hooks.StunProtocol | None:
        if self.transport is None or self.transport.is_closing():
            raise MediaPortsExhausted(f"relay.udp_port {self.port} is closed: the relay is "
                                      "stopping")
        member = next((m for m in self._members.values() if m.connection is connection),
                      None)
        if member is None:
            ufrag = hooks.unique_ufrag(connection, lambda u: u in self._members)
            member = _Member(connection, ufrag)
            self._members[ufrag] = member
        protocol = hooks.stun_protocol(connection)
        member.protocols.append(protocol)
        protocol.connection_made(SharedPort(self, member, protocol, address))
        return protocol

    def detach(self, member: _Member, protocol: hooks.StunProtocol) -> None:
        """``protocol`` closed: its routes go; with its connection's last protocol, the
        connection's ufrag and addresses go too. Nobody else's."""
        if protocol in member.protocols:
            member.protocols.remove(protocol)
        for addr in [a for a in member.addresses if self._routes[a].protocol is protocol]:
            if member.protocols:
                self._routes[addr] = _Route(member, member.protocols[0])
            else:
                del self._routes[addr]
                member.addresses.discard(addr)
        if not member.protocols and self._members.get(member.ufrag) is member:
            del self._members[member.ufrag]

    # -- what SharedPort needs -------------------------------------------------------------
    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self._sendto(data, addr)

    def extra_info(self, name: str, default: Any = None) -> Any:
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    def write_buffer_size(self) -> int:
        """The socket's whole backlog: in single-port mode it is shared by everyone."""
        transport: Any = self.transport  # asyncio's UDP transport has it; typeshed omits it
        return int(transport.get_write_buffer_size()) if transport is not None else 0

    def owner(self, addr: tuple[str, int]) -> str | None:
        """The local ufrag of the connection datagrams from ``addr`` go to; None: dropped."""
        route = self._routes.get(addr)
        return route.member.ufrag if route is not None else None

    def stats(self) -> dict[str, int]:
        return {"connections": len(self._members), "addresses": len(self._routes),
                "dropped": self.dropped, "refused": self.refused}

    def close(self) -> None:
        if hooks.host_sockets() is self:
            hooks.set_host_sockets(None)
        if self.transport is not None:
            self.transport.close()


UdpPorts = PortRange | UdpMux


async def open_ports(config: MediaConfig) -> UdpPorts | None:
    """At start-up (``LocalRelay.start``, after the host addresses are set): check the port
    range, or bind the single port, and install it for the relay's connections. None (and
    aioice's random ports) when neither is set. UdpPortsUnavailable says what is wrong."""
    if config.udp_port is not None and config.udp_port_range is not None:
        raise UdpPortsUnavailable("relay.udp_port (one shared port) and relay.udp_port_range "
                                  "exclude each other: set one")
    if config.announced_port is not None:
        if config.udp_port is None:
            raise UdpPortsUnavailable(f"relay.announced_port {config.announced_port} is the "
                                      "public port of the single port: it needs relay.udp_port")
        if not 1 <= config.announced_port <= 65535:
            raise UdpPortsUnavailable("relay.announced_port must be 1-65535, got "
                                      f"{config.announced_port}")
    ports: UdpPorts | None = None
    if config.udp_port_range is not None:
        low, high = config.udp_port_range
        ports = PortRange(low, high)
        ports.probe(hooks.host_addresses())
        logger.info("relay.udp_port_range: ICE host sockets on UDP ports %d-%d", low, high)
    elif config.udp_port is not None:
        if not 1 <= config.udp_port <= 65535:
            raise UdpPortsUnavailable(f"relay.udp_port must be 1-65535, got {config.udp_port}")
        hosts = config.host_addresses
        ports = await UdpMux.open(hosts[0] if len(hosts) == 1 else "0.0.0.0", config.udp_port,
                                  config.announced_port)
    hooks.set_host_sockets(ports)
    return ports
