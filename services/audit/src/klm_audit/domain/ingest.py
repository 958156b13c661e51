"""Planning one append: dedupe, tenant, sequence, hash and checkpoints (pure).

The store takes the append lock, loads what this module needs (chain head, ids already
stored, owners of the keys involved, tenants of correlated events), calls
:func:`plan_append`, and writes the result in the same transaction. The read models are
not part of it: they follow the log on their own position (:mod:`klm_audit.projection`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from klm_audit.domain.checkpoints import Checkpoint, checkpoint_of
from klm_audit.domain.entries import Origin, PendingEntry, key_id_of, owner_of, pending_entry
from klm_audit.domain.hash_chain import link_hash
from klm_common.envelope import CloudEvent


@dataclass(frozen=True, slots=True)
class Accepted:
    """A record that parsed as a CloudEvent and has a canonical form."""

    event: CloudEvent
    canonical: bytes
    origin: Origin


@dataclass(frozen=True, slots=True)
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
    """Seal ``batch`` (already fresh) after ``head``; ``owners`` maps key ids to tenants."""
    plan = AppendPlan()
    known_owners = dict(owners)
    tenants = dict(tenants_by_event)
    sequence, prev = head.sequence, head.hash
    for item in batch:
        tenant = resolve_tenant(item.event, known_owners, tenants)
        tenants[item.event.id] = tenant
        key_id = key_id_of(item.event)
        if key_id is not None and tenant is not None:
            known_owners.setdefault(key_id, tenant)
        sequence += 1
        digest = link_hash(prev, sequence, item.canonical)
        plan.sealed.append(Sealed(pending_entry(item.event, item.canonical, item.origin, tenant),
                                  sequence, prev, digest))
        prev = digest
        checkpoint = checkpoint_of(item.event, sequence)
        if checkpoint is not None:
            plan.checkpoints.append(checkpoint)
    return plan


def resolve_tenant(event: CloudEvent, owners: Mapping[str, str | None],
                   tenants_by_event: Mapping[str, str | None]) -> str | None:
    """The tenant an event belongs to: its ``owner``, else its key's, else its request's.

    ``None`` means no tenant (dead letters, checkpoints, requests for unknown keys): only
    principals without a tenant scope see those.
    """
    owner = owner_of(event.data)
    if owner is not None:
        return owner
    key_id = key_id_of(event)
    if key_id is not None and owners.get(key_id) is not None:
        return owners[key_id]
    if event.correlationid is not None:
        return tenants_by_event.get(event.correlationid)
    return None


def keys_without_owner(batch: Sequence[Accepted]) -> set[str]:
    """Keys whose owner must be looked up: named by an event that does not carry one."""
    return {k for a in batch if owner_of(a.event.data) is None
            and (k := key_id_of(a.event)) is not None}


def correlations_of(batch: Sequence[Accepted]) -> set[str]:
    return {a.event.correlationid for a in batch if a.event.correlationid}
