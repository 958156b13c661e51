"""The keystore (keygen's Postgres schema): keys, versions with wrapped material, inbox and
outbox — written in ONE transaction per batch, so a key exists iff its fact will be published."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol

import asyncpg

from klm_common import inbox
from klm_common.envelope import CloudEvent
from klm_common.errors import StoreUnavailable
from klm_common.outbox import add_to_outbox
from klm_keygen.adapters.hsm import MASTER_KEK_LABEL
from klm_keygen.domain.generation import NewKey


class KeystorePort(Protocol):
    async def processed(self, request_ids: Sequence[str]) -> set[str]: ...

    async def save(self, request_ids: Sequence[str], keys: Sequence[NewKey],
                   answers: Sequence[CloudEvent]) -> set[str]: ...

    async def count_keys(self) -> int: ...


class PgKeystore:
    def __init__(self, pool: asyncpg.Pool, lifecycle_topic: str) -> None:
        self._pool = pool
        self._topic = lifecycle_topic

    async def processed(self, request_ids: Sequence[str]) -> set[str]:
        try:
            return await inbox.already_processed(self._pool, request_ids)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    async def save(self, request_ids: Sequence[str], keys: Sequence[NewKey],
                   answers: Sequence[CloudEvent]) -> set[str]:
        """Claim the requests, store their keys and queue their answers; return the claimed
        ids. Keys and answers of a request claimed meanwhile by someone else are dropped."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                claimed = await inbox.claim(conn, request_ids)
                await _insert_keys(conn, [k for k in keys if k.plan.request.id in claimed])
                await add_to_outbox(conn, self._topic,
                                    [a for a in answers if a.correlationid in claimed])
                return claimed
        except (OSError, asyncpg.PostgresConnectionError,
                asyncpg.exceptions.InterfaceError) as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    async def count_keys(self) -> int:
        return int(await self._pool.fetchval("SELECT count(*) FROM keys"))


async def _insert_keys(conn: asyncpg.Connection, keys: Sequence[NewKey]) -> None:
    if not keys:
        return
    await conn.executemany(
        """INSERT INTO keys (key_id, owner, name, algorithm, size, curve, usages, protection,
                             policy, profile, labels, state, primary_version, request_id,
                             created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, 1, $13, $14, $14)""",
        [(k.plan.key_id, k.plan.data.owner, k.plan.data.name, k.plan.spec.algorithm.value,
          k.plan.spec.size, k.plan.spec.curve, sorted(u.value for u in k.plan.spec.usages),
          k.plan.protection.value, k.plan.data.policy, k.plan.data.profile,
          json.dumps(k.plan.data.labels), k.state.value, k.plan.request.id, k.created_at)
         for k in keys])
    await conn.executemany(
        """INSERT INTO key_versions (key_id, version, state, wrapped, kek_label, public_der, kcv,
                                     hsm_object_id, created_at, activated_at)
           VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        [(k.plan.key_id, k.state.value, k.material.wrapped,
          MASTER_KEK_LABEL if k.material.wrapped else None, k.material.public_der,
          k.material.kcv, k.material.hsm_object_id, k.created_at,
          k.created_at if k.state.value == "active" else None)
         for k in keys])
