"""Pure rules of key *usage*: who may use which key version for what, what a refusal
records, what a reply says, and how successful uses are summarised. No I/O here.

Order of the checks (a refusal reveals no more than the requester may know): the key
exists → the tenant named in the request owns it (``forbidden``) → the key was made for
this use (``usage_not_permitted``) → the version's state allows it (``key_not_active``).

Version rules (SP 800-57 Pt 1 §5.3): *protect* operations (sign, encrypt, mac, wrap)
use the primary version, and only while key and version are active; *process*
operations (verify, decrypt, mac_verify, unwrap) may use any version that is active,
deactivated or compromised — never a suspended, pre-active or destroyed one — and the
reply warns when the version is compromised.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from klm_common.algorithms import Algorithm, Usage
from klm_common.envelope import CloudEvent, make_event, now
from klm_common.errors import (
    Forbidden,
    KeyNotActive,
    KeyNotFound,
    KlmError,
    RequestInvalid,
    UsageNotPermitted,
)
from klm_common.events import (
    CryptoDecrypt,
    CryptoEncrypt,
    CryptoMac,
    CryptoMacVerify,
    CryptoReply,
    CryptoSign,
    CryptoUnwrap,
    CryptoVerify,
    CryptoWrap,
    UsageDenied,
    UsageSummary,
)
from klm_common.kafka import KLM_NAMESPACE
from klm_common.states import PROCESS_STATES, PROTECT_STATES, KeyState

SOURCE = "klm/keygen"

CryptoRequest = (CryptoSign | CryptoVerify | CryptoEncrypt | CryptoDecrypt | CryptoMac
                 | CryptoMacVerify | CryptoWrap | CryptoUnwrap)


class Operation(StrEnum):
    SIGN = "sign"
    VERIFY = "verify"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    MAC = "mac"
    MAC_VERIFY = "mac_verify"
    WRAP = "wrap"
    UNWRAP = "unwrap"

    @property
    def protects(self) -> bool:
        """New protection: must use the primary, active version."""
        return self in _PROTECT

    @property
    def usage(self) -> Usage:
        return _REQUIRED_USAGE[self]


_PROTECT = frozenset({Operation.SIGN, Operation.ENCRYPT, Operation.MAC, Operation.WRAP})
_REQUIRED_USAGE = {
    Operation.SIGN: Usage.SIGN, Operation.VERIFY: Usage.VERIFY,
    Operation.ENCRYPT: Usage.ENCRYPT, Operation.DECRYPT: Usage.DECRYPT,
    Operation.MAC: Usage.MAC, Operation.MAC_VERIFY: Usage.MAC,
    Operation.WRAP: Usage.WRAP, Operation.UNWRAP: Usage.UNWRAP,
}
OPERATION_OF: dict[str, Operation] = {
    CryptoSign.event_type: Operation.SIGN, CryptoVerify.event_type: Operation.VERIFY,
    CryptoEncrypt.event_type: Operation.ENCRYPT, CryptoDecrypt.event_type: Operation.DECRYPT,
    CryptoMac.event_type: Operation.MAC, CryptoMacVerify.event_type: Operation.MAC_VERIFY,
    CryptoWrap.event_type: Operation.WRAP, CryptoUnwrap.event_type: Operation.UNWRAP,
}
#: refusals that are misuse attempts: each also becomes a klm.key.usage_denied fact
DENIAL_CODES = frozenset({Forbidden.code, UsageNotPermitted.code, KeyNotActive.code})

#: severity order: the effective state of a version is the worse of key and version state
_SEVERITY = [KeyState.ACTIVE, KeyState.PRE_ACTIVE, KeyState.DEACTIVATED, KeyState.SUSPENDED,
             KeyState.COMPROMISED, KeyState.DESTROYED, KeyState.DESTROYED_COMPROMISED]


class DecryptionFailed(KlmError):
    """Authentication of a ciphertext or wrapped key failed (wrong key, AAD, nonce or tag)."""

    code = "decryption_failed"


@dataclass(frozen=True, slots=True)
class UsageVersion:
    version: int
    state: KeyState
    wrapped: bytes | None
    hsm_object_id: bytes | None
    public_der: bytes | None


@dataclass(frozen=True, slots=True)
class UsageKey:
    """A key as the keystore knows it, with its versions (material wrapped only)."""

    key_id: str
    owner: str
    algorithm: Algorithm
    size: int
    curve: str | None
    usages: frozenset[Usage]
    state: KeyState
    primary_version: int
    versions: Mapping[int, UsageVersion]


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission to run one operation on one version."""

    key: UsageKey
    version: UsageVersion
    warning: str | None = None


def effective_state(key: UsageKey, version: UsageVersion) -> KeyState:
    return max(key.state, version.state, key=_SEVERITY.index)


def authorise(request: CryptoRequest, operation: Operation, key: UsageKey | None) -> Grant:
    """Decide one request; raise the coded refusal (see the module doc for the order)."""
    if key is None:
        raise KeyNotFound(f"no key {request.key_id}")
    if request.owner != key.owner:
        raise Forbidden(f"{request.key_id} does not belong to tenant {request.owner!r}")
    if operation.usage not in key.usages:
        raise UsageNotPermitted(
            f"{request.key_id} is not permitted to {operation.value} "
            f"(usages: {', '.join(sorted(u.value for u in key.usages))})")
    number = key.primary_version if operation.protects else \
        (getattr(request, "version", None) or key.primary_version)
    version = key.versions.get(number)
    if version is None:
        raise KeyNotFound(f"{request.key_id} has no version {number}")
    state = effective_state(key, version)
    allowed = PROTECT_STATES if operation.protects else PROCESS_STATES
    if state not in allowed:
        raise KeyNotActive(f"{request.key_id} v{number} is {state.value}: it cannot "
                           f"{operation.value}", state=state.value, version=number)
    warning = None
    if state is KeyState.COMPROMISED:
        warning = (f"{request.key_id} v{number} is compromised: the result may have been "
                   "forged or disclosed; re-protect the data under a new key")
    return Grant(key, version, warning)


def reply_topic_allowed(topic: str, prefix: str) -> bool:
    """Keygen writes replies only under its configured prefix (no arbitrary topics)."""
    return topic.startswith(prefix) and len(topic) > len(prefix) and \
        _SAFE_TOPIC.fullmatch(topic) is not None


_SAFE_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def decode_b64(value: str | None, what: str) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestInvalid(f"{what} is not valid base64") from None


def b64(value: bytes | None) -> str | None:
    return base64.b64encode(value).decode() if value is not None else None


def answer_id(request_id: str, what: str) -> str:
    """Deterministic ids: a redelivered request makes identical replies and denials."""
    return str(uuid.uuid5(KLM_NAMESPACE, f"{request_id}/{what}"))


def reply_event(request: CloudEvent, operation: str, reply: CryptoReply) -> CloudEvent:
    """The reply envelope, as ``make_event`` would build it (correlation and causation from
    the request). Built without re-validation — every field comes from validated models —
    because this runs once per operation on the hot path."""
    return CloudEvent.model_construct(
        id=answer_id(request.id, "reply"), source=SOURCE, type=CryptoReply.event_type,
        time=now(), subject=reply.key_id, correlationid=request.correlationid or request.id,
        causationid=request.id, data=reply.model_dump(mode="json", exclude_none=True))


def refusal(request: CloudEvent, operation: str, error: KlmError,
            key_id: str | None) -> CloudEvent:
    """The reply to a request that was not carried out."""
    reply = CryptoReply(operation=operation, ok=False, code=error.code, message=error.message,
                        key_id=key_id)
    return reply_event(request, operation, reply)


def denial_fact(request: CloudEvent, data: CryptoRequest, operation: Operation,
                error: KlmError, key: UsageKey) -> CloudEvent:
    """``klm.key.usage_denied``: misuse attempts are visible to auditors."""
    version = error.details.get("version")
    tenant = error.details.get("tenant")  # the tenant whose topic it came from, if any
    fact = UsageDenied(key_id=key.key_id, owner=key.owner, operation=operation.value,
                       code=error.code, requester=request.source,
                       version=version if isinstance(version, int) else None,
                       tenant=tenant if isinstance(tenant, str) else data.owner,
                       message=error.message[:500])
    return make_event(UsageDenied.event_type, fact, source=SOURCE, subject=key.key_id,
                      cause=request, event_id=answer_id(request.id, "usage_denied"))


# ---- usage summaries ----------------------------------------------------------------------
@dataclass
class _KeyTally:
    owner: str
    last_used_at: datetime
    operations: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    warnings: int = 0

    @property
    def total(self) -> int:
        return sum(self.operations.values())


class UsageTally:
    """Counts successful uses per key over an interval; drained into one
    ``klm.key.usage_summary`` fact per used key (not one event per operation)."""

    def __init__(self, started: datetime) -> None:
        self.started = started
        self._keys: dict[str, _KeyTally] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, grant: Grant, operation: Operation, at: datetime) -> None:
        tally = self._keys.get(grant.key.key_id)
        if tally is None:
            tally = self._keys[grant.key.key_id] = _KeyTally(grant.key.owner, at)
        tally.last_used_at = max(tally.last_used_at, at)
        tally.operations[operation.value] = tally.operations.get(operation.value, 0) + 1
        version = str(grant.version.version)
        tally.versions[version] = tally.versions.get(version, 0) + 1
        tally.warnings += grant.warning is not None

    def drain(self, ended: datetime) -> list[UsageSummary]:
        """The summaries of the interval that ends now; the tally starts a new interval."""
        summaries = [
            UsageSummary(key_id=key_id, owner=t.owner, interval_start=self.started,
                         interval_end=ended, last_used_at=t.last_used_at, total=t.total,
                         operations=dict(t.operations), versions=dict(t.versions),
                         warnings=t.warnings)
            for key_id, t in self._keys.items()]
        self._keys = {}
        self.started = ended
        return summaries


def summary_event(summary: UsageSummary) -> CloudEvent:
    event_id = answer_id(f"{summary.key_id}@{summary.interval_start.isoformat()}", "usage")
    return make_event(UsageSummary.event_type, summary, source=SOURCE, subject=summary.key_id,
                      event_id=event_id, time=summary.interval_end)
