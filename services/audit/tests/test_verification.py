"""Whole-store verification: ranges hashed by worker processes give the single-pass answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from klm_audit import handlers
from klm_audit.adapters.memory_store import MemoryAuditStore
from klm_audit.domain.entries import Origin, StoredEntry
from klm_audit.domain.hash_chain import canonical_json, link_hash
from klm_audit.domain.ingest import Accepted
from klm_audit.verification import Verification, verify_store

from .factories import Events

Tamper = Callable[[list[StoredEntry]], None]


async def filled(events: Events, n: int = 30) -> MemoryAuditStore:
    store = MemoryAuditStore()
    batch = [events.generated() for _ in range(n)]
    await handlers.append(store, [Accepted(e, canonical_json(e.to_jsonable()), Origin("t", 0, i))
                                  for i, e in enumerate(batch)])
    return store


def modify(rows: list[StoredEntry]) -> None:
    rows[11] = dataclasses.replace(rows[11], canonical=rows[11].canonical.replace(b"k", b"K"))


def rehash(rows: list[StoredEntry]) -> None:
    """The chain breaks at 13; the indexed columns of 12 no longer match it either."""
    row = rows[11]
    forged = row.canonical.replace(b"k", b"K")
    rows[11] = dataclasses.replace(row, canonical=forged,
                                   hash=link_hash(row.prev_hash, row.sequence, forged))


def delete(rows: list[StoredEntry]) -> None:
    del rows[16]


def delete_range(rows: list[StoredEntry]) -> None:
    del rows[9:21]


def swap(rows: list[StoredEntry]) -> None:
    rows[4], rows[9] = (dataclasses.replace(rows[9], sequence=5),
                        dataclasses.replace(rows[4], sequence=10))


def _answer(result: Verification) -> tuple[object, ...]:
    reason = (result.reason or "").split(" (")[0]
    return result.ok, result.first_broken_sequence, reason, result.checked, \
        result.head_sequence, result.head_hash


@pytest.mark.parametrize(("tamper", "named"), [
    (None, None), (modify, 12), (rehash, 12), (delete, 17), (delete_range, 10), (swap, 5)])
async def test_worker_processes_give_the_single_pass_answer(
        events: Events, tamper: Tamper | None, named: int | None) -> None:
    store = await filled(events)
    if tamper is not None:
        tamper(store.rows)
    single = await verify_store(store, chunk=1000, workers=0)
    for chunk, workers in ((4, 0), (4, 2), (7, 3)):
        assert _answer(await verify_store(store, chunk=chunk, workers=workers)) == \
            _answer(single)
    assert single.ok is (tamper is None) and single.first_broken_sequence == named
