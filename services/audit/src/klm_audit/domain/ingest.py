"""Planning one append: dedupe, tenant, sequence, hash and checkpoints (pure).

The store takes the append lock, loads what this module needs (chain head, ids already
stored, owners of the keys involved, tenants of correlated events), calls
:func:`plan_append`, and writes the result in the same transaction. The read models are
not part of it: they follow the log on their own position (:mod:`klm_audit.projection`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from klm_audit.domain.checkpoints import Checkpoint, checkpoint_of
from klm_audit.domain.entries import Origin, PendingEntry, key_id_of, owner_of, pending_entry
from klm_common.envelope import CloudEvent
from klm_common.events import AuditCheckpoint

CHECKPOINT_EVENT = AuditCheckpoint.event_type
#: ``link_hash`` of :mod:`klm_audit.domain.hash_chain`, inlined in the ingest loop
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class Accepted:
    """A record that parsed as a CloudEvent and has a canonical form."""

    event: CloudEvent
    canonical: bytes
    origin: Origin


@dataclass(slots=True)  # not frozen: one per ingested event, on the hot path
class Sealed:
    """A pending entry with its place in the chain."""

    entry: PendingEntry
    sequence: int
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class ChainHead:
    sequence: int
    hash: bytes


@dataclass(slots=True)
class AppendPlan:
    sealed: list[Sealed] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    duplicates: int = 0

    @property
    def head(self) -> ChainHead | None:
        last = self.sealed[-1] if self.sealed else None
        return ChainHead(last.sequence, last.hash) if last else None


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
    """Seal ``batch`` (already fresh) after ``head``; ``owners`` maps key ids to tenants.

    The hot loop of ingest: one SHA-256 (``link_hash`` inlined) and one entry per event."""
    plan = AppendPlan()
    sealed, known_owners, tenants = plan.sealed, dict(owners), dict(tenants_by_event)
    sha256, pack = hashlib.sha256, _U64.pack
    sequence, prev = head.sequence, head.hash
    for item in batch:
        event = item.event
        key_id = key_id_of(event)
        tenant = owner_of(event.data) or _known_tenant(event, key_id, known_owners, tenants)
        tenants[event.id] = tenant
        if key_id is not None and tenant is not None and key_id not in known_owners:
            known_owners[key_id] = tenant
        sequence += 1
        digest = sha256(prev + pack(sequence) + item.canonical).digest()
        sealed.append(Sealed(pending_entry(event, item.canonical, item.origin, tenant, key_id),
                             sequence, prev, digest))
        prev = digest
        if event.type == CHECKPOINT_EVENT:
            checkpoint = checkpoint_of(event, sequence)
            if checkpoint is not None:
                plan.checkpoints.append(checkpoint)
    return plan


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


def keys_without_owner(batch: Sequence[Accepted]) -> set[str]:
    """Keys whose owner must be looked up: named by an event that does not carry one."""
    return {k for a in batch if owner_of(a.event.data) is None
            and (k := key_id_of(a.event)) is not None}


def correlations_of(batch: Sequence[Accepted]) -> set[str]:
    return {a.event.correlationid for a in batch if a.event.correlationid}
