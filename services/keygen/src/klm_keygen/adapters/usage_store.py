"""Keygen's Postgres side of key usage: read keys for authorisation, record refusals and
usage summaries (each with its facts in the outbox, in one transaction)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import asyncpg

from klm_common.algorithms import Algorithm, Usage
from klm_common.envelope import CloudEvent
from klm_common.errors import StoreUnavailable
from klm_common.events import UsageSummary
from klm_common.outbox import add_to_outbox
from klm_common.states import KeyState
from klm_keygen.domain.usage import UsageKey, UsageVersion

_DB_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.InterfaceError,
              asyncpg.exceptions.CannotConnectNowError)


class UsageStorePort(Protocol):
    async def load_keys(self, key_ids: Sequence[str]) -> dict[str, UsageKey]: ...

    async def record_denials(self, facts: Sequence[CloudEvent]) -> None: ...

    async def record_usage(self, summaries: Sequence[UsageSummary],
                           facts: Sequence[CloudEvent]) -> None: ...


class PgUsageStore:
    def __init__(self, pool: asyncpg.Pool, lifecycle_topic: str) -> None:
        self._pool = pool
        self._topic = lifecycle_topic

    async def load_keys(self, key_ids: Sequence[str]) -> dict[str, UsageKey]:
        """The keys of a batch with every version (one round trip; no lock: a usage reads
        the committed state, and a state change evicts cached handles)."""
        if not key_ids:
            return {}
        try:
            rows = await self._pool.fetch(
                """SELECT k.key_id, k.owner, k.algorithm, k.size, k.curve, k.usages, k.state,
                          k.primary_version, v.version, v.state AS version_state, v.wrapped,
                          v.hsm_object_id, v.public_der
                   FROM keys k JOIN key_versions v USING (key_id)
                   WHERE k.key_id = ANY($1::text[]) ORDER BY k.key_id, v.version""",
                sorted(set(key_ids)))
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc
        return _keys(rows)

    async def record_denials(self, facts: Sequence[CloudEvent]) -> None:
        if not facts:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await add_to_outbox(conn, self._topic, facts)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    async def record_usage(self, summaries: Sequence[UsageSummary],
                           facts: Sequence[CloudEvent]) -> None:
        """Last-used time and counts per key, with the summary facts, in one transaction."""
        if not summaries:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    """INSERT INTO key_usage AS u (key_id, last_used_at, use_count)
                       VALUES ($1, $2, $3)
                       ON CONFLICT (key_id) DO UPDATE
                       SET last_used_at = GREATEST(u.last_used_at, EXCLUDED.last_used_at),
                           use_count = u.use_count + EXCLUDED.use_count, updated_at = now()""",
                    [(s.key_id, s.last_used_at, s.total) for s in summaries])
                await add_to_outbox(conn, self._topic, facts)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc


def _keys(rows: Sequence[asyncpg.Record]) -> dict[str, UsageKey]:
    versions: dict[str, dict[int, UsageVersion]] = {}
    heads: dict[str, asyncpg.Record] = {}
    for row in rows:
        heads.setdefault(row["key_id"], row)
        versions.setdefault(row["key_id"], {})[row["version"]] = UsageVersion(
            version=row["version"], state=KeyState(row["version_state"]),
            wrapped=_bytes(row["wrapped"]), hsm_object_id=_bytes(row["hsm_object_id"]),
            public_der=_bytes(row["public_der"]))
    return {key_id: UsageKey(
        key_id=key_id, owner=row["owner"], algorithm=Algorithm(row["algorithm"]),
        size=row["size"], curve=row["curve"],
        usages=frozenset(Usage(u) for u in row["usages"]), state=KeyState(row["state"]),
        primary_version=row["primary_version"], versions=versions[key_id])
        for key_id, row in heads.items()}


def _bytes(value: bytes | None) -> bytes | None:
    return bytes(value) if value is not None else None
