"""Hand-written in-memory fakes behind rotation's ports (no Postgres, no Kafka)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import ConsumerRecord

from klm_common.envelope import CloudEvent, parse_envelope
from klm_common.policy import CryptoPolicy
from klm_rotation.domain.compliance import Changes, Finding
from klm_rotation.domain.inventory import (
    UNKNOWN_PROTECTION,
    InventoryFigures,
    InventoryKey,
    algorithm_label,
)
from klm_rotation.domain.schedule import Due, DueRow
from klm_rotation.ports import RecordedPolicy, RowId


@dataclass
class Row:
    planned_at: datetime
    due_at: datetime
    reason: str
    attempts: int = 0


@dataclass
class State:
    inbox: set[str] = field(default_factory=set)
    keys: dict[str, InventoryKey] = field(default_factory=dict)
    schedule: dict[RowId, Row] = field(default_factory=dict)
    findings: dict[str, dict[str, Finding]] = field(default_factory=dict)
    outbox: list[tuple[str, CloudEvent]] = field(default_factory=list)
    cursor: str = ""
    #: name → (sha256, document, path)
    policies: dict[str, tuple[str, dict[str, Any], str]] = field(default_factory=dict)


class FakeTx:
    def __init__(self, state: State) -> None:
        self.s = state

    async def claim(self, event_ids: Sequence[str]) -> set[str]:
        new = set(event_ids) - self.s.inbox
        self.s.inbox |= new
        return new

    async def load_keys(self, key_ids: Sequence[str]) -> dict[str, InventoryKey]:
        return {k: self.s.keys[k] for k in key_ids if k in self.s.keys}

    read_keys = load_keys

    async def save_keys(self, keys: Sequence[InventoryKey]) -> None:
        for key in keys:
            self.s.keys[key.key_id] = key

    async def planned(self, key_ids: Sequence[str]) -> dict[RowId, datetime]:
        return {rid: row.planned_at for rid, row in self.s.schedule.items() if rid[0] in key_ids}

    async def write_schedule(self, upserts: Sequence[tuple[str, Due]],
                             deletes: Sequence[RowId]) -> None:
        for rid in deletes:
            self.s.schedule.pop(rid, None)
        for key_id, due in upserts:
            self.s.schedule[(key_id, due.kind, due.version)] = Row(
                due.planned_at, due.planned_at, due.reason)

    async def claim_due(self, now: datetime, limit: int, rearm_at: datetime) -> list[DueRow]:
        due = sorted((row.due_at, rid) for rid, row in self.s.schedule.items()
                     if row.due_at <= now)[:limit]
        for _, rid in due:
            self.s.schedule[rid].due_at = rearm_at
            self.s.schedule[rid].attempts += 1
        return [DueRow(rid[0], rid[1], rid[2], self.s.schedule[rid].planned_at,
                       self.s.schedule[rid].reason) for _, rid in due]

    async def postpone(self, rows: Sequence[RowId], due_at: datetime) -> None:
        for rid in rows:
            if rid in self.s.schedule:  # like an UPDATE that matches nothing
                self.s.schedule[rid].due_at = due_at

    async def delete_rows(self, rows: Sequence[RowId]) -> None:
        await self.write_schedule([], rows)

    async def findings_of(self, key_ids: Sequence[str]) -> dict[str, dict[str, Finding]]:
        return {k: dict(self.s.findings[k]) for k in key_ids if k in self.s.findings}

    async def save_findings(self, changes: Changes) -> None:
        for key_id, code in changes.cleared:
            self.s.findings.get(key_id, {}).pop(code, None)
        for key_id, finding in changes.raised:
            self.s.findings.setdefault(key_id, {})[finding.code] = finding

    async def outbox(self, topic: str, events: Sequence[CloudEvent]) -> None:
        self.s.outbox += [(topic, e) for e in events]

    async def scan_page(self, limit: int) -> list[InventoryKey] | None:
        ids = sorted(k for k in self.s.keys if k > self.s.cursor)[:limit]
        self.s.cursor = "" if len(ids) < limit else ids[-1]
        return [self.s.keys[k] for k in ids]

    async def record_policy(self, policy: CryptoPolicy, path: str
                            ) -> tuple[bool, str | None, dict[str, Any] | None]:
        previous = self.s.policies.get(policy.name)
        if previous is not None and previous[0] == policy.digest():
            return False, previous[0], previous[1]
        self.s.policies[policy.name] = (policy.digest(), policy.model_dump(mode="json"), path)
        self.s.cursor = ""
        return True, previous[0] if previous else None, previous[1] if previous else None

    async def forget_policies(self, keep: Sequence[str]) -> list[RecordedPolicy]:
        gone = sorted(set(self.s.policies) - set(keep))
        if gone:
            self.s.cursor = ""
        out = []
        for name in gone:
            sha, document, path = self.s.policies.pop(name)
            out.append(RecordedPolicy(name, document["version"], sha, path))
        return out


class FakeInventory:
    """Units of work apply to a copy that replaces the state only on success (rollback)."""

    def __init__(self) -> None:
        self.state = State()

    @contextlib.asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[FakeTx]:
        work = copy.deepcopy(self.state)
        yield FakeTx(work)
        self.state = work

    async def finding_counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for findings in self.state.findings.values():
            for f in findings.values():
                counts[(f.code, f.severity)] = counts.get((f.code, f.severity), 0) + 1
        return counts

    async def next_due(self) -> datetime | None:
        return min((r.due_at for r in self.state.schedule.values()), default=None)

    async def figures(self, due_before: datetime) -> InventoryFigures:
        keys: dict[tuple[str, str, str], int] = {}
        for k in self.state.keys.values():
            slot = (k.state, algorithm_label(k.algorithm, k.size, k.curve),
                    k.protection or UNKNOWN_PROTECTION)
            keys[slot] = keys.get(slot, 0) + 1
        oldest = min((k.primary_since for k in self.state.keys.values()
                      if k.state == "active"), default=None)
        due = sum(1 for (_, kind, _), row in self.state.schedule.items()
                  if kind == "rotate" and row.due_at <= due_before)
        return InventoryFigures(keys, oldest, due)

    def sent(self, topic: str) -> list[CloudEvent]:
        return [e for t, e in self.state.outbox if t == topic]


class FakeDeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[ConsumerRecord[bytes, bytes], str]] = []

    def letter(self, record: ConsumerRecord[bytes, bytes], error: str) -> CloudEvent:
        self.letters.append((record, error))
        return parse_envelope(b'{"id":"x","source":"t","type":"klm.dlq.dead_letter",'
                              b'"time":"2026-01-01T00:00:00Z"}')

    async def publish(self, letters: Sequence[CloudEvent]) -> None:
        return None


def record(event: CloudEvent | bytes, topic: str = "t", offset: int = 0
           ) -> ConsumerRecord[bytes, bytes]:
    value = event if isinstance(event, bytes) else event.to_bytes()
    return ConsumerRecord(topic=topic, partition=0, offset=offset, timestamp=0,
                          timestamp_type=0, key=None, value=value, checksum=None,
                          serialized_key_size=0, serialized_value_size=len(value), headers=())


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now
