"""Presence: which sites and clinicians are online. A connection counts from socket.io
``connect`` until ``disconnect``; a connection that stops answering pings (heartbeat timeout,
``presence.ping_timeout_s``) is disconnected by the server and so goes offline."""

from __future__ import annotations

import logging

from signaling.directory import Directory
from signaling.live import Connection, LiveStore
from signaling.metrics import Metrics
from signaling.notify import COORDINATORS, Notifier
from signaling.tokens import Principal

logger = logging.getLogger(__name__)


class Presence:
    def __init__(self, live: LiveStore, directory: Directory, notifier: Notifier,
                 metrics: Metrics) -> None:
        self._live = live
        self._directory = directory
        self._notifier = notifier
        self._metrics = metrics

    async def connected(self, sid: str, principal: Principal) -> None:
        first = await self._live.add_connection(
            Connection(sid, principal.id, principal.site.id)
        )
        self._metrics.connections.inc()
        if first:
            self._metrics.connected_sites.inc()
            await self._notifier.emit(
                "presence:update", {"site_id": principal.site.id, "online": True}, COORDINATORS
            )

    async def disconnected(self, sid: str) -> Connection | None:
        connection, last = await self._live.remove_connection(sid)
        if connection is None:
            return None
        self._metrics.connections.dec()
        if last:
            self._metrics.connected_sites.dec()
            await self._notifier.emit(
                "presence:update", {"site_id": connection.site_id, "online": False}, COORDINATORS
            )
        return connection

    async def snapshot(self) -> list[dict[str, object]]:
        """Every site of the directory with its online state, by region then name."""
        online = await self._live.online_sites()
        sites = sorted(self._directory.sites.values(), key=lambda s: (s.region, s.name))
        return [
            {**site.to_wire(), "online": site.id in online, "connections": online.get(site.id, 0)}
            for site in sites
        ]
