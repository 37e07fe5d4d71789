"""Background steps owned by one object of the relay: each is logged if it fails, and all are
cancelled when their owner closes (nothing outlives its parent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Abandoned(Exception):
    """``unless``: the event came first and the step was cancelled."""


async def unless(event: asyncio.Event, step: Awaitable[T]) -> T:
    """``step``'s result, unless ``event`` is set first (the link it waits on is gone): then
    the step is cancelled and ``Abandoned`` raised. The step's own errors pass through."""
    work = asyncio.ensure_future(step)
    gone = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        raise Abandoned
    return work.result()


class Tasks:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        """Names the owner in the log (``Room(r1)``)."""
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a background step; a failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: a background step failed", self.owner, exc_info=task.exception())

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel every step still running but the one calling this; returns them."""
        current = asyncio.current_task()
        pending = [task for task in self._tasks if task is not current]
        for task in pending:
            task.cancel()
        return pending

    async def close(self) -> None:
        """Cancel every step still running and wait for them to finish."""
        await asyncio.gather(*self.cancel(), return_exceptions=True)
