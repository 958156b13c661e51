"""Every denied API call is itself recorded in the audit log (``klm.audit.access_denied``).

Denials are queued and appended in small batches by a background task, so a burst of bad
requests costs one transaction per flush, not one per request; beyond ``max_pending`` they
are counted and the count goes into the next recorded denial.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from klm_audit import handlers
from klm_audit.ports import AuditStore
from klm_common.background import BackgroundTask
from klm_common.envelope import CloudEvent, make_event
from klm_common.events import AccessDenied

log = logging.getLogger(__name__)

ACCESS_DENIED = AccessDenied.event_type


class DenialRecorder(BackgroundTask):
    task_name = "audit-denials"

    def __init__(self, store: AuditStore, *, interval: float = 0.2,
                 max_pending: int = 5000) -> None:
        self._store = store
        self._interval = interval
        self._max_pending = max_pending
        self._pending: list[CloudEvent] = []
        self._dropped = 0

    def record(self, *, status: int, reason: str, method: str, path: str,
               client: str | None, token_id: str | None, tenant: str | None) -> None:
        if len(self._pending) >= self._max_pending:
            self._dropped += 1
            return
        data = AccessDenied(status=status, reason=reason, method=method, path=path[:1000],
                            client=client, token_id=token_id, owner=tenant,
                            dropped_before=self._dropped or None)
        self._dropped = 0
        self._pending.append(make_event(ACCESS_DENIED, data, source="klm/audit"))

    async def flush(self) -> None:
        events = list(self._pending)
        if events:
            await handlers.append_own(self._store, events)
            del self._pending[:len(events)]

    async def stop(self) -> None:
        await super().stop()
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:
                log.exception("could not record denied calls; will retry")
