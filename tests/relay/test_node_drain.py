"""A relay node's SIGTERM drains it: a real `telehealth relay` process asks signaling (real, in
this process) to move its consultations with ``relay:drain``, keeps its rooms until the moved
participants are connected on their new relay, then exits 0; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relay.remote import RemoteRelay
from telehealth.startup import SERVICES
from tests.consultation_media import media_peer, open_consultation, start_media
from tests.media import MediaPeer, wait_for
from tests.support import Server, clients, run_server, write_config

NODE_ID = "relay-muongnhe"
DRAIN_S = 8.0


class NodeProcess:
    """`telehealth relay` as a subprocess whose output is kept (read by a thread, so that a
    full pipe never blocks it)."""

    def __init__(self, config: Path, server: Server) -> None:
        token = server.tokens.issue_node(NODE_ID)
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "telehealth.cli", "--config", str(config), "relay",
             "--signaling", server.url, "--node-token", token, "--region", "11"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def said(self, text: str) -> list[str]:
        return [line for line in self.output if text in line]


@contextmanager
def node_process(config: Path, server: Server) -> Iterator[NodeProcess]:
    node = NodeProcess(config, server)
    try:
        yield node
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait(timeout=10)


def registered(server: Server) -> RemoteRelay | None:
    assert server.app is not None
    return next((r for r in server.app[SERVICES].relays.relays()
                 if isinstance(r, RemoteRelay) and r.info.id == NODE_ID), None)


async def test_sigterm_moves_the_consultation_and_exits_once_its_participants_are_connected(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, relay={"drain_s": DRAIN_S},
                          presence={"reconnect_grace_s": 60})
    names = ("cardio1", "ref1")
    peers: dict[str, MediaPeer] = {}
    moved_peers: dict[str, MediaPeer] = {}
    async with run_server(config) as server:
        assert server.app is not None
        services = server.app[SERVICES]
        with node_process(config, server) as node:
            await wait_for(lambda: registered(server) is not None, 20, "the node to register")
            try:
                async with clients(server.url, {n: server.token(n) for n in names}) as c:
                    cid = await open_consultation(c)
                    relay = services.relays.for_room(cid)
                    assert relay is not None and relay.info.id == NODE_ID
                    peers = {n: await start_media(c[n], cid) for n in names}
                    for a, b in (("ref1", "cardio1"), ("cardio1", "ref1")):
                        await wait_for(lambda a=a, b=b: peers[a].frames(b) > 20, 30,
                                       f"{a} decoding {b} through the node")
                    node.process.send_signal(signal.SIGTERM)
                    termed = time.monotonic()
                    # Each participant is told, and moves its media to the new relay (the
                    # embedded one) while the node still carries the old.
                    told: dict[str, float] = {}
                    for name in names:
                        moved = await c[name].next("media:moved", timeout=10)
                        assert moved["consultation_id"] == cid
                        assert moved["relay"]["id"] == "embedded"
                        told[name] = time.monotonic() - termed
                    for name in names:
                        joined = await c[name].ok("media:join", {"consultation_id": cid,
                                                                 "resume": True})
                        assert joined["resumed"] is False
                        peer = media_peer(c[name], cid)
                        moved_peers[name] = peer
                        await peer.subscribe()
                        await peer.publish()
                        print(f"{name}: told {told[name]:.2f} s after SIGTERM, new connections "
                              f"offered {time.monotonic() - termed:.2f} s")
                    # Media went on through the node until they had moved.
                    assert all(peers[a].frames(b) > 20 for a, b in (("ref1", "cardio1"),
                                                                    ("cardio1", "ref1")))
                    await wait_for(lambda: node.process.poll() is not None, DRAIN_S + 15,
                                   "the drained node to exit")
                    exited = time.monotonic() - termed
                    print(f"node exited {exited:.2f} s after SIGTERM: "
                          f"{''.join(node.said('drained')).strip()}")
                    assert node.process.returncode == 0, "".join(node.output[-20:])
                    [drained] = node.said("drained in")
                    assert "1 consultations moved, 2 participants connected" in drained
                    assert exited < DRAIN_S, "the node waited for drain_s, not for the peers"
                    assert registered(server) is None
                    for a, b in (("ref1", "cardio1"), ("cardio1", "ref1")):
                        await wait_for(lambda a=a, b=b: moved_peers[a].frames(b) > 15, 30,
                                       f"{a} decoding {b} on the new relay")
            finally:
                for peer in (*peers.values(), *moved_peers.values()):
                    await peer.close()


async def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, relay={"drain_s": DRAIN_S},
                          presence={"reconnect_grace_s": 60})
    async with run_server(config) as server:
        with node_process(config, server) as node:
            await wait_for(lambda: registered(server) is not None, 20, "the node to register")
            async with clients(server.url, {n: server.token(n)
                                            for n in ("cardio1", "ref1")}) as c:
                cid = await open_consultation(c)
                # A participant in the node's room who never moves: signaling would wait
                # drain_s for it.
                await c["ref1"].ok("media:join", {"consultation_id": cid})
                node.process.send_signal(signal.SIGTERM)
                await wait_for(lambda: bool(node.said("draining: signaling moves")), 10,
                               "the drain to start")
                again = time.monotonic()
                node.process.send_signal(signal.SIGTERM)
                await wait_for(lambda: node.process.poll() is not None, 5,
                               "the node to exit at the second SIGTERM")
                print(f"exited {time.monotonic() - again:.2f} s after the second SIGTERM")
                assert node.process.returncode == 128 + signal.SIGTERM
                assert node.said("second SIGTERM; exiting at once")
