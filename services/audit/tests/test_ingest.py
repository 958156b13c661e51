"""Ingest through the in-memory store: once per event id, gap-free sequence, tenants."""

from __future__ import annotations

from aiokafka import ConsumerRecord

from klm_audit import handlers
from klm_audit.adapters.memory_store import MemoryAuditStore
from klm_audit.domain.entries import Origin
from klm_audit.domain.hash_chain import GENESIS, canonical_json
from klm_audit.domain.ingest import Accepted, ChainHead, Sealer, plan_append
from klm_audit.domain.queries import Scope
from klm_audit.verification import verify_store
from klm_common.envelope import CloudEvent

from .factories import Events

GENESIS_HEAD = ChainHead(0, GENESIS)


def accepted(*events: CloudEvent) -> list[Accepted]:
    return [Accepted(e, canonical_json(e.to_jsonable()), Origin("t", 0, i))
            for i, e in enumerate(events)]


def record(value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("klm.requests", 0, offset, 0, 0, None, value, None, 0, len(value),
                          [])


async def test_each_event_is_stored_once_with_a_gap_free_sequence(events: Events) -> None:
    store = MemoryAuditStore()
    request = events.request()
    key = events.generated(cause=request)
    first = await handlers.append(store, accepted(request, key, key))
    again = await handlers.append(store, accepted(key, request))
    assert (first.stored, first.duplicates) == (2, 1)
    assert (again.stored, again.duplicates) == (0, 2)
    assert [r.sequence for r in store.rows] == [1, 2]
    assert (await verify_store(store)).ok


async def test_a_repeat_within_a_batch_after_the_known_head_is_stored_once(
        events: Events) -> None:
    """The optimistic path (head known) makes no pass for repeats: the store refuses the
    batch and the checked path drops them."""
    store = MemoryAuditStore()
    request = events.request()
    await handlers.append(store, accepted(request))
    assert store.known_head() is not None
    key = events.generated(cause=request)
    result = await handlers.append(store, accepted(key, key, request))
    assert (result.stored, result.duplicates, result.counted) == (1, 2, 1)
    assert [r.event_id for r in store.rows] == [request.id, key.id]
    assert (await verify_store(store)).ok


def test_sealing_in_parts_gives_the_rows_of_sealing_whole(events: Events) -> None:
    """The store writes a part while the next is sealed: head, owners and tenants carry over
    (here a key's later events and a request's answer fall in the next part)."""
    batch: list[CloudEvent] = []
    for _ in range(4):
        request = events.request(owner="globex")
        key = events.generated(owner="globex", cause=request)
        rotate = events.request_for("klm.request.rotate_key", key)
        batch += [request, key, rotate]
    whole = plan_append(accepted(*batch), GENESIS_HEAD, {}, {})
    sealer = Sealer(GENESIS_HEAD, {}, {})
    parts = [sealer.seal(accepted(*batch)[i:i + 5]) for i in range(0, len(batch), 5)]
    assert [row for part in parts for row in part.rows] == whole.rows
    assert sealer.head == whole.head


async def test_a_batch_written_in_parts_is_one_append(events: Events) -> None:
    store = MemoryAuditStore()
    batch = accepted(*(events.generated() for _ in range(handlers.PART_EVENTS * 2 + 7)))
    result = await handlers.append(store, batch)
    assert result.stored == len(batch) and result.head is not None
    assert result.head.sequence == len(store.rows) == len(batch)
    assert (await verify_store(store)).ok


async def test_tenant_comes_from_owner_key_or_request(events: Events) -> None:
    store = MemoryAuditStore()
    request = events.request(owner="globex")
    key = events.generated(owner="globex", cause=request)
    rotate = events.request_for("klm.request.rotate_key", key)
    rejected = CloudEvent(id="r1", source="klm/keygen", type="klm.request.rejected",
                          time=events.tick(), correlationid=request.id,
                          data={"code": "x", "message": "m", "request_type": request.type})
    stray = events.request_for("klm.request.suspend_key", events.generated())
    await handlers.append(store, accepted(request, key))
    await handlers.append(store, accepted(rotate, rejected, stray))
    tenants = {r.event_id: r.tenant for r in store.rows}
    assert tenants[request.id] == tenants[key.id] == "globex"
    assert tenants[rotate.id] == "globex"  # via the key
    assert tenants["r1"] == "globex"  # via the request it answers
    assert tenants[stray.id] is None  # a key audit never saw: visible to unscoped callers only


async def test_history_includes_the_causing_request_in_order(events: Events) -> None:
    store = MemoryAuditStore()
    request = events.request()
    key = events.generated(cause=request)
    suspended = events.fact("klm.key.suspended", key, state="suspended",
                            previous_state="active")
    await handlers.append(store, accepted(request, key, suspended, events.generated()))
    history = await store.history(str(key.subject), Scope())
    assert [h.event_id for h in history] == [request.id, key.id, suspended.id]
    assert await store.history(str(key.subject), Scope("other")) == []


def test_unparseable_records_are_skipped_and_counted(events: Events) -> None:
    good = events.request()
    batch, skipped = handlers.accept([
        record(b"\xff\xfe", 0), record(b'{"id": 1}', 1), record(good.to_bytes(), 2),
        record(b'{"specversion":"1.0","id":"x","source":"s","type":"t",'
               b'"time":"2026-01-01T00:00:00Z","data":{"v":NaN}}', 3)])
    assert skipped == 3
    assert [a.event.id for a in batch] == [good.id]
    assert batch[0].canonical == canonical_json(good.to_jsonable())
