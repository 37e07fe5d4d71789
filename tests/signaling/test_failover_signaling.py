"""Failover inside one process: a real server, real relay nodes (``relay.node.RelayNode``)
dialling in through a TCP link the test can cut, and real aiortc participants.

A cut link is what signaling sees of a relay that lost power or its cable: the socket stays
open and nothing arrives. A dropped link (its connections closed) is what it sees of a relay
whose process died. The node itself keeps running behind the link: when the link heals it
redials and says hello, as a frozen relay that thaws does."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from config.settings import Settings, load_settings
from relay.node import RelayNode
from signaling.http_api import runner_options
from signaling.tokens import TokenAuthority
from telehealth.startup import SERVICES, STOPPING, Services, create_app
from tests.consultation_media import media_peer, open_consultation, start_media
from tests.media import MediaPeer, wait_for
from tests.support import Client, Server, clients, run_server, write_config
from tests.tcp_link import TcpLink

NAMES = ("cardio1", "ref1")


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


@dataclass
class Node:
    """A relay node running in this process behind its ``TcpLink``; ``stop`` stops it (a
    SIGTERM: it drains while its link is up)."""

    node: RelayNode
    link: TcpLink
    stop: asyncio.Event
    task: asyncio.Task[int]

    @property
    def rooms(self) -> dict[str, Any]:
        return dict(self.node.relay.rooms)


async def start_node(settings: Settings, tokens: TokenAuthority, port: int, relay_id: str,
                     region: str) -> Node:
    link = await TcpLink(port).start()
    node = RelayNode(settings, signaling_url=link.url,
                     node_token=tokens.issue_node(relay_id), region=region)
    stop = asyncio.Event()
    return Node(node, link, stop, asyncio.create_task(node.run(stop)))


async def end_node(node: Node) -> None:
    """The link dropped first, so that the node stops without a drain."""
    await node.link.close()
    node.stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(node.task, 20)


@asynccontextmanager
async def relay_node(server: Server, relay_id: str, region: str) -> AsyncIterator[Node]:
    """A relay node in this process dialling in through a ``TcpLink``; registered on entry."""
    services = services_of(server)
    node = await start_node(server.settings, services.tokens, port_of(server), relay_id,
                            region)
    try:
        await wait_for(lambda: services.relays.get(relay_id) is not None, 20,
                       f"relay node {relay_id} to register")
        yield node
    finally:
        await end_node(node)


async def moved(c: dict[str, Client], cid: str, timeout: float = 10) -> list[Any]:
    """Every participant's next ``media:moved`` for the consultation: their relays."""
    relays = []
    for name in NAMES:
        data = await c[name].next_matching("media:moved",
                                           lambda d: d["consultation_id"] == cid, timeout)
        relays.append(data["relay"])
    return relays


@asynccontextmanager
async def media_of(c: dict[str, Client], cid: str) -> AsyncIterator[dict[str, MediaPeer]]:
    """Media of ``NAMES`` in the consultation, flowing every way on entry; on exit the peers
    the dict then holds (a test may rebuild them) are closed."""
    peers = {n: await start_media(c[n], cid) for n in NAMES}
    try:
        await media_everywhere(peers)
        yield peers
    finally:
        for peer in peers.values():
            await peer.close()


async def rebuild(client: Client, cid: str, old: MediaPeer | None) -> MediaPeer:
    """Rule 1 of docs/protocol.md after a move to a new relay: ``media:join {resume: true}``
    answers ``resumed: false``, so the old connections go and new ones are built."""
    answer = await client.ok("media:join", {"consultation_id": cid, "resume": True})
    assert answer["resumed"] is False, answer
    if old is not None:
        await old.close()
    peer = media_peer(client, cid)
    await peer.subscribe()
    await peer.publish()
    return peer


async def media_everywhere(peers: dict[str, MediaPeer], frames: int = 10) -> None:
    for name, peer in peers.items():
        for other in peers:
            if other != name:
                enough = peer.frames(other) + frames

                def flowing(p: MediaPeer = peer, o: str = other, n: int = enough) -> bool:
                    return p.frames(o) > n

                await wait_for(flowing, 30, f"{name} receiving {other}'s video")


def services_of(server: Server) -> Services:
    assert server.app is not None
    return server.app[SERVICES]


async def test_a_silent_relay_is_taken_out_within_two_seconds_and_its_consultation_moves(
        tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server:
        services = services_of(server)
        async with relay_node(server, "relay-a", "11") as a, \
                clients(server.url, {n: server.token(n) for n in NAMES}) as c:
            cid = await open_consultation(c)  # ref1's site is in region 11
            assert services.relays.for_room(cid) is services.relays.get("relay-a")
            async with media_of(c, cid) as peers:
                cut_at = time.monotonic()
                a.link.cut()
                relays = await moved(c, cid)
                told_s = time.monotonic() - cut_at
                print(f"silent relay: participants told after {told_s:.2f} s "
                      f"(heartbeat_s {server.settings.relay.heartbeat_s} x "
                      f"{server.settings.relay.heartbeat_misses})")
                assert [r["id"] for r in relays] == ["embedded", "embedded"]
                assert told_s < 3.0  # 1.5 s of silence, checked every 0.25 s
                for name in NAMES:
                    peers[name] = await rebuild(c[name], cid, peers[name])
                await media_everywhere(peers)
                print(f"silent relay: media back through the embedded relay after "
                      f"{time.monotonic() - cut_at:.2f} s")
                # The relay thaws: it redials by itself and closes the room moved meanwhile.
                hellos = len(a.node.hellos)
                a.link.heal()
                await wait_for(lambda: len(a.node.hellos) > hellos, 20, "the node's hello")
                result = a.node.hellos[-1]
                assert result is not None and result.close == [cid] and result.adopted == []
                assert cid not in a.rooms
                assert services.relays.for_room(cid) is services.embedded


async def test_a_node_back_before_its_silence_was_noticed_keeps_its_participants_media(
        tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server:
        services = services_of(server)
        async with relay_node(server, "relay-a", "11") as a, \
                clients(server.url, {n: server.token(n) for n in NAMES}) as c:
            cid = await open_consultation(c)
            async with media_of(c, cid) as peers:
                builds = {n: (p.publish_pc, p.subscribe_pc) for n, p in peers.items()}
                connects = a.node.connects
                a.link.sever_node_side()  # signaling still holds the old, silent connection
                relays = await moved(c, cid)
                assert a.node.connects == connects + 1
                assert [r["id"] for r in relays] == ["relay-a", "relay-a"]
                for name in NAMES:
                    answer = await c[name].ok("media:join", {"consultation_id": cid,
                                                             "resume": True})
                    assert answer["resumed"] is True
                await media_everywhere(peers)
                assert {n: (p.publish_pc, p.subscribe_pc) for n, p in peers.items()} == builds
                assert services.relays.for_room(cid) is services.relays.get("relay-a")
                await asyncio.sleep(server.settings.relay.heartbeat_s * 4)
                assert services.relays.get("relay-a") is not None  # the new one heartbeats


async def test_a_spare_that_does_not_answer_is_skipped_for_the_next(tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server:
        services = services_of(server)
        async with relay_node(server, "relay-a", "11") as a, \
                relay_node(server, "relay-b", "11") as b, \
                clients(server.url, {n: server.token(n) for n in NAMES}) as c:
            cid = await open_consultation(c)
            # Same region, same load: the id decides.
            assert services.relays.for_room(cid) is services.relays.get("relay-a")
            b.link.cut()  # the spare of the region freezes...
            lost_at = time.monotonic()
            a.link.drop()  # ...just as the consultation's relay dies
            relays = await moved(c, cid)
            told_s = time.monotonic() - lost_at
            print(f"dead relay, frozen spare: participants told after {told_s:.2f} s "
                  f"(open_room_timeout_s {server.settings.relay.open_room_timeout_s})")
            assert [r["id"] for r in relays] == ["embedded", "embedded"]
            assert server.settings.relay.open_room_timeout_s * 0.9 <= told_s < 4.0
            record = await services.store.get_consultation(cid)
            assert record is not None and record.relay_id == "embedded"
            # The frozen spare is taken out by its own silence.
            await wait_for(lambda: services.relays.get("relay-b") is None, 5,
                           "the frozen spare to be taken out")


async def test_without_a_spare_the_consultation_waits_and_moves_when_a_relay_arrives(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, relay={"host_addresses": ["127.0.0.1"], "embedded": False})
    async with run_server(config) as server:
        services = services_of(server)
        async with relay_node(server, "relay-a", "11") as a, \
                clients(server.url, {n: server.token(n) for n in NAMES}) as c:
            cid = await open_consultation(c)
            async with media_of(c, cid) as peers:
                a.link.drop()
                assert await moved(c, cid) == [None, None]  # no relay: the waiting state
                for name in NAMES:
                    await c[name].refused("media:join", {"consultation_id": cid,
                                                         "resume": True}, "relay_waiting")
                await c["ref1"].ok("chat:send", {"consultation_id": cid,
                                                 "text": "still here"})
                waiting = services.relays.waiting(cid)
                assert waiting is not None and waiting.reason == "relay_lost"
                metrics = services.metrics.registry
                assert metrics.get_sample_value(
                    "telehealth_consultations_waiting_for_relay") == 1
                assert metrics.get_sample_value(
                    "telehealth_relay_moves_total",
                    {"reason": "relay_lost", "outcome": "waiting"}) == 1
                # A relay of another region arrives: the consultation goes there at once.
                arrived_at = time.monotonic()
                async with relay_node(server, "relay-b", "79"):
                    relays = await moved(c, cid)
                    print(f"waiting consultation placed {time.monotonic() - arrived_at:.2f} s "
                          "after a relay started")
                    assert [r["id"] for r in relays] == ["relay-b", "relay-b"]
                    for name in NAMES:
                        peers[name] = await rebuild(c[name], cid, peers[name])
                    await media_everywhere(peers)
                    assert services.relays.waiting(cid) is None
                    assert metrics.get_sample_value(
                        "telehealth_consultations_waiting_for_relay") == 0
                    assert metrics.get_sample_value(
                        "telehealth_relay_moves_total",
                        {"reason": "relay_lost", "outcome": "placed"}) == 1


async def test_a_draining_relay_is_answered_once_its_participants_are_connected_elsewhere(
        tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server:
        services = services_of(server)
        async with relay_node(server, "relay-a", "11") as a, \
                clients(server.url, {n: server.token(n) for n in NAMES}) as c:
            cid = await open_consultation(c)
            peers = {n: await start_media(c[n], cid) for n in NAMES}

            async def follow(name: str) -> None:
                # Rule 1: the move arrives while the old relay still forwards.
                await c[name].next_matching("media:moved",
                                            lambda d: d["relay"] is not None, 15)
                peers[name] = await rebuild(c[name], cid, peers[name])

            try:
                await media_everywhere(peers)
                followers = [asyncio.create_task(follow(n)) for n in NAMES]
                started = time.monotonic()
                a.stop.set()  # SIGTERM: the node asks to be drained
                await asyncio.wait_for(asyncio.gather(*followers), 20)
                await wait_for(lambda: a.node.drained is not None, 20, "the drain's answer")
                drained = a.node.drained
                assert drained is not None
                print(f"drain: answered after {drained.waited_s:.2f} s (moved "
                      f"{drained.moved}, connected {drained.connected}), node asked "
                      f"{time.monotonic() - started:.2f} s ago")
                assert (drained.moved, drained.connected) == (1, 2)
                assert drained.waited_s < server.settings.relay.drain_s
                assert services.relays.for_room(cid) is services.embedded
                await media_everywhere(peers)
            finally:
                for peer in peers.values():
                    await peer.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def serve_on(settings: Settings, port: int) -> AsyncIterator[tuple[Services, Any]]:
    """The app on a fixed port (a restart must be found where the nodes dial), and a stop as
    `serve` does it (``Stopping.begin``, then the runner's cleanup), which returns its time."""
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False,
                           **runner_options(settings.server, app[SERVICES].metrics))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stopped = False

    async def stop() -> float:
        nonlocal stopped
        started = time.monotonic()
        await app[STOPPING].begin(runner)
        await runner.cleanup()
        stopped = True
        return time.monotonic() - started

    try:
        yield app[SERVICES], stop
    finally:
        if not stopped:
            await runner.cleanup()


def rebind(peer: MediaPeer, client: Client, cid: str) -> None:
    """A resumed participant keeps its peer connections; only its signaling socket is new."""

    async def call(command: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await client.ok(f"media:{command}", {"consultation_id": cid, **payload})

    async def on_offer(data: dict[str, Any]) -> None:
        await peer.answer_offer(data)

    peer.call = call
    client.sio.on("media:offer", on_offer)


async def test_signaling_restarts_while_relay_nodes_keep_the_media_and_adopts_their_rooms(
        tmp_path: Path) -> None:
    config = write_config(
        tmp_path, relay={"host_addresses": ["127.0.0.1"], "embedded": False,
                         "adopt_wait_s": 10.0, "reconnect_delay_max_s": 0.5},
        presence={"reconnect_grace_s": 20.0})
    settings = load_settings(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    nodes: list[Node] = []
    c: dict[str, Client] = {}
    peers: dict[str, MediaPeer] = {}
    try:
        async with serve_on(settings, port) as (services, stop):
            nodes = [await start_node(settings, services.tokens, port, "relay-a", "11"),
                     await start_node(settings, services.tokens, port, "relay-b", "79")]
            a, b = nodes
            await wait_for(lambda: len(services.relays.relays()) == 2, 20, "two relay nodes")
            for name in NAMES:
                c[name] = await Client(url, services.tokens.issue(name)).connect()
            cid = await open_consultation(c)
            assert services.relays.for_room(cid) is services.relays.get("relay-a")
            for name in NAMES:
                peers[name] = await start_media(c[name], cid)
            await media_everywhere(peers)
            stop_s = await stop()
        print(f"stop of signaling with two relay nodes and a consultation: {stop_s:.2f} s")
        assert stop_s < 3.0
        # Nothing moved and no room closed: the media goes on without signaling.
        assert set(a.rooms) == {cid} and set(a.rooms[cid].participants) == set(NAMES)
        assert b.rooms == {}
        await media_everywhere(peers)
        a.link.drop()  # relay-a stays away while signaling starts again

        async with serve_on(settings, port) as (services, stop):
            waiting = services.relays.waiting(cid)
            assert waiting is not None and waiting.relay_id == "relay-a"
            assert waiting.reason == "signaling_restart"
            await wait_for(lambda: services.relays.get("relay-b") is not None, 20,
                           "relay-b to dial the new process")
            assert services.relays.waiting(cid) is not None  # it waits for relay-a only
            c["cardio1"] = await Client(url, services.tokens.issue("cardio1")).connect()
            await c["cardio1"].ok("consult:join", {"consultation_id": cid})
            await c["cardio1"].refused("media:join", {"consultation_id": cid, "resume": True},
                                       "relay_waiting")
            hellos = len(a.node.hellos)
            a.link.heal()
            await wait_for(lambda: len(a.node.hellos) > hellos, 20, "relay-a's hello")
            result = a.node.hellos[-1]
            assert result is not None and result.adopted == [cid] and result.close == []
            assert services.relays.for_room(cid) is services.relays.get("relay-a")
            moved_to = await c["cardio1"].next_matching(
                "media:moved", lambda d: d["consultation_id"] == cid, 10)
            assert moved_to["relay"]["id"] == "relay-a"
            # ref1, whom this process never saw, is back from the relay's report.
            joined = await c["cardio1"].ok("consult:join", {"consultation_id": cid})
            states = {p["clinician_id"]: p["state"] for p in joined["participants"]}
            assert states == {"cardio1": "present", "ref1": "reconnecting"}
            c["ref1"] = await Client(url, services.tokens.issue("ref1")).connect()
            await c["ref1"].ok("consult:join", {"consultation_id": cid})
            for name in NAMES:
                answer = await c[name].ok("media:join", {"consultation_id": cid,
                                                         "resume": True})
                assert answer["resumed"] is True and answer["relay"]["id"] == "relay-a"
                rebind(peers[name], c[name], cid)
            builds = {n: (p.publish_pc, p.subscribe_pc) for n, p in peers.items()}
            await media_everywhere(peers)
            assert {n: (p.publish_pc, p.subscribe_pc) for n, p in peers.items()} == builds
            assert b.rooms == {}
            # Without resume, media starts afresh on the relay (today's behaviour).
            fresh = await c["ref1"].ok("media:join", {"consultation_id": cid})
            assert fresh["resumed"] is False
            await stop()
    finally:
        for client in c.values():
            await client.close()
        for peer in peers.values():
            await peer.close()
        for node in nodes:
            await end_node(node)


async def test_a_media_step_waiting_on_a_frozen_relay_fails_when_the_relay_is_taken_out(
        tmp_path: Path) -> None:
    # A command to a node waits up to relay/remote.py's COMMAND_TIMEOUT_S (15 s) for its
    # answer; a frozen node never answers, and the client's media set-up would hang behind it
    # well past the move. Taking the node out abandons what waits on it.
    async with run_server(write_config(tmp_path)) as server:
        async with relay_node(server, "relay-a", "11") as a, \
                clients(server.url, {n: server.token(n) for n in NAMES}) as c:
            cid = await open_consultation(c)
            await c["ref1"].ok("media:join", {"consultation_id": cid})
            a.link.cut()  # power cut: the node's socket stays open and says nothing
            frozen_at = time.monotonic()
            answer = await c["ref1"].call("media:join", {"consultation_id": cid,
                                                         "resume": True}, timeout=20)
            took = time.monotonic() - frozen_at
            print(f"media:join on a frozen relay answered after {took:.2f} s: {answer}")
            # Refused relay_unreachable when the node is taken out, or, the consultation having
            # moved by then, joined afresh where it went (a resume is asked once more where
            # the relay is): either way within the sweep's time, not the command timeout.
            if "error" in answer:
                assert answer["error"]["code"] == "relay_unreachable", answer
            else:
                assert answer["resumed"] is False and answer["relay"]["id"] == "embedded", answer
            assert took < 5.0, "the step waited for the command timeout, not the sweep"
            moved_to = await c["ref1"].next_matching(
                "media:moved", lambda d: d["consultation_id"] == cid, 10)
            assert moved_to["relay"]["id"] == "embedded"
            joined = await c["ref1"].ok("media:join", {"consultation_id": cid, "resume": True})
            # A new relay: new connections, unless the first join already set them up there.
            assert joined["resumed"] is ("error" not in answer)
