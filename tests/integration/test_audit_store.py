"""The audit store on the real PostgreSQL: append-only for everyone, tampering detected.

Each test gets its own database (tampering would break the session's shared chain), the
audit migrations applied by the admin role, and writes through the service's own role.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio

from klm_audit import handlers
from klm_audit.adapters.postgres_store import PgChainSource, PostgresAuditStore
from klm_audit.domain.entries import Origin
from klm_audit.domain.hash_chain import canonical_json
from klm_audit.domain.ingest import Accepted
from klm_audit.domain.queries import KeyFilter, Scope
from klm_audit.verification import verify_store
from klm_common.db import create_pool, provision
from klm_common.envelope import make_event
from klm_common.settings import KlmSettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Db:
    def __init__(self, settings: KlmSettings, store: PostgresAuditStore) -> None:
        self.settings, self.store = settings, store

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.settings.admin_dsn())

    async def as_superuser(self, *statements: str) -> None:
        """Run ``statements`` as a superuser with the append-only trigger disabled."""
        conn = await self.admin()
        try:
            async with conn.transaction():
                await conn.execute("ALTER TABLE audit.audit_log DISABLE TRIGGER "
                                   "audit_log_append_only")
                for sql in statements:
                    await conn.execute(sql)
                await conn.execute("ALTER TABLE audit.audit_log ENABLE ALWAYS TRIGGER "
                                   "audit_log_append_only")
        finally:
            await conn.close()


def _with_database(settings: KlmSettings, name: str) -> KlmSettings:
    admin = settings.admin_dsn().rsplit("/", 1)[0] + f"/{name}"
    dsn = settings.pg_dsn.rsplit("/", 1)[0] + f"/{name}"
    return settings.model_copy(update={"pg_dsn": dsn, "pg_admin_dsn": admin})


@pytest_asyncio.fixture(loop_scope="session")
async def db(settings: KlmSettings) -> AsyncIterator[Db]:
    name = f"{settings.topic_prefix.rstrip('.')}_store_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.admin_dsn())
    await conn.execute(f'CREATE DATABASE "{name}"')
    mine = _with_database(settings, name)
    try:
        await provision(mine, services=("audit",))
        pool = await create_pool(mine, "audit")
        try:
            yield Db(mine, PostgresAuditStore(pool))
        finally:
            await pool.close()
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def facts(n: int, owner: str = "acme") -> list[Accepted]:
    out = []
    for i in range(n):
        key_id = f"klm:key:{uuid.UUID(int=i)}"
        event = make_event("klm.key.generated", {
            "key_id": key_id, "owner": owner, "state": "active", "name": f"k{i}",
            "algorithm": "AES", "size": 256, "usages": ["encrypt"], "protection": "hsm-wrapped",
            "version": 1, "created_at": T0.isoformat()}, source="klm/keygen", subject=key_id,
            time=T0 + timedelta(seconds=i))
        out.append(Accepted(event, canonical_json(event.to_jsonable()), Origin("t", 0, i)))
    return out


async def filled(db: Db, n: int = 20) -> Db:
    await handlers.append(db.store, facts(n))
    assert (await verify_store(db.store)).ok
    return db


# ------------------------------------------------------------------ append-only, for everyone
@pytest.mark.parametrize("sql", [
    "UPDATE audit_log SET type = 'x' WHERE sequence = 1",
    "DELETE FROM audit_log WHERE sequence = 1",
    "TRUNCATE audit_log",
])
async def test_the_service_role_cannot_change_the_log(db: Db, sql: str) -> None:
    await filled(db, 3)
    conn = await asyncpg.connect(db.settings.service_dsn("audit"),
                                 server_settings={"search_path": "audit"})
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize("sql", [
    "UPDATE audit.audit_log SET type = 'x' WHERE sequence = 1",
    "UPDATE audit.audit_log SET type = 'x' WHERE false",
    "DELETE FROM audit.audit_log WHERE sequence = 1",
    "TRUNCATE audit.audit_log",
])
@pytest.mark.parametrize("replica", [False, True])
async def test_the_trigger_refuses_even_a_superuser(db: Db, sql: str, replica: bool) -> None:
    await filled(db, 3)
    conn = await db.admin()
    try:
        if replica:
            await conn.execute("SET session_replication_role = replica")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(sql)
    finally:
        await conn.close()
    assert (await verify_store(db.store)).head_sequence == 3


# ------------------------------------------------------------------ tampering is named
async def test_a_modified_row_is_named(db: Db) -> None:
    await filled(db)
    await db.as_superuser("UPDATE audit.audit_log SET canonical = replace(canonical, "
                          "'\"name\":\"k6\"', '\"name\":\"evil\"') WHERE sequence = 7")
    result = await verify_store(db.store)
    assert not result.ok and result.first_broken_sequence == 7
    assert "modified" in (result.reason or "")


async def test_a_modified_index_column_is_named(db: Db) -> None:
    await filled(db)
    await db.as_superuser("UPDATE audit.audit_log SET tenant = 'globex' WHERE sequence = 4")
    result = await verify_store(db.store)
    assert not result.ok and result.first_broken_sequence == 4


async def test_a_rewritten_row_with_a_recomputed_hash_is_named(db: Db) -> None:
    await filled(db)
    await db.as_superuser(
        "UPDATE audit.audit_log SET canonical = replace(canonical, 'k6', 'k9'), "
        "hash = sha256(prev_hash || int8send(sequence) || "
        "convert_to(replace(canonical, 'k6', 'k9'), 'UTF8')) WHERE sequence = 7")
    result = await verify_store(db.store)
    assert not result.ok and result.first_broken_sequence == 8
    assert "prev_hash" in (result.reason or "")


async def test_a_deleted_row_is_named(db: Db) -> None:
    await filled(db)
    await db.as_superuser("DELETE FROM audit.audit_log WHERE sequence = 12")
    result = await verify_store(db.store)
    assert not result.ok and result.first_broken_sequence == 12
    assert "missing" in (result.reason or "")


async def test_two_swapped_rows_are_named(db: Db) -> None:
    await filled(db)
    await db.as_superuser(
        "UPDATE audit.audit_log SET sequence = sequence + 1000000 WHERE sequence IN (5, 9)",
        "UPDATE audit.audit_log SET sequence = CASE sequence WHEN 1000005 THEN 9 ELSE 5 END "
        "WHERE sequence IN (1000005, 1000009)")
    result = await verify_store(db.store)
    assert not result.ok and result.first_broken_sequence == 5


async def test_swapped_contents_are_named(db: Db) -> None:
    await filled(db)
    await db.as_superuser(
        "UPDATE audit.audit_log a SET canonical = b.canonical FROM audit.audit_log b "
        "WHERE (a.sequence, b.sequence) IN ((3, 15), (15, 3))")
    result = await verify_store(db.store)
    assert not result.ok and result.first_broken_sequence == 3


async def test_a_truncated_tail_keeps_a_valid_but_shorter_chain(db: Db) -> None:
    """Only a checkpoint kept outside the database can catch this (docs/audit.md)."""
    await filled(db)
    before = await verify_store(db.store)
    await db.as_superuser("DELETE FROM audit.audit_log WHERE sequence > 15")
    after = await verify_store(db.store)
    assert after.ok and after.head_sequence == 15 and before.head_sequence == 20


async def test_appending_after_a_break_continues_from_the_stored_head(db: Db) -> None:
    await filled(db, 5)
    await handlers.append(db.store, facts(8)[5:])
    result = await verify_store(db.store)
    assert result.ok and result.head_sequence == 8


# ------------------------------------------------------------------ projections
async def test_dropping_the_projection_and_replaying_gives_the_same_answers(db: Db) -> None:
    await filled(db, 30)
    suspended = make_event("klm.key.suspended", {
        "key_id": f"klm:key:{uuid.UUID(int=3)}", "owner": "acme", "state": "suspended",
        "previous_state": "active"}, source="klm/keygen", subject=f"klm:key:{uuid.UUID(int=3)}")
    await handlers.append(db.store, [Accepted(suspended, canonical_json(suspended.to_jsonable()),
                                              Origin("t"))])
    assert await handlers.project(db.store) == 31  # the inventory follows the log
    before = await db.store.keys(KeyFilter(limit=1000), Scope())
    conn = await db.admin()
    try:
        await conn.execute("DELETE FROM audit.key_inventory")
    finally:
        await conn.close()
    assert await db.store.keys(KeyFilter(limit=1000), Scope()) == []
    assert await db.store.rebuild_projections() == 30
    assert await db.store.keys(KeyFilter(limit=1000), Scope()) == before
    assert any(v.state == "suspended" for v in before)


# ------------------------------------------------------------------ parallel verification
@pytest.mark.parametrize(("sql", "named"), [
    (None, None),
    ("UPDATE audit.audit_log SET canonical = replace(canonical, '\"name\":\"k6\"', "
     "'\"name\":\"evil\"') WHERE sequence = 7", 7),
    ("UPDATE audit.audit_log SET canonical = replace(canonical, 'k6', 'k9'), "
     "hash = sha256(prev_hash || int8send(sequence) || "
     "convert_to(replace(canonical, 'k6', 'k9'), 'UTF8')) WHERE sequence = 7", 8),
    ("DELETE FROM audit.audit_log WHERE sequence BETWEEN 9 AND 14", 9),
])
async def test_ranges_read_and_hashed_by_worker_processes_give_the_same_answer(
        db: Db, sql: str | None, named: int | None) -> None:
    """Each worker reads its ranges over its own connection (PgChainSource); joined, they
    name what a single pass from genesis names."""
    await filled(db)
    if sql is not None:
        await db.as_superuser(sql)
    single = await verify_store(db.store, columns=False, workers=0)
    pool = await create_pool(db.settings, "audit")
    try:
        parallel = PostgresAuditStore(pool, PgChainSource(db.settings.service_dsn("audit")))
        for chunk, workers in ((3, 2), (7, 3)):
            result = await verify_store(parallel, chunk, columns=False, workers=workers)
            assert (result.ok, result.first_broken_sequence, result.checked,
                    result.head_sequence, result.head_hash) == \
                (single.ok, single.first_broken_sequence, single.checked,
                 single.head_sequence, single.head_hash)
    finally:
        await pool.close()
    assert single.first_broken_sequence == named
