"""Background steps owned by one object of the relay: each is logged if it fails, and all are
cancelled when their owner closes (nothing outlives its parent)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


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
