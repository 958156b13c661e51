"""Keygen's keystore as the backup path sees it: read versions to wrap for backup, write
restored versions back — each batch in ONE transaction with the inbox and the outbox."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from klm_common import inbox
from klm_common.envelope import CloudEvent
from klm_common.errors import StoreUnavailable
from klm_common.events import BackupMaterial, VersionRef
from klm_common.outbox import add_to_outbox
from klm_keygen.adapters.hsm import MASTER_KEK_LABEL
from klm_keygen.adapters.hsm_backup import RestoredVersion, VersionRow


@dataclass(frozen=True, slots=True)
class KeyRestore:
    """Versions of one key to (re)write, and the state the key had when it was lost."""

    command_id: str
    key_state: str
    primary_version: int
    versions: Sequence[RestoredVersion]


@dataclass(frozen=True, slots=True)
class Outgoing:
    command_id: str
    topic: str
    event: CloudEvent


class BackupKeystorePort(Protocol):
    async def processed(self, command_ids: Sequence[str]) -> set[str]: ...

    async def versions(self, refs: Sequence[VersionRef]) -> dict[tuple[str, int], VersionRow]: ...

    async def commit(self, command_ids: Sequence[str], restores: Sequence[KeyRestore],
                     outgoing: Sequence[Outgoing]) -> set[str]: ...


_SELECT_VERSIONS = """
SELECT k.key_id, k.owner, k.name, k.algorithm, k.size, k.curve, k.usages, k.protection,
       k.policy, k.profile, k.labels, k.created_at AS key_created_at, v.version,
       v.state, v.created_at, v.public_der, v.kcv, v.hsm_object_id, v.wrapped, v.destroyed_at
  FROM key_versions v JOIN keys k USING (key_id)
 WHERE (v.key_id, v.version) IN (SELECT * FROM unnest($1::text[], $2::int[]))"""


class PgBackupKeystore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def processed(self, command_ids: Sequence[str]) -> set[str]:
        try:
            return await inbox.already_processed(self._pool, command_ids)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    async def versions(self, refs: Sequence[VersionRef]) -> dict[tuple[str, int], VersionRow]:
        """The live (not destroyed) versions among ``refs``."""
        if not refs:
            return {}
        try:
            rows = await self._pool.fetch(_SELECT_VERSIONS, [r.key_id for r in refs],
                                          [r.version for r in refs])
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc
        return {(r["key_id"], r["version"]): _row(r) for r in rows
                if r["destroyed_at"] is None and (r["wrapped"] or r["hsm_object_id"])}

    async def commit(self, command_ids: Sequence[str], restores: Sequence[KeyRestore],
                     outgoing: Sequence[Outgoing]) -> set[str]:
        """Claim the commands; write the restores and queue the events of claimed ones."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                claimed = await inbox.claim(conn, command_ids)
                await _write_restores(conn, [r for r in restores if r.command_id in claimed])
                for topic in {o.topic for o in outgoing}:
                    await add_to_outbox(conn, topic, [o.event for o in outgoing
                                                      if o.topic == topic
                                                      and o.command_id in claimed])
                return claimed
        except (OSError, asyncpg.PostgresConnectionError,
                asyncpg.exceptions.InterfaceError) as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc


def _row(r: asyncpg.Record) -> VersionRow:
    material = BackupMaterial(
        key_id=r["key_id"], version=r["version"], owner=r["owner"], name=r["name"],
        algorithm=r["algorithm"], size=r["size"], curve=r["curve"], usages=list(r["usages"]),
        protection=r["protection"], policy=r["policy"], profile=r["profile"],
        labels=json.loads(r["labels"]) if isinstance(r["labels"], str) else dict(r["labels"]),
        key_created_at=r["key_created_at"], version_state=r["state"],
        version_created_at=r["created_at"],
        public_der_b64=base64.b64encode(r["public_der"]).decode() if r["public_der"] else None,
        kcv=r["kcv"],
        hsm_object_id_hex=bytes(r["hsm_object_id"]).hex() if r["hsm_object_id"] else None)
    return VersionRow(material, bytes(r["wrapped"]) if r["wrapped"] else None)


async def _write_restores(conn: asyncpg.Connection, restores: Sequence[KeyRestore]) -> None:
    """Insert the keys the keystore lost; (re)write each version's material — unless keygen
    destroyed that version meanwhile (a destroyed version is never brought back)."""
    if not restores:
        return
    await conn.executemany(
        """INSERT INTO keys (key_id, owner, name, algorithm, size, curve, usages, protection,
                             policy, profile, labels, state, primary_version, request_id,
                             created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15, now())
           ON CONFLICT (key_id) DO NOTHING""",
        [(m.key_id, m.owner, m.name, m.algorithm, m.size, m.curve, m.usages, m.protection,
          m.policy, m.profile, json.dumps(m.labels), r.key_state, r.primary_version,
          f"restored:{m.key_id}", m.key_created_at)
         for r in restores for m in [r.versions[0].material]])
    await conn.executemany(
        """INSERT INTO key_versions (key_id, version, state, wrapped, kek_label, public_der,
                                     kcv, hsm_object_id, created_at, activated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (key_id, version) DO UPDATE
              SET wrapped = EXCLUDED.wrapped, kek_label = EXCLUDED.kek_label
            WHERE key_versions.destroyed_at IS NULL""",
        [_version_row(v) for r in restores for v in r.versions])
    # a first version inserted does not notify (migrations/004): forget the restored keys
    await conn.execute("SELECT pg_notify('klm_key_changed', k) FROM unnest($1::text[]) k",
                       sorted({r.versions[0].material.key_id for r in restores}))


def _version_row(v: RestoredVersion) -> tuple[object, ...]:
    m = v.material
    return (m.key_id, m.version, m.version_state, v.wrapped,
            MASTER_KEK_LABEL if v.wrapped else None,
            base64.b64decode(m.public_der_b64) if m.public_der_b64 else None, m.kcv,
            bytes.fromhex(m.hsm_object_id_hex) if m.hsm_object_id_hex else None,
            m.version_created_at, m.version_created_at if m.version_state == "active" else None)
