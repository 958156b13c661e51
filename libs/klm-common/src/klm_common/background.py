"""Background loops of a service: one named asyncio task, started with the service and
cancelled at shutdown, that sleeps until woken or until its poll interval passes."""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from typing import ClassVar


class Wakeup:
    """An event a handler sets to make a loop run now instead of at its next poll."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Wait until set or ``timeout``; True if it was set. Clears it either way."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            fired = True
        except TimeoutError:
            fired = False
        self._event.clear()
        return fired


class BackgroundTask(ABC):
    """A component whose :meth:`_run` loop runs as one task between start() and stop()."""

    task_name: ClassVar[str]
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @abstractmethod
    async def _run(self) -> None:
        """The loop; it runs until cancelled."""
