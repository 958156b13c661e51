"""Compliance of one inventory key against the policy that governs it (the one it names, else
the default): :func:`evaluate` gives the findings it has now; :func:`compare` turns old vs
new findings into ``klm.key.policy_violation`` events (raised, or ``cleared: true`` once
fixed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import PolicyViolation
from klm_common.policy import CryptoPolicy, PolicySet, Rule, Severity, Transition
from klm_rotation.domain.inventory import InventoryKey
from klm_rotation.domain.schedule import (
    MAX_REFUSALS,
    SOURCE,
    TERMINAL_STATES,
    days,
    destruction_guard,
    refused,
)

#: every code :func:`evaluate` can give (and therefore may clear)
CODES = (
    "algorithm_not_approved", "key_size_below_minimum", "algorithm_not_allowed",
    "usage_not_permitted", "cryptoperiod_exceeded", "rotation_overdue",
    "transition_deadline_approaching", "algorithm_deprecated", "algorithm_disallowed",
    "destruction_blocked", "command_refused", "policy_unknown",
)


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    severity: Severity
    rule: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _strength(key: InventoryKey, policy: CryptoPolicy) -> list[Finding]:
    found = []
    forbidden = policy.forbidden(key.algorithm)
    if forbidden is not None:
        name, entry = forbidden
        found.append(Finding("algorithm_not_approved", entry.severity,
                             f"forbidden_algorithms.{name}",
                             {"algorithm": key.algorithm, "reason": entry.reason,
                              "source": entry.source}))
    minimum = policy.minimum_for(key.algorithm)
    if minimum is not None and key.size < minimum.bits:
        found.append(Finding("key_size_below_minimum", "high", "minimum_sizes",
                             {"algorithm": key.algorithm, "size": key.size,
                              "minimum": minimum.bits, "source": minimum.source}))
    return found


def _rule_name(key: InventoryKey, policy: CryptoPolicy) -> str:
    if key.profile is not None and key.profile in policy.profiles:
        return f"profiles.{key.profile}"
    return "usages"


def _allowed(key: InventoryKey, policy: CryptoPolicy, rule: Rule | None) -> list[Finding]:
    found = []
    where = _rule_name(key, policy)
    if rule is None:
        return [Finding("usage_not_permitted", "medium", "usages",
                        {"usages": list(key.usages), "reason": "no policy rule for any usage"})]
    allowed = rule.usages if rule.usages is not None else list(policy.usages)
    extra = sorted(set(key.usages) - set(allowed))
    if extra:
        found.append(Finding("usage_not_permitted", "medium", where,
                             {"usages": extra, "allowed": allowed}))
    if policy.forbidden(key.algorithm) is None and not any(
            a.admits(key.algorithm, key.size, key.curve) for a in rule.algorithms):
        found.append(Finding("algorithm_not_allowed", "medium", where,
                             {"algorithm": key.label,
                              "allowed": [a.model_dump(exclude_none=True)
                                          for a in rule.algorithms]}))
    return found


def _age(key: InventoryKey, policy: CryptoPolicy, rule: Rule | None, now: datetime,
         day_seconds: float) -> list[Finding]:
    if rule is None or key.state in TERMINAL_STATES or key.state not in ("active", "suspended"):
        return []
    found = []
    where = _rule_name(key, policy)
    age = now - key.primary_since
    period = days(rule.cryptoperiod_days, day_seconds)
    evidence = {"version": key.primary_version, "primary_since": key.primary_since.isoformat(),
                "age_days": round(age / timedelta(seconds=day_seconds), 3),
                "cryptoperiod_days": rule.cryptoperiod_days, "source": rule.source}
    if age > period:
        found.append(Finding("cryptoperiod_exceeded", "medium", where, evidence))
    grace = days(policy.defaults.overdue_grace_days, day_seconds)
    rotatable = key.origin == "klm" and key.state == "active" and rule.rotation == "automatic"
    if rotatable and age > period + grace:
        found.append(Finding("rotation_overdue", "high", where,
                             {**evidence, "grace_days": policy.defaults.overdue_grace_days}))
    return found


def _transition(key: InventoryKey, policy: CryptoPolicy, now: datetime) -> list[Finding]:
    """The first matching row of the calendar applies (rows go from specific to general)."""
    row: Transition | None = next(
        (t for t in policy.transitions if t.matches(key.algorithm, key.size, key.curve)), None)
    if row is None or key.state in TERMINAL_STATES:
        return []
    today = now.date()
    evidence = {"algorithm": key.label, "use": row.use, "source": row.source,
                "deprecated_after": row.deprecated_after.isoformat()
                if row.deprecated_after else None,
                "disallowed_after": row.disallowed_after.isoformat()}
    if today > row.disallowed_after:
        return [Finding("algorithm_disallowed", "high", "transitions", evidence)]
    if row.deprecated_after is not None and today > row.deprecated_after:
        return [Finding("algorithm_deprecated", "medium", "transitions", evidence)]
    next_date = row.deprecated_after or row.disallowed_after
    ahead = timedelta(days=policy.defaults.transition_warn_ahead_days)
    if today + ahead > next_date:
        return [Finding("transition_deadline_approaching", "low", "transitions", evidence)]
    return []


def _destruction(key: InventoryKey, policy: CryptoPolicy, now: datetime,
                 day_seconds: float) -> list[Finding]:
    if key.destroy_after is None or key.destruction_override or now < key.destroy_after:
        return []
    reasons = destruction_guard(key, policy, now, day_seconds)
    if not reasons:
        return []
    return [Finding("destruction_blocked", "high", "defaults.recent_use_days",
                    {"destroy_after": key.destroy_after.isoformat(), "reasons": reasons,
                     "remedy": "schedule the destruction again with override: true"})]


def _refusals(key: InventoryKey, policy: CryptoPolicy, day_seconds: float) -> list[Finding]:
    stuck = refused(key, policy, day_seconds)
    if not stuck:
        return []
    return [Finding("command_refused", "high", "schedule",
                    {"work": [f"{d.kind}:{d.version}" for d in stuck], "reasons":
                     [d.reason for d in stuck], "refusals": MAX_REFUSALS,
                     "remedy": "keygen refused this work; act on the key by hand"})]


def evaluate(key: InventoryKey, policy: CryptoPolicy, now: datetime, day_seconds: float
             ) -> dict[str, Finding]:
    """The findings the key has now, by code (a destroyed key has none)."""
    if key.state in TERMINAL_STATES:
        return {}
    rule = policy.rule_for(key.usages, key.profile)
    found = [*_strength(key, policy), *_allowed(key, policy, rule),
             *_age(key, policy, rule, now, day_seconds), *_transition(key, policy, now),
             *_destruction(key, policy, now, day_seconds), *_refusals(key, policy, day_seconds)]
    return {f.code: f for f in found}


def _unknown_policy(key: InventoryKey, policies: PolicySet) -> list[Finding]:
    if policies.knows(key.policy):
        return []
    return [Finding("policy_unknown", "high", "policy",
                    {"policy": key.policy, "applied": policies.default.name,
                     "known": policies.names,
                     "remedy": "load a policy of that name (KLM_POLICY_DIR)"})]


def evaluate_in(key: InventoryKey, policies: PolicySet, now: datetime, day_seconds: float
                ) -> dict[str, Finding]:
    """:func:`evaluate` under the policy the key names; a key naming a policy that is not
    loaded is judged by the default policy meanwhile, and has a ``policy_unknown`` finding."""
    found = evaluate(key, policies.applied(key.policy), now, day_seconds)
    if key.state not in TERMINAL_STATES:
        found.update((f.code, f) for f in _unknown_policy(key, policies))
    return found


@dataclass
class Changes:
    raised: list[tuple[str, Finding]] = field(default_factory=list)
    cleared: list[tuple[str, str]] = field(default_factory=list)
    events: list[CloudEvent] = field(default_factory=list)


def compare(key: InventoryKey, before: dict[str, Finding], after: dict[str, Finding],
            changes: Changes) -> None:
    """Raise what is new (or changed severity), clear what is gone."""
    for code, finding in after.items():
        old = before.get(code)
        if old is None or old.severity != finding.severity:
            changes.raised.append((key.key_id, finding))
            changes.events.append(_event(key, finding, cleared=False))
    for code, finding in before.items():
        if code not in after:
            changes.cleared.append((key.key_id, code))
            changes.events.append(_event(key, finding, cleared=True))


def _event(key: InventoryKey, finding: Finding, cleared: bool) -> CloudEvent:
    data = PolicyViolation(key_id=key.key_id, owner=key.owner, code=finding.code,
                           severity=finding.severity, rule=finding.rule,
                           evidence=finding.evidence, cleared=cleared)
    return make_event(data.event_type, data, source=SOURCE, subject=key.key_id)


def override_record(key: InventoryKey, policy: CryptoPolicy, now: datetime,
                    day_seconds: float, cause: CloudEvent) -> CloudEvent | None:
    """A destruction scheduled *with* override that the guard would have stopped: record it."""
    if key.destroy_after is None or not key.destruction_override:
        return None
    reasons = destruction_guard(key, policy, now, day_seconds)
    if not reasons:
        return None
    data = PolicyViolation(key_id=key.key_id, owner=key.owner, code="destruction_override",
                           severity="info", rule="defaults.recent_use_days",
                           evidence={"reasons": reasons,
                                     "destroy_after": key.destroy_after.isoformat()})
    return make_event(data.event_type, data, source=SOURCE, subject=key.key_id, cause=cause)
