"""The backup store (backup's Postgres schema). A batch runs in one :class:`Unit` — one
transaction holding the inbox claim, the blobs and the outbox — so a backup is reported
(``klm.key.backed_up`` in the outbox) exactly when it is durable."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from klm_backup.domain.integrity import StoredBackup
from klm_common import inbox
from klm_common.envelope import CloudEvent
from klm_common.errors import StoreUnavailable
from klm_common.events import BackupFailure
from klm_common.outbox import add_to_outbox

_UNREACHABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.InterfaceError)
#: a constant; the f-strings below only splice it (never input) — hence the S608 noqa
_BACKUP_COLUMNS = ("backup_id, key_id, version, metadata, blob, blob_sha256, skip_reason, "
                   "backup_kek_kcv, tag")


@dataclass(frozen=True, slots=True)
class KeyRow:
    key_id: str
    owner: str
    state: str
    primary_version: int
    generated: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class DrillRow:
    drill_id: str
    sampled: int
    pending: int
    passed: int
    failures: list[BackupFailure]


def _backup(r: asyncpg.Record) -> StoredBackup:
    return StoredBackup(r["backup_id"], r["key_id"], r["version"], r["metadata"],
                        bytes(r["blob"]) if r["blob"] is not None else None, r["blob_sha256"],
                        r["skip_reason"], r["backup_kek_kcv"], bytes(r["tag"]))


class Unit:
    """The operations of one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self._keys: list[tuple[str, str, str, int | None, str | None]] = []

    async def claim(self, event_ids: Sequence[str]) -> set[str]:
        return await inbox.claim(self.conn, event_ids)

    async def emit(self, topic: str, events: Sequence[CloudEvent]) -> None:
        await add_to_outbox(self.conn, topic, events)

    # ---- keys ---------------------------------------------------------------------------
    def note_key(self, key_id: str, owner: str, state: str, primary_version: int | None,
                 generated: dict[str, Any] | None = None) -> None:
        """Queue what a fact says about a key; written by :meth:`flush_keys` (one round trip
        per batch), which every read of ``backup_keys`` calls first."""
        self._keys.append((key_id, owner, state, primary_version,
                           json.dumps(generated) if generated is not None else None))

    async def flush_keys(self) -> None:
        rows, self._keys = self._keys, []
        if rows:
            await self.conn.executemany(
                """INSERT INTO backup_keys (key_id, owner, state, primary_version, generated)
                   VALUES ($1, $2, $3, coalesce($4, 1), $5)
                   ON CONFLICT (key_id) DO UPDATE
                      SET state = EXCLUDED.state,
                          primary_version = coalesce($4, backup_keys.primary_version),
                          generated = coalesce(EXCLUDED.generated, backup_keys.generated),
                          updated_at = now()""", rows)

    async def states(self, key_ids: Sequence[str]) -> dict[str, str]:
        await self.flush_keys()
        rows = await self.conn.fetch(
            "SELECT key_id, state FROM backup_keys WHERE key_id = ANY($1::text[])",
            list(key_ids))
        return {r["key_id"]: r["state"] for r in rows}

    async def key(self, key_id: str) -> KeyRow | None:
        await self.flush_keys()
        r = await self.conn.fetchrow("SELECT * FROM backup_keys WHERE key_id = $1", key_id)
        if r is None:
            return None
        return KeyRow(r["key_id"], r["owner"], r["state"], r["primary_version"],
                      json.loads(r["generated"]) if r["generated"] else None)

    async def destroyed(self, key_ids: Sequence[str]) -> set[str]:
        rows = await self.conn.fetch(
            "SELECT key_id FROM destroyed_keys WHERE key_id = ANY($1::text[])", list(key_ids))
        return {r["key_id"] for r in rows}

    # ---- blobs --------------------------------------------------------------------------
    async def insert_backups(self, backups: Sequence[StoredBackup]) -> set[str]:
        """Store new backups; return the ids actually inserted (a replay inserts none)."""
        if not backups:
            return set()
        rows = await self.conn.fetch(
            f"""INSERT INTO backups ({_BACKUP_COLUMNS})
                SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[],
                                     $5::bytea[], $6::text[], $7::text[], $8::text[],
                                     $9::bytea[])
                ON CONFLICT DO NOTHING RETURNING backup_id""",  # noqa: S608
            [b.backup_id for b in backups], [b.key_id for b in backups],
            [b.version for b in backups], [b.metadata for b in backups],
            [b.blob for b in backups], [b.blob_sha256 for b in backups],
            [b.skip_reason for b in backups], [b.backup_kek_kcv for b in backups],
            [b.tag for b in backups])
        return {r["backup_id"] for r in rows}

    async def backups_of(self, key_id: str, version: int | None = None) -> list[StoredBackup]:
        rows = await self.conn.fetch(
            f"""SELECT {_BACKUP_COLUMNS} FROM backups
                 WHERE key_id = $1 AND ($2::int IS NULL OR version = $2) ORDER BY version""",  # noqa: S608
            key_id, version)
        return [_backup(r) for r in rows]

    async def live_backups(self) -> list[tuple[StoredBackup, KeyRow | None]]:
        """Every backup of a key not destroyed, with what backup knows of its key."""
        await self.flush_keys()
        rows = await self.conn.fetch(
            f"""SELECT b.{_BACKUP_COLUMNS.replace(', ', ', b.')},
                       k.owner, k.state, k.primary_version
                  FROM backups b LEFT JOIN backup_keys k USING (key_id)
                 WHERE NOT EXISTS (SELECT 1 FROM destroyed_keys d WHERE d.key_id = b.key_id)
                 ORDER BY b.key_id, b.version""")  # noqa: S608
        return [(_backup(r), KeyRow(r["key_id"], r["owner"], r["state"], r["primary_version"],
                                    None) if r["state"] else None) for r in rows]

    async def sample(self, size: int) -> list[StoredBackup]:
        rows = await self.conn.fetch(
            f"""SELECT {_BACKUP_COLUMNS} FROM backups WHERE blob IS NOT NULL
                 ORDER BY random() LIMIT $1""", size)  # noqa: S608
        return [_backup(r) for r in rows]

    async def shred(self, key_id: str, destroyed_event_id: str) -> list[StoredBackup]:
        """Crypto-shredding: delete the key's blobs, keep their digests as evidence, and
        remember the key is destroyed so that no late blob of it is ever stored."""
        await self.conn.execute(
            "INSERT INTO destroyed_keys (key_id, destroyed_event_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING", key_id, destroyed_event_id)
        rows = await self.conn.fetch(
            f"DELETE FROM backups WHERE key_id = $1 RETURNING {_BACKUP_COLUMNS}", key_id)  # noqa: S608
        gone = [_backup(r) for r in rows]
        await self.conn.executemany(
            "INSERT INTO shred_log (backup_id, key_id, version, blob_sha256) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            [(b.backup_id, b.key_id, b.version, b.blob_sha256) for b in gone])
        return gone

    # ---- drills and recoveries ----------------------------------------------------------
    async def start_drill(self, drill_id: str, sampled: int, pending: int, passed: int,
                          failures: Sequence[BackupFailure]) -> None:
        await self.conn.execute(
            "INSERT INTO drills (drill_id, sampled, pending, passed, failures, finished_at) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, CASE WHEN $3 = 0 THEN now() END)",
            drill_id, sampled, pending, passed, _failures_json(failures))

    async def drill_answered(self, drill_id: str, passed: int,
                             failures: Sequence[BackupFailure]) -> DrillRow | None:
        """Record one answered check command; the drill row after it (None: unknown)."""
        r = await self.conn.fetchrow(
            """UPDATE drills SET pending = pending - 1, passed = passed + $2,
                                 failures = failures || $3::jsonb,
                                 finished_at = CASE WHEN pending = 1 THEN now() END
                WHERE drill_id = $1 AND pending > 0
            RETURNING drill_id, sampled, pending, passed, failures""",
            drill_id, passed, _failures_json(failures))
        if r is None:
            return None
        return DrillRow(r["drill_id"], r["sampled"], r["pending"], r["passed"],
                        [BackupFailure.model_validate(f) for f in json.loads(r["failures"])])

    async def record_recovery(self, recovery_id: str, keys: int, versions: int,
                              refused: Sequence[BackupFailure]) -> None:
        await self.conn.execute(
            "INSERT INTO recoveries (recovery_id, keys, versions, refused) "
            "VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT DO NOTHING",
            recovery_id, keys, versions, _failures_json(refused))


def _failures_json(failures: Sequence[BackupFailure]) -> str:
    return json.dumps([f.model_dump(mode="json") for f in failures])


class PgBackupStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def processed(self, event_ids: Sequence[str]) -> set[str]:
        try:
            return await inbox.already_processed(self._pool, event_ids)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"backup store unreachable: {type(exc).__name__}") from exc

    @contextlib.asynccontextmanager
    async def unit(self) -> AsyncIterator[Unit]:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                unit = Unit(conn)
                yield unit
                await unit.flush_keys()
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"backup store unreachable: {type(exc).__name__}") from exc

    async def counts(self) -> dict[str, int]:
        r = await self._pool.fetchrow(
            "SELECT count(*) FILTER (WHERE blob IS NOT NULL) AS wrapped, "
            "count(*) FILTER (WHERE blob IS NULL) AS public_only FROM backups")
        return {"wrapped": r["wrapped"], "public_only": r["public_only"]}
