"""The backup service's message handlers, one small function per message type.

Three subscriptions, each batch in ONE store transaction (inbox + blobs + outbox):

* ``klm.lifecycle`` — ``klm.key.generated`` / ``klm.key.rotated``: ask keygen to wrap the
  new version under the backup KEK (or record a public-only backup when policy forbids
  backing up the private half); ``klm.key.destroyed``: crypto-shred its backups; every
  fact: remember the key's state (a disaster recovery restores keys as they were).
* ``klm.backup`` — keygen's replies (``versions_wrapped`` → store + ``klm.key.backed_up``;
  ``blobs_checked`` → drill verdict) and operator commands (``recover_all``,
  ``start_drill``).
* ``klm.requests`` and every tenant's ``klm.requests.<tenant>`` — ``restore_key`` and
  ``backup_key`` only (keygen leaves them to us). A tenant's request is authorised as
  keygen authorises its own (:func:`klm_common.authorization.authorize`): only for a key
  the tenant owns, and only if the crypto policy grants it the request type.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord
from cryptography.hazmat.primitives import serialization
from opentelemetry import metrics

from klm_backup.adapters.store import PgBackupStore, Unit
from klm_backup.domain.drills import judge
from klm_backup.domain.eligibility import skip_reason
from klm_backup.domain.integrity import StoredBackup, backup_id
from klm_common.authorization import authorize, tenant_of_topic
from klm_common.envelope import CloudEvent, EnvelopeInvalid, make_event, new_id, parse_envelope
from klm_common.errors import Forbidden, InfrastructureError, IntegrityError, KeyNotFound, KlmError
from klm_common.events import (
    BackupFailure,
    BackupKey,
    BackupMaterial,
    BackupsChecked,
    BackupShredded,
    CheckBackups,
    DrillCompleted,
    KeyBackedUp,
    KeyDestroyed,
    KeyGenerated,
    KeyRotated,
    RecoverAll,
    RecoveryStarted,
    RequestRejected,
    RestoreKey,
    RestoreVersions,
    StartDrill,
    VersionRef,
    VersionsWrapped,
    WrapForBackup,
    parse_data,
)
from klm_common.kafka import KLM_NAMESPACE, DeadLetters, Inbound, split_batch
from klm_common.policy import CryptoPolicy
from klm_common.topics import Topics

log = logging.getLogger(__name__)
SOURCE = "klm/backup"
#: versions per restore/check command and per wrap command: the replies (metadata + blob,
#: up to ~3 KiB a version for RSA-4096) stay far below the 256 KiB envelope limit
CHUNK = 50
WRAP_CHUNK = 50


class KeyDestroyedError(KlmError):
    code = "key_destroyed"


class BackupNotFound(KlmError):
    code = "backup_not_found"


class Metrics:
    def __init__(self) -> None:
        meter = metrics.get_meter("klm.backup")
        self.backed_up = meter.create_counter("klm_backup_versions_backed_up",
                                              description="key versions backed up")
        self.skipped = meter.create_counter("klm_backup_versions_skipped",
                                            description="versions whose policy forbids backup")
        self.failed = meter.create_counter("klm_backup_wrap_failures")
        self.shredded = meter.create_counter("klm_backup_blobs_shredded")
        self.drills = meter.create_counter("klm_backup_drills",
                                           description="restore drills by result")
        self.drill_failed = meter.create_histogram("klm_backup_drill_failed_blobs",
                                                   description="failed blobs per drill")


@dataclass
class Deps:
    store: PgBackupStore
    topics: Topics
    tag_key: bytes
    dead_letters: DeadLetters
    on_commit: Callable[[], None] = lambda: None
    retry_delay: float = 1.0
    metrics: Metrics = field(default_factory=Metrics)
    #: the policy whose ``permissions`` say which tenant may request what (None: owner only)
    policy: CryptoPolicy | None = None


def answer(type_: str, data: Any, cause: CloudEvent, what: str,
           subject: str | None = None) -> CloudEvent:
    """A deterministic id: a redelivered cause makes an identical event (deduped)."""
    return make_event(type_, data, source=SOURCE, subject=subject, cause=cause,
                      event_id=str(uuid.uuid5(KLM_NAMESPACE, f"{cause.id}/backup/{what}")))


def command(type_: str, data: Any, cause: CloudEvent | None = None,
            subject: str | None = None) -> CloudEvent:
    if cause is None:  # a new conversation: keygen's reply correlates to this command
        return make_event(type_, data, source=SOURCE, subject=subject)
    return make_event(type_, data, source=SOURCE, subject=subject, cause=cause)


async def _batch(records: Sequence[ConsumerRecord[bytes, bytes]], deps: Deps,
                 apply: Callable[[Unit, list[CloudEvent], Deps], Any]) -> None:
    """parse → skip processed → one transaction → commit; infra errors → redelivery."""
    try:
        inbound = _dedupe(await split_batch(records, deps.dead_letters))
        done = await deps.store.processed([i.event.id for i in inbound])
        fresh = [i.event for i in inbound if i.event.id not in done]
        if not fresh:
            return
        async with deps.store.unit() as unit:
            claimed = await unit.claim([e.id for e in fresh])
            await apply(unit, [e for e in fresh if e.id in claimed], deps)
        deps.on_commit()
    except InfrastructureError as exc:
        log.warning("backup batch not served (%s); it will be redelivered", exc.code)
        await asyncio.sleep(deps.retry_delay)
        raise


def _dedupe(inbound: list[Inbound]) -> list[Inbound]:
    seen: set[str] = set()
    out = []
    for item in inbound:
        if item.event.id not in seen:
            seen.add(item.event.id)
            out.append(item)
    return out


# =============================== klm.lifecycle ===============================
async def handle_lifecycle(records: Sequence[ConsumerRecord[bytes, bytes]], deps: Deps) -> None:
    await _batch(records, deps, apply_lifecycle)


async def apply_lifecycle(unit: Unit, events: list[CloudEvent], deps: Deps) -> None:
    wraps: list[VersionRef] = []
    public_only: list[tuple[CloudEvent, StoredBackup]] = []
    for event in events:
        if event.type == KeyGenerated.event_type:
            await on_generated(unit, event, deps, wraps, public_only)
        elif event.type == KeyRotated.event_type:
            await on_rotated(unit, event, deps, wraps, public_only)
        elif event.type == KeyDestroyed.event_type:
            await on_destroyed(unit, event, deps)
        elif isinstance(event.data.get("key_id"), str) and isinstance(
                event.data.get("state"), str) and isinstance(event.data.get("owner"), str):
            unit.note_key(event.data["key_id"], event.data["owner"], event.data["state"], None)
    for cause, stored in public_only:
        await _store(unit, deps, [stored], cause, announce_all=False)
    await unit.emit(deps.topics.backup_commands, [
        command(WrapForBackup.event_type, WrapForBackup(versions=wraps[i:i + WRAP_CHUNK]))
        for i in range(0, len(wraps), WRAP_CHUNK)])


async def on_generated(unit: Unit, event: CloudEvent, deps: Deps, wraps: list[VersionRef],
                       public_only: list[tuple[CloudEvent, StoredBackup]]) -> None:
    fact = KeyGenerated.model_validate(event.data)
    unit.note_key(fact.key_id, fact.owner, fact.state, fact.version,
                  fact.model_dump(mode="json"))
    _back_up_version(event, deps, wraps, public_only, fact, fact.version,
                     fact.public_key_pem, fact.kcv, fact.created_at, fact.state)


async def on_rotated(unit: Unit, event: CloudEvent, deps: Deps, wraps: list[VersionRef],
                     public_only: list[tuple[CloudEvent, StoredBackup]]) -> None:
    fact = KeyRotated.model_validate(event.data)
    unit.note_key(fact.key_id, fact.owner, fact.state, fact.version)
    key = await unit.key(fact.key_id)
    generated = KeyGenerated.model_validate(key.generated) if key and key.generated else None
    if generated is None:  # generated before we listened: decide when keygen's reply comes
        wraps.append(VersionRef(key_id=fact.key_id, version=fact.version))
        return
    _back_up_version(event, deps, wraps, public_only, generated, fact.version,
                     fact.public_key_pem, fact.kcv, fact.created_at, "active")


def _back_up_version(event: CloudEvent, deps: Deps, wraps: list[VersionRef],
                     public_only: list[tuple[CloudEvent, StoredBackup]], key: KeyGenerated,
                     version: int, public_pem: str | None, kcv: str | None, created_at: Any,
                     version_state: str) -> None:
    """A wrap to ask keygen for, or — policy forbids backing up the private half — a
    public-only backup made from the fact alone."""
    reason = skip_reason(key.algorithm, key.usages, key.labels)
    if reason is None:
        wraps.append(VersionRef(key_id=key.key_id, version=version))
        return
    material = BackupMaterial(
        key_id=key.key_id, version=version, owner=key.owner, name=key.name,
        algorithm=key.algorithm, size=key.size, curve=key.curve, usages=key.usages,
        protection=key.protection, policy=key.policy, profile=key.profile, labels=key.labels,
        key_created_at=key.created_at, version_state=version_state,
        version_created_at=created_at, public_der_b64=_pem_to_der_b64(public_pem), kcv=kcv)
    public_only.append((event, StoredBackup.seal(deps.tag_key, material, reason)))


def _pem_to_der_b64(pem: str | None) -> str | None:
    if pem is None:
        return None
    der = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


async def on_destroyed(unit: Unit, event: CloudEvent, deps: Deps) -> None:
    fact = KeyDestroyed.model_validate(event.data)
    unit.note_key(fact.key_id, fact.owner, fact.state, None)
    gone = await unit.shred(fact.key_id, event.id)
    evidence = BackupShredded(key_id=fact.key_id, owner=fact.owner,
                              versions=[b.version for b in gone],
                              backup_ids=[b.backup_id for b in gone],
                              blob_sha256=[b.blob_sha256 or "" for b in gone],
                              destroyed_event_id=event.id)
    await unit.emit(deps.topics.lifecycle, [answer(BackupShredded.event_type, evidence, event,
                                                   "shredded", fact.key_id)])
    deps.metrics.shredded.add(len(gone))
    log.info("crypto-shredded %d backup(s) of destroyed key %s", len(gone), fact.key_id)


async def _store(unit: Unit, deps: Deps, backups: Sequence[StoredBackup], cause: CloudEvent,
                 announce_all: bool) -> None:
    """Insert the backups and, in the same transaction, queue their ``klm.key.backed_up``
    (for rows inserted now — or for all when the cause is a request awaiting its answer)."""
    inserted = await unit.insert_backups(backups)
    states = await unit.states([b.key_id for b in backups])
    facts = []
    for b in backups:
        if b.backup_id not in inserted and not announce_all:
            continue
        material = BackupMaterial.model_validate_json(b.metadata)
        fact = KeyBackedUp(key_id=b.key_id, owner=material.owner,
                           state=states.get(b.key_id, material.version_state),
                           version=b.version, backup_id=b.backup_id,
                           skipped=b.skip_reason is not None, skip_reason=b.skip_reason)
        facts.append(answer(KeyBackedUp.event_type, fact, cause,
                            f"backed_up/{b.key_id}#{b.version}", b.key_id))
        counter = deps.metrics.skipped if b.skip_reason else deps.metrics.backed_up
        counter.add(1)
    await unit.emit(deps.topics.lifecycle, facts)


# ================================ klm.backup =================================
async def handle_backup_topic(records: Sequence[ConsumerRecord[bytes, bytes]],
                              deps: Deps) -> None:
    await _batch(records, deps, apply_backup_topic)


async def apply_backup_topic(unit: Unit, events: list[CloudEvent], deps: Deps) -> None:
    for event in events:
        try:
            data = parse_data(event)
        except KlmError as exc:
            log.warning("ignoring %s on %s: %s", event.type, deps.topics.backup, exc)
            continue
        if isinstance(data, VersionsWrapped):
            await on_wrapped(unit, event, data, deps)
        elif isinstance(data, BackupsChecked):
            await on_checked(unit, event, data, deps)
        elif isinstance(data, RecoverAll):
            await recover_all(unit, event, deps)
        elif isinstance(data, StartDrill):
            await start_drill(unit, deps, data.sample, cause=event)


async def on_wrapped(unit: Unit, reply: CloudEvent, data: VersionsWrapped, deps: Deps) -> None:
    destroyed = await unit.destroyed([m.key_id for m in data.materials])
    rows = [StoredBackup.seal(deps.tag_key, m,
                              skip_reason(m.algorithm, m.usages, m.labels))
            for m in data.materials if m.key_id not in destroyed]
    # the command came from a backup_key request iff it had a correlation of its own
    for_request = reply.correlationid not in (None, reply.causationid)
    await _store(unit, deps, rows, reply, announce_all=for_request)
    for failure in data.failures:
        deps.metrics.failed.add(1)
        log.warning("keygen could not wrap %s#%d for backup: %s %s", failure.key_id,
                    failure.version, failure.code, failure.message)
    if for_request and data.failures and not rows:
        first = data.failures[0]
        await unit.emit(deps.topics.lifecycle, [_rejection(
            reply, BackupKey.event_type, first.key_id, KlmError(first.message), first.code)])


async def on_checked(unit: Unit, reply: CloudEvent, data: BackupsChecked, deps: Deps) -> None:
    """Judge one answered check command; when the drill's last one is in, publish it."""
    passed, failures = 0, []
    for result in data.results:
        stored = await unit.backups_of(result.key_id, result.version)
        if not stored:
            continue  # shredded meanwhile: neither a pass nor a failure
        failure = judge(BackupMaterial.model_validate_json(stored[0].metadata), result)
        if failure is None:
            passed += 1
        else:
            failures.append(failure)
    drill = await unit.drill_answered(data.drill_id, passed, failures)
    if drill is not None and drill.pending == 0:
        await _finish_drill(unit, deps, drill.drill_id, drill.sampled, drill.passed,
                            drill.failures, reply)


async def _finish_drill(unit: Unit, deps: Deps, drill_id: str, sampled: int, passed: int,
                        failures: Sequence[BackupFailure], cause: CloudEvent | None) -> None:
    result = DrillCompleted(drill_id=drill_id, sampled=sampled, passed=passed,
                            failed=len(failures), failures=list(failures))
    event = make_event(DrillCompleted.event_type, result, source=SOURCE, cause=cause,
                       event_id=str(uuid.uuid5(KLM_NAMESPACE, f"drill/{drill_id}")))
    await unit.emit(deps.topics.lifecycle, [event])
    deps.metrics.drills.add(1, {"result": "failed" if failures else "passed"})
    deps.metrics.drill_failed.record(len(failures))
    log.log(logging.WARNING if failures else logging.INFO,
            "restore drill %s: %d/%d passed", drill_id, passed, sampled)


async def start_drill(unit: Unit, deps: Deps, sample: int,
                      cause: CloudEvent | None = None) -> str:
    """Sample backups; tags are checked here, blobs are unwrapped by keygen (scratch)."""
    drill_id = str(uuid.uuid5(KLM_NAMESPACE, f"drill-of/{cause.id}")) if cause else new_id()
    picked = await unit.sample(sample)
    good, failures = _verify(picked, deps)
    chunks = [good[i:i + CHUNK] for i in range(0, len(good), CHUNK)]
    await unit.start_drill(drill_id, len(picked), len(chunks), 0, failures)
    await unit.emit(deps.topics.backup_commands, [
        command(CheckBackups.event_type, CheckBackups(drill_id=drill_id, materials=chunk),
                cause) for chunk in chunks])
    if not chunks:
        await _finish_drill(unit, deps, drill_id, len(picked), 0, failures, cause)
    return drill_id


def _verify(backups: Sequence[StoredBackup], deps: Deps
            ) -> tuple[list[BackupMaterial], list[BackupFailure]]:
    good, failures = [], []
    for b in backups:
        try:
            good.append(b.verified(deps.tag_key))
        except KlmError as exc:
            failures.append(BackupFailure(key_id=b.key_id, version=b.version, code=exc.code,
                                          message=exc.message))
    return good, failures


async def recover_all(unit: Unit, event: CloudEvent, deps: Deps) -> None:
    """Disaster recovery: one restore command per non-destroyed key, all its versions."""
    by_key: dict[str, list[StoredBackup]] = {}
    states: dict[str, tuple[str, int]] = {}
    for backup, key in await unit.live_backups():
        by_key.setdefault(backup.key_id, []).append(backup)
        if key is not None:
            states[backup.key_id] = (key.state, key.primary_version)
    commands, refused, versions = [], [], 0
    for key_id, stored in by_key.items():
        good, bad = _verify(stored, deps)
        refused.extend(bad)
        if not good:
            continue
        state, primary = states.get(key_id, (good[-1].version_state, good[-1].version))
        for chunk in _chunks(good):
            commands.append(command(RestoreVersions.event_type, RestoreVersions(
                key_id=key_id, key_state=state, primary_version=primary, materials=chunk,
                backup_ids=[backup_id(m.key_id, m.version) for m in chunk],
                recovery_id=event.id), event, key_id))
        versions += len(good)
    await unit.record_recovery(event.id, len(by_key), versions, refused)
    await unit.emit(deps.topics.backup_commands, commands)
    started = RecoveryStarted(recovery_id=event.id, keys=len(by_key), versions=versions,
                              refused=refused)
    await unit.emit(deps.topics.lifecycle, [answer(RecoveryStarted.event_type, started, event,
                                                   "recovery")])
    log.warning("disaster recovery %s: restoring %d version(s) of %d key(s); %d refused",
                event.id, versions, len(by_key), len(refused))


def _chunks(materials: list[BackupMaterial]) -> list[list[BackupMaterial]]:
    return [materials[i:i + CHUNK] for i in range(0, len(materials), CHUNK)]


# ================================ klm.requests ================================
SERVED = frozenset({RestoreKey.event_type, BackupKey.event_type})


async def handle_requests(records: Sequence[ConsumerRecord[bytes, bytes]], deps: Deps) -> None:
    """Only restore_key/backup_key; everything else (and unparseable records, which keygen
    sends to the DLQ) is keygen's business. The tenant of each request is the one whose
    topic it came from (None: the shared topic, written by operators only)."""
    ours: list[ConsumerRecord[bytes, bytes]] = []
    tenants: dict[str, str | None] = {}
    for record in records:
        try:
            event = parse_envelope(record.value)
        except EnvelopeInvalid:
            continue
        if event.type in SERVED:
            ours.append(record)
            tenants[event.id] = tenant_of_topic(record.topic)
    if ours:
        await _batch(ours, deps, functools.partial(apply_requests, tenants=tenants))


async def apply_requests(unit: Unit, events: list[CloudEvent], deps: Deps,
                         tenants: Mapping[str, str | None] | None = None) -> None:
    for request in events:
        try:
            data = parse_data(request)
            if isinstance(data, RestoreKey | BackupKey):
                await _authorize(unit, request, data.key_id, (tenants or {}).get(request.id),
                                 deps)
            if isinstance(data, RestoreKey):
                await restore_key(unit, request, data, deps)
            elif isinstance(data, BackupKey):
                await backup_key(unit, request, data, deps)
        except KlmError as exc:
            await unit.emit(deps.topics.lifecycle, [_rejection(
                request, request.type, request.subject or request.data.get("key_id"), exc)])


async def _authorize(unit: Unit, request: CloudEvent, key_id: str, tenant: str | None,
                     deps: Deps) -> None:
    """``forbidden`` unless the tenant owns the key and its policy grants the request; a
    tenant gets nothing on a key whose owner backup does not know."""
    if tenant is None:
        return
    key = await unit.key(key_id)
    if key is None:
        raise Forbidden(f"tenant {tenant!r} may act only on keys known to be its own",
                        tenant=tenant)
    authorize(tenant, request.type, key.owner, deps.policy)


async def restore_key(unit: Unit, request: CloudEvent, data: RestoreKey, deps: Deps) -> None:
    """Check the tags here; keygen unwraps, proves and re-wraps, and answers."""
    if await unit.destroyed([data.key_id]):
        raise KeyDestroyedError(f"{data.key_id} was destroyed: its backups were shredded")
    stored = await unit.backups_of(data.key_id, data.version)
    if not stored:
        what = f"version {data.version} of " if data.version else ""
        raise BackupNotFound(f"no backup of {what}{data.key_id}")
    good, bad = _verify(stored, deps)
    if bad:
        raise IntegrityError(bad[0].message)
    key = await unit.key(data.key_id)
    state, primary = (key.state, key.primary_version) if key else (
        good[-1].version_state, good[-1].version)
    restore = RestoreVersions(key_id=data.key_id, key_state=state, primary_version=primary,
                              materials=good, backup_ids=[b.backup_id for b in stored])
    await unit.emit(deps.topics.backup_commands,
                    [command(RestoreVersions.event_type, restore, request, data.key_id)])


async def backup_key(unit: Unit, request: CloudEvent, data: BackupKey, deps: Deps) -> None:
    """Answered with ``klm.key.backed_up`` once the backup is durable (now, if it is)."""
    if await unit.destroyed([data.key_id]):
        raise KeyDestroyedError(f"{data.key_id} was destroyed")
    key = await unit.key(data.key_id)
    if key is None:
        raise KeyNotFound(f"backup knows no key {data.key_id}")
    version = data.version or key.primary_version
    stored = await unit.backups_of(data.key_id, version)
    if stored:
        await _store(unit, deps, stored, request, announce_all=True)
        return
    await unit.emit(deps.topics.backup_commands, [command(
        WrapForBackup.event_type,
        WrapForBackup(versions=[VersionRef(key_id=data.key_id, version=version)]), request,
        data.key_id)])


def _rejection(request: CloudEvent, request_type: str, key_id: str | None, error: KlmError,
               code: str | None = None) -> CloudEvent:
    data = RequestRejected(code=code or error.code, message=error.message,
                           request_type=request_type, key_id=key_id)
    return answer(RequestRejected.event_type, data, request, "rejected", key_id)
