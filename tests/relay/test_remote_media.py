"""relay:media batches: what a node streams up for the recorder, packed and unpacked."""

from __future__ import annotations

from typing import Any

from relay.api import RelayInfo
from relay.remote import RemoteRelay, pack_packets, unpack_packets


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def publication_added(self, publication: dict[str, Any]) -> None:
        self.events.append(("added", publication["id"]))

    def publication_removed(self, publication_id: str) -> None:
        self.events.append(("removed", publication_id))

    def packet(self, publication_id: str, sequence_number: int, timestamp: int, marker: bool,
               payload: bytes, arrival: float) -> None:
        self.events.append((publication_id, sequence_number, timestamp, marker, payload,
                            arrival))


def test_packets_survive_packing() -> None:
    packets = [(0, 65535, 4294967295, True, b"\x90\x10" + bytes(1200), 1.7e9 + 0.125),
               (1, 0, 0, False, b"", 1.7e9), (0, 1, 3000, False, b"x", 1.7e9 + 1)]
    assert unpack_packets(pack_packets(packets)) == packets


class Node:
    """The signaling side's socket.io server as RemoteRelay sees it: every command the node
    is sent is acknowledged."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, Any]] = []

    async def call(self, event: str, data: Any, *, to: str, namespace: str,
                   timeout: float) -> Any:
        self.commands.append((event, data))
        return {"ok": True, "result": None}


async def test_a_node_message_reaches_the_rooms_sink_and_a_malformed_one_is_dropped() -> None:
    node = Node()
    remote = RemoteRelay(RelayInfo("n1", "11", "", 10), "sid", server=node)
    sink = Sink()
    await remote.attach_sink("room", sink)
    assert node.commands == [("record_start", {"room_id": "room"})]
    remote.deliver({"room_id": "room", "added": {"id": "pub1"}})
    remote.deliver({"room_id": "room", "publications": ["pub1"],
                    "packets": pack_packets([(0, 7, 90000, True, b"frame", 2.5)])})
    remote.deliver({"room_id": "room", "publications": ["pub1"], "packets": b"\x00\x01"})
    remote.deliver({"room_id": "room", "publications": [],
                    "packets": pack_packets([(3, 7, 90000, True, b"frame", 2.5)])})
    remote.deliver({"room_id": "other", "removed": "pub1"})
    remote.deliver({"room_id": "room", "removed": "pub1"})
    assert sink.events == [("added", "pub1"), ("pub1", 7, 90000, True, b"frame", 2.5),
                           ("removed", "pub1")]
    # Once detached, the node is told to stop and what it still sends is dropped.
    await remote.detach_sink("room", sink)
    assert node.commands[-1] == ("record_stop", {"room_id": "room"})
    remote.deliver({"room_id": "room", "added": {"id": "pub2"}})
    assert sink.events[-1] == ("removed", "pub1")
