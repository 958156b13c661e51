"""Planning one append: dedupe, tenant, sequence, hash and checkpoints (pure).

The store takes the append lock, loads what this module needs (chain head, ids already
stored, owners of the keys involved, tenants of correlated events), calls
:func:`plan_append`, and writes the result in the same transaction. The read models are
not part of it: they follow the log on their own position (:mod:`klm_audit.projection`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from klm_audit.domain.checkpoints import CHECKPOINT_TYPES, Checkpoint, checkpoint_of
from klm_audit.domain.entries import Origin, key_id_of, owner_of
from klm_chainlink import link_hashes
from klm_common.envelope import CloudEvent
from klm_common.events import AuditCheckpoint

CHECKPOINT_EVENT = AuditCheckpoint.event_type


@dataclass(frozen=True, slots=True)
class Accepted:
    """A record that parsed as a CloudEvent and has a canonical form."""

    event: CloudEvent
    canonical: bytes
    origin: Origin


#: one sealed audit_log row, in the table's column order (``recorded_at`` is the server's):
#: sequence, event_id, type, subject, key_version, source, tenant, correlation_id,
#: occurred_at, topic, kafka_partition, kafka_offset, canonical (text), prev_hash, hash.
#: A plain tuple: the store COPies it as it is, no object per event on the hot path.
SealedRow = tuple[int, str, str, str | None, int | None, str, str | None, str | None, datetime,
                  str, int | None, int | None, str, bytes, bytes]
SEQUENCE: Final = 0
EVENT_ID: Final = 1
HASH: Final = 14


@dataclass(frozen=True, slots=True)
class ChainHead:
    sequence: int
    hash: bytes


@dataclass(slots=True)
class AppendPlan:
    rows: list[SealedRow] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    duplicates: int = 0
    #: sealed events that are checkpoint traffic (not counted towards the next checkpoint)
    checkpoint_traffic: int = 0

    @property
    def head(self) -> ChainHead | None:
        last = self.rows[-1] if self.rows else None
        return ChainHead(last[SEQUENCE], last[HASH]) if last else None


def fresh(batch: Sequence[Accepted], stored_ids: set[str]) -> list[Accepted]:
    """Drop events already stored and repeats within the batch (first one wins)."""
    seen = set(stored_ids)
    out = []
    for item in batch:
        if item.event.id not in seen:
            seen.add(item.event.id)
            out.append(item)
    return out


def plan_append(batch: Sequence[Accepted], head: ChainHead, owners: Mapping[str, str | None],
                tenants_by_event: Mapping[str, str | None]) -> AppendPlan:
    """Seal ``batch`` (already fresh) after ``head``; ``owners`` maps key ids to tenants."""
    return Sealer(head, owners, tenants_by_event).seal(batch)


class Sealer:
    """Seals one batch part after part (:meth:`seal`), each part after the last: the chain
    head and the owners and tenants learnt carry from one part to the next, so the parts'
    plans are those of sealing the batch whole. The store writes a part while the next is
    sealed."""

    def __init__(self, head: ChainHead, owners: Mapping[str, str | None],
                 tenants_by_event: Mapping[str, str | None]) -> None:
        self.head = head
        self._owners, self._tenants = dict(owners), dict(tenants_by_event)
        #: sealed events that are checkpoint traffic, over all parts
        self.checkpoint_traffic = 0

    def seal(self, part: Sequence[Accepted]) -> AppendPlan:
        """The hot loop of ingest: the part's links hashed in one call
        (:func:`klm_chainlink.link_hashes`, ``link_hash`` chained, in C), then one row tuple
        per event. :func:`key_id_of`, :func:`owner_of` and :func:`version_of` are inlined
        (a call each per event was a sixth of the loop); the tenant rules are those of
        :func:`resolve_tenant`."""
        plan = AppendPlan()
        add, known_owners, tenants = plan.rows.append, self._owners, self._tenants
        sequence, prev = self.head.sequence, self.head.hash
        digests = link_hashes(prev, sequence + 1, [item.canonical for item in part])
        for item, digest in zip(part, digests, strict=True):
            event, canonical, origin = item.event, item.canonical, item.origin
            data, event_id, type_ = event.data, event.id, event.type
            key_id = event.subject or _key_id_in(data)
            tenant = data.get("owner")
            if not (tenant and isinstance(tenant, str)):
                tenant = _known_tenant(event, key_id, known_owners, tenants)
            tenants[event_id] = tenant
            if key_id is not None and tenant is not None and key_id not in known_owners:
                known_owners[key_id] = tenant
            version = data.get("version")
            if not isinstance(version, int) or isinstance(version, bool):
                version = None
            sequence += 1
            add((sequence, event_id, type_, key_id, version, event.source, tenant,
                 event.correlationid, event.time, origin.topic, origin.partition,
                 origin.offset, canonical.decode("utf-8"), prev, digest))
            prev = digest
            if type_ in CHECKPOINT_TYPES:
                plan.checkpoint_traffic += 1
                checkpoint = checkpoint_of(event, sequence) if type_ == CHECKPOINT_EVENT \
                    else None
                if checkpoint is not None:
                    plan.checkpoints.append(checkpoint)
        self.head = ChainHead(sequence, prev)
        self.checkpoint_traffic += plan.checkpoint_traffic
        return plan


def _key_id_in(data: Mapping[str, object]) -> str | None:
    """``data.key_id`` when it is a string (:func:`key_id_of` without a subject)."""
    key_id = data.get("key_id")
    return key_id if isinstance(key_id, str) else None


def _known_tenant(event: CloudEvent, key_id: str | None, owners: Mapping[str, str | None],
                  tenants_by_event: Mapping[str, str | None]) -> str | None:
    if key_id is not None and owners.get(key_id) is not None:
        return owners[key_id]
    if event.correlationid is not None:
        return tenants_by_event.get(event.correlationid)
    return None


def resolve_tenant(event: CloudEvent, owners: Mapping[str, str | None],
                   tenants_by_event: Mapping[str, str | None]) -> str | None:
    """The tenant an event belongs to: its ``owner``, else its key's, else its request's.

    ``None`` means no tenant (dead letters, checkpoints, requests for unknown keys): only
    principals without a tenant scope see those.
    """
    return owner_of(event.data) or _known_tenant(event, key_id_of(event), owners,
                                                 tenants_by_event)


def lookups_of(batch: Sequence[Accepted]) -> tuple[set[str], set[str]]:
    """What the store must look up before sealing, in one pass (helpers inlined: this runs
    on every ingested event): the keys named by an event that carries no owner (their
    owners), and the requests events correlate to (their tenants)."""
    keys: set[str] = set()
    correlations: set[str] = set()
    for item in batch:
        event = item.event
        data = event.data
        owner = data.get("owner")
        if not (owner and isinstance(owner, str)):
            key_id = event.subject or _key_id_in(data)
            if key_id is not None:
                keys.add(key_id)
        if event.correlationid:
            correlations.add(event.correlationid)
    return keys, correlations
