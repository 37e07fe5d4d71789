"""The one start-up module: ``create_app(settings)`` builds the relay (the embedded one, or none
when relay nodes dial in), the recorder (``recorder.service.Recorder``, and
``RecordingControl``, its face to clients) and the signaling services, each given what it needs
in its constructor, and returns one aiohttp application.

Starting and stopping follow ``cleanup_ctx``, in this order, and close in reverse:

1. the relay: aiortc's private hooks checked and the ICE host addresses set before any media
   flows; at the end every Room of the embedded relay is closed;
2. the live state: with ``live.backend = "redis"``, what this process's previous run left in
   Redis is swept (its participants reconnecting, before the records are restored) and the
   heartbeat starts; with it python-socketio's Redis manager's listener stops at the end;
   then, with Redis, the relay registry (signaling/relay_registry.py): the manager's listener
   started (the acks of relays connected to other processes) and the fleet's relays read;
3. the records: the store of ``storage.backend`` opened (``load_directory`` read the directory
   from it first), waiting requests and open consultations restored (their Rooms reopened on a
   relay); closed at the end;
4. the recorder: what a dead process was recording marked interrupted; every file finished at
   the end;
5. the fleet (signaling/fleet.py): with ``live.backend = "redis"`` and ``storage.backend =
   "postgresql"`` this process joins the other `serve` processes on that Redis (their queue
   messages heard from now on, the waiting requests read again); at the end it leaves and
   releases the timers' lease, so that another member runs them at its next tick;
6. the timers: escalation and expiry, the reconnect grace period (in a fleet, only on the
   member holding the timers' lease); on a timer of their own, silent relay nodes and
   consultations waiting for a relay;
7. with ``relay.embedded_workers``, the embedded relay as worker processes instead of in this
   one (telehealth/relay_workers.py): their loopback listener opened and the workers started
   (`serve` waits for them to register); stopped first, their rooms closed.

Stopping (``Stopping.begin``, then ``runner.cleanup()``; ``telehealth serve`` on SIGTERM/SIGINT):
the listening sockets close; new requests on open connections are answered 503
``server_stopping``; every signed-in connection is sent ``server:stopping`` and every engine.io
session (clients, relay nodes) is closed (relay nodes keep their rooms: ``RelayNodes.stop``,
nothing moves); requests in flight get a moment to finish; then
aiohttp's own shutdown (at most ``http_shutdown_timeout`` per stuck request) and ``cleanup_ctx``
in reverse: timers, recorder (files finished, manifests written), records, live state, relay.
Each share of ``server.drain_s`` is bounded; ``Stopping.step`` names the step under way.

Everything is reached through the typed ``SERVICES`` key; nothing is module-level state.
Signaling knows relays only through ``relay.api``: this module picks the implementations
(``relay.embedded.LocalRelay``, ``relay.remote.RemoteRelay`` for each node that dials in)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioice.ice
import socketio
from aiohttp import web

from config.settings import Settings
from recorder.audit import AUDIT_LOG, AuditLog
from recorder.service import Recorder
from relay.api import RelayInfo
from relay.config import MediaConfig, from_settings
from relay.embedded import LocalRelay
from relay.remote import RemoteRelay
from signaling.account_backends import accounts_for
from signaling.accounts import Accounts
from signaling.auth_api import add_auth_routes
from signaling.consultations import Consultations
from signaling.demo import ensure_demo_directory
from signaling.directory import Directory
from signaling.directory_admin import DirectoryAdmin
from signaling.directory_api import add_directory_routes
from signaling.fleet import (
    BatchedRedisManager,
    Fleet,
    LocalFleet,
    fleet_for,
    raise_if_cancelled,
)
from signaling.handlers import SocketGateway, SocketIONotifier
from signaling.http_api import add_routes, json_errors, make_auth_middleware
from signaling.limits import ClinicianLimits, LocalClinicianLimits
from signaling.limits_redis import RedisClinicianLimits
from signaling.live import LiveStore, MemoryLiveStore
from signaling.live_redis import RedisLiveStore, instance_id_for
from signaling.media import Media, MediaEvents
from signaling.metrics import Metrics
from signaling.oidc import add_oidc_routes
from signaling.pairing import Pairing
from signaling.placement import RelayDirectory, RelayNodes
from signaling.presence import Presence
from signaling.queue import ConsultQueue
from signaling.recording import (
    ArchiveDescription,
    RecorderFace,
    RecordingControl,
    policy_for,
    recording_state_notifier,
)
from signaling.recording_fleet import FleetRecorder
from signaling.records import open_directory, record_store
from signaling.relay_registry import FleetRelayDirectory, RelayRegistry
from signaling.security import forwarded_from, same_origin, security_headers
from signaling.socket_server import SignalingServer
from signaling.store import RecordStore
from signaling.tokens import TokenAuthority, load_or_create_secret
from telehealth.relay_workers import relay_workers

logger = logging.getLogger(__name__)

STOPPING_EVENT = "server:stopping"
"""Sent to every signed-in connection before the server closes it on a stop."""
TELL_SHARE = 0.15
"""Of ``server.drain_s``: telling clients and closing their sessions."""
SETTLE_SHARE = 0.15
"""Of ``server.drain_s``: requests in flight (websocket handlers closing) finishing alone."""
HTTP_SHARE = 0.1
"""Of ``server.drain_s``: aiohttp's ``shutdown_timeout`` for what is still in flight after
that (it may wait twice: for the handler, then after cancelling it). The rest of the drain
time, at least half, is for closing recordings, records and relays."""


@dataclass(frozen=True, kw_only=True)
class Services:
    """What one app is made of (tests and the CLI reach it through ``SERVICES``)."""

    settings: Settings
    directory: Directory
    tokens: TokenAuthority
    metrics: Metrics
    store: RecordStore
    relays: RelayDirectory
    embedded: LocalRelay | None
    """The in-process relay (``relay.embedded``), None when only relay nodes serve."""
    nodes: RelayNodes
    recorder: Recorder
    recording: RecordingControl
    pairing: Pairing
    consultations: Consultations
    accounts: Accounts
    """Clinicians' passwords, TOTP and sessions (``accounts_for``: their own SQLite file, or
    the records' PostgreSQL database)."""
    live: LiveStore
    """Presence and membership: ``MemoryLiveStore``, or ``RedisLiveStore`` with
    ``live.backend = "redis"``."""
    fleet: Fleet
    """The other `serve` processes (``fleet_for``): ``LocalFleet`` unless the live state is
    in Redis and the records in PostgreSQL."""


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


class Stopping:
    """The stop of one app: the step under way (named in the one line logged when
    ``server.drain_s`` runs out), the requests in flight, and telling clients."""

    def __init__(self, drain_s: float, sio: socketio.AsyncServer,
                 nodes: RelayNodes | None = None) -> None:
        """``nodes``: told first, so that relay nodes disconnecting during the stop keep
        their rooms (nothing moves, no room is closed): they redial the next process."""
        self.drain_s = drain_s
        self.step = "serving"
        self._sio = sio
        self._nodes = nodes
        self._stopping = False
        self._told = False
        self._in_flight = 0
        self._settled = asyncio.Event()
        self._settled.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def notice(self) -> dict[str, Any]:
        """The ``server:stopping`` payload (docs/protocol.md), also the 503 body's error."""
        retry = math.ceil(self.drain_s)
        return {"code": "server_stopping",
                "message": f"The server is stopping (restart or maintenance); reconnect in "
                           f"{retry} s.",
                "retry_after_s": retry}

    async def begin(self, runner: web.BaseRunner) -> None:
        """Stop listening, refuse new requests, tell every client and close every session,
        and let requests in flight finish; the caller then runs ``runner.cleanup()``.

        All this happens before aiohttp's own shutdown on purpose: its ``pre_shutdown()``
        (aiohttp 3.14) marks every connection closing, and from then on
        ``RequestHandler.data_received`` drops what a client sends, upgraded websockets
        included, so a websocket handler never sees the client's close frame and waits for
        engine.io's ping timeout (ping_interval + ping_timeout: 40 s by default)."""
        self._stopping = True
        self.step = "closing the listening sockets"
        for site in runner.sites:
            await site.stop()
        await self.tell_clients()
        self.step = "waiting for requests in flight"
        budget = self.drain_s * SETTLE_SHARE
        try:
            async with asyncio.timeout(budget):
                await self._settled.wait()
        except TimeoutError:
            logger.info("stop: %d requests still in flight after %.1f s; aiohttp cancels them",
                        self._in_flight, budget)

    async def tell_clients(self) -> None:
        """``server:stopping`` to every signed-in connection, then every engine.io session
        closed (clients see a transport close and may reconnect), within ``TELL_SHARE`` of the
        drain time. Once."""
        if self._told:
            return
        self._told = True
        self._stopping = True
        if self._nodes is not None:
            self._nodes.stop()
        self.step = "telling clients"
        sio = self._sio
        budget = self.drain_s * TELL_SHARE
        # python-engineio 4.15: ``eio.sockets`` (sid -> socket) is the server's table of
        # sessions; ``eio.disconnect()`` without a sid closes them all (and fails on an empty
        # table). tests/signaling/test_stop.py checks both are still there.
        sessions = len(sio.eio.sockets)
        try:
            async with asyncio.timeout(budget):
                await sio.emit(STOPPING_EVENT, self.notice())
                if sio.eio.sockets:
                    await sio.eio.disconnect()
        except TimeoutError:
            # A client fault (a polling session that stopped polling, a client not reading).
            logger.info("stop: %d sessions told; %d still closing after %.1f s, going on",
                        sessions, len(sio.eio.sockets), budget)
        else:
            logger.info("stop: %d sessions told and closed", sessions)
        await sio.shutdown()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ) -> web.StreamResponse:
        """Counts requests in flight (websocket handlers included); once stopping, answers
        503 ``server_stopping`` with ``Retry-After``."""
        if self._stopping:
            notice = self.notice()
            return web.json_response(
                {"error": {"code": notice["code"], "message": notice["message"]}}, status=503,
                headers={"Retry-After": str(notice["retry_after_s"]), "Connection": "close"})
        self._in_flight += 1
        self._settled.clear()
        try:
            return await handler(request)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._settled.set()


STOPPING: web.AppKey[Stopping] = web.AppKey("stopping", Stopping)


def http_shutdown_timeout(settings: Settings) -> float:
    """aiohttp's ``shutdown_timeout`` for ``AppRunner``: how long a stop waits for HTTP
    requests in flight (its default, 60 s, alone outlasts ``server.drain_s``)."""
    return settings.server.drain_s * HTTP_SHARE


def directory_path(settings: Settings) -> Path:
    """The configured directory file, else the demo directory (written once into the data
    directory)."""
    if settings.directory.file is not None:
        return settings.directory.file
    return ensure_demo_directory(settings.storage.data_dir)


def load_directory(settings: Settings) -> Directory:
    """The directory from the store, its source of truth; an empty store is seeded first from
    the directory file (or the demo directory), which is only an import source afterwards."""

    def seed() -> tuple[Directory, str]:
        path = directory_path(settings)
        return Directory.load(path), str(path)

    return open_directory(settings.storage, seed)


def token_authority(settings: Settings) -> tuple[Directory, TokenAuthority]:
    """The directory and the authority that signs and checks its access tokens."""
    directory = load_directory(settings)
    secret = load_or_create_secret(settings.security.token_secret, settings.storage.data_dir)
    return directory, TokenAuthority(secret, directory, settings.security.token_ttl_s)


def create_app(settings: Settings) -> web.Application:
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    directory, tokens = token_authority(settings)
    metrics = Metrics()
    manager = client_manager(settings)
    sio = SignalingServer(
        settings, metrics=metrics, async_mode="aiohttp",
        ping_interval=settings.presence.ping_interval_s,
        ping_timeout=settings.presence.ping_timeout_s,
        logger=False,
        engineio_logger=False,
        cors_allowed_origins=same_origin,
        **({"client_manager": manager} if manager is not None else {}),
    )
    notifier = SocketIONotifier(sio)
    store = record_store(settings.storage)
    live = live_store(settings)

    # The relay: what relays say reaches the participants' connections through MediaEvents.
    relays = relay_directory(settings, sio)
    metrics.waiting_for_relay.set_function(lambda: len(relays.waiting_rooms()))
    media = Media(relays=relays, live=live, notifier=notifier,
                  client_ice_servers=[s.model_dump(exclude_none=True)
                                      for s in settings.relay.client_ice_servers],
                  turn=settings.turn, store=store)
    media_events = MediaEvents(media, notifier)
    embedded: LocalRelay | None = None
    if settings.relay.embedded and not settings.relay.embedded_workers:
        embedded = LocalRelay(settings.relay.id, region=settings.relay.region,
                              capacity=settings.relay.capacity,
                              public_address=settings.relay.announced_address,
                              config=relay_config(settings), events=media_events)
        relays.register(embedded)

    # The recorder: a media sink of the rooms it records, told who is present by signaling.
    fleet = fleet_for(settings, instance_id_for(settings.storage.data_dir))
    recorder = Recorder(
        settings.archive_dir(), relay_for=relays.for_room,
        describe=ArchiveDescription(store=store, directory=directory).describe,
        notify=recording_state_notifier(notifier),
        retention_years=settings.recording.retention_years, hold_s=settings.recording.hold_s,
        cluster_ms=settings.recording.cluster_ms,
        fsync_interval_s=settings.recording.fsync_interval_s,
        instance="" if isinstance(fleet, LocalFleet) else fleet.instance_id)
    recording = RecordingControl(recorder=recording_face(settings, recorder, fleet, relays,
                                                         store, live),
                                 store=store, live=live, settings=settings.recording)

    # Signaling.
    pairing = Pairing(store=store, queue=ConsultQueue(), directory=directory, relays=relays,
                      notifier=notifier, metrics=metrics, settings=settings.queue, fleet=fleet)
    consultations = Consultations(store=store, live=live, directory=directory, relays=relays,
                                  notifier=notifier, metrics=metrics,
                                  reconnect_grace_s=settings.presence.reconnect_grace_s,
                                  media=media, recording=recording)
    presence = Presence(live, directory, notifier, metrics)

    def node_relay(info: RelayInfo, sid: str) -> RemoteRelay:
        return RemoteRelay(info, sid, sio)

    nodes = RelayNodes(sio, tokens=tokens, relays=relays, events=media_events,
                       on_moved=consultations.relay_moved, node_relay=node_relay,
                       settings=settings.relay, on_adopted=consultations.adopted)
    limits = clinician_limits(settings, live)
    gateway = SocketGateway(sio, tokens=tokens, pairing=pairing, consultations=consultations,
                            presence=presence, media=media, metrics=metrics, recording=recording,
                            clinician_limits=limits)

    # storage.backend: their own SQLite file, or the records' PostgreSQL database (a fleet);
    # the addresses' strikes follow live.backend (memory, or Redis).
    accounts = accounts_for(settings, directory=directory, tokens=tokens,
                            audit=AuditLog(settings.archive_dir() / AUDIT_LOG))

    stopping = Stopping(settings.server.drain_s, sio, nodes)
    # Outermost first: the client as the trusted proxy names it, then the headers every
    # answer carries (the 503 of a stop and every JSON error included).
    forwarded = [forwarded_from(settings.server.trusted_proxies)] \
        if settings.server.trusted_proxies else []
    app = web.Application(client_max_size=settings.server.max_payload_bytes, middlewares=[
        *forwarded,
        security_headers(settings.tls.hsts_max_age_s),
        stopping.middleware,
        json_errors,
        make_auth_middleware(tokens.verify, settings.security.metrics_token),
    ])
    app[SERVICES] = Services(settings=settings, directory=directory, tokens=tokens,
                             metrics=metrics, store=store, relays=relays, embedded=embedded,
                             nodes=nodes, recorder=recorder, recording=recording, pairing=pairing,
                             consultations=consultations, accounts=accounts, live=live,
                             fleet=fleet)
    sio.attach(app)
    add_routes(app, directory=directory, metrics=metrics, pairing=pairing,
               consultations=consultations, recording=recording, presence=presence)
    add_auth_routes(app, accounts, public_url=settings.server.public_url)
    add_oidc_routes(app, settings.oidc, accounts, recorder.audit,
                    public_url=settings.server.public_url)
    directory_admin = DirectoryAdmin(directory, store, recorder.audit, gateway)
    directory_admin.join(fleet)
    add_directory_routes(app, directory_admin)
    app[STOPPING] = stopping

    async def tell_clients(app: web.Application) -> None:
        # When the runner is cleaned up without ``Stopping.begin`` (tests).
        await app[STOPPING].tell_clients()

    app.on_shutdown.append(tell_clients)
    app.cleanup_ctx.append(_relay)
    app.cleanup_ctx.append(_live(manager))
    app.cleanup_ctx.append(_limits(limits))
    app.cleanup_ctx.append(_relay_registry(sio))
    app.cleanup_ctx.append(_records)
    app.cleanup_ctx.append(_accounts)
    app.cleanup_ctx.append(_recorder)
    app.cleanup_ctx.append(_fleet)
    app.cleanup_ctx.append(_timers)
    if settings.relay.embedded_workers:  # last: they start after all else, stop first
        app.cleanup_ctx.append(relay_workers(settings, tokens, relay_config(settings),
                                             stopping))
    return app


def live_store(settings: Settings) -> LiveStore:
    """The live state's store: this process's memory (the default) or Redis."""
    if settings.live.backend == "redis":
        return RedisLiveStore.from_url(
            settings.live.redis_url, prefix=settings.live.key_prefix,
            instance_id=instance_id_for(settings.storage.data_dir))
    return MemoryLiveStore()


def relay_directory(settings: Settings, sio: socketio.AsyncServer) -> RelayDirectory:
    """Where consultations are placed: this process's relays (the default), or with
    ``live.backend = "redis"`` every standalone relay of the fleet, in Redis; a relay connected
    to another process is driven through the socket.io Redis manager (``RemoteRelay``)."""
    if settings.live.backend != "redis":
        return RelayDirectory(open_room_timeout_s=settings.relay.open_room_timeout_s,
                              adopt_wait_s=settings.relay.adopt_wait_s)
    registry = RelayRegistry.from_url(settings.live.redis_url,
                                      prefix=settings.live.key_prefix,
                                      instance_id=instance_id_for(settings.storage.data_dir))

    def remote(info: RelayInfo, sid: str) -> RemoteRelay:
        return RemoteRelay(info, sid, sio)

    return FleetRelayDirectory(registry, remote,
                               open_room_timeout_s=settings.relay.open_room_timeout_s,
                               adopt_wait_s=settings.relay.adopt_wait_s)


def _relay_registry(sio: socketio.AsyncServer,
                    ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def relay_registry(app: web.Application) -> AsyncIterator[None]:
        """With Redis: hear acks from other processes from the start, read the fleet's
        relays before the records are restored; close the registry's client at the end."""
        relays = app[SERVICES].relays
        if isinstance(relays, FleetRelayDirectory):
            await relays.listen(sio)
            await relays.refresh()
        yield
        if isinstance(relays, FleetRelayDirectory):
            await relays.close()

    return relay_registry


def clinician_limits(settings: Settings, live: LiveStore) -> ClinicianLimits:
    """Each clinician's chat and connections: counted in this process, or with the live
    state in Redis over every process sharing it (signaling/limits_redis.py)."""
    if isinstance(live, RedisLiveStore):
        return RedisClinicianLimits.from_url(settings.live.redis_url,
                                             prefix=settings.live.key_prefix, live=live,
                                             settings=settings.limits)
    return LocalClinicianLimits(settings.limits)


def _limits(limits: ClinicianLimits) -> Callable[[web.Application], AsyncIterator[None]]:
    async def clinician_limits(app: web.Application) -> AsyncIterator[None]:
        """At the end: the Redis client of a fleet's limits closed."""
        yield
        await limits.close()

    return clinician_limits


def client_manager(settings: Settings) -> socketio.AsyncRedisManager | None:
    """With ``live.backend = "redis"``: python-socketio's ``AsyncRedisManager`` (batched:
    ``signaling.fleet.BatchedRedisManager``), so that an emit published on Redis (by another
    process on the same prefix) reaches this process's sockets too; None (its in-memory
    manager) by default. Every emit is then also a PUBLISH, over one connection
    (``single_connection_client``: a node's emits reach the others in order; redis-py's
    default pool refuses its 101st concurrent command, and the manager gives up on a message
    after two refusals); what is published while a batch is on its way leaves in the next."""
    if settings.live.backend != "redis":
        return None
    return BatchedRedisManager(settings.live.redis_url,
                                      channel=settings.live.key_prefix + "socketio",
                                      logger=logger,
                                      redis_options={"single_connection_client": True})


def _live(manager: socketio.AsyncRedisManager | None,
          ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def live_state(app: web.Application) -> AsyncIterator[None]:
        """Redis: sweep this process's previous run and heartbeat (before the records are
        restored, which may take participants back); at the end stop heartbeating, and the
        socket.io manager's listener with it."""
        live = app[SERVICES].live
        if isinstance(live, RedisLiveStore):
            await live.start()
        yield
        if isinstance(live, RedisLiveStore):
            app[STOPPING].step = "closing the live state"
            await live.close()
        if manager is not None:
            await _stop_manager(manager)

    return live_state


async def _stop_manager(manager: socketio.AsyncRedisManager) -> None:
    """``AsyncServer.shutdown`` leaves the manager's listener running (python-socketio
    5.18): its task (``thread``, started at the first connection) is cancelled and its Redis
    client (``redis``) closed here."""
    task = getattr(manager, "thread", None)
    if isinstance(task, asyncio.Task):
        task.cancel()
        # Bounded: redis-py may lose a cancellation (signaling.fleet.raise_if_cancelled).
        await asyncio.wait([task], timeout=1.0)
    client = getattr(manager, "redis", None)
    if client is not None:
        await client.aclose()


async def _relay(app: web.Application) -> AsyncIterator[None]:
    """Check aiortc's internals before any media flows; close every Room at the end."""
    services = app[SERVICES]
    if services.embedded is not None:
        await services.embedded.start()
        if not services.embedded.config.host_addresses:
            _say_announced_addresses(services.settings)
    yield
    app[STOPPING].step = "closing the relay"
    if services.embedded is not None:
        await services.embedded.close()
    app[STOPPING].step = "exiting (asyncio's last tasks, worker threads)"


def is_loopback(host: str) -> bool:
    """``server.host`` reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def relay_config(settings: Settings) -> MediaConfig:
    """The embedded relay's media settings. With ``relay.host_addresses`` empty and a server
    only this machine can reach, the relay gathers on 127.0.0.1: aioice leaves loopback out
    on its own, and the one-machine demo would get no media without it."""
    config = from_settings(settings.relay)
    if not config.host_addresses and is_loopback(settings.server.host):
        config.host_addresses = ["127.0.0.1"]
    return config


def _say_announced_addresses(settings: Settings) -> None:
    addresses = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    announced = settings.relay.announced_address
    logger.info("relay: relay.host_addresses is empty, so ICE offers every address of this "
                "machine but loopback: %s%s; browsers must reach one of them over UDP (set "
                "relay.host_addresses to those they can, and relay.announced_address behind "
                "1:1 NAT)", ", ".join(addresses) or "none",
                f" (announced as {announced})" if announced else "")


async def _records(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    await services.store.open()
    waiting = await services.pairing.restore()
    active = await services.consultations.restore()
    logger.info("restored %d waiting requests and %d open consultations", waiting, active)
    yield
    app[STOPPING].step = "closing the records"
    await services.store.close()


async def _accounts(app: web.Application) -> AsyncIterator[None]:
    accounts = app[SERVICES].accounts
    await accounts.open()
    yield
    app[STOPPING].step = "closing the accounts"
    await accounts.close()


def recording_face(settings: Settings, recorder: Recorder, fleet: Fleet,
                   relays: RelayDirectory, store: RecordStore, live: LiveStore) -> RecorderFace:
    """The recorder itself; in a fleet, ``FleetRecorder``: each consultation's recording is
    carried out where its media arrives, in an archive the processes share."""
    if isinstance(fleet, LocalFleet) or not isinstance(relays, FleetRelayDirectory):
        return recorder
    if settings.recording.archive_dir is None:
        logger.warning("a fleet without recording.archive_dir: each process archives in its "
                       "own data directory, so a recording handed from one process to another "
                       "starts a new manifest there (consent is asked again); share one "
                       "archive directory (docs/fleet.md)")

    async def policy_of(consultation_id: str) -> str:
        consultation = await store.get_consultation(consultation_id)
        return policy_for(settings.recording,
                          consultation.site_ids if consultation is not None else [])

    return FleetRecorder(recorder, fleet=fleet, registry=relays.registry, relays=relays,
                         live=live, policy_of=policy_of)


async def _recorder(app: web.Application) -> AsyncIterator[None]:
    """Mark what a dead process was recording as interrupted; finish every file at the end."""
    services = app[SERVICES]
    recorder = services.recorder
    years = services.settings.recording.retention_years
    if years < 10:
        logger.warning("recording.retention_years = %g: Circular 49/2017/TT-BYT asks that "
                       "consultation records be kept at least 10 years", years)
    interrupted = await recorder.restore()
    if interrupted:
        logger.warning("%d recordings were interrupted by the last stop", len(interrupted))
    yield
    app[STOPPING].step = "finishing recordings"
    face = services.recording.recorder
    await (face if isinstance(face, FleetRecorder) else recorder).close()


async def _fleet(app: web.Application) -> AsyncIterator[None]:
    """Join the fleet, then read the waiting requests again: what other members wrote
    between the restore and the subscription was said to nobody here. At the end leave it:
    the timers' lease released, so another member takes the timers at its next tick."""
    services = app[SERVICES]
    await services.fleet.start()
    if not isinstance(services.fleet, LocalFleet):
        await services.pairing.resync()
    yield
    app[STOPPING].step = "leaving the fleet"
    await services.fleet.stop()


async def _timers(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    # The relay nodes' timer runs on its own: a silent relay is noticed within
    # heartbeat_s / 2 of its deadline, whatever queue.tick_s is.
    tasks = [asyncio.create_task(_tick_forever(services), name="signaling-timers"),
             asyncio.create_task(_relay_timers(services), name="relay-node-timers")]
    yield
    app[STOPPING].step = "stopping the timers"
    for task in tasks:
        task.cancel()
    # Bounded: a tick awaiting Redis may lose its cancellation (raise_if_cancelled ends it
    # at the end of that round; a stop never waits on it for long).
    _, stuck = await asyncio.wait(tasks, timeout=2.0)
    for task in stuck:
        logger.warning("%s did not stop within 2 s; left behind", task.get_name())


async def _relay_timers(services: Services) -> None:
    while True:
        try:
            await services.nodes.run()
        except Exception:
            logger.exception("relay node timers failed; starting them again in 1 s")
            await asyncio.sleep(1.0)


async def _tick_forever(services: Services) -> None:
    """Escalation, expiry, queue positions and the reconnect grace, every ``queue.tick_s``,
    while this process leads the timers (always, alone; in a fleet, while it holds the lease,
    renewed here: so ticks come at least twice per ``live.timers_lease_s``)."""
    interval = services.settings.queue.tick_s
    fleet = services.fleet
    if not isinstance(fleet, LocalFleet):
        interval = min(interval, services.settings.live.timers_lease_s / 2)
    while True:
        await asyncio.sleep(interval)
        try:
            if await fleet.leads_timers():
                await services.pairing.tick()
                await services.consultations.tick()
        except Exception:
            logger.exception("timer tick failed; trying again in %.1f s", interval)
        raise_if_cancelled()
