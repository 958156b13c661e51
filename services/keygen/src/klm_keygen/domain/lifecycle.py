"""Pure rules of a key's life after generation: rotation, suspension, revocation, scheduled
destruction and version deactivation. No I/O: each rule takes the key as the keystore holds
it and returns the key as it must be stored next, plus the facts to announce.

Which state change is legal is decided by :func:`klm_common.states.transition` only; the
rules here add what the state graph does not know (a primary version, a destruction date).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from klm_common.algorithms import KeySpec, Protection, key_spec
from klm_common.envelope import CloudEvent, make_event
from klm_common.errors import IllegalTransition
from klm_common.events import (
    CancelDestruction,
    DeactivateVersion,
    DestructionCancelled,
    DestructionScheduled,
    EventData,
    KeyCompromised,
    KeyDeactivated,
    KeyDestroyed,
    KeyReactivated,
    KeyRotated,
    KeySuspended,
    KeyVersionDeactivated,
    ReactivateKey,
    RevokeKey,
    RotateKey,
    ScheduleDestruction,
    SuspendKey,
)
from klm_common.states import TERMINAL_STATES, KeyState, Transition, transition
from klm_keygen.adapters.hsm import object_id
from klm_keygen.domain.generation import SOURCE, answer_id
from klm_keygen.domain.material import GeneratedVersion


class DestructionNotDue(IllegalTransition):
    """A destroy command arrived before the key's waiting period ended."""

    code = "destruction_not_due"


@dataclass(frozen=True, slots=True)
class VersionRecord:
    version: int
    state: KeyState
    hsm_object_id: bytes | None = None
    has_material: bool = True
    material: GeneratedVersion | None = None
    """set only on a version created in this unit of work (it must be inserted)"""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as the keystore holds it (metadata and version states, never material)."""

    key_id: str
    owner: str
    algorithm: str
    size: int
    curve: str | None
    usages: tuple[str, ...]
    protection: Protection
    state: KeyState
    primary_version: int
    destroy_after: datetime | None
    versions: tuple[VersionRecord, ...]

    @property
    def spec(self) -> KeySpec:
        return key_spec(self.algorithm, self.size, self.curve, list(self.usages))

    def version(self, number: int) -> VersionRecord | None:
        return next((v for v in self.versions if v.version == number), None)

    def with_version(self, new: VersionRecord) -> KeyRecord:
        others = tuple(v for v in self.versions if v.version != new.version)
        return replace(self, versions=tuple(sorted((*others, new), key=lambda v: v.version)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """A rule's result: the key to store and the facts to publish (in order)."""

    key: KeyRecord
    facts: tuple[CloudEvent, ...]


@dataclass(frozen=True, slots=True)
class RotationPlan:
    """What the HSM must make for a rotation: the same spec, the next version."""

    key_id: str
    version: int
    spec: KeySpec
    protection: Protection

    @property
    def hsm_object_id(self) -> bytes:
        return object_id(self.key_id, self.version)


@dataclass(frozen=True, slots=True)
class DestructionPlan:
    """What the HSM must destroy: the resident objects of every version still holding one."""

    key_id: str
    versions: tuple[int, ...]
    resident_object_ids: tuple[bytes, ...]


def _fact(request: CloudEvent, key: KeyRecord, data: EventData, what: str,
          at: datetime) -> CloudEvent:
    return make_event(data.event_type, data, source=SOURCE, subject=key.key_id, cause=request,
                      event_id=answer_id(request.id, what), time=at)


def _require_state(key: KeyRecord, allowed: set[KeyState], action: str) -> None:
    if key.state not in allowed:
        raise IllegalTransition(f"cannot {action} a key that is {key.state.value}",
                                current_state=key.state.value, action=action)


# ---- state changes of the whole key ---------------------------------------------------------
def suspend(key: KeyRecord, request: CloudEvent, data: SuspendKey, at: datetime) -> Outcome:
    new = replace(key, state=transition(key.state, Transition.SUSPEND))
    fact = KeySuspended(key_id=key.key_id, owner=key.owner, state=new.state.value,
                        previous_state=key.state.value, reason=data.reason)
    return Outcome(new, (_fact(request, new, fact, "suspended", at),))


def reactivate(key: KeyRecord, request: CloudEvent, data: ReactivateKey,
               at: datetime) -> Outcome:
    new = replace(key, state=transition(key.state, Transition.REACTIVATE))
    fact = KeyReactivated(key_id=key.key_id, owner=key.owner, state=new.state.value,
                          previous_state=key.state.value, reason=data.reason)
    return Outcome(new, (_fact(request, new, fact, "reactivated", at),))


def revoke(key: KeyRecord, request: CloudEvent, data: RevokeKey, at: datetime) -> Outcome:
    """``compromised`` → compromised (every live version too); ``superseded`` / ``cessation``
    → deactivated: the key (all versions) may still process, never protect."""
    if data.reason == "compromised":
        state = transition(key.state, Transition.COMPROMISE)
        new = _all_live_versions(replace(key, state=state), state)
        fact: EventData = KeyCompromised(
            key_id=key.key_id, owner=key.owner, state=state.value,
            previous_state=key.state.value, reason=data.comment or data.reason,
            compromise_date=data.compromise_date or at)
        return Outcome(new, (_fact(request, new, fact, "compromised", at),))
    state = transition(key.state, Transition.DEACTIVATE)
    new = _all_live_versions(replace(key, state=state), state)
    fact = KeyDeactivated(key_id=key.key_id, owner=key.owner, state=state.value,
                          previous_state=key.state.value, reason=data.reason)
    return Outcome(new, (_fact(request, new, fact, "deactivated", at),))


def _all_live_versions(key: KeyRecord, state: KeyState) -> KeyRecord:
    versions = tuple(v if v.state in TERMINAL_STATES else replace(v, state=state)
                     for v in key.versions)
    return replace(key, versions=versions)


# ---- destruction ----------------------------------------------------------------------------
def schedule_destruction(key: KeyRecord, request: CloudEvent, data: ScheduleDestruction,
                         at: datetime, day_seconds: float) -> Outcome:
    """Only a key that may be destroyed now (pre-active, deactivated, compromised) gets a
    date; ``waiting_days`` policy days later the rotation service sends ``destroy_key``."""
    transition(key.state, Transition.DESTROY)  # raises IllegalTransition with current state
    if key.destroy_after is not None:
        raise IllegalTransition(
            f"destruction is already scheduled for {key.destroy_after.isoformat()}",
            current_state=key.state.value, destroy_after=key.destroy_after.isoformat())
    after = at + timedelta(seconds=data.waiting_days * day_seconds)
    new = replace(key, destroy_after=after)
    fact = DestructionScheduled(key_id=key.key_id, owner=key.owner, state=key.state.value,
                                destroy_after=after, waiting_days=data.waiting_days,
                                override=data.override)
    return Outcome(new, (_fact(request, new, fact, "destruction_scheduled", at),))


def cancel_destruction(key: KeyRecord, request: CloudEvent, data: CancelDestruction,
                       at: datetime) -> Outcome:
    if key.destroy_after is None or key.state in TERMINAL_STATES:
        raise IllegalTransition(f"no destruction is scheduled for this {key.state.value} key",
                                current_state=key.state.value)
    new = replace(key, destroy_after=None)
    fact = DestructionCancelled(key_id=key.key_id, owner=key.owner, state=key.state.value)
    return Outcome(new, (_fact(request, new, fact, "destruction_cancelled", at),))


def plan_destruction(key: KeyRecord, at: datetime) -> DestructionPlan:
    """Refuse a destroy before the scheduled date; name what the HSM must destroy."""
    transition(key.state, Transition.DESTROY)
    if key.destroy_after is None:
        raise IllegalTransition("destruction was not scheduled",
                                current_state=key.state.value)
    if at < key.destroy_after:
        raise DestructionNotDue(
            f"destruction is due at {key.destroy_after.isoformat()}, not before",
            current_state=key.state.value, destroy_after=key.destroy_after.isoformat())
    live = [v for v in key.versions if v.state not in TERMINAL_STATES]
    return DestructionPlan(key.key_id, tuple(v.version for v in live),
                           tuple(v.hsm_object_id for v in live if v.hsm_object_id))


def destroyed(key: KeyRecord, request: CloudEvent, plan: DestructionPlan,
              evidence: dict[str, object], at: datetime) -> Outcome:
    state = transition(key.state, Transition.DESTROY)
    versions = tuple(replace(v, state=state, has_material=False)
                     if v.version in plan.versions else v for v in key.versions)
    new = replace(key, state=state, versions=versions)
    fact = KeyDestroyed(key_id=key.key_id, owner=key.owner, state=state.value,
                        previous_state=key.state.value, versions=list(plan.versions),
                        evidence=evidence)
    return Outcome(new, (_fact(request, new, fact, "destroyed", at),))


# ---- versions -------------------------------------------------------------------------------
def plan_rotation(key: KeyRecord) -> RotationPlan:
    """An active or compromised key rotates (``Transition.REKEY``); the new version has the
    key's spec and protection."""
    transition(key.state, Transition.REKEY)  # raises IllegalTransition with the current state
    return RotationPlan(key.key_id, max(v.version for v in key.versions) + 1, key.spec,
                        key.protection)


def rotated(key: KeyRecord, request: CloudEvent, data: RotateKey, plan: RotationPlan,
            material: GeneratedVersion, at: datetime) -> Outcome:
    """The new version becomes primary and active; the previous one keeps processing unless
    the policy deactivates it at once."""
    previous = key.primary_version
    state = transition(key.state, Transition.REKEY)
    new = replace(key, state=state, primary_version=plan.version).with_version(
        VersionRecord(plan.version, KeyState.ACTIVE, material.hsm_object_id, True, material))
    fact = KeyRotated(key_id=key.key_id, owner=key.owner, state=new.state.value,
                      version=plan.version, previous_version=previous, created_at=at,
                      public_key_pem=material.public_key_pem,
                      fingerprint_sha256=material.fingerprint_sha256, kcv=material.kcv,
                      reason=data.reason)
    facts = [_fact(request, new, fact, "rotated", at)]
    if data.deactivate_previous:
        new, more = _deactivate(new, request, previous, at)
        facts.append(more)
    return Outcome(new, tuple(facts))


def deactivate_version(key: KeyRecord, request: CloudEvent, data: DeactivateVersion,
                       at: datetime) -> Outcome:
    """End an old version's process-only period (the primary is deactivated with the key)."""
    version = key.version(data.version)
    if version is None:
        raise IllegalTransition(f"the key has no version {data.version}",
                                current_state=key.state.value, version=data.version)
    if version.version == key.primary_version:
        raise IllegalTransition("the primary version is deactivated with the key (revoke_key)",
                                current_state=version.state.value, version=data.version)
    new, fact = _deactivate(key, request, data.version, at)
    return Outcome(new, (fact,))


def _deactivate(key: KeyRecord, request: CloudEvent, number: int,
                at: datetime) -> tuple[KeyRecord, CloudEvent]:
    version = key.version(number)
    assert version is not None
    state = transition(version.state, Transition.DEACTIVATE)
    new = key.with_version(replace(version, state=state))
    fact = KeyVersionDeactivated(key_id=key.key_id, owner=key.owner, state=key.state.value,
                                 version=number)
    return new, _fact(request, new, fact, f"version_deactivated/{number}", at)
