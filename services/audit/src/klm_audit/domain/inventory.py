"""Key inventory projection: a key's view is the fold of its events (event sourcing, pure).

Every ``klm.key.*`` fact carries the key's ``state`` after it (``KeyMetadata``), so the fold
trusts the producer's state rather than re-deriving the state machine; it records versions,
rotation, destruction schedule, backups and open policy findings on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klm_common.events import EVENT_TYPES


class VersionView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int
    state: str
    created_at: datetime | None = None
    fingerprint_sha256: str | None = None
    kcv: str | None = None


class Finding(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str
    severity: str
    rule: str
    since: datetime


class KeyView(BaseModel):
    """What the inventory knows about one key (metadata only, never material)."""

    model_config = ConfigDict(extra="ignore")

    key_id: str
    owner: str
    name: str | None = None
    algorithm: str | None = None
    size: int | None = None
    curve: str | None = None
    usages: list[str] = Field(default_factory=list)
    protection: str | None = None
    policy: str | None = None
    profile: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    state: str
    created_at: datetime | None = None
    activation_date: datetime | None = None
    last_rotated_at: datetime | None = None
    primary_version: int | None = None
    versions: list[VersionView] = Field(default_factory=list)
    destroy_after: datetime | None = None
    destroyed_at: datetime | None = None
    compromised_at: datetime | None = None
    last_backup_at: datetime | None = None
    usage_denied: int = 0
    findings: list[Finding] = Field(default_factory=list)
    updated_at: datetime
    last_sequence: int

    def version(self, number: int) -> VersionView | None:
        return next((v for v in self.versions if v.version == number), None)


class Fact(BaseModel):
    """The slice of a stored event the fold needs."""

    model_config = ConfigDict(frozen=True)

    sequence: int
    type: str
    time: datetime
    data: dict[str, Any]


def apply(view: KeyView | None, fact: Fact) -> KeyView | None:
    """The view after ``fact``; events that say nothing about a key leave it unchanged.

    A fact whose payload does not match its schema is stored in the log but not projected:
    one malformed producer must not block the partition (a poison pill) or corrupt the view.
    """
    if not fact.type.startswith("klm.key.") or not _well_formed(fact):
        return view
    if fact.type == "klm.key.generated":
        return _generated(fact)
    if view is None:
        return view
    view = view.model_copy(deep=True)
    handler = _HANDLERS.get(fact.type)
    if handler is not None:
        handler(view, fact)
    state = fact.data.get("state")
    if isinstance(state, str) and fact.type != "klm.key.policy_violation":
        view.state = state
    view.updated_at, view.last_sequence = fact.time, fact.sequence
    return view


def _well_formed(fact: Fact) -> bool:
    model = EVENT_TYPES.get(fact.type)
    if model is None:
        return False
    try:
        model.model_validate(fact.data)
    except ValidationError:
        return False
    return True


def fold(views: Mapping[str, KeyView], facts: Iterable[tuple[str, Fact]]
         ) -> dict[str, KeyView]:
    """Apply ``(key_id, fact)`` pairs in order to ``views``; return the views that changed."""
    current = dict(views)
    changed: dict[str, KeyView] = {}
    for key_id, fact in facts:
        after = apply(current.get(key_id), fact)
        if after is not None and after is not current.get(key_id):
            current[key_id] = changed[key_id] = after
    return changed


def replay(facts: Iterable[Fact]) -> KeyView | None:
    view: KeyView | None = None
    for fact in facts:
        view = apply(view, fact)
    return view


def _generated(fact: Fact) -> KeyView:
    d = fact.data
    version = int(d.get("version", 1))
    return KeyView(
        key_id=d["key_id"], owner=d["owner"], name=d.get("name"), algorithm=d.get("algorithm"),
        size=d.get("size"), curve=d.get("curve"), usages=list(d.get("usages") or []),
        protection=d.get("protection"), policy=d.get("policy"), profile=d.get("profile"),
        labels=dict(d.get("labels") or {}), state=d["state"],
        created_at=d.get("created_at") or fact.time, activation_date=d.get("activation_date"),
        primary_version=version,
        versions=[VersionView(version=version, state=d["state"],
                              created_at=d.get("created_at") or fact.time,
                              fingerprint_sha256=d.get("fingerprint_sha256"), kcv=d.get("kcv"))],
        updated_at=fact.time, last_sequence=fact.sequence)


def _activated(view: KeyView, fact: Fact) -> None:
    view.activation_date = fact.data.get("activation_date") or fact.time
    _set_version_state(view, fact.data.get("version"), "active")


def _rotated(view: KeyView, fact: Fact) -> None:
    d = fact.data
    version = int(d["version"])
    view.versions.append(VersionView(
        version=version, state=d.get("state", view.state), created_at=d.get("created_at"),
        fingerprint_sha256=d.get("fingerprint_sha256"), kcv=d.get("kcv")))
    view.primary_version, view.last_rotated_at = version, fact.time


def _version_deactivated(view: KeyView, fact: Fact) -> None:
    _set_version_state(view, fact.data.get("version"), "deactivated")


def _compromised(view: KeyView, fact: Fact) -> None:
    view.compromised_at = fact.data.get("compromise_date") or fact.time


def _destruction_scheduled(view: KeyView, fact: Fact) -> None:
    view.destroy_after = fact.data.get("destroy_after")


def _destruction_cancelled(view: KeyView, fact: Fact) -> None:
    view.destroy_after = None


def _destroyed(view: KeyView, fact: Fact) -> None:
    view.destroyed_at, view.destroy_after = fact.time, None
    state = fact.data.get("state", "destroyed")
    for number in fact.data.get("versions") or [v.version for v in view.versions]:
        _set_version_state(view, number, state)


def _backed_up(view: KeyView, fact: Fact) -> None:
    if not fact.data.get("skipped"):
        view.last_backup_at = fact.time


def _usage_denied(view: KeyView, fact: Fact) -> None:
    view.usage_denied += 1


def _policy_violation(view: KeyView, fact: Fact) -> None:
    code = str(fact.data.get("code", "unknown"))
    view.findings = [f for f in view.findings if f.code != code]
    if not fact.data.get("cleared"):
        view.findings.append(Finding(code=code, severity=str(fact.data.get("severity", "info")),
                                     rule=str(fact.data.get("rule", "")), since=fact.time))


def _set_version_state(view: KeyView, number: object, state: str) -> None:
    if isinstance(number, int):
        version = view.version(number)
        if version is not None:
            version.state = state


_HANDLERS = {
    "klm.key.activated": _activated,
    "klm.key.rotated": _rotated,
    "klm.key.version_deactivated": _version_deactivated,
    "klm.key.compromised": _compromised,
    "klm.key.destruction_scheduled": _destruction_scheduled,
    "klm.key.destruction_cancelled": _destruction_cancelled,
    "klm.key.destroyed": _destroyed,
    "klm.key.backed_up": _backed_up,
    "klm.key.usage_denied": _usage_denied,
    "klm.key.policy_violation": _policy_violation,
}
