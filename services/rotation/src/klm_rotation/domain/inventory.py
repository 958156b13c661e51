"""The key inventory as rotation sees it: one :class:`InventoryKey` per key, rebuilt by
applying ``klm.key.*`` facts (:func:`apply`). Observed keys (imported metadata, never in
KLM's HSM) live here too, so the same compliance scan covers them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from klm_common.envelope import CloudEvent
from klm_common.events import (
    DestructionCancelled,
    DestructionScheduled,
    EventData,
    KeyActivated,
    KeyCompromised,
    KeyDestroyed,
    KeyGenerated,
    KeyMetadata,
    KeyObserved,
    KeyRotated,
    KeyVersionDeactivated,
    UsageSummary,
)

Origin = Literal["klm", "observed"]


@dataclass(frozen=True, slots=True)
class Version:
    state: str
    created_at: datetime
    #: when a newer version became primary: the start of this version's process-only period
    superseded_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "created_at": self.created_at.isoformat(),
                "superseded_at": self.superseded_at.isoformat() if self.superseded_at else None}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Version:
        sup = obj.get("superseded_at")
        return cls(obj["state"], datetime.fromisoformat(obj["created_at"]),
                   datetime.fromisoformat(sup) if sup else None)


@dataclass(frozen=True, slots=True)
class InventoryKey:
    key_id: str
    owner: str
    name: str
    algorithm: str
    size: int
    curve: str | None
    usages: tuple[str, ...]
    profile: str | None
    policy: str | None
    origin: Origin
    location: str | None
    state: str
    primary_version: int
    #: when the primary version started protecting (activation, else creation)
    primary_since: datetime
    created_at: datetime
    versions: dict[int, Version] = field(default_factory=dict)
    last_used_at: datetime | None = None
    compromised_at: datetime | None = None
    destroy_after: datetime | None = None
    destruction_override: bool = False
    #: commands keygen refused, by "<kind>:<version>": the next attempt gets a new id
    rejections: dict[str, int] = field(default_factory=dict)
    #: ``hsm-wrapped`` / ``hsm-resident`` (klm.key.generated), ``observed`` for imported
    #: metadata; None for keys projected before the inventory kept it
    protection: str | None = None

    @property
    def label(self) -> str:
        return algorithm_label(self.algorithm, self.size, self.curve)


def algorithm_label(algorithm: str, size: int, curve: str | None) -> str:
    """``AES-256``, ``EC-P-256``, ``RSA-1024``: the algorithm with what sets its strength."""
    return f"{algorithm}-{curve}" if curve else f"{algorithm}-{size}"


#: the protection label of a key whose protection the inventory does not know
UNKNOWN_PROTECTION = "unknown"


@dataclass(frozen=True, slots=True)
class InventoryFigures:
    """What the inventory gauges show (one read of the inventory and the schedule)."""

    #: keys by (state, algorithm label, protection)
    keys: dict[tuple[str, str, str], int]
    #: the earliest ``primary_since`` among active keys (None: no active key)
    oldest_active_since: datetime | None
    #: rotate rows due up to the notice horizon
    rotations_due: int


def _generated(event: CloudEvent, d: KeyGenerated) -> InventoryKey:
    since = d.activation_date or d.created_at
    return InventoryKey(
        key_id=d.key_id, owner=d.owner, name=d.name, algorithm=d.algorithm, size=d.size,
        curve=d.curve, usages=tuple(sorted(d.usages)), profile=d.profile, policy=d.policy,
        origin="klm", location=None, state=d.state, primary_version=d.version,
        primary_since=since, created_at=d.created_at,
        versions={d.version: Version(d.state, d.created_at)}, protection=d.protection)


def _observed(event: CloudEvent, d: KeyObserved) -> InventoryKey:
    return InventoryKey(
        key_id=d.key_id, owner=d.owner, name=d.name, algorithm=d.algorithm, size=d.size,
        curve=d.curve, usages=tuple(sorted(d.usages)), profile=d.profile, policy=d.policy,
        origin="observed", location=d.location, state=d.state, primary_version=1,
        primary_since=d.created_at, created_at=d.created_at,
        versions={1: Version(d.state, d.created_at)}, protection="observed")


def _with_version(key: InventoryKey, number: int, version: Version) -> dict[int, Version]:
    return {**key.versions, number: version}


def _rotated(key: InventoryKey, event: CloudEvent, d: KeyRotated) -> InventoryKey:
    versions = dict(key.versions)
    previous = versions.get(d.previous_version)
    if previous is not None:
        versions[d.previous_version] = replace(previous, superseded_at=d.created_at)
    versions[d.version] = Version("active", d.created_at)
    return replace(key, state=d.state, primary_version=d.version, primary_since=d.created_at,
                   versions=versions, compromised_at=None)


def _activated(key: InventoryKey, d: KeyActivated) -> InventoryKey:
    current = key.versions.get(d.version)
    created = current.created_at if current else d.activation_date
    versions = _with_version(key, d.version, Version("active", created,
                                                     current.superseded_at if current else None))
    since = d.activation_date if d.version == key.primary_version else key.primary_since
    return replace(key, state=d.state, versions=versions, primary_since=since)


def _version_deactivated(key: InventoryKey, d: KeyVersionDeactivated) -> InventoryKey:
    current = key.versions.get(d.version)
    if current is None:
        return replace(key, state=d.state)
    return replace(key, state=d.state,
                   versions=_with_version(key, d.version, replace(current, state="deactivated")))


def _destroyed(key: InventoryKey, d: KeyDestroyed) -> InventoryKey:
    versions = {n: replace(v, state=d.state) if n in d.versions or not d.versions else v
                for n, v in key.versions.items()}
    return replace(key, state=d.state, versions=versions, destroy_after=None)


def _compromised(key: InventoryKey, event: CloudEvent, d: KeyCompromised) -> InventoryKey:
    return replace(key, state=d.state, compromised_at=event.time)


def _destruction_scheduled(key: InventoryKey, event: CloudEvent, d: DestructionScheduled
                           ) -> InventoryKey:
    return replace(key, state=d.state, destroy_after=d.destroy_after,
                   destruction_override=d.override, rejections=_without(key, "destroy:0"))


def _destruction_cancelled(key: InventoryKey, event: CloudEvent, d: DestructionCancelled
                           ) -> InventoryKey:
    return replace(key, state=d.state, destroy_after=None, destruction_override=False,
                   rejections=_without(key, "destroy:0"))


def _without(key: InventoryKey, slot: str) -> dict[str, int]:
    """A new destruction schedule starts its refusal count afresh."""
    return {k: n for k, n in key.rejections.items() if k != slot}


def _used(key: InventoryKey, event: CloudEvent, d: UsageSummary) -> InventoryKey:
    return replace(key, last_used_at=max(filter(None, [key.last_used_at, d.last_used_at])))


#: how each fact about a known key changes it; other KeyMetadata facts only set the state
_APPLY: dict[type[EventData], Callable[[InventoryKey, CloudEvent, Any], InventoryKey]] = {
    KeyRotated: _rotated,
    KeyActivated: lambda k, _e, d: _activated(k, d),
    KeyVersionDeactivated: lambda k, _e, d: _version_deactivated(k, d),
    KeyCompromised: _compromised,
    DestructionScheduled: _destruction_scheduled,
    DestructionCancelled: _destruction_cancelled,
    KeyDestroyed: lambda k, _e, d: _destroyed(k, d),
    UsageSummary: _used,
}


def apply(key: InventoryKey | None, event: CloudEvent, data: EventData) -> InventoryKey | None:
    """The key after one fact (None if the fact is about a key the inventory never saw)."""
    if isinstance(data, KeyGenerated):
        return key or _generated(event, data)
    if isinstance(data, KeyObserved):
        return _observed(event, data)
    if key is None:
        return None
    step = _APPLY.get(type(data))
    if step is not None:
        return step(key, event, data)
    if isinstance(data, KeyMetadata):  # suspended, reactivated, deactivated, backed up, …
        return replace(key, state=data.state)
    return key


def note_rejection(key: InventoryKey, kind: str, version: int, give_up_at: int) -> InventoryKey:
    """Keygen refused a command: it did not happen, so the next attempt may use a new id.

    A compromised key's state never changes back (SP 800-57 §5.3.4: compromised →
    destroyed-compromised only), so waiting cannot make keygen accept: the refusal counts as
    the last one and the finding is raised at once."""
    slot = f"{kind}:{version}"
    count = give_up_at if key.state == "compromised" else key.rejections.get(slot, 0) + 1
    return replace(key, rejections={**key.rejections, slot: count})
