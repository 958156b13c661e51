"""The read models follow the log on their own (event sourcing with a tracking position).

Appending does not touch the key inventory: a background :class:`Projector`, woken after
each appended batch, folds every new row into it in chunks, each chunk one transaction that
also moves ``projection_position``. So the append path stays a COPY, and the projection
batches many appends at once. Inventory reads call :func:`caught_up` first, so an API
caller still sees every event already stored (usually a no-op).
"""

from __future__ import annotations

import asyncio
import logging

from klm_audit import handlers
from klm_audit.ports import AuditStore
from klm_common.background import BackgroundTask, Wakeup

log = logging.getLogger(__name__)


async def caught_up(store: AuditStore) -> None:
    """Bring the inventory up to the head of the log before reading it."""
    if await store.projection_lag() > 0:
        await handlers.project(store)


class Projector(BackgroundTask):
    task_name = "audit-projector"

    def __init__(self, store: AuditStore, *, idle: float = 1.0) -> None:
        self._store = store
        self._idle = idle
        self._wakeup = Wakeup()

    def wake(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait(self._idle)
            try:
                await handlers.project(self._store)
            except Exception:
                log.exception("projection did not advance; will retry")
                await asyncio.sleep(self._idle)
