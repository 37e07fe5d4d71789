"""ICE on 127.0.0.1 only, for tests that build the relay's parts themselves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from relay import hooks


@contextmanager
def loopback() -> Iterator[None]:
    """Every peer connection made inside gathers host candidates on 127.0.0.1 alone."""
    hooks.set_host_addresses(["127.0.0.1"])
    try:
        yield
    finally:
        hooks.set_host_addresses([])
