"""The keystore (keygen's Postgres schema): keys, versions with wrapped material, inbox and
outbox — written in ONE transaction per batch, so a key exists iff its fact will be published.

A batch runs in a :meth:`PgKeystore.unit` (unit of work): claim the request ids in the inbox,
insert new keys, lock the existing keys it changes (``FOR UPDATE``), store their next state
and queue the answers, then commit. The role has no DELETE on keys or versions: destruction
clears the wrapped material (``wrapped = NULL``) and the metadata and history remain.

With an :class:`~klm_common.outbox.OutboxRelay` the answers a unit queued are published
from memory once its transaction committed (their outbox rows, written in the transaction,
are deleted once Kafka has them; whatever that misses, the relay publishes with the same
event ids): the relay does not read them back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Protocol

import asyncpg

from klm_common import inbox
from klm_common.algorithms import Protection
from klm_common.envelope import CloudEvent
from klm_common.errors import StoreUnavailable
from klm_common.outbox import OutboxBatch, OutboxRelay, OutboxRow, add_to_outbox
from klm_common.states import TERMINAL_STATES, KeyState
from klm_keygen.adapters.hsm import MASTER_KEK_LABEL
from klm_keygen.domain.generation import NewKey
from klm_keygen.domain.lifecycle import KeyRecord, VersionRecord

_UNREACHABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.InterfaceError)


class KeystoreUnit(Protocol):
    """One transaction: what a batch may do to the keystore."""

    async def claim(self, request_ids: Sequence[str]) -> set[str]: ...

    async def insert_keys(self, keys: Sequence[NewKey]) -> set[str]: ...

    async def save_new(self, request_ids: Sequence[str], keys: Sequence[NewKey],
                       answers: Sequence[CloudEvent]) -> set[str]: ...

    async def lock_keys(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]: ...

    async def store(self, before: KeyRecord, after: KeyRecord, at: datetime) -> None: ...

    async def queue(self, answers: Sequence[CloudEvent]) -> None: ...


class KeystorePort(Protocol):
    async def processed(self, request_ids: Sequence[str]) -> set[str]: ...

    def unit(self) -> contextlib.AbstractAsyncContextManager[KeystoreUnit]: ...

    async def known_object_ids(self, object_ids: Sequence[bytes]) -> set[bytes]: ...

    async def queue_facts(self, facts: Sequence[CloudEvent]) -> None: ...

    async def count_keys(self) -> int: ...


class PgKeystore:
    def __init__(self, pool: asyncpg.Pool, lifecycle_topic: str,
                 relay: OutboxRelay | None = None) -> None:
        self._pool = pool
        self._topic = lifecycle_topic
        self._relay = relay

    async def processed(self, request_ids: Sequence[str]) -> set[str]:
        try:
            return await inbox.already_processed(self._pool, request_ids)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    @contextlib.asynccontextmanager
    async def unit(self) -> AsyncIterator[PgUnit]:
        """One transaction; its answers are handed to the relay only once it committed
        (a failed COMMIT may still have committed: then the relay finds the rows)."""
        unit: PgUnit | None = None
        try:
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        unit = PgUnit(conn, self._topic, self._relay)
                        yield unit
                except BaseException:
                    if unit is not None:
                        unit.not_committed()
                    raise
                unit.committed()
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    async def known_object_ids(self, object_ids: Sequence[bytes]) -> set[bytes]:
        """The CKA_IDs among ``object_ids`` that belong to a version not yet destroyed."""
        try:
            rows = await self._pool.fetch(
                "SELECT hsm_object_id FROM key_versions WHERE hsm_object_id = ANY($1::bytea[])"
                " AND destroyed_at IS NULL", list(object_ids))
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc
        return {bytes(r["hsm_object_id"]) for r in rows}

    async def queue_facts(self, facts: Sequence[CloudEvent]) -> None:
        """Queue facts that change no key (e.g. an orphan HSM object destroyed)."""
        async with self.unit() as unit:
            await unit.queue(facts)

    async def count_keys(self) -> int:
        return int(await self._pool.fetchval("SELECT count(*) FROM keys"))


class PgUnit:
    def __init__(self, conn: asyncpg.Connection, topic: str,
                 relay: OutboxRelay | None = None) -> None:
        self._conn = conn
        self._topic = topic
        self._relay = relay
        #: rows this transaction wrote that the relay publishes from memory after commit
        self._claimed: list[OutboxRow] = []
        #: rows the relay reads back (wake it after commit)
        self._left_to_relay = False

    async def claim(self, request_ids: Sequence[str]) -> set[str]:
        return await inbox.claim(self._conn, request_ids)

    async def insert_keys(self, keys: Sequence[NewKey]) -> set[str]:
        """Insert new keys; return the request ids whose key already exists (see below)."""
        return await _insert_keys(self._conn, keys)

    async def save_new(self, request_ids: Sequence[str], keys: Sequence[NewKey],
                       answers: Sequence[CloudEvent]) -> set[str]:
        """:meth:`claim`, :meth:`insert_keys` of the claimed requests' keys and
        :meth:`queue` of the answers of those whose key was inserted, in ONE statement (a
        chunk that only generates: one round trip instead of three). Returns the claimed ids
        less those whose key existed already, as ``claim() - insert_keys()`` would."""
        if not request_ids:
            return set()
        batch = OutboxBatch.of(self._topic, answers)
        key_of = {k.plan.request.id: k.plan.key_id for k in keys}
        rows = await self._conn.fetch(
            _SAVE_NEW, list(request_ids), *_key_columns(keys), self._topic,
            [a.correlationid for a in answers],
            [key_of.get(a.correlationid or "") for a in answers],
            batch.keys, batch.values, batch.headers)
        claimed = {r["claimed"] for r in rows if r["claimed"] is not None}
        inserted = {r["new_key"] for r in rows if r["new_key"] is not None}
        claimed -= {request for request, key in key_of.items() if key not in inserted}
        kept = [i for i, a in enumerate(answers) if a.correlationid in claimed]
        self._hand_over(batch.written([r["seq"] for r in rows if r["seq"] is not None], kept))
        return claimed

    async def queue(self, answers: Sequence[CloudEvent]) -> None:
        self._hand_over(await add_to_outbox(self._conn, self._topic, answers))

    def _hand_over(self, rows: Sequence[OutboxRow]) -> None:
        if self._relay is not None and self._relay.claim(rows):
            self._claimed.extend(rows)
        elif rows:
            self._left_to_relay = True

    def committed(self) -> None:
        if self._relay is None:
            return
        self._relay.publish_committed(self._claimed)
        if self._left_to_relay:
            self._relay.left_committed()

    def not_committed(self) -> None:
        if self._relay is not None:
            self._relay.unclaim(self._claimed)

    async def lock_keys(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        """The keys (with their versions), locked until commit, in key order (no deadlock)."""
        if not key_ids:
            return {}
        keys = await self._conn.fetch(
            """SELECT key_id, owner, algorithm, size, curve, usages, protection, state,
                      primary_version, destroy_after
               FROM keys WHERE key_id = ANY($1::text[]) ORDER BY key_id FOR UPDATE""",
            sorted(set(key_ids)))
        versions = await self._conn.fetch(
            """SELECT key_id, version, state, hsm_object_id, wrapped IS NOT NULL AS has_wrapped
               FROM key_versions WHERE key_id = ANY($1::text[]) ORDER BY key_id, version""",
            [k["key_id"] for k in keys])
        by_key: dict[str, list[VersionRecord]] = {}
        for v in versions:
            obj = bytes(v["hsm_object_id"]) if v["hsm_object_id"] is not None else None
            by_key.setdefault(v["key_id"], []).append(VersionRecord(
                v["version"], KeyState(v["state"]), obj,
                bool(v["has_wrapped"]) or (obj is not None and
                                           KeyState(v["state"]) not in TERMINAL_STATES)))
        return {k["key_id"]: _key_record(k, by_key.get(k["key_id"], [])) for k in keys}

    async def store(self, before: KeyRecord, after: KeyRecord, at: datetime) -> None:
        """Write the key's next state: its row, new versions, changed versions."""
        await self._conn.execute(
            "UPDATE keys SET state = $2, primary_version = $3, destroy_after = $4, "
            "updated_at = $5 WHERE key_id = $1",
            after.key_id, after.state.value, after.primary_version, after.destroy_after, at)
        new = [v for v in after.versions if before.version(v.version) is None]
        await _insert_versions(self._conn, after.key_id, new, at)
        changed = [v for v in after.versions
                   if (old := before.version(v.version)) is not None and old.state != v.state]
        await self._conn.executemany(
            """UPDATE key_versions SET state = $3,
                      deactivated_at = CASE WHEN $3 = 'deactivated' THEN $4
                                            ELSE deactivated_at END,
                      destroyed_at = CASE WHEN $5 THEN $4 ELSE destroyed_at END,
                      wrapped = CASE WHEN $5 THEN NULL ELSE wrapped END
               WHERE key_id = $1 AND version = $2""",
            [(after.key_id, v.version, v.state.value, at, v.state in TERMINAL_STATES)
             for v in changed])


def _key_record(row: asyncpg.Record, versions: list[VersionRecord]) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"], owner=row["owner"], algorithm=row["algorithm"],
        size=row["size"], curve=row["curve"], usages=tuple(row["usages"]),
        protection=Protection(row["protection"]), state=KeyState(row["state"]),
        primary_version=row["primary_version"], destroy_after=row["destroy_after"],
        versions=tuple(versions))


async def _insert_versions(conn: asyncpg.Connection, key_id: str,
                           versions: Sequence[VersionRecord], at: datetime) -> None:
    rows = []
    for v in versions:
        m = v.material
        assert m is not None, "a new version carries its material"
        rows.append((key_id, v.version, v.state.value, m.wrapped,
                     MASTER_KEK_LABEL if m.wrapped else None, m.public_der, m.kcv,
                     m.hsm_object_id, at, at if v.state is KeyState.ACTIVE else None))
    await conn.executemany(
        """INSERT INTO key_versions (key_id, version, state, wrapped, kek_label, public_der, kcv,
                                     hsm_object_id, created_at, activated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""", rows)


def _key_input(first: int) -> str:
    """New keys and their first versions as rows, from one array parameter per column
    (parameters $first to $first+19, in :func:`_key_columns`' order)."""
    types = ["text", "text", "text", "text", "int4", "text", "text", "text", "text", "text",
             "text", "text", "text", "timestamptz", "bytea", "text", "bytea", "text", "bytea",
             "timestamptz"]
    arrays = ", ".join(f"${first + n}::{t}[]" for n, t in enumerate(types))
    return f"""SELECT * FROM unnest({arrays})
            AS i(key_id, owner, name, algorithm, size, curve, usages, protection, policy,
                 profile, labels, state, request_id, created_at, wrapped, kek_label,
                 public_der, kcv, hsm_object_id, activated_at)"""  # noqa: S608 - constants


#: keys whose key id exists already are skipped, with their version
_NEW_KEYS = """new_keys AS (
        INSERT INTO keys (key_id, owner, name, algorithm, size, curve, usages, protection,
                          policy, profile, labels, state, primary_version, request_id,
                          created_at, updated_at)
        SELECT key_id, owner, name, algorithm, size, curve,
               ARRAY(SELECT jsonb_array_elements_text(usages::jsonb)), protection, policy,
               profile, labels::jsonb, state, 1, request_id, created_at, created_at
        FROM input
        ON CONFLICT (key_id) DO NOTHING
        RETURNING key_id
    )"""
_NEW_VERSIONS = """INSERT INTO key_versions (key_id, version, state, wrapped, kek_label,
                              public_der, kcv, hsm_object_id, created_at, activated_at)
    SELECT i.key_id, 1, i.state, i.wrapped, i.kek_label, i.public_der, i.kcv,
           i.hsm_object_id, i.created_at, i.activated_at
    FROM input i JOIN new_keys USING (key_id)
    RETURNING key_id"""

#: new keys and their first versions in ONE statement; the key ids inserted are returned
_INSERT_KEYS = f"WITH input AS ({_key_input(1)}), {_NEW_KEYS} {_NEW_VERSIONS}"

#: PgUnit.save_new: inbox claim, new keys and versions of the claimed requests, and the
#: answers of the claimed requests whose key (if they made one) was inserted — in one
#: statement. Rows out: the claimed ids, the key ids inserted, the outbox seqs.
_SAVE_NEW = f"""
    WITH claimed AS ({inbox.CLAIM.format(ids="$1")}),
    input AS ({_key_input(2)}
              WHERE i.request_id IN (SELECT event_id FROM claimed)),
    {_NEW_KEYS},
    new_versions AS ({_NEW_VERSIONS}),
    queued AS (
        INSERT INTO outbox (topic, key, value, headers)
        SELECT $22, a.k, a.v, a.h::jsonb
        FROM unnest($23::text[], $24::text[], $25::bytea[], $26::bytea[], $27::text[])
             WITH ORDINALITY AS a(request_id, key_id, k, v, h, n)
        WHERE a.request_id IN (SELECT event_id FROM claimed)
          AND (a.key_id IS NULL OR a.key_id IN (SELECT key_id FROM new_keys))
        ORDER BY a.n
        RETURNING seq)
    SELECT event_id AS claimed, NULL AS new_key, NULL::bigint AS seq FROM claimed
    UNION ALL SELECT NULL, key_id, NULL FROM new_keys
    UNION ALL SELECT NULL, NULL, seq FROM queued"""  # noqa: S608 - composed of constants


async def _insert_keys(conn: asyncpg.Connection, keys: Sequence[NewKey]) -> set[str]:
    """Insert the keys whose key id is new. A key id that exists already (its key came back
    through a disaster recovery, which empties the inbox) means the request was answered
    before the disaster: it is a replay, so no second key — the caller drops its answer.

    One statement for the whole chunk (was: a look-up and two ``executemany``)."""
    if not keys:
        return set()
    inserted = {r["key_id"] for r in await conn.fetch(_INSERT_KEYS, *_key_columns(keys))}
    return {k.plan.request.id for k in keys if k.plan.key_id not in inserted}


def _key_columns(keys: Sequence[NewKey]) -> list[list[object]]:
    """The parameters of :func:`_key_input`: one list per column."""
    columns: list[list[object]] = [[] for _ in range(20)]
    for k in keys:
        plan, data, spec, material = k.plan, k.plan.data, k.plan.spec, k.material
        row = (plan.key_id, data.owner, data.name, spec.algorithm.value, spec.size, spec.curve,
               json.dumps(sorted(u.value for u in spec.usages)), plan.protection.value,
               data.policy, data.profile, json.dumps(data.labels), k.state.value,
               plan.request.id, k.created_at, material.wrapped,
               MASTER_KEK_LABEL if material.wrapped else None, material.public_der,
               material.kcv, material.hsm_object_id,
               k.created_at if k.state.value == "active" else None)
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns
