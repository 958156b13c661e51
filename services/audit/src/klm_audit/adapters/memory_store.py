"""In-memory audit store: the fake behind the ports for unit tests (same contract as Postgres)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from klm_audit.domain.auth import StoredToken
from klm_audit.domain.checkpoints import Checkpoint
from klm_audit.domain.entries import StoredEntry
from klm_audit.domain.hash_chain import GENESIS, ChainRow, Link, copy_rows
from klm_audit.domain.ingest import EVENT_ID, SEQUENCE, AppendPlan, ChainHead
from klm_audit.domain.inventory import Fact, KeyView, fold
from klm_audit.domain.queries import EventFilter, KeyFilter, Scope
from klm_audit.ports import AppendConflict


class MemoryAppendTx:
    def __init__(self, store: MemoryAuditStore) -> None:
        self._store = store

    async def stored_ids(self, event_ids: Sequence[str]) -> set[str]:
        return {i for i in event_ids if i in self._store.by_id}

    async def head(self) -> ChainHead:
        rows = self._store.rows
        return ChainHead(rows[-1].sequence, rows[-1].hash) if rows else ChainHead(0, GENESIS)

    async def owners(self, key_ids: Iterable[str]) -> dict[str, str | None]:
        wanted = set(key_ids)
        found: dict[str, str | None] = {}
        for r in self._store.rows:
            if r.subject in wanted and r.tenant is not None:
                found[r.subject] = r.tenant
        return found

    async def tenants_of(self, event_ids: Iterable[str]) -> dict[str, str | None]:
        by_id = self._store.by_id
        return {i: by_id[i].tenant for i in event_ids if i in by_id}

    async def write(self, plans: Iterable[AppendPlan], *, parts: int) -> None:
        """All parts or none, like the Postgres transaction."""
        plan = AppendPlan()
        for part in plans:
            plan.rows.extend(part.rows)
            plan.checkpoints.extend(part.checkpoints)
        now = datetime.now(UTC)
        next_sequence = len(self._store.rows) + 1
        ids = {r[EVENT_ID] for r in plan.rows}  # unique, as the Postgres index has them
        if plan.rows and (plan.rows[0][SEQUENCE] != next_sequence or len(ids) < len(plan.rows)
                          or any(i in self._store.by_id for i in ids)):
            raise AppendConflict("sequence or event id already stored")
        for (sequence, event_id, type_, subject, version, source, tenant, correlation_id,
             occurred_at, _topic, _partition, _offset, canonical, prev_hash, digest) in plan.rows:
            row = StoredEntry(sequence, event_id, type_, subject, version, source, tenant,
                              correlation_id, occurred_at, now, canonical.encode("utf-8"),
                              prev_hash, digest)
            self._store.rows.append(row)
            self._store.by_id[row.event_id] = row
        self._store.checkpoint_rows.extend(plan.checkpoints)


@dataclass(frozen=True, slots=True)
class MemoryChainSource:
    rows: tuple[ChainRow, ...]

    #: bytes per piece handed to the sink: small, so rows are cut across pieces as over a
    #: socket
    piece: int = 1000

    def stream(self, after: int, upto: int, sink: Callable[[bytes], None]) -> None:
        copied = copy_rows(r for r in self.rows if after < r[0] <= upto)
        for start in range(0, len(copied), self.piece):
            sink(copied[start:start + self.piece])


class MemoryAuditStore:
    def __init__(self) -> None:
        self.rows: list[StoredEntry] = []
        self.by_id: dict[str, StoredEntry] = {}
        self.inventory: dict[str, KeyView] = {}
        self.position = 0
        self.checkpoint_rows: list[Checkpoint] = []
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def appending(self, *, locked: bool = True) -> AsyncIterator[MemoryAppendTx]:
        async with self._lock:
            yield MemoryAppendTx(self)

    def known_head(self) -> ChainHead | None:
        """Like Postgres: the head after the last append, to exercise the optimistic path
        (a stale one makes :meth:`MemoryAppendTx.write` raise ``AppendConflict``)."""
        rows = self.rows
        return ChainHead(rows[-1].sequence, rows[-1].hash) if rows else None

    async def ping(self) -> bool:
        return True

    async def history(self, key_id: str, scope: Scope) -> list[StoredEntry]:
        own = [r for r in self.rows if r.subject == key_id]
        causes = {r.correlation_id for r in own if r.correlation_id}
        rows = [r for r in self.rows if r.subject == key_id or r.event_id in causes]
        return [r for r in rows if scope.allows(r.tenant)]

    async def events(self, filters: EventFilter, scope: Scope) -> list[StoredEntry]:
        def keep(r: StoredEntry) -> bool:
            return (r.sequence > filters.after_sequence
                    and filters.type in (None, r.type) and filters.subject in (None, r.subject)
                    and filters.source in (None, r.source) and scope.allows(r.tenant)
                    and (filters.since is None or r.occurred_at >= filters.since)
                    and (filters.until is None or r.occurred_at < filters.until))

        return [r for r in self.rows if keep(r)][:filters.limit]

    async def facts_of(self, key_id: str) -> list[Fact]:
        return [_fact(r) for r in self.rows
                if r.subject == key_id and r.type.startswith("klm.key.")]

    async def key(self, key_id: str, scope: Scope) -> KeyView | None:
        view = self.inventory.get(key_id)
        return view if view is not None and scope.allows(view.owner) else None

    async def keys(self, filters: KeyFilter, scope: Scope) -> list[KeyView]:
        def keep(v: KeyView) -> bool:
            return ((filters.after_key_id is None or v.key_id > filters.after_key_id)
                    and filters.state in (None, v.state)
                    and filters.algorithm in (None, v.algorithm)
                    and filters.owner in (None, v.owner) and scope.allows(v.owner))

        return sorted((v for v in self.inventory.values() if keep(v)),
                      key=lambda v: v.key_id)[:filters.limit]

    async def head(self) -> ChainHead:
        return await MemoryAppendTx(self).head()

    async def links(self, after: int, upto: int, limit: int) -> list[Link]:
        rows = [r for r in self.rows if after < r.sequence <= upto][:limit]
        return [Link(r.sequence, r.prev_hash, r.hash, r.canonical) for r in rows]

    def chain_source(self) -> MemoryChainSource:
        """A snapshot of the rows, sent to the worker processes with each range."""
        return MemoryChainSource(tuple((r.sequence, r.prev_hash, r.hash, r.canonical)
                                       for r in self.rows))

    async def chain_copy(self, after: int, upto: int) -> bytes:
        return copy_rows((r.sequence, r.prev_hash, r.hash, r.canonical) for r in self.rows
                         if after < r.sequence <= upto)

    async def first_inconsistent_row(self, upto: int) -> int | None:
        for r in self.rows:
            event = json.loads(r.canonical)
            if r.sequence <= upto and (event["id"], event["type"]) != (r.event_id, r.type):
                return r.sequence
        return None

    async def checkpoints(self) -> list[Checkpoint]:
        return list(self.checkpoint_rows)

    async def project(self, chunk: int = 20_000) -> int:
        upto = min(len(self.rows), self.position + chunk)
        facts = [(str(r.subject), _fact(r)) for r in self.rows[self.position:upto]
                 if r.subject is not None and r.type.startswith("klm.key.")]
        self.inventory.update(fold(self.inventory, facts))
        passed, self.position = upto - self.position, upto
        return passed

    async def projection_lag(self) -> int:
        return len(self.rows) - self.position

    async def rebuild_projections(self) -> int:
        async with self._lock:
            self.inventory, self.position = {}, 0
            while await self.project():
                pass
            return len(self.inventory)


class MemoryTokenStore:
    def __init__(self, tokens: Iterable[StoredToken] = ()) -> None:
        self.tokens = {t.token_id: t for t in tokens}

    async def get(self, token_id: str) -> StoredToken | None:
        return self.tokens.get(token_id)


def _fact(row: StoredEntry) -> Fact:
    event = json.loads(row.canonical)
    return Fact(sequence=row.sequence, type=row.type, time=event["time"],
                data=event.get("data") or {})
