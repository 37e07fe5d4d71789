"""The app factory: ``create_app(settings)`` wires the directory, the record store, live state,
the relays and the socket.io gateway into one aiohttp application. Background resources live in
``cleanup_ctx`` and are reached through typed AppKeys; nothing is module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import socketio
from aiohttp import web

from config.settings import Settings
from relay import hooks
from relay.config import from_settings
from relay.embedded import LocalRelay
from signaling.consultations import Consultations
from signaling.demo import ensure_demo_directory
from signaling.directory import Directory
from signaling.handlers import SocketGateway, SocketIONotifier
from signaling.http_api import add_routes, json_errors, make_auth_middleware
from signaling.live import MemoryLiveStore
from signaling.media import Media, MediaEvents
from signaling.metrics import Metrics
from signaling.pairing import Pairing
from signaling.presence import Presence
from signaling.queue import ConsultQueue
from signaling.recording import RecordingControl
from signaling.relay_nodes import RelayNodes
from signaling.relays import RelayDirectory
from signaling.store import RecordStore
from signaling.tokens import TokenAuthority, load_or_create_secret

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.sqlite3"


@dataclass
class Services:
    settings: Settings
    directory: Directory
    tokens: TokenAuthority
    store: RecordStore
    relays: RelayDirectory
    metrics: Metrics
    pairing: Pairing
    consultations: Consultations
    presence: Presence
    gateway: SocketGateway
    sio: socketio.AsyncServer
    media: Media
    embedded: LocalRelay | None
    nodes: RelayNodes
    recording: RecordingControl


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def directory_path(settings: Settings) -> Path:
    if settings.directory.file is not None:
        return settings.directory.file
    return ensure_demo_directory(settings.storage.data_dir)


def create_app(settings: Settings) -> web.Application:
    data_dir = settings.storage.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    directory = Directory.load(directory_path(settings))
    secret = load_or_create_secret(settings.security.token_secret, data_dir)
    tokens = TokenAuthority(secret, directory, settings.security.token_ttl_s)
    metrics = Metrics()

    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        ping_interval=settings.presence.ping_interval_s,
        ping_timeout=settings.presence.ping_timeout_s,
        logger=False,
        engineio_logger=False,
    )
    notifier = SocketIONotifier(sio)
    store = RecordStore(data_dir / RECORDS_FILE)
    live = MemoryLiveStore()
    relays = RelayDirectory()
    media = Media(relays=relays, live=live, notifier=notifier,
                  client_ice_servers=[s.model_dump(exclude_none=True)
                                      for s in settings.relay.client_ice_servers])
    media_events = MediaEvents(media, notifier)
    embedded: LocalRelay | None = None
    if settings.relay.embedded:
        embedded = LocalRelay(settings.relay.id, region=settings.relay.region,
                              capacity=settings.relay.capacity,
                              public_address=settings.relay.announced_address,
                              config=from_settings(settings.relay), events=media_events)
        relays.register(embedded)
    pairing = Pairing(store=store, queue=ConsultQueue(), directory=directory, relays=relays,
                      notifier=notifier, metrics=metrics, settings=settings.queue)
    consultations = Consultations(store=store, live=live, directory=directory, relays=relays,
                                  notifier=notifier, metrics=metrics,
                                  reconnect_grace_s=settings.presence.reconnect_grace_s,
                                  media=media)
    recording = RecordingControl(archive=settings.archive_dir(), store=store, live=live,
                                 directory=directory, relays=relays, notifier=notifier,
                                 settings=settings.recording)
    consultations.recording = recording
    presence = Presence(live, directory, notifier, metrics)
    nodes = RelayNodes(sio, tokens=tokens, relays=relays, events=media_events,
                       on_moved=consultations.relay_moved,
                       heartbeat_s=settings.relay.heartbeat_s)
    gateway = SocketGateway(sio, tokens=tokens, pairing=pairing, consultations=consultations,
                            presence=presence, media=media, metrics=metrics,
                            recording=recording)

    app = web.Application(middlewares=[
        json_errors,
        make_auth_middleware(tokens.verify, settings.security.metrics_token),
    ])
    app[SERVICES] = Services(settings, directory, tokens, store, relays, metrics, pairing,
                             consultations, presence, gateway, sio, media, embedded, nodes,
                             recording)
    sio.attach(app)
    add_routes(app, SERVICES)
    app.cleanup_ctx.append(_embedded_relay)
    app.cleanup_ctx.append(_records)
    app.cleanup_ctx.append(_recording)
    app.cleanup_ctx.append(_timers)
    return app


async def _embedded_relay(app: web.Application) -> AsyncIterator[None]:
    """Check aiortc's internals before any media flows; close every room at the end."""
    services = app[SERVICES]
    if services.embedded is not None:
        await hooks.check()
        hooks.set_host_addresses(services.settings.relay.host_addresses)
    yield
    if services.embedded is not None:
        await services.embedded.close()


async def _records(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    await services.store.open()
    await services.store.mirror_directory(services.directory)
    waiting = await services.pairing.restore()
    active = await services.consultations.restore()
    logger.info("restored %d waiting requests and %d open consultations", waiting, active)
    yield
    await services.store.close()


async def _recording(app: web.Application) -> AsyncIterator[None]:
    """Mark what a dead process was recording as interrupted; finish every file at the end."""
    services = app[SERVICES]
    recorder = services.recording.recorder
    years = services.settings.recording.retention_years
    if years < 10:
        logger.warning("recording.retention_years = %g: Circular 49/2017/TT-BYT asks that "
                       "consultation records be kept at least 10 years", years)
    interrupted = await recorder.restore()
    if interrupted:
        logger.warning("%d recordings were interrupted by the last stop", len(interrupted))
    yield
    await recorder.close()


async def _timers(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    task = asyncio.create_task(_tick_forever(services), name="signaling-timers")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _tick_forever(services: Services) -> None:
    interval = services.settings.queue.tick_s
    while True:
        await asyncio.sleep(interval)
        try:
            await services.pairing.tick()
            await services.consultations.tick()
            await services.nodes.sweep()
        except Exception:
            logger.exception("timer tick failed; trying again in %.1f s", interval)
