"""Keygen's side of backup and recovery: the commands of the backup service on
``klm.backup.commands`` (the backup service never holds an HSM session).

* ``klm.backup.wrap_versions`` → each version re-wrapped under the backup KEK → one
  ``klm.backup.versions_wrapped`` reply on ``klm.backup``;
* ``klm.backup.restore_versions`` → the versions of one key unwrapped from the backup KEK,
  proven (KCV / public key), re-wrapped under the master KEK (or re-created on the token),
  written to the keystore → ``klm.key.restored`` or ``klm.request.rejected`` on
  ``klm.lifecycle``;
* ``klm.backup.check_blobs`` (restore drill) → unwrapped into scratch session objects only,
  observed and destroyed → ``klm.backup.blobs_checked`` on ``klm.backup``.

A batch: parse (bad → DLQ) → skip commands already handled (inbox) → HSM work → one
transaction (inbox + keystore + outbox) → offsets committed. Infrastructure errors (HSM,
Postgres, a missing backup KEK) leave the batch uncommitted: it is redelivered.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRecord

from klm_common.envelope import CloudEvent, make_event
from klm_common.errors import InfrastructureError, KlmError, RequestInvalid
from klm_common.events import (
    BackupFailure,
    BackupMaterial,
    BackupsChecked,
    CheckBackups,
    KeyRestored,
    RequestRejected,
    RestoreKey,
    RestoreVersions,
    VersionsWrapped,
    WrapForBackup,
    parse_data,
)
from klm_common.kafka import DeadLetters, Inbound, split_batch, subscriber_options
from klm_common.topics import Topics
from klm_keygen.adapters.backup_keystore import (
    BackupKeystorePort,
    KeyRestore,
    Outgoing,
    PgBackupKeystore,
)
from klm_keygen.adapters.hsm_backup import (
    RestoredVersion,
    backup_kek_kcv,
    check_blobs,
    find_backup_kek,
    restore_versions,
    wrap_for_backup,
)
from klm_keygen.domain.generation import answer_id

if TYPE_CHECKING:
    from klm_keygen.adapters.hsm import Pkcs11Hsm
    from klm_keygen.bootstrap import Keygen

log = logging.getLogger(__name__)
GROUP_ID = "klm-keygen-backup"
SOURCE = "klm/keygen"


@dataclass
class BackupDeps:
    hsm: Pkcs11Hsm
    keystore: BackupKeystorePort
    topics: Topics
    dead_letters: DeadLetters
    on_commit: Callable[[], None] = lambda: None
    retry_delay: float = 1.0


@dataclass
class Work:
    """What a batch produced before it is committed."""

    restores: list[KeyRestore] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)


def register(keygen: Keygen) -> None:
    """Subscribe the ``klm.backup.commands`` batch handler."""
    deps = BackupDeps(hsm=keygen.hsm, keystore=PgBackupKeystore(keygen.pool),
                      topics=keygen.topics,
                      dead_letters=DeadLetters(keygen.broker, keygen.topics, "keygen-backup"),
                      on_commit=keygen.relay.wake)
    options = subscriber_options(keygen.settings, GROUP_ID)

    @keygen.broker.subscriber(keygen.topics.backup_commands, **options)
    async def on_backup_commands(records: list[Any]) -> None:
        await handle_backup_batch(records, deps)


async def handle_backup_batch(records: Sequence[ConsumerRecord[bytes, bytes]],
                              deps: BackupDeps) -> None:
    try:
        await _handle(records, deps)
    except InfrastructureError as exc:
        log.warning("backup batch not served (%s: %s); it will be redelivered",
                    exc.code, exc.message)
        await asyncio.sleep(deps.retry_delay)
        raise


async def _handle(records: Sequence[ConsumerRecord[bytes, bytes]], deps: BackupDeps) -> None:
    inbound = _dedupe(await split_batch(records, deps.dead_letters))
    done = await deps.keystore.processed([i.event.id for i in inbound])
    fresh = [i for i in inbound if i.event.id not in done]
    if not fresh:
        return
    work = Work()
    wraps: list[tuple[CloudEvent, WrapForBackup]] = []
    restores: list[tuple[CloudEvent, RestoreVersions]] = []
    letters = []
    for item in fresh:
        try:
            data = parse_data(item.event)
        except KlmError as exc:
            letters.append(deps.dead_letters.letter(item.record, exc.message))
            continue
        if isinstance(data, WrapForBackup):
            wraps.append((item.event, data))
        elif isinstance(data, RestoreVersions):
            restores.append((item.event, data))
        elif isinstance(data, CheckBackups):
            await check(item.event, data, deps, work)
        else:
            letters.append(deps.dead_letters.letter(
                item.record, f"keygen does not serve {item.event.type!r} on this topic"))
    await wrap(wraps, deps, work)
    await restore(restores, deps, work)
    await deps.dead_letters.publish(letters)
    await deps.keystore.commit([i.event.id for i in fresh], work.restores, work.outgoing)
    deps.on_commit()


def _dedupe(inbound: list[Inbound]) -> list[Inbound]:
    """The same command twice in one batch is handled once."""
    seen: set[str] = set()
    out = []
    for item in inbound:
        if item.event.id not in seen:
            seen.add(item.event.id)
            out.append(item)
    return out


# ---- klm.backup.wrap_versions ---------------------------------------------------------------
async def wrap(commands: Sequence[tuple[CloudEvent, WrapForBackup]], deps: BackupDeps,
               work: Work) -> None:
    """One keystore read and one HSM round trip for every version of every command."""
    if not commands:
        return
    refs = [ref for _, data in commands for ref in data.versions]
    rows = await deps.keystore.versions(refs)
    present = [rows[(r.key_id, r.version)] for r in refs if (r.key_id, r.version) in rows]
    blobs = dict(zip([(r.material.key_id, r.material.version) for r in present],
                     await deps.hsm.run(wrap_for_backup, present), strict=True))
    kek_kcv = await deps.hsm.run(backup_kek_kcv)
    for command, data in commands:
        materials, failures = [], []
        for ref in data.versions:
            key = (ref.key_id, ref.version)
            outcome = blobs.get(key)
            if isinstance(outcome, bytes):
                materials.append(rows[key].material.model_copy(update={
                    "blob_b64": _b64(outcome), "backup_kek_kcv": kek_kcv}))
            else:
                error = outcome or KlmError("no live version in the keystore (destroyed or "
                                            "never generated)")
                code = "key_not_found" if outcome is None else error.code
                failures.append(BackupFailure(key_id=ref.key_id, version=ref.version,
                                              code=code, message=error.message))
        reply = make_event(VersionsWrapped.event_type,
                           VersionsWrapped(materials=materials, failures=failures),
                           source=SOURCE, cause=command,
                           event_id=answer_id(command.id, "wrapped"))
        work.outgoing.append(Outgoing(command.id, deps.topics.backup, reply))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# ---- klm.backup.restore_versions ------------------------------------------------------------
async def restore(commands: Sequence[tuple[CloudEvent, RestoreVersions]], deps: BackupDeps,
                  work: Work) -> None:
    """One HSM round trip for the batch; per key all versions or none; the one answer to
    each restore goes to lifecycle."""
    if not commands:
        return
    outcomes = await deps.hsm.run(restore_keys, [data for _, data in commands])
    for (command, data), outcome in zip(commands, outcomes, strict=True):
        if isinstance(outcome, KlmError):
            work.outgoing.append(Outgoing(command.id, deps.topics.lifecycle,
                                          _rejected(command, data.key_id, outcome)))
            continue
        work.restores.append(KeyRestore(command.id, data.key_state, data.primary_version,
                                        outcome))
        work.outgoing.append(Outgoing(command.id, deps.topics.lifecycle,
                                      _restored_fact(command, data)))


def restore_keys(session: Any, master_kek: Any, commands: Sequence[RestoreVersions]
                 ) -> list[list[RestoredVersion] | KlmError]:
    """On the HSM thread: each command's versions, or the coded error that stopped it."""
    out: list[list[RestoredVersion] | KlmError] = []
    needs_kek = any(m.blob_b64 for data in commands for m in data.materials)
    backup_kek = find_backup_kek(session) if needs_kek else None
    for data in commands:
        try:
            _same_key(data)
            out.append(restore_versions(session, master_kek, data.materials, backup_kek))
        except InfrastructureError:
            raise
        except KlmError as exc:
            out.append(exc)
    return out


def _same_key(data: RestoreVersions) -> None:
    if any(m.key_id != data.key_id for m in data.materials):
        raise RequestInvalid("a restore command carries versions of another key")


def _restored_fact(command: CloudEvent, data: RestoreVersions) -> CloudEvent:
    newest: BackupMaterial = max(data.materials, key=lambda m: m.version)
    by_version = dict(zip([m.version for m in data.materials], data.backup_ids, strict=True))
    fact = KeyRestored(key_id=data.key_id, owner=newest.owner, state=data.key_state,
                       version=newest.version, backup_id=by_version[newest.version],
                       versions=sorted(by_version), recovery_id=data.recovery_id)
    return make_event(KeyRestored.event_type, fact, source=SOURCE, subject=data.key_id,
                      cause=command, event_id=answer_id(command.id, "restored"))


def _rejected(command: CloudEvent, key_id: str, error: KlmError) -> CloudEvent:
    data = RequestRejected(code=error.code, message=error.message,
                           request_type=RestoreKey.event_type, key_id=key_id)
    return make_event(RequestRejected.event_type, data, source=SOURCE, subject=key_id,
                      cause=command, event_id=answer_id(command.id, "rejected"))


# ---- klm.backup.check_blobs (restore drill) -------------------------------------------------
async def check(command: CloudEvent, data: CheckBackups, deps: BackupDeps, work: Work) -> None:
    results = await deps.hsm.run(check_blobs, data.materials)
    reply = make_event(BackupsChecked.event_type,
                       BackupsChecked(drill_id=data.drill_id, results=results),
                       source=SOURCE, cause=command, event_id=answer_id(command.id, "checked"))
    work.outgoing.append(Outgoing(command.id, deps.topics.backup, reply))
