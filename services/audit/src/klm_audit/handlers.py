"""Ingest: one Kafka batch of records → one append transaction (then the batch is committed).

Choice about bad input: audit stores every well-formed CloudEvent it sees on the KLM topics.
A record it cannot parse is *skipped and counted*, never sent to ``klm.dlq``: the service
that owns the topic (keygen for ``klm.requests``) already dead-letters it, and the DLQ
record itself reaches audit through ``klm.dlq`` — so the evidence is stored exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from klm_audit.domain.entries import Origin
from klm_audit.domain.hash_chain import (
    NotCanonicalisable,
    canonical_json,
    canonicalise_received,
)
from klm_audit.domain.ingest import (
    Accepted,
    ChainHead,
    Sealer,
    fresh,
    lookups_of,
)
from klm_audit.ports import AppendConflict, AuditStore
from klm_common.envelope import CloudEvent, EnvelopeInvalid, parse_envelope

log = logging.getLogger(__name__)

#: events per ``COPY`` when a batch is written in parts: the store writes one part while the
#: next is sealed (the server's index work and the client's hashing overlap); a batch of up
#: to this many events is one ``COPY``
PART_EVENTS = 250


@dataclass(frozen=True, slots=True)
class AppendResult:
    stored: int
    duplicates: int
    head: ChainHead | None
    #: stored events that count towards the next checkpoint (not checkpoint traffic)
    counted: int = 0


def accept(records: Iterable[ConsumerRecord[bytes, bytes]]) -> tuple[list[Accepted], int]:
    """Parse a batch; return the well-formed events and how many records were skipped."""
    accepted: list[Accepted] = []
    skipped = 0
    for record in records:
        try:
            event = parse_envelope(record.value)
            canonical = canonicalise_received(record.value or b"")
        except (EnvelopeInvalid, NotCanonicalisable) as exc:
            skipped += 1
            log.warning("skipping unparseable record %s/%d@%d: %s", record.topic,
                        record.partition, record.offset, exc)
            continue
        accepted.append(Accepted(event, canonical,
                                 Origin(record.topic, record.partition, record.offset)))
    return accepted, skipped


async def append(store: AuditStore, batch: list[Accepted]) -> AppendResult:
    """Append the events not stored yet, in batch order, in one transaction.

    Optimistic first: after the head this process wrote last, with no lookup of the ids
    (redeliveries are rare) and no lock — the unique ``sequence`` and ``event_id`` are the
    arbiters. When that conflicts (a redelivered event, another writer), or the head is not
    known, the checked path runs: append lock, stored ids, head read from the store."""
    if not batch:
        return AppendResult(0, 0, None)
    head = store.known_head()
    if head is not None:
        try:
            return await _append(store, batch, head)
        except AppendConflict:
            log.info("optimistic append conflicted; appending with the checks")
    return await _append(store, batch, None)


async def _append(store: AuditStore, batch: list[Accepted], head: ChainHead | None
                  ) -> AppendResult:
    async with store.appending(locked=head is None) as tx:
        # optimistic: no pass for repeats either; a repeat within the batch, like one of
        # a stored event, conflicts in the store and the checked path drops it
        new = batch if head is not None else \
            fresh(batch, await tx.stored_ids([a.event.id for a in batch]))
        if not new:
            return AppendResult(0, len(batch), None)
        keys, correlations = lookups_of(new)
        sealer = Sealer(head or await tx.head(), await tx.owners(keys),
                        await tx.tenants_of(correlations))
        parts = [new[i:i + PART_EVENTS] for i in range(0, len(new), PART_EVENTS)]
        await tx.write((sealer.seal(part) for part in parts), parts=len(parts))
    counted = len(new) - sealer.checkpoint_traffic
    return AppendResult(len(new), len(batch) - len(new), sealer.head, counted)


async def project(store: AuditStore) -> int:
    """Bring the read models up to the head of the log; returns the rows passed."""
    total = 0
    while passed := await store.project():
        total += passed
    return total


async def append_own(store: AuditStore, events: list[CloudEvent]) -> AppendResult:
    """Append events the audit service itself writes (denied calls): no Kafka origin."""
    batch = [Accepted(ev, canonical_json(ev.to_jsonable()), Origin("")) for ev in events]
    return await append(store, batch)
