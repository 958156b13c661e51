"""The port the handlers talk to: a unit of work over the inventory (Postgres in the
service, :mod:`tests.fakes` in unit tests). Everything done through one ``Tx`` commits
together — inbox, inventory, schedule, findings and outbox."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from klm_common.envelope import CloudEvent
from klm_common.policy import CryptoPolicy
from klm_rotation.domain.compliance import Changes, Finding
from klm_rotation.domain.inventory import InventoryFigures, InventoryKey
from klm_rotation.domain.schedule import Due, DueRow, Kind

RowId = tuple[str, Kind, int]


@dataclass(frozen=True, slots=True)
class RecordedPolicy:
    """A policy as last recorded in force."""

    name: str
    version: int
    sha256: str
    path: str | None


class Tx(Protocol):
    async def claim(self, event_ids: Sequence[str]) -> set[str]: ...

    async def load_keys(self, key_ids: Sequence[str]) -> dict[str, InventoryKey]:
        """The keys, locked until the end of the unit of work."""

    async def save_keys(self, keys: Sequence[InventoryKey]) -> None: ...

    async def planned(self, key_ids: Sequence[str]) -> dict[RowId, datetime]: ...

    async def write_schedule(self, upserts: Sequence[tuple[str, Due]],
                             deletes: Sequence[RowId]) -> None: ...

    async def claim_due(self, now: datetime, limit: int, rearm_at: datetime) -> list[DueRow]:
        """Due rows no other transaction holds (SKIP LOCKED), re-armed to ``rearm_at`` in the
        same statement and locked until commit."""

    async def read_keys(self, key_ids: Sequence[str]) -> dict[str, InventoryKey]:
        """The keys without locking them."""

    async def postpone(self, rows: Sequence[RowId], due_at: datetime) -> None:
        """Next attempt of ``rows`` at ``due_at`` (a refusal's retry, a held destruction)."""

    async def delete_rows(self, rows: Sequence[RowId]) -> None: ...

    async def findings_of(self, key_ids: Sequence[str]) -> dict[str, dict[str, Finding]]: ...

    async def save_findings(self, changes: Changes) -> None: ...

    async def outbox(self, topic: str, events: Sequence[CloudEvent]) -> None: ...

    async def scan_page(self, limit: int) -> list[InventoryKey] | None:
        """The next page of the continuous scan (keys locked FOR SHARE), advancing the
        cursor; None if another instance is scanning."""

    async def record_policy(self, policy: CryptoPolicy, path: str
                            ) -> tuple[bool, str | None, dict[str, Any] | None]:
        """Store one policy in force, by name: (changed?, previous sha256, previous
        document). A change restarts the scan."""

    async def forget_policies(self, keep: Sequence[str]) -> list[RecordedPolicy]:
        """Drop the recorded policies not named in ``keep`` (no longer loaded); what they
        were. A removal restarts the scan."""


class Inventory(Protocol):
    def unit_of_work(self) -> AbstractAsyncContextManager[Tx]: ...

    async def finding_counts(self) -> dict[tuple[str, str], int]: ...

    async def next_due(self) -> datetime | None: ...

    async def figures(self, due_before: datetime) -> InventoryFigures:
        """Keys by state/algorithm/protection, the oldest active primary version, and the
        rotations due by ``due_before`` (what the inventory gauges show)."""
