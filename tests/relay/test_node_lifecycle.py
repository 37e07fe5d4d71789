"""A standalone relay node outlives signaling: an in-process ``RelayNode`` dials a real
in-process signaling server through a TCP forwarder (so that signaling can stop and start
again on another port, and a cut is a real network cut), with real aiortc participants whose
media keeps flowing while signaling is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from relay import node as node_module
from relay.api import NODE_NAMESPACE
from relay.node import RelayNode
from relay.remote import RemoteRelay
from telehealth.startup import SERVICES, Services
from tests.consultation_media import open_consultation, start_media
from tests.media import MediaPeer, wait_for
from tests.relay.peers import PacketSink
from tests.support import Server, clients, run_server, write_config
from tests.tcp_link import TcpLink

NODE_ID = "relay-muongnhe"
REGION = "11"  # ref1's district (d1): consultations ref1 asks for are placed on the node


@dataclass
class RunningNode:
    node: RelayNode
    stop: asyncio.Event
    task: asyncio.Task[int]

    async def stopped(self, within: float) -> int:
        """Stop the node (as its SIGTERM does) and its exit code, within ``within`` s."""
        self.stop.set()
        return await asyncio.wait_for(asyncio.shield(self.task), within)


def node_settings(settings: Settings, **relay: Any) -> Settings:
    """The server's settings with a node's ``[relay]`` overrides (short timers)."""
    relay = {"reconnect_delay_max_s": 0.5, **relay}
    return settings.model_copy(update={"relay": settings.relay.model_copy(update=relay)})


@asynccontextmanager
async def running_node(server: Server, url: str, **relay: Any) -> AsyncIterator[RunningNode]:
    """A RelayNode dialling ``url`` (the forwarder), registered with ``server``; stopped on
    exit."""
    token = server.tokens.issue_node(NODE_ID)
    node = RelayNode(node_settings(server.settings, **relay), signaling_url=url,
                     node_token=token, region=REGION)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(node.run(stop))
    running = RunningNode(node, stop, task)
    try:
        await wait_for(lambda: node_remote(services(server)) is not None or task.done(), 20,
                       "the node to register")
        assert not task.done(), task.result()
        yield running
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def forwarder() -> AsyncIterator[TcpLink]:
    """The node's TCP link to signaling, closed at the end of the test."""
    link = await TcpLink().start()
    try:
        yield link
    finally:
        await link.close()


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def services(server: Server) -> Services:
    assert server.app is not None
    return server.app[SERVICES]


def node_remote(found: Services) -> RemoteRelay | None:
    """Signaling's RemoteRelay of the node, while it is connected."""
    return next((r for r in found.relays.relays()
                 if isinstance(r, RemoteRelay) and r.info.id == NODE_ID), None)


async def frames_keep_coming(peers: dict[str, MediaPeer], seconds: float,
                             at_least: int) -> dict[str, int]:
    """Over ``seconds``, each peer decodes at least ``at_least`` new frames of every other
    peer's camera; returns how many each got."""
    names = list(peers)
    before = {(a, b): peers[a].frames(b) for a in names for b in names if a != b}
    await asyncio.sleep(seconds)
    grown = {f"{a}<-{b}": peers[a].frames(b) - n for (a, b), n in before.items()}
    for pair, count in grown.items():
        assert count >= at_least, (pair, grown)
    return grown


async def test_media_flows_while_signaling_stops_and_starts_again(
        tmp_path: Path, forwarder: TcpLink) -> None:
    # Presence grace long enough that a restarted signaling never removes a participant.
    # drain_s short: at the end the node drains, and these clients never move.
    config = write_config(tmp_path, presence={"reconnect_grace_s": 60},
                          relay={"drain_s": 2.0})
    peers: dict[str, MediaPeer] = {}
    names = ("cardio1", "ref1")
    try:
        async with AsyncExitStack() as outer:
            first = AsyncExitStack()  # signaling and its clients; the node outlives them
            outer.push_async_callback(first.aclose)
            server = await first.enter_async_context(run_server(config))
            forwarder.point_at(port_of(server))
            running = await outer.enter_async_context(
                running_node(server, forwarder.url, signaling_grace_s=30))
            node = running.node
            c = await first.enter_async_context(
                clients(server.url, {n: server.token(n) for n in names}))
            cid = await open_consultation(c)
            placed = services(server).relays.for_room(cid)
            assert placed is not None and placed.info.id == NODE_ID
            peers = {n: await start_media(c[n], cid) for n in names}
            for a, b in (("ref1", "cardio1"), ("cardio1", "ref1")):
                await wait_for(lambda a=a, b=b: peers[a].frames(b) > 20, 30,
                               f"{a} decoding {b} through the node")
            stopping = time.monotonic()
            await first.aclose()  # signaling stops (clients, then the server)
            stopped = time.monotonic()
            await wait_for(lambda: not node.sio.connected, 10, "the node to lose signaling")
            print(f"signaling stopped in {stopped - stopping:.2f} s; the node had lost it "
                  f"{time.monotonic() - stopping:.2f} s after the stop began")
            # Signaling is gone: the node keeps the room and media goes on between the peers.
            grown = await frames_keep_coming(peers, 2.0, at_least=15)
            print(f"frames while signaling was down (2 s): {grown}")
            assert list(node.relay.rooms) == [cid]
            assert set(node.relay.rooms[cid].participants) == set(names)

            async with run_server(config) as again:
                restarted = time.monotonic()
                forwarder.point_at(port_of(again))
                await wait_for(lambda: node.connects == 2, 10, "the node to dial back")
                print(f"node back {time.monotonic() - restarted:.2f} s after signaling "
                      f"started again (down {restarted - stopped:.2f} s)")
                await wait_for(lambda: len(node.hellos) == 2, 15, "the node's second hello")
                hello = node.hellos[-1]
                assert hello is not None and hello.adopted == [cid], hello
                assert hello.close == []
                # The participants come back to the restarted signaling and resume:
                # the node still has their media, so they keep their connections.
                async with clients(again.url, {n: again.token(n) for n in names}) as c2:
                    for name in names:
                        await c2[name].ok("consult:join", {"consultation_id": cid})
                        joined = await c2[name].ok("media:join", {
                            "consultation_id": cid, "resume": True})
                        assert joined["resumed"] is True, joined
                grown = await frames_keep_coming(peers, 1.0, at_least=8)
                print(f"frames after signaling came back (1 s): {grown}, hello {hello}")
                assert list(node.relay.rooms) == [cid]
                began = time.monotonic()
                assert await running.stopped(within=30) == 0
                print(f"node drained and stopped in {time.monotonic() - began:.2f} s: "
                      f"{running.node.drained}")
    finally:
        for peer in peers.values():
            await peer.close()


async def test_a_node_that_signaling_drops_dials_back_and_keeps_its_media(
        tmp_path: Path) -> None:
    # No embedded relay: the dropped node's consultation has nowhere else to go, so signaling
    # adopts it again when the node is back; media never stopped meanwhile.
    config = write_config(tmp_path, relay={"embedded": False},
                          presence={"reconnect_grace_s": 60})
    names = ("cardio1", "ref1")
    peers: dict[str, MediaPeer] = {}
    async with run_server(config) as server, running_node(server, server.url) as running:
        node, found = running.node, services(server)
        try:
            async with clients(server.url, {n: server.token(n) for n in names}) as c:
                cid = await open_consultation(c)
                peers = {n: await start_media(c[n], cid) for n in names}
                for a, b in (("ref1", "cardio1"), ("cardio1", "ref1")):
                    await wait_for(lambda a=a, b=b: peers[a].frames(b) > 20, 30,
                                   f"{a} decoding {b} through the node")
                first = node_remote(found)
                assert first is not None
                recorder = PacketSink()
                await first.attach_sink(cid, recorder)
                await wait_for(lambda: len(recorder.added) == 4 and len(recorder.packets) == 4,
                               10, "the recorder stream")
                # Signaling drops the node (python-socketio's client would never dial back).
                dropped = time.monotonic()
                await found.nodes._sio.disconnect(first.sid,
                                                  namespace=NODE_NAMESPACE)
                await wait_for(lambda: node.connects == 2, 10, "the node to dial back")
                back = time.monotonic() - dropped
                await wait_for(lambda: len(node.hellos) == 2, 15, "the node's second hello")
                print(f"node dialled back {back:.2f} s after signaling dropped it; hello "
                      f"answered {node.hellos[-1]}")
                hello = node.hellos[-1]
                assert hello is not None and hello.adopted == [cid], hello
                assert list(node.relay.rooms) == [cid]
                await frames_keep_coming(peers, 1.0, at_least=8)
                second = node_remote(found)
                assert second is not None and second.sid != first.sid

                # The participants' media is still here: resume says so; a stranger's is not.
                assert await second.resume(cid, "ref1") is True
                assert await second.resume(cid, "ghost") is False

                # A recorder attached anew (as after a signaling restart) hears every
                # publication again from the stream that outlived the drop, then packets.
                again = PacketSink()
                await second.attach_sink(cid, again)
                await wait_for(lambda: len(again.added) == 4 and len(again.packets) == 4
                               and min(again.packets.values()) > 10, 10,
                               "the re-announced publications and their packets")
                assert set(again.added) == set(recorder.added)
                assert list(node.sinks) == [cid]
                await second.detach_sink(cid, again)
                await wait_for(lambda: not node.sinks, 5, "the stream to stop")
        finally:
            for peer in peers.values():
                await peer.close()


async def test_a_node_cut_off_gets_back_in_before_signaling_noticed_the_cut(
        tmp_path: Path, forwarder: TcpLink, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path, relay={"embedded": False})
    async with run_server(config) as server:
        found = services(server)
        forwarder.point_at(port_of(server))
        async with running_node(server, forwarder.url) as running:
            node = running.node
            async with clients(server.url, {n: server.token(n)
                                            for n in ("cardio1", "ref1")}) as c:
                cid = await open_consultation(c)
                old = node_remote(found)
                assert old is not None
                caplog.set_level(logging.INFO, logger="relay.node")
                forwarder.sever_node_side()
                cut = time.monotonic()
                await wait_for(lambda: node.connects == 2, 15, "the node to get back in")
                back = time.monotonic() - cut
                refused = [r for r in caplog.records if r.name == "relay.node"
                           and "duplicate_relay" in r.message]
                print(f"node back in {back:.2f} s ({len(refused)} duplicate_relay "
                      "refusals while signaling held its old connection)")
                # Signaling either lets the node in at once (dropping the old connection)
                # or refuses it until it notices: the node retries either way.
                assert back < 5.0
                assert all(r.levelno == logging.INFO for r in refused)
                new = node_remote(found)
                assert new is not None and new.sid != old.sid
                await wait_for(lambda: len(node.hellos) == 2, 15, "the second hello")
                hello = node.hellos[-1]
                assert hello is not None and hello.adopted == [cid], hello
                assert list(node.relay.rooms) == [cid]
                forwarder.release_held()


async def test_a_dial_to_a_frozen_signaling_is_given_up_and_tried_again(
        tmp_path: Path, forwarder: TcpLink, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "CONNECT_TIMEOUT_S", 1.0)
    config = write_config(tmp_path, relay={"embedded": False})
    async with run_server(config) as server:
        forwarder.point_at(port_of(server))
        async with running_node(server, forwarder.url) as running:
            node = running.node
            caplog.set_level(logging.INFO, logger="relay.node")
            # Signaling's machine hangs: connections are accepted and never answered.
            forwarder.drop()
            forwarder.freeze()
            await wait_for(lambda: any("TimeoutError" in r.message
                                       for r in caplog.records), 10,
                           "a dial attempt to time out")
            forwarder.heal()
            mended = time.monotonic()
            await wait_for(lambda: node.connects == 2, 10, "the node to get back in")
            print(f"node back {time.monotonic() - mended:.2f} s after signaling thawed")
            assert node.sio.connected


async def test_two_nodes_with_one_id_back_off_instead_of_replacing_each_other_all_the_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path, relay={"embedded": False})
    caplog.set_level(logging.WARNING, logger="relay.node")
    async with run_server(config) as server:
        async with running_node(server, server.url, reconnect_delay_max_s=5.0) as one, \
                running_node(server, server.url, reconnect_delay_max_s=5.0) as other:
            await asyncio.sleep(6.0)
            connects = (one.node.connects, other.node.connects)
    # Without the kept back-off: 9 and 8 connects in 4 s here, and on forever.
    print(f"connects in 6 s of two nodes with one id: {connects}")
    assert max(connects) <= 6, connects
    assert any("another node running with this id" in r.message for r in caplog.records)


async def test_hello_closes_exactly_the_rooms_signaling_lists(
        tmp_path: Path, forwarder: TcpLink) -> None:
    config = write_config(tmp_path, relay={"embedded": False})
    async with run_server(config) as server:
        found = services(server)
        forwarder.point_at(port_of(server))
        async with running_node(server, forwarder.url) as running:
            node = running.node
            names = ("cardio1", "ref1", "cardio2", "ref2")
            async with clients(server.url, {n: server.token(n) for n in names}) as c:
                kept = await open_consultation(c, host="cardio1", guests=("ref1",))
                ended = await open_consultation(c, host="cardio2", guests=("ref2",))
                assert set(node.relay.rooms) == {kept, ended}
                # The node is cut off; meanwhile one consultation ends.
                forwarder.drop()
                await wait_for(lambda: not node.sio.connected, 10, "the cut")
                await wait_for(lambda: node_remote(found) is None, 10,
                               "signaling to lose the node")
                await c["cardio2"].ok("consult:end", {"consultation_id": ended,
                                                      "conclusion": "done"})
                forwarder.heal()
                await wait_for(lambda: len(node.hellos) == 2, 15, "the second hello")
                hello = node.hellos[-1]
                assert hello is not None, "signaling did not answer relay:hello"
                assert hello.close == [ended] and hello.adopted == [kept], hello
                assert list(node.relay.rooms) == [kept]


async def test_past_the_grace_the_node_closes_every_room(
        tmp_path: Path, forwarder: TcpLink, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path, relay={"embedded": False})
    async with run_server(config) as server:
        forwarder.point_at(port_of(server))
        async with running_node(server, forwarder.url, signaling_grace_s=1.0) as running:
            node = running.node
            names = ("cardio1", "ref1")
            async with clients(server.url, {n: server.token(n) for n in names}) as c:
                cid = await open_consultation(c)
                assert list(node.relay.rooms) == [cid]
                caplog.set_level(logging.INFO, logger="relay.node")
                forwarder.drop()
                cut = time.monotonic()
                await wait_for(lambda: not node.relay.rooms, 10, "the grace to run out")
                took = time.monotonic() - cut
                print(f"rooms closed {took:.2f} s after the cut (grace 1 s)")
                assert took >= 0.9
                closing = [r for r in caplog.records if r.name == "relay.node"
                           and r.levelno == logging.WARNING and "closing its" in r.message]
                assert len(closing) == 1, [r.message for r in closing]
                # The node goes on dialling; once signaling is reachable it says hello,
                # with no rooms left.
                forwarder.heal()
                await wait_for(lambda: len(node.hellos) == 2, 15, "the second hello")
                assert node.sio.connected
                assert await running.stopped(within=10) == 0


async def test_a_node_without_signaling_stops_at_once(tmp_path: Path, forwarder: TcpLink) -> None:
    config = write_config(tmp_path, relay={"embedded": False})
    async with run_server(config) as server:
        forwarder.point_at(port_of(server))
        async with running_node(server, forwarder.url) as running:
            async with clients(server.url, {n: server.token(n)
                                            for n in ("cardio1", "ref1")}) as c:
                await open_consultation(c)
                forwarder.drop()
                await wait_for(lambda: not running.node.sio.connected, 10, "the cut")
                began = time.monotonic()
                assert await running.stopped(within=5) == 0
                print(f"stopped without signaling in {time.monotonic() - began:.2f} s")
                assert not running.node.relay.rooms
                assert running.node.drained is None
