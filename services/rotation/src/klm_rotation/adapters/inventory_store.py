"""The inventory in rotation's Postgres schema (migrations 001–005): inbox, keys, due-work
schedule, findings, scan cursor, policy state (one row per policy) and outbox — one
transaction per unit of work. Rows are touched in key order so concurrent units of work
cannot deadlock."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import asyncpg
from opentelemetry import propagate

from klm_common import inbox
from klm_common.envelope import CloudEvent
from klm_common.outbox import add_to_outbox
from klm_common.policy import CryptoPolicy
from klm_rotation.domain.compliance import Changes, Finding
from klm_rotation.domain.inventory import (
    UNKNOWN_PROTECTION,
    InventoryFigures,
    InventoryKey,
    Version,
    algorithm_label,
)
from klm_rotation.domain.schedule import Due, DueRow
from klm_rotation.ports import RecordedPolicy, RowId

#: constant SQL fragments (never input): the f-strings below only splice these in
_KEY_COLUMNS = (
    "key_id, owner, name, algorithm, size, curve, usages, profile, policy, origin, location, "
    "state, primary_version, primary_since, created_at, versions, last_used_at, "
    "compromised_at, destroy_after, destruction_override, rejections, protection")


def key_from_row(row: asyncpg.Record) -> InventoryKey:
    versions = {int(n): Version.from_json(v) for n, v in json.loads(row["versions"]).items()}
    return InventoryKey(
        key_id=row["key_id"], owner=row["owner"], name=row["name"],
        algorithm=row["algorithm"], size=row["size"], curve=row["curve"],
        usages=tuple(row["usages"]), profile=row["profile"], policy=row["policy"],
        origin=row["origin"], location=row["location"], state=row["state"],
        primary_version=row["primary_version"], primary_since=row["primary_since"],
        created_at=row["created_at"], versions=versions, last_used_at=row["last_used_at"],
        compromised_at=row["compromised_at"], destroy_after=row["destroy_after"],
        destruction_override=row["destruction_override"],
        rejections=json.loads(row["rejections"]) if row["rejections"] != "{}" else {},
        protection=row["protection"])


def key_to_row(k: InventoryKey) -> tuple[Any, ...]:
    versions = json.dumps({str(n): v.to_json() for n, v in k.versions.items()})
    return (k.key_id, k.owner, k.name, k.algorithm, k.size, k.curve, list(k.usages), k.profile,
            k.policy, k.origin, k.location, k.state, k.primary_version, k.primary_since,
            k.created_at, versions, k.last_used_at, k.compromised_at, k.destroy_after,
            k.destruction_override, json.dumps(k.rejections), k.protection)


_UPSERT_KEY = f"""
INSERT INTO keys ({_KEY_COLUMNS}) VALUES
  ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16::jsonb, $17, $18,
   $19, $20, $21::jsonb, $22)
ON CONFLICT (key_id) DO UPDATE SET
  owner = EXCLUDED.owner, name = EXCLUDED.name, algorithm = EXCLUDED.algorithm,
  size = EXCLUDED.size, curve = EXCLUDED.curve, usages = EXCLUDED.usages,
  profile = EXCLUDED.profile, policy = EXCLUDED.policy, origin = EXCLUDED.origin,
  location = EXCLUDED.location, state = EXCLUDED.state,
  primary_version = EXCLUDED.primary_version, primary_since = EXCLUDED.primary_since,
  created_at = EXCLUDED.created_at, versions = EXCLUDED.versions,
  last_used_at = EXCLUDED.last_used_at, compromised_at = EXCLUDED.compromised_at,
  destroy_after = EXCLUDED.destroy_after, destruction_override = EXCLUDED.destruction_override,
  rejections = EXCLUDED.rejections, protection = EXCLUDED.protection,
  updated_at = now()"""  # noqa: S608

#: below this many events the shared helper's per-row INSERT is as good
_FEW = 50
#: serialises policy recording across instances (one klm.policy.changed per change)
POLICY_LOCK_ID = 7243501
_ROWS = "unnest($1::text[], $2::text[], $3::int[]) AS r(key_id, kind, version)"


def _row_arrays(rows: Sequence[RowId]) -> tuple[list[str], list[str], list[int]]:
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


class PgTx:
    """One unit of work on one connection inside one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def claim(self, event_ids: Sequence[str]) -> set[str]:
        return await inbox.claim(self.conn, event_ids)

    async def load_keys(self, key_ids: Sequence[str]) -> dict[str, InventoryKey]:
        rows = await self.conn.fetch(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = ANY($1::text[]) "  # noqa: S608
            "ORDER BY key_id FOR UPDATE", sorted(set(key_ids)))
        return {r["key_id"]: key_from_row(r) for r in rows}

    async def read_keys(self, key_ids: Sequence[str]) -> dict[str, InventoryKey]:
        rows = await self.conn.fetch(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = ANY($1::text[])",  # noqa: S608
            list(key_ids))
        return {r["key_id"]: key_from_row(r) for r in rows}

    async def save_keys(self, keys: Sequence[InventoryKey]) -> None:
        if keys:
            await self.conn.executemany(_UPSERT_KEY, [key_to_row(k) for k in
                                                      sorted(keys, key=lambda k: k.key_id)])

    async def planned(self, key_ids: Sequence[str]) -> dict[RowId, datetime]:
        rows = await self.conn.fetch(
            "SELECT key_id, kind, version, planned_at FROM schedule "
            "WHERE key_id = ANY($1::text[]) ORDER BY key_id, kind, version FOR UPDATE",
            sorted(set(key_ids)))
        return {(r["key_id"], r["kind"], r["version"]): r["planned_at"] for r in rows}

    async def write_schedule(self, upserts: Sequence[tuple[str, Due]],
                             deletes: Sequence[RowId]) -> None:
        if deletes:
            await self.conn.execute(
                f"DELETE FROM schedule s USING {_ROWS} WHERE s.key_id = r.key_id "  # noqa: S608
                "AND s.kind = r.kind AND s.version = r.version", *_row_arrays(deletes))
        if upserts:
            await self.conn.execute(
                """INSERT INTO schedule (key_id, kind, version, planned_at, due_at, reason)
                   SELECT k, c, v, p, p, why FROM unnest($1::text[], $2::text[], $3::int[],
                          $4::timestamptz[], $5::text[]) AS u(k, c, v, p, why)
                   ON CONFLICT (key_id, kind, version) DO UPDATE SET
                     planned_at = EXCLUDED.planned_at, due_at = EXCLUDED.due_at,
                     reason = EXCLUDED.reason, dispatched_at = NULL,
                     attempts = 0""",
                [k for k, _ in upserts], [d.kind for _, d in upserts],
                [d.version for _, d in upserts], [d.planned_at for _, d in upserts],
                [d.reason for _, d in upserts])

    async def claim_due(self, now: datetime, limit: int, rearm_at: datetime) -> list[DueRow]:
        rows = await self.conn.fetch(
            """WITH due AS (
                 SELECT key_id, kind, version FROM schedule WHERE due_at <= $1
                 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED)
               UPDATE schedule s SET due_at = $3, dispatched_at = $1, attempts = s.attempts + 1
               FROM due WHERE s.key_id = due.key_id AND s.kind = due.kind
                 AND s.version = due.version
               RETURNING s.key_id, s.kind, s.version, s.planned_at, s.reason""",
            now, limit, rearm_at)
        return [DueRow(r["key_id"], r["kind"], r["version"], r["planned_at"], r["reason"])
                for r in rows]

    async def postpone(self, rows: Sequence[RowId], due_at: datetime) -> None:
        if rows:
            await self.conn.execute(
                f"UPDATE schedule s SET due_at = $4 FROM {_ROWS} "  # noqa: S608
                "WHERE s.key_id = r.key_id AND s.kind = r.kind AND s.version = r.version",
                *_row_arrays(rows), due_at)

    async def delete_rows(self, rows: Sequence[RowId]) -> None:
        await self.write_schedule([], rows)

    async def findings_of(self, key_ids: Sequence[str]) -> dict[str, dict[str, Finding]]:
        rows = await self.conn.fetch(
            "SELECT key_id, code, severity, rule, evidence FROM findings "
            "WHERE key_id = ANY($1::text[])", list(key_ids))
        out: dict[str, dict[str, Finding]] = {}
        for r in rows:
            out.setdefault(r["key_id"], {})[r["code"]] = Finding(
                r["code"], r["severity"], r["rule"], json.loads(r["evidence"]))
        return out

    async def save_findings(self, changes: Changes) -> None:
        if changes.cleared:
            keys, codes = zip(*sorted(changes.cleared), strict=True)
            await self.conn.execute(
                "DELETE FROM findings f USING unnest($1::text[], $2::text[]) AS x(k, c) "
                "WHERE f.key_id = x.k AND f.code = x.c", list(keys), list(codes))
        if changes.raised:
            raised = sorted(changes.raised, key=lambda r: (r[0], r[1].code))
            await self.conn.executemany(
                "INSERT INTO findings (key_id, code, severity, rule, evidence) "
                "VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (key_id, code) DO UPDATE SET "
                "severity = EXCLUDED.severity, rule = EXCLUDED.rule, "
                "evidence = EXCLUDED.evidence, raised_at = now()",
                [(k, f.code, f.severity, f.rule, json.dumps(f.evidence)) for k, f in raised])

    async def outbox(self, topic: str, events: Sequence[CloudEvent]) -> None:
        """Like :func:`klm_common.outbox.add_to_outbox` (same rows, same trace headers), in
        ONE statement for the whole list: the dispatcher writes thousands per batch."""
        if len(events) < _FEW:
            await add_to_outbox(self.conn, topic, events)
            return
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        headers = json.dumps({"content-type": "application/cloudevents+json", **carrier})
        await self.conn.execute(
            "INSERT INTO outbox (topic, key, value, headers) "
            "SELECT $1, k, v, $4::jsonb FROM unnest($2::bytea[], $3::bytea[]) "
            "WITH ORDINALITY AS u(k, v, n) ORDER BY n",
            topic, [e.partition_key for e in events], [e.to_bytes() for e in events], headers)

    async def scan_page(self, limit: int) -> list[InventoryKey] | None:
        cursor = await self.conn.fetchrow(
            "SELECT after_key FROM scan_cursor WHERE id = 1 FOR UPDATE SKIP LOCKED")
        if cursor is None:
            return None
        rows = await self.conn.fetch(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id > $1 "  # noqa: S608
            "ORDER BY key_id LIMIT $2 "
            "FOR SHARE", cursor["after_key"], limit)
        if len(rows) < limit:  # end of a pass: the next page starts over
            await self.conn.execute("UPDATE scan_cursor SET after_key = '', "
                                    "passes = passes + 1, pass_started_at = now() WHERE id = 1")
        else:
            await self.conn.execute("UPDATE scan_cursor SET after_key = $1 WHERE id = 1",
                                    rows[-1]["key_id"])
        return [key_from_row(r) for r in rows]

    async def record_policy(self, policy: CryptoPolicy, path: str
                            ) -> tuple[bool, str | None, dict[str, Any] | None]:
        digest = policy.digest()
        await self.conn.execute("SELECT pg_advisory_xact_lock($1)", POLICY_LOCK_ID)
        row = await self.conn.fetchrow(
            "SELECT sha256, document FROM policy_state WHERE name = $1", policy.name)
        previous = row["sha256"] if row else None
        document = json.loads(row["document"]) if row else None
        if previous == digest:
            return False, previous, document
        await self.conn.execute(
            "INSERT INTO policy_state (name, version, sha256, document, path) "
            "VALUES ($1, $2, $3, $4::jsonb, $5) ON CONFLICT (name) DO UPDATE SET "
            "version = EXCLUDED.version, sha256 = EXCLUDED.sha256, "
            "document = EXCLUDED.document, path = EXCLUDED.path, loaded_at = now()",
            policy.name, policy.version, digest, json.dumps(policy.model_dump(mode="json")),
            path)
        await self.conn.execute("UPDATE scan_cursor SET after_key = '' WHERE id = 1")
        return True, previous, document

    async def forget_policies(self, keep: Sequence[str]) -> list[RecordedPolicy]:
        await self.conn.execute("SELECT pg_advisory_xact_lock($1)", POLICY_LOCK_ID)
        rows = await self.conn.fetch(
            "DELETE FROM policy_state WHERE NOT name = ANY($1::text[]) "
            "RETURNING name, version, sha256, path", list(keep))
        if rows:
            await self.conn.execute("UPDATE scan_cursor SET after_key = '' WHERE id = 1")
        return [RecordedPolicy(r["name"], r["version"], r["sha256"], r["path"])
                for r in sorted(rows, key=lambda r: r["name"])]


class PgInventory:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[PgTx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield PgTx(conn)

    async def finding_counts(self) -> dict[tuple[str, str], int]:
        rows = await self._pool.fetch(
            "SELECT code, severity, count(*) AS n FROM findings GROUP BY code, severity")
        return {(r["code"], r["severity"]): r["n"] for r in rows}

    async def next_due(self) -> datetime | None:
        value = await self._pool.fetchval("SELECT min(due_at) FROM schedule")
        return value if isinstance(value, datetime) else None

    async def figures(self, due_before: datetime) -> InventoryFigures:
        """One grouped pass over the keys, and the rotate rows due by ``due_before`` through
        the ``due_at`` index (its cost grows with the rows due, not the inventory)."""
        async with self._pool.acquire() as conn:
            groups = await conn.fetch(_KEY_GROUPS)
            due = await conn.fetchval(
                "SELECT count(*) FROM schedule WHERE due_at <= $1 AND kind = 'rotate'",
                due_before)
        keys: dict[tuple[str, str, str], int] = {}
        for r in groups:
            slot = (r["state"], algorithm_label(r["algorithm"], r["size"], r["curve"]),
                    r["protection"] or UNKNOWN_PROTECTION)
            keys[slot] = keys.get(slot, 0) + r["n"]
        oldest = min((r["oldest"] for r in groups if r["oldest"] is not None), default=None)
        return InventoryFigures(keys, oldest, int(due or 0))


#: keys by state, algorithm (with size or curve) and protection; the oldest primary version
#: of an active key
_KEY_GROUPS = """
SELECT state, algorithm, size, curve, protection, count(*) AS n,
       min(primary_since) FILTER (WHERE state = 'active') AS oldest
FROM keys GROUP BY state, algorithm, size, curve, protection"""
