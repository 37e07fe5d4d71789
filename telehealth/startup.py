"""The one start-up module: ``create_app(settings)`` builds the relay (the embedded one, or none
when relay nodes dial in), the recorder (``recorder.service.Recorder``, and
``RecordingControl``, its face to clients) and the signaling services, each given what it needs
in its constructor, and returns one aiohttp application.

Starting and stopping follow ``cleanup_ctx``, in this order, and close in reverse:

1. the relay: aiortc's private hooks checked and the ICE host addresses set before any media
   flows; at the end every Room of the embedded relay is closed;
2. the records: the SQLite store opened, the directory mirrored, waiting requests and open
   consultations restored (their Rooms reopened on a relay); closed at the end;
3. the recorder: what a dead process was recording marked interrupted; every file finished at
   the end;
4. the timers: escalation and expiry, the reconnect grace period, silent relay nodes.

Everything is reached through the typed ``SERVICES`` key; nothing is module-level state.
Signaling knows relays only through ``relay.api``: this module picks the implementations
(``relay.embedded.LocalRelay``, ``relay.remote.RemoteRelay`` for each node that dials in)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from config.settings import Settings
from recorder.service import Recorder
from relay import hooks
from relay.api import RelayInfo
from relay.config import from_settings
from relay.embedded import LocalRelay
from relay.remote import RemoteRelay
from signaling.consultations import Consultations
from signaling.demo import ensure_demo_directory
from signaling.directory import Directory
from signaling.handlers import SocketGateway, SocketIONotifier
from signaling.http_api import add_routes, json_errors, make_auth_middleware
from signaling.live import MemoryLiveStore
from signaling.media import Media, MediaEvents
from signaling.metrics import Metrics
from signaling.pairing import Pairing
from signaling.placement import RelayDirectory, RelayNodes
from signaling.presence import Presence
from signaling.queue import ConsultQueue
from signaling.recording import (
    ArchiveDescription,
    RecordingControl,
    recording_state_notifier,
)
from signaling.socket_server import SignalingServer
from signaling.store import RecordStore
from signaling.tokens import TokenAuthority, load_or_create_secret

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.sqlite3"


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


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def directory_path(settings: Settings) -> Path:
    """The configured directory file, else the demo directory (written once into the data
    directory)."""
    if settings.directory.file is not None:
        return settings.directory.file
    return ensure_demo_directory(settings.storage.data_dir)


def token_authority(settings: Settings) -> tuple[Directory, TokenAuthority]:
    """The directory and the authority that signs and checks its access tokens."""
    directory = Directory.load(directory_path(settings))
    secret = load_or_create_secret(settings.security.token_secret, settings.storage.data_dir)
    return directory, TokenAuthority(secret, directory, settings.security.token_ttl_s)


def create_app(settings: Settings) -> web.Application:
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    directory, tokens = token_authority(settings)
    metrics = Metrics()
    sio = SignalingServer(
        settings, metrics=metrics, async_mode="aiohttp",
        ping_interval=settings.presence.ping_interval_s,
        ping_timeout=settings.presence.ping_timeout_s,
        logger=False,
        engineio_logger=False,
    )
    notifier = SocketIONotifier(sio)
    store = RecordStore(settings.storage.data_dir / RECORDS_FILE)
    live = MemoryLiveStore()

    # The relay: what relays say reaches the participants' connections through MediaEvents.
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

    # The recorder: a media sink of the rooms it records, told who is present by signaling.
    recorder = Recorder(
        settings.archive_dir(), relay_for=relays.for_room,
        describe=ArchiveDescription(store=store, directory=directory).describe,
        notify=recording_state_notifier(notifier),
        retention_years=settings.recording.retention_years, hold_s=settings.recording.hold_s,
        cluster_ms=settings.recording.cluster_ms,
        fsync_interval_s=settings.recording.fsync_interval_s)
    recording = RecordingControl(recorder=recorder, store=store, live=live,
                                 settings=settings.recording)

    # Signaling.
    pairing = Pairing(store=store, queue=ConsultQueue(), directory=directory, relays=relays,
                      notifier=notifier, metrics=metrics, settings=settings.queue)
    consultations = Consultations(store=store, live=live, directory=directory, relays=relays,
                                  notifier=notifier, metrics=metrics,
                                  reconnect_grace_s=settings.presence.reconnect_grace_s,
                                  media=media, recording=recording)
    presence = Presence(live, directory, notifier, metrics)

    def node_relay(info: RelayInfo, sid: str) -> RemoteRelay:
        return RemoteRelay(info, sid, sio)

    nodes = RelayNodes(sio, tokens=tokens, relays=relays, events=media_events,
                       on_moved=consultations.relay_moved, node_relay=node_relay,
                       heartbeat_s=settings.relay.heartbeat_s)
    SocketGateway(sio, tokens=tokens, pairing=pairing, consultations=consultations,
                  presence=presence, media=media, metrics=metrics, recording=recording)

    app = web.Application(middlewares=[
        json_errors,
        make_auth_middleware(tokens.verify, settings.security.metrics_token),
    ])
    app[SERVICES] = Services(settings=settings, directory=directory, tokens=tokens,
                             metrics=metrics, store=store, relays=relays, embedded=embedded,
                             nodes=nodes, recorder=recorder, recording=recording, pairing=pairing,
                             consultations=consultations)
    sio.attach(app)
    add_routes(app, directory=directory, metrics=metrics, pairing=pairing,
               consultations=consultations, recording=recording, presence=presence)
    app.cleanup_ctx.append(_relay)
    app.cleanup_ctx.append(_records)
    app.cleanup_ctx.append(_recorder)
    app.cleanup_ctx.append(_timers)
    return app


async def _relay(app: web.Application) -> AsyncIterator[None]:
    """Check aiortc's internals before any media flows; close every Room at the end."""
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
