"""The same consultation through a standalone `telehealth relay` process started by the test:
it dials in, registers its region, carries the media, and when it dies the consultation moves
to another relay and the participants are told."""

from __future__ import annotations

import signal
from pathlib import Path

from relay.remote import RemoteRelay
from telehealth.startup import SERVICES
from tests.consultation_media import open_consultation, start_media, start_node, stop_node
from tests.media import wait_for
from tests.support import clients, run_server, write_config


async def test_a_consultation_runs_through_a_standalone_relay_node(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    async with run_server(config) as server:
        assert server.app is not None
        services = server.app[SERVICES]
        token = services.tokens.issue_node("relay-muongnhe")
        node = start_node(config, server.url, token, region="11")  # d1's province
        try:
            await wait_for(lambda: any(isinstance(r, RemoteRelay)
                                       for r in services.relays.relays()), 20,
                           "the node to register")
            [remote] = [r for r in services.relays.relays() if isinstance(r, RemoteRelay)]
            assert remote.info.id == "relay-muongnhe" and remote.info.region == "11"
            names = ("cardio1", "ref1")
            async with clients(server.url, {n: server.token(n) for n in names}) as c:
                cid = await open_consultation(c)  # ref1 is at d1, region 11
                assert services.relays.for_room(cid) is remote
                peers = {n: await start_media(c[n], cid) for n in names}
                try:
                    await wait_for(lambda: peers["ref1"].frames("cardio1") > 20, 30,
                                   "video through the node")
                    await wait_for(lambda: peers["cardio1"].frames("ref1") > 20, 30,
                                   "video back through the node")
                    stats = await remote.stats(cid)
                    assert stats["ref1"]["publications"]["camera"]["packets"] > 20
                    # The node dies: the consultation moves and everyone is told to rejoin.
                    node.send_signal(signal.SIGKILL)
                    node.wait(timeout=10)
                    for name in names:
                        moved = await c[name].next("media:moved", timeout=15)
                        assert moved["consultation_id"] == cid
                        assert moved["relay"]["id"] == "embedded"
                    assert services.relays.for_room(cid) is services.embedded
                finally:
                    for peer in peers.values():
                        await peer.close()
        finally:
            await stop_node(node)


async def test_a_node_with_a_bad_token_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    async with run_server(config) as server:
        assert server.app is not None
        services = server.app[SERVICES]
        clinician_token = server.token("admin")  # not a node token
        node = start_node(config, server.url, clinician_token, region="11")
        try:
            # Refused for good: the node says why and exits with code 2 instead of retrying.
            # (Poll: a blocking wait would stall the server running in this event loop.)
            await wait_for(lambda: node.poll() is not None, 30, "the refused node to exit")
            assert node.returncode == 2
            assert not any(isinstance(r, RemoteRelay) for r in services.relays.relays())
        finally:
            await stop_node(node)
