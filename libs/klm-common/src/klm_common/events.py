"""Every event of the public contract, as frozen pydantic models — defined here and nowhere else.

An event's ``type`` names its payload class through :data:`EVENT_TYPES`; look a class up
by that name (``GenerateKey`` is the data of ``klm.request.generate_key``). Facts carry
metadata only — never private or secret key material.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klm_common.envelope import SCHEMA_VERSION, CloudEvent, validation_message
from klm_common.errors import RequestInvalid, UnknownRequestType, UnsupportedSchemaVersion

KEY_ID_PATTERN = r"^klm:key:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
OWNER_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
KeyId = str


class EventData(BaseModel):
    """Base of every payload; ``event_type`` is the CloudEvent ``type`` it travels under."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    event_type: ClassVar[str]


# ============================== requests (topic klm.requests) ==============================
class GenerateKey(EventData):
    event_type = "klm.request.generate_key"
    owner: str = Field(pattern=OWNER_PATTERN, description="tenant that owns the key")
    name: str = Field(min_length=1, max_length=200)
    algorithm: str = Field(min_length=1, max_length=32)
    size: int | None = Field(default=None, ge=1, le=16384)
    curve: str | None = Field(default=None, max_length=32)
    usages: list[str] | None = Field(default=None, max_length=8)
    protection: Literal["hsm-wrapped", "hsm-resident"] = "hsm-wrapped"
    policy: str | None = Field(default=None, max_length=100)
    profile: str | None = Field(default=None, max_length=100)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    activation_date: datetime | None = None
    subject: dict[str, str] | None = Field(default=None, description="CSR subject, profiles")
    sans: list[str] | None = Field(default=None, max_length=100)


class _KeyRequest(EventData):
    key_id: KeyId = Field(pattern=KEY_ID_PATTERN)
    reason: str | None = Field(default=None, max_length=500)


class RotateKey(_KeyRequest):
    event_type = "klm.request.rotate_key"
    deactivate_previous: bool = Field(
        default=False, description="policy: the previous version stops processing at once "
        "(klm.key.version_deactivated); by default it stays able to decrypt/verify/unwrap")


class SuspendKey(_KeyRequest):
    event_type = "klm.request.suspend_key"


class ReactivateKey(_KeyRequest):
    event_type = "klm.request.reactivate_key"


class RevokeKey(EventData):
    event_type = "klm.request.revoke_key"
    key_id: KeyId = Field(pattern=KEY_ID_PATTERN)
    reason: Literal["compromised", "superseded", "cessation"]
    compromise_date: datetime | None = None
    comment: str | None = Field(default=None, max_length=500)


class ScheduleDestruction(_KeyRequest):
    event_type = "klm.request.schedule_destruction"
    waiting_days: int = Field(default=30, ge=7, le=30)
    override: bool = False


class CancelDestruction(_KeyRequest):
    event_type = "klm.request.cancel_destruction"


class BackupKey(_KeyRequest):
    event_type = "klm.request.backup_key"
    version: int | None = Field(default=None, ge=1)


class RestoreKey(_KeyRequest):
    event_type = "klm.request.restore_key"
    version: int | None = Field(default=None, ge=1)



# ============= inventory requests (topic klm.inventory.requests, served by rotation) =============
class ImportObservedKey(EventData):
    """Put a key KLM did not generate (discovered elsewhere) into the inventory, metadata only,
    so the compliance scan covers it. Answered by ``klm.key.observed`` or a rejection."""

    event_type = "klm.request.import_observed_key"
    key_id: KeyId | None = Field(default=None, pattern=KEY_ID_PATTERN,
                                 description="default: derived from the request id")
    owner: str = Field(pattern=OWNER_PATTERN)
    name: str = Field(min_length=1, max_length=200)
    algorithm: str = Field(min_length=1, max_length=32, description="as found, e.g. HMAC-SHA1")
    size: int = Field(ge=1, le=16384)
    curve: str | None = Field(default=None, max_length=32)
    usages: list[str] = Field(min_length=1, max_length=8)
    profile: str | None = Field(default=None, max_length=100)
    policy: str | None = Field(default=None, max_length=100)
    location: str = Field(min_length=1, max_length=500, description="where the key lives")
    created_at: datetime = Field(description="when the key (its current version) was made")
    fingerprint_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)

# ===================== internal commands to keygen (topic klm.commands) =====================
class DestroyKey(_KeyRequest):
    """Sent by rotation when a scheduled destruction is due."""

    event_type = "klm.command.destroy_key"


class DeactivateVersion(EventData):
    """Sent by rotation when an old version's process-only period ends."""

    event_type = "klm.command.deactivate_version"
    key_id: KeyId = Field(pattern=KEY_ID_PATTERN)
    version: int = Field(ge=1)


class SignCheckpoint(EventData):
    """Sent by audit every N events or T seconds: keygen signs the chain head with its
    HSM-resident checkpoint key and answers ``klm.audit.checkpoint`` (docs/audit.md)."""

    event_type = "klm.command.sign_checkpoint"
    sequence: int = Field(ge=1, lt=2**63, description="audit_log sequence of the head")
    head_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 chain hash")
    time: datetime = Field(description="when audit read this head (signed with it)")


# ========== usage operations (topic klm.crypto.requests → the requester's reply topic) ==========
#: base64 (RFC 4648 §4, padded) of binary fields; decoded and checked by keygen
B64_PATTERN = r"^[A-Za-z0-9+/]*={0,2}$"
#: a safe Kafka topic name; keygen also requires its configured reply-topic prefix
REPLY_TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
#: reply topics live under <topic prefix> + this (keygen writes nowhere else)
REPLY_TOPIC_BASE = "klm.crypto.replies."
HashName = Literal["SHA-256", "SHA-384", "SHA-512"]
_B64_MAX = 350_000  # a record is at most 256 KiB anyway


class _CryptoRequest(EventData):
    """A usage operation: keygen answers on ``reply_to`` with a :class:`CryptoReply` whose
    ``correlationid`` is this request's ``id``."""

    key_id: KeyId = Field(pattern=KEY_ID_PATTERN)
    owner: str = Field(pattern=OWNER_PATTERN, description="tenant the operation is asked for")
    reply_to: str = Field(pattern=REPLY_TOPIC_PATTERN,
                          description="topic for the reply: <prefix>klm.crypto.replies.<name>")


class CryptoSign(_CryptoRequest):
    """Sign with the primary version: ECDSA (DER signature), Ed25519, RSA-PSS or PKCS#1 v1.5."""

    event_type = "klm.crypto.sign"
    data_b64: str = Field(pattern=B64_PATTERN, max_length=_B64_MAX)
    hash: HashName | None = Field(default=None, description="default: by curve/size")
    scheme: Literal["pss", "pkcs1v15"] | None = Field(default=None, description="RSA only")


class CryptoVerify(_CryptoRequest):
    event_type = "klm.crypto.verify"
    data_b64: str = Field(pattern=B64_PATTERN, max_length=_B64_MAX)
    signature_b64: str = Field(pattern=B64_PATTERN, max_length=2048)
    version: int | None = Field(default=None, ge=1, description="from the signature envelope")
    hash: HashName | None = None
    scheme: Literal["pss", "pkcs1v15"] | None = None


class CryptoEncrypt(_CryptoRequest):
    """AES-GCM (96-bit nonce from the HSM, 128-bit tag) or RSA-OAEP (SHA-256)."""

    event_type = "klm.crypto.encrypt"
    plaintext_b64: str = Field(pattern=B64_PATTERN, max_length=_B64_MAX)
    aad_b64: str | None = Field(default=None, pattern=B64_PATTERN, max_length=65536,
                                description="associated data (GCM) or OAEP label")


class CryptoDecrypt(_CryptoRequest):
    event_type = "klm.crypto.decrypt"
    version: int = Field(ge=1, description="from the ciphertext envelope")
    ciphertext_b64: str = Field(pattern=B64_PATTERN, max_length=_B64_MAX)
    nonce_b64: str | None = Field(default=None, pattern=B64_PATTERN, max_length=512)
    aad_b64: str | None = Field(default=None, pattern=B64_PATTERN, max_length=65536)


class CryptoMac(_CryptoRequest):
    event_type = "klm.crypto.mac"
    data_b64: str = Field(pattern=B64_PATTERN, max_length=_B64_MAX)


class CryptoMacVerify(_CryptoRequest):
    event_type = "klm.crypto.mac_verify"
    data_b64: str = Field(pattern=B64_PATTERN, max_length=_B64_MAX)
    mac_b64: str = Field(pattern=B64_PATTERN, max_length=128)
    version: int | None = Field(default=None, ge=1)


class CryptoWrap(_CryptoRequest):
    """Wrap caller key material (e.g. a data key) under an AES key with AES-KWP (RFC 5649)."""

    event_type = "klm.crypto.wrap"
    key_b64: str = Field(pattern=B64_PATTERN, max_length=1400)


class CryptoUnwrap(_CryptoRequest):
    event_type = "klm.crypto.unwrap"
    wrapped_b64: str = Field(pattern=B64_PATTERN, max_length=1400)
    version: int = Field(ge=1)


class CryptoReply(EventData):
    """The one answer to a ``klm.crypto.*`` request. ``ok`` false carries ``code``/``message``
    (usage_not_permitted, key_not_active, forbidden, key_not_found, invalid_request, ...).
    ``key_id`` + ``version`` + ``algorithm`` form the envelope of a signature or ciphertext."""

    event_type = "klm.crypto.reply"
    operation: str
    ok: bool
    code: str | None = None
    message: str | None = None
    key_id: str | None = None
    version: int | None = None
    algorithm: str | None = None
    warning: str | None = Field(default=None, description="e.g. the version is compromised")
    signature_b64: str | None = None
    valid: bool | None = Field(default=None, description="verify / mac_verify outcome")
    ciphertext_b64: str | None = None
    nonce_b64: str | None = None
    plaintext_b64: str | None = None
    mac_b64: str | None = None
    wrapped_b64: str | None = None
    key_b64: str | None = None


# ============================ facts (topic klm.lifecycle) ============================
class KeyMetadata(EventData):
    """What every fact about a key says about it (no material, ever)."""

    key_id: KeyId
    owner: str
    state: str


class KeyGenerated(KeyMetadata):
    event_type = "klm.key.generated"
    name: str
    algorithm: str
    size: int
    curve: str | None = None
    usages: list[str]
    protection: str
    policy: str | None = None
    profile: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    version: int
    created_at: datetime
    activation_date: datetime | None = None
    protect_until: datetime | None = None
    public_key_pem: str | None = None
    fingerprint_sha256: str | None = Field(default=None, description="SHA-256 of the SPKI, hex")
    kcv: str | None = Field(default=None, description="key check value of a secret key, hex")
    csr_pem: str | None = None


class KeyActivated(KeyMetadata):
    event_type = "klm.key.activated"
    version: int
    activation_date: datetime


class KeyRotated(KeyMetadata):
    event_type = "klm.key.rotated"
    version: int
    previous_version: int
    created_at: datetime
    public_key_pem: str | None = None
    fingerprint_sha256: str | None = None
    kcv: str | None = None
    csr_pem: str | None = None
    reason: str | None = None


class KeyVersionDeactivated(KeyMetadata):
    event_type = "klm.key.version_deactivated"
    version: int


class _StateChange(KeyMetadata):
    previous_state: str
    reason: str | None = None


class KeySuspended(_StateChange):
    event_type = "klm.key.suspended"


class KeyReactivated(_StateChange):
    event_type = "klm.key.reactivated"


class KeyCompromised(_StateChange):
    event_type = "klm.key.compromised"
    compromise_date: datetime | None = None


class KeyDeactivated(_StateChange):
    event_type = "klm.key.deactivated"


class DestructionScheduled(KeyMetadata):
    event_type = "klm.key.destruction_scheduled"
    destroy_after: datetime
    waiting_days: int
    override: bool = False


class DestructionCancelled(KeyMetadata):
    event_type = "klm.key.destruction_cancelled"


class KeyDestroyed(_StateChange):
    event_type = "klm.key.destroyed"
    versions: list[int]
    evidence: dict[str, Any] = Field(default_factory=dict)


class KeyOrphanDestroyed(EventData):
    """keygen found an hsm-resident object with no keystore row (a crash between the HSM call
    and the commit) and destroyed it; no key ever existed for it, so there is no key_id."""

    event_type = "klm.key.orphan_destroyed"
    hsm_object_id: str = Field(description="CKA_ID, hex")
    label: str
    object_classes: list[str]
    token_label: str


class KeyBackedUp(KeyMetadata):
    event_type = "klm.key.backed_up"
    version: int
    backup_id: str | None = None
    skipped: bool = False
    skip_reason: str | None = None


class KeyRestored(KeyMetadata):
    event_type = "klm.key.restored"
    version: int
    backup_id: str
    versions: list[int] = Field(default_factory=list,
                                description="every version restored (``version`` is the newest)")
    recovery_id: str | None = Field(default=None, description="the disaster recovery run, if any")


class PolicyViolation(EventData):
    event_type = "klm.key.policy_violation"
    key_id: KeyId
    owner: str
    code: str
    severity: Literal["info", "low", "medium", "high", "critical"]
    rule: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    cleared: bool = False



class KeyObserved(KeyMetadata):
    """A key KLM did not generate is in the inventory (answer to import_observed_key)."""

    event_type = "klm.key.observed"
    name: str
    algorithm: str
    size: int
    curve: str | None = None
    usages: list[str]
    profile: str | None = None
    policy: str | None = None
    location: str
    created_at: datetime
    fingerprint_sha256: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class PolicyChanged(EventData):
    """A crypto policy in force changed (loaded at start or reloaded), one event per policy
    of the set (the default one and each named one)."""

    event_type = "klm.policy.changed"
    name: str
    version: int
    sha256: str
    previous_sha256: str | None = None
    path: str
    changed: list[str] = Field(default_factory=list, description="sections that differ")
    loaded_by: str
    removed: bool = Field(default=False, description="the policy is no longer loaded (its "
                          "file left the policy directory); keys naming it follow the "
                          "default policy and get a policy_unknown finding")

class UsageDenied(EventData):
    event_type = "klm.key.usage_denied"
    key_id: KeyId
    owner: str
    operation: str
    code: str
    requester: str
    version: int | None = None
    tenant: str | None = Field(default=None, description="tenant the refused request named")
    message: str | None = None


class UsageSummary(EventData):
    """Successful uses of one key in one interval (one fact per key and interval, not one
    per operation): counts by operation and version, and the last-used time."""

    event_type = "klm.key.usage_summary"
    key_id: KeyId
    owner: str
    interval_start: datetime
    interval_end: datetime
    last_used_at: datetime
    total: int
    operations: dict[str, int]
    versions: dict[str, int] = Field(default_factory=dict)
    warnings: int = Field(default=0, description="uses of a compromised version")


class AuditCheckpoint(EventData):
    """A chain head signed by keygen's HSM checkpoint key. The signed message is
    ``b"KLM-AUDIT-CHECKPOINT-1" || uint64_be(sequence) || head_hash (32 bytes) ||
    int64_be(time in µs since the Unix epoch)`` (docs/audit.md)."""

    event_type = "klm.audit.checkpoint"
    sequence: int
    head_hash: str
    signature: str | None = None
    signing_key_id: str | None = None
    time: datetime | None = Field(default=None, description="the signed time")
    algorithm: str | None = Field(default=None, description="e.g. ECDSA-P256-SHA256 "
                                  "(signature: base64 DER)")
    public_key: str | None = Field(default=None, description="base64 DER SubjectPublicKeyInfo "
                                   "of the signing key; signing_key_id is its SHA-256 (hex)")


#: domain separation of the checkpoint signature (see :func:`checkpoint_message`)
CHECKPOINT_CONTEXT = b"KLM-AUDIT-CHECKPOINT-1"


def checkpoint_message(sequence: int, head_hash: str, time: datetime) -> bytes:
    """The exact bytes keygen signs for a checkpoint and every verifier rebuilds:
    ``CHECKPOINT_CONTEXT || uint64_be(sequence) || head_hash (32 raw bytes) ||
    int64_be(µs since 1970-01-01T00:00:00Z)``."""
    micros = (time - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return (CHECKPOINT_CONTEXT + sequence.to_bytes(8, "big") + bytes.fromhex(head_hash)
            + micros.to_bytes(8, "big", signed=True))


class AccessDenied(EventData):
    """An audit API call that was refused (401/403/404 across tenants) is itself recorded."""

    event_type = "klm.audit.access_denied"
    status: int
    reason: str
    method: str
    path: str = Field(max_length=1000)
    client: str | None = None
    token_id: str | None = None
    owner: str | None = None
    dropped_before: int | None = Field(default=None, description="denials not recorded "
                                       "individually because the queue was full")


class RequestRejected(EventData):
    """The one answer to a request that KLM will not carry out."""

    event_type = "klm.request.rejected"
    code: str
    message: str
    request_type: str
    key_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class DeadLetter(EventData):
    """What ``klm.dlq`` holds: the original bytes, where they came from and why they are here."""

    event_type = "klm.dlq.dead_letter"
    original_b64: str
    original_key_b64: str | None = None
    topic: str
    partition: int
    offset: int
    error: str
    consumer: str


# ====== internal: backup service ⇄ keygen (topics klm.backup.commands → keygen, klm.backup) ======
class BackupMaterial(BaseModel):
    """One key version as the backup service keeps it: metadata, public facts and the
    material wrapped (AES-KWP) under the backup KEK — never clear material. ``blob_b64`` is
    None for a version whose policy forbids backing up its private half (public-only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key_id: KeyId = Field(pattern=KEY_ID_PATTERN)
    version: int = Field(ge=1)
    owner: str
    name: str
    algorithm: str
    size: int
    curve: str | None = None
    usages: list[str]
    protection: str
    policy: str | None = None
    profile: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    key_created_at: datetime
    version_state: str
    version_created_at: datetime
    public_der_b64: str | None = None
    kcv: str | None = None
    hsm_object_id_hex: str | None = None
    blob_b64: str | None = Field(default=None, max_length=16384)
    backup_kek_kcv: str | None = None


class VersionRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    key_id: KeyId = Field(pattern=KEY_ID_PATTERN)
    version: int = Field(ge=1)


class WrapForBackup(EventData):
    """backup → keygen: wrap these versions under the backup KEK."""

    event_type = "klm.backup.wrap_versions"
    versions: list[VersionRef] = Field(min_length=1, max_length=500)


class BackupFailure(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    key_id: str
    version: int
    code: str
    message: str


class VersionsWrapped(EventData):
    """keygen → backup: the wrapped blobs (and the versions that could not be wrapped)."""

    event_type = "klm.backup.versions_wrapped"
    materials: list[BackupMaterial] = Field(default_factory=list)
    failures: list[BackupFailure] = Field(default_factory=list)


class RestoreVersions(EventData):
    """backup → keygen: put these versions of one key back into the keystore/HSM; keygen
    answers with ``klm.key.restored`` or ``klm.request.rejected``."""

    event_type = "klm.backup.restore_versions"
    key_id: KeyId = Field(pattern=KEY_ID_PATTERN)
    key_state: str
    primary_version: int = Field(ge=1)
    materials: list[BackupMaterial] = Field(min_length=1, max_length=60)
    backup_ids: list[str] = Field(min_length=1, max_length=60)
    recovery_id: str | None = None


class CheckBackups(EventData):
    """backup → keygen (restore drill): unwrap each blob into a scratch session object,
    report its key check value / fingerprint, destroy it; the keystore is not touched."""

    event_type = "klm.backup.check_blobs"
    drill_id: str
    materials: list[BackupMaterial] = Field(min_length=1, max_length=60)


class BlobCheck(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    key_id: str
    version: int
    kcv: str | None = None
    fingerprint_sha256: str | None = None
    code: str | None = Field(default=None, description="why the blob did not unwrap")
    message: str | None = None


class BackupsChecked(EventData):
    event_type = "klm.backup.blobs_checked"
    drill_id: str
    results: list[BlobCheck]


class RecoverAll(EventData):
    """operator → backup (``klm backup recover``): restore every non-destroyed key."""

    event_type = "klm.backup.recover_all"
    reason: str = Field(default="disaster recovery", max_length=500)


class StartDrill(EventData):
    """operator → backup: run a restore drill now (drills also run on a schedule)."""

    event_type = "klm.backup.start_drill"
    sample: int = Field(default=20, ge=1, le=1000)


# ========================== backup facts (topic klm.lifecycle) ==========================
class BackupShredded(EventData):
    """Crypto-shredding evidence: the backups of a destroyed key are gone."""

    event_type = "klm.backup.shredded"
    key_id: KeyId
    owner: str | None = None
    versions: list[int]
    backup_ids: list[str]
    blob_sha256: list[str]
    destroyed_event_id: str


class DrillCompleted(EventData):
    event_type = "klm.backup.drill_completed"
    drill_id: str
    sampled: int
    passed: int
    failed: int
    failures: list[BackupFailure] = Field(default_factory=list)


class RecoveryStarted(EventData):
    event_type = "klm.backup.recovery_started"
    recovery_id: str
    keys: int
    versions: int
    refused: list[BackupFailure] = Field(default_factory=list)


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.event_type: cls
    for cls in (
        GenerateKey, RotateKey, SuspendKey, ReactivateKey, RevokeKey, ScheduleDestruction,
        CancelDestruction, BackupKey, RestoreKey, DestroyKey, DeactivateVersion,
        SignCheckpoint,
        KeyGenerated, KeyActivated, KeyRotated, KeyVersionDeactivated, KeySuspended,
        KeyReactivated, KeyCompromised, KeyDeactivated, DestructionScheduled,
        DestructionCancelled, KeyDestroyed, KeyOrphanDestroyed, KeyBackedUp, KeyRestored,
        PolicyViolation, UsageDenied, AuditCheckpoint, AccessDenied, RequestRejected,
        DeadLetter,
        CryptoSign, CryptoVerify, CryptoEncrypt, CryptoDecrypt, CryptoMac, CryptoMacVerify,
        CryptoWrap, CryptoUnwrap, CryptoReply, UsageSummary,
        ImportObservedKey, KeyObserved, PolicyChanged,
        WrapForBackup, VersionsWrapped, RestoreVersions, CheckBackups, BackupsChecked,
        RecoverAll, StartDrill, BackupShredded, DrillCompleted, RecoveryStarted,
    )
}
REQUEST_TYPES = frozenset(t for t in EVENT_TYPES if t.startswith("klm.request.")) - {
    RequestRejected.event_type}


def parse_data(event: CloudEvent) -> EventData:
    """Typed payload of an envelope; coded :class:`RequestInvalid` errors for bad payloads."""
    if event.klmschema > SCHEMA_VERSION or event.klmschema < 1:
        raise UnsupportedSchemaVersion(
            f"klmschema {event.klmschema} is not supported (this KLM reads 1..{SCHEMA_VERSION})")
    cls = EVENT_TYPES.get(event.type)
    if cls is None:
        raise UnknownRequestType(f"unknown event type {event.type!r}")
    try:
        return cls.model_validate(event.data)
    except ValidationError as exc:
        raise RequestInvalid(f"{event.type}: {validation_message(exc)}") from None
