"""A TCP link between a relay node and signaling that a test can break the ways real links
break: the node dials the link's port, which stays the same while signaling restarts on
another (``point_at``).

- ``cut()``: bytes are dropped both ways and new connections refused; nothing closes (a power
  or cable cut: signaling notices only by the node's silence).
- ``drop()``: every connection closed at once and new ones refused (the node's process died,
  or signaling's).
- ``freeze()``: new connections are accepted and never answered (a stopped process).
- ``sever_node_side()``: the node loses its connections while signaling's side of them stays
  open and silent (a cut the node notices first); new connections go through.
- ``heal()``: new connections go through again (and what ``sever_node_side`` kept is reset).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class TcpLink:
    def __init__(self, target_port: int | None = None) -> None:
        self.target_port = target_port
        self.state = "up"
        """"up", "cut" (bytes dropped), "down" (connections refused) or "frozen"."""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._node_side: set[asyncio.StreamWriter] = set()
        self._held: set[asyncio.StreamWriter] = set()
        """Connections kept open and silent: signaling's side after ``sever_node_side``, and
        the node's side of connections accepted while frozen."""
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> TcpLink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def point_at(self, port: int) -> None:
        """New connections go to ``port`` (signaling restarted there)."""
        self.target_port = port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state == "frozen":
            self._held.add(writer)
            return
        if self.state != "up" or self.target_port is None:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        self._node_side.add(writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if self.state == "up":
                    sink.write(data)
                    await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if sink not in self._held:
                sink.close()
            self._writers.discard(sink)
            self._node_side.discard(sink)

    def cut(self) -> None:
        self.state = "cut"

    def drop(self) -> None:
        self.state = "down"
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self.release_held()

    def freeze(self) -> None:
        self.state = "frozen"

    def sever_node_side(self) -> None:
        self._held |= self._writers - self._node_side
        for writer in list(self._node_side):
            writer.transport.abort()

    def release_held(self) -> None:
        """Reset what was kept open (a server's stop would otherwise wait for the close
        handshake of connections nobody reads)."""
        for writer in self._held:
            writer.transport.abort()
        self._held.clear()

    def heal(self) -> None:
        self.state = "up"
        self.release_held()

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
