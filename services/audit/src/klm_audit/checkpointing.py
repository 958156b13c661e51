"""Audit asks keygen to sign its chain head every N events or T seconds (audit holds no HSM
session): it publishes ``klm.command.sign_checkpoint`` on ``klm.commands``; keygen answers
``klm.audit.checkpoint`` on ``klm.lifecycle``, which is ingested like any event and also
recorded in ``audit.checkpoints`` (see :mod:`klm_audit.domain.checkpoints`).

Only events other than the checkpoint traffic itself count, so a quiet log does not keep
asking for checkpoints of its own checkpoints. A lost command is harmless: the next one
covers a later head.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from klm_audit.ports import AuditStore
from klm_common.background import BackgroundTask, Wakeup
from klm_common.envelope import CloudEvent, make_event, now
from klm_common.events import SignCheckpoint

log = logging.getLogger(__name__)


class CheckpointSettings(BaseSettings):
    """``KLM_AUDIT_CHECKPOINT_EVERY_EVENTS`` / ``KLM_AUDIT_CHECKPOINT_EVERY_SECONDS``."""

    model_config = SettingsConfigDict(env_prefix="KLM_AUDIT_CHECKPOINT_", extra="ignore")

    every_events: int = Field(default=10_000, ge=1)
    every_seconds: float = Field(default=60.0, gt=0)


class Checkpointer(BackgroundTask):
    task_name = "audit-checkpoints"

    def __init__(self, store: AuditStore, publish: Callable[[CloudEvent], Awaitable[None]],
                 settings: CheckpointSettings | None = None) -> None:
        self._store = store
        self._publish = publish
        self._settings = settings or CheckpointSettings()
        self._pending = 0
        self._due = Wakeup()
        self.requested = 0

    def note(self, appended: int) -> None:
        """``appended`` events (checkpoint traffic excluded) were just stored."""
        self._pending += appended
        if self._pending >= self._settings.every_events:
            self._due.set()

    async def request(self) -> CloudEvent | None:
        """Ask for a signature of the current head (None when the log is empty)."""
        head = await self._store.head()
        if head.sequence == 0:
            return None
        self._pending = 0
        command = make_event(SignCheckpoint.event_type,
                             SignCheckpoint(sequence=head.sequence, head_hash=head.hash.hex(),
                                            time=now()),
                             source="klm/audit")
        await self._publish(command)
        self.requested += 1
        log.info("asked keygen to sign checkpoint #%d", head.sequence)
        return command

    async def _run(self) -> None:
        while True:
            await self._due.wait(self._settings.every_seconds)
            if self._pending == 0:
                continue
            try:
                await self.request()
            except Exception:
                log.exception("could not ask for a checkpoint; will retry")
