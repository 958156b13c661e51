"""What is due and when (:func:`plan`), and what to send when it is (:func:`decide`).

Every key has at most one row per ``(kind, version)`` in the due-work table: ``rotate``
(version = the primary it rotates away from), ``deactivate`` (a superseded version at the
end of its process-only period) and ``destroy`` (version 0, at ``destroy_after``).

A command's id is derived from what it acts on (:func:`command_id`), so every scheduler
instance and every re-send after a restart produce the *same* request: keygen's idempotent
inbox executes it once. Only a command keygen refused (which therefore did not happen) is
retried under a new id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import DeactivateVersion, DestroyKey, RotateKey
from klm_common.kafka import KLM_NAMESPACE
from klm_common.policy import CryptoPolicy
from klm_rotation.domain.inventory import InventoryKey

Kind = Literal["rotate", "deactivate", "destroy"]
SOURCE = "klm/rotation"
#: keygen refuses a destroy before destroy_after; a little margin absorbs clock skew (at
#: most a second, less when tests shrink the policy day)
DESTROY_MARGIN = timedelta(seconds=1)
ROTATABLE_STATES = frozenset({"active", "compromised"})
#: after this many refusals of the same work the scheduler stops and a finding says so
MAX_REFUSALS = 3
TERMINAL_STATES = frozenset({"destroyed", "destroyed-compromised"})


@dataclass(frozen=True, slots=True)
class Due:
    kind: Kind
    version: int
    planned_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class DueRow:
    """A claimed row of the due-work table."""

    key_id: str
    kind: Kind
    version: int
    planned_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one due row: send a command (to ``target``), evaluate the key's
    findings now (notify-mode rotation, blocked destruction), or drop a stale row. A row is
    re-armed when it is claimed, so work not sent now (``hold``: a destruction that needs
    an override) is decided again after the redispatch period."""

    command: CloudEvent | None = None
    target: Literal["requests", "commands"] | None = None
    evaluate: bool = False
    hold: bool = False
    drop: bool = False


def days(n: float, day_seconds: float) -> timedelta:
    return timedelta(seconds=n * day_seconds)


def _rotation(key: InventoryKey, policy: CryptoPolicy, day_seconds: float) -> Due | None:
    if key.origin != "klm" or key.state not in ROTATABLE_STATES:
        return None
    if key.compromised_at is not None:
        return Due("rotate", key.primary_version, key.compromised_at, "compromised")
    if key.state != "active":
        return None
    rule = policy.rule_for(key.usages, key.profile)
    if rule is None:
        return None
    return Due("rotate", key.primary_version,
               key.primary_since + days(rule.cryptoperiod_days, day_seconds), "cryptoperiod")


def _deactivations(key: InventoryKey, policy: CryptoPolicy, day_seconds: float) -> list[Due]:
    if key.origin != "klm" or key.state in TERMINAL_STATES:
        return []
    rule = policy.rule_for(key.usages, key.profile)
    if rule is None:
        return []
    period = days(rule.process_only_days, day_seconds)
    return [Due("deactivate", n, v.superseded_at + period, "process_only_period")
            for n, v in sorted(key.versions.items())
            if n != key.primary_version and v.state == "active" and v.superseded_at is not None]


def wanted(key: InventoryKey, policy: CryptoPolicy, day_seconds: float) -> list[Due]:
    """Every piece of future work the key needs, refused or not."""
    work = _deactivations(key, policy, day_seconds)
    rotation = _rotation(key, policy, day_seconds)
    if rotation is not None:
        work.append(rotation)
    if key.destroy_after is not None and key.state not in TERMINAL_STATES:
        margin = min(DESTROY_MARGIN, days(0.05, day_seconds))
        work.append(Due("destroy", 0, key.destroy_after + margin, "destruction_due"))
    return work


def refused(key: InventoryKey, policy: CryptoPolicy, day_seconds: float) -> list[Due]:
    """Wanted work keygen refused :data:`MAX_REFUSALS` times: no longer scheduled."""
    return [d for d in wanted(key, policy, day_seconds)
            if key.rejections.get(f"{d.kind}:{d.version}", 0) >= MAX_REFUSALS]


def plan(key: InventoryKey, policy: CryptoPolicy, day_seconds: float) -> list[Due]:
    """The work the scheduler will do for the key, with its due time."""
    return [d for d in wanted(key, policy, day_seconds)
            if key.rejections.get(f"{d.kind}:{d.version}", 0) < MAX_REFUSALS]


def command_id(key: InventoryKey, kind: Kind, version: int, planned_at: datetime) -> str:
    """Same inputs, same id: a re-sent command is the same request (executed once)."""
    attempt = key.rejections.get(f"{kind}:{version}", 0)
    anchor = planned_at.isoformat() if kind == "destroy" else str(version)
    return name_uuid(f"{kind}/{key.key_id}/{anchor}/{attempt}")


_NAMESPACE = KLM_NAMESPACE.bytes


def name_uuid(name: str) -> str:
    """``str(uuid.uuid5(KLM_NAMESPACE, name))`` (RFC 4122 §4.3), without building a UUID
    object: the dispatcher derives one per command, thousands a second."""
    raw = bytearray(hashlib.sha1(_NAMESPACE + name.encode()).digest()[:16])  # noqa: S324
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: the command type each kind of work is sent as
COMMAND_KINDS: dict[str, Kind] = {RotateKey.event_type: "rotate",
                                  DeactivateVersion.event_type: "deactivate",
                                  DestroyKey.event_type: "destroy"}


def refused_work(key: InventoryKey, rows: dict[tuple[str, Kind, int], datetime],
                 request_id: str, request_type: str) -> tuple[str, Kind, int] | None:
    """The due-work row whose current command is ``request_id`` (None: not ours, or an
    answer to an attempt already counted — its id is no longer the current one)."""
    kind = COMMAND_KINDS.get(request_type)
    for (key_id, row_kind, version), planned_at in rows.items():
        if key_id == key.key_id and row_kind == kind and \
                command_id(key, row_kind, version, planned_at) == request_id:
            return key_id, row_kind, version
    return None


def destruction_guard(key: InventoryKey, policy: CryptoPolicy, now: datetime,
                      day_seconds: float) -> list[str]:
    """Why destroying the key needs an override (empty: it does not)."""
    reasons = []
    recent = days(policy.defaults.recent_use_days, day_seconds)
    if key.last_used_at is not None and now - key.last_used_at < recent:
        reasons.append(f"used at {key.last_used_at.isoformat()}, within "
                       f"{policy.defaults.recent_use_days:g} days")
    if key.profile is not None and key.state in ("active", "suspended"):
        reasons.append(f"still the primary key of profile {key.profile!r}")
    return reasons


def decide(row: DueRow, key: InventoryKey | None, policy: CryptoPolicy, now: datetime,
           day_seconds: float) -> Decision:
    """What one due row turns into (pure)."""
    if key is None or not _still_planned(row, key, policy, day_seconds):
        return Decision(drop=True)
    ident = command_id(key, row.kind, row.version, row.planned_at)
    if row.kind == "rotate":
        return _decide_rotation(row, key, policy, ident)
    if row.kind == "deactivate":
        data = DeactivateVersion(key_id=key.key_id, version=row.version)
        return Decision(_command(data, key, ident), "commands")
    if not key.destruction_override and destruction_guard(key, policy, now, day_seconds):
        return Decision(evaluate=True, hold=True)
    reason = "destruction waiting period over"
    return Decision(_command(DestroyKey(key_id=key.key_id, reason=reason), key, ident),
                    "commands")


def _decide_rotation(row: DueRow, key: InventoryKey, policy: CryptoPolicy, ident: str
                     ) -> Decision:
    if row.reason == "compromised":
        data = RotateKey(key_id=key.key_id, reason="compromised")
        return Decision(_command(data, key, ident), "requests")
    rule = policy.rule_for(key.usages, key.profile)
    if rule is None or rule.rotation == "notify":
        return Decision(evaluate=True)
    data = RotateKey(key_id=key.key_id,
                     reason=f"cryptoperiod of {rule.cryptoperiod_days:g} days reached")
    return Decision(_command(data, key, ident), "requests")


def _still_planned(row: DueRow, key: InventoryKey, policy: CryptoPolicy,
                   day_seconds: float) -> bool:
    """A row written from an older view of the key (e.g. before a rotation) is stale."""
    if key.rejections.get(f"{row.kind}:{row.version}", 0) >= MAX_REFUSALS:
        return False
    if row.kind == "rotate":
        due = _rotation(key, policy, day_seconds)
        return due is not None and due.version == row.version
    if row.kind == "deactivate":
        return any(d.version == row.version for d in _deactivations(key, policy, day_seconds))
    return key.destroy_after is not None and key.state not in TERMINAL_STATES


def _command(data: RotateKey | DeactivateVersion | DestroyKey, key: InventoryKey,
             ident: str) -> CloudEvent:
    return make_event(data.event_type, data, source=SOURCE, subject=key.key_id, event_id=ident)
