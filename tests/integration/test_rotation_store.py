"""Rotation's Postgres inventory store on the real PostgreSQL (own database, rotation's
migrations): the same handlers as the unit tests, and what only a real database shows —
concurrent dispatchers never claim the same work."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from klm_common.db import create_pool, provision
from klm_common.envelope import make_event, parse_envelope
from klm_common.events import RequestRejected
from klm_common.policy import load_policy
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from klm_rotation.adapters.inventory_store import PgInventory
from klm_rotation.domain.inventory import InventoryKey, Version
from klm_rotation.handlers import Deps, PolicyInForce, dispatch_due, project, reconcile

pytestmark = pytest.mark.asyncio(loop_scope="session")

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400.0
TOPICS = Topics("store.")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def store_settings(settings: KlmSettings) -> AsyncIterator[KlmSettings]:
    """A database of its own: the rotation services of other modules never see these rows."""
    name = f"rotstore{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(settings.admin_dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    ours = settings.model_copy(update={
        "pg_dsn": settings.pg_dsn.rsplit("/", 1)[0] + f"/{name}",
        "pg_admin_dsn": settings.admin_dsn().rsplit("/", 1)[0] + f"/{name}"})
    await provision(ours, ("rotation",))
    yield ours
    admin = await asyncpg.connect(settings.admin_dsn())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def deps_for(settings: KlmSettings, now: datetime) -> tuple[Deps, asyncpg.Pool]:
    pool = await create_pool(settings, "rotation")
    deps = Deps(inventory=PgInventory(pool), policy=PolicyInForce(load_policy(), "default"),
                topics=TOPICS, day_seconds=DAY, clock=lambda: now, dispatch_batch=100)
    return deps, pool


def key(**fields: Any) -> InventoryKey:
    base = InventoryKey(
        key_id=f"klm:key:{uuid.uuid4()}", owner="acme", name="k", algorithm="AES", size=256,
        curve=None, usages=("decrypt", "encrypt"), profile=None, policy=None, origin="klm",
        location=None, state="active", primary_version=1, primary_since=T0, created_at=T0,
        versions={1: Version("active", T0)})
    return replace(base, **fields)


async def add_keys(deps: Deps, keys: list[InventoryKey]) -> None:
    async with deps.inventory.unit_of_work() as tx:
        await tx.save_keys(keys)
        await reconcile(tx, keys, deps.policy, DAY)


async def outbox(settings: KlmSettings, topic: str) -> list[Any]:
    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        rows = await conn.fetch("SELECT value FROM rotation.outbox WHERE topic = $1 "
                                "ORDER BY seq", topic)
    finally:
        await conn.close()
    return [parse_envelope(r["value"]) for r in rows]


async def test_keys_round_trip_through_postgres(store_settings: KlmSettings) -> None:
    deps, pool = await deps_for(store_settings, T0)
    try:
        original = key(versions={1: Version("active", T0, superseded_at=T0),
                                 2: Version("active", T0 + timedelta(days=1))},
                       primary_version=2, rejections={"rotate:2": 1},
                       destroy_after=T0 + timedelta(days=9), last_used_at=T0)
        await add_keys(deps, [original])
        async with deps.inventory.unit_of_work() as tx:
            assert (await tx.load_keys([original.key_id]))[original.key_id] == original
            planned = await tx.planned([original.key_id])
        assert set(planned) == {(original.key_id, "rotate", 2),
                                (original.key_id, "deactivate", 1),
                                (original.key_id, "destroy", 0)}
    finally:
        await pool.close()


async def test_concurrent_dispatchers_never_send_the_same_work(
        store_settings: KlmSettings) -> None:
    due_at = T0 + timedelta(days=730)
    keys = [key() for _ in range(1500)]
    (a, pool_a), (b, pool_b) = [await deps_for(store_settings, due_at) for _ in range(2)]
    try:
        await add_keys(a, keys)
        counts = await asyncio.gather(dispatch_due(a), dispatch_due(b))  # 2 × 2 loops
        assert sum(counts) >= len(keys) and all(counts)  # both took a share
        assert await dispatch_due(a) == 0  # re-armed: nothing due again yet
    finally:
        await pool_a.close()
        await pool_b.close()
    commands = [e for e in await outbox(store_settings, TOPICS.requests)
                if e.subject in {k.key_id for k in keys}]
    assert len(commands) == len(keys)
    assert len({c.id for c in commands}) == len({c.subject for c in commands}) == len(keys)
    assert {c.type for c in commands} == {"klm.request.rotate_key"}


async def test_a_refusal_is_counted_and_the_retry_gets_a_new_id(
        store_settings: KlmSettings) -> None:
    due_at = T0 + timedelta(days=730)
    deps, pool = await deps_for(store_settings, due_at)
    try:
        k = key()
        await add_keys(deps, [k])
        await dispatch_due(deps)
        [sent] = [e for e in await outbox(store_settings, TOPICS.requests) if e.subject == k.key_id]
        refusal = make_event("klm.request.rejected", {
            "code": "illegal_transition", "message": "no", "request_type": sent.type,
            "key_id": k.key_id}, source="klm/keygen", subject=k.key_id, cause=sent)
        data = refusal.data
        async with deps.inventory.unit_of_work() as tx:
            await project(tx, [(refusal, RequestRejected(**data))], deps)
            await project(tx, [(refusal, RequestRejected(**data))], deps)  # answered twice
            stored = (await tx.load_keys([k.key_id]))[k.key_id]
        assert stored.rejections == {"rotate:1": 1}
        deps.clock = lambda: due_at + timedelta(days=1)
        await dispatch_due(deps)  # (other tests' keys are due again too)
        retries = [e for e in await outbox(store_settings, TOPICS.requests)
                   if e.subject == k.key_id]
        assert len(retries) == 2 and retries[1].id != sent.id
    finally:
        await pool.close()


async def test_inventory_figures_group_the_keys_and_count_due_rotations(
        store_settings: KlmSettings) -> None:
    """What the klm.keys / oldest-age / rotations-due gauges read (other tests' keys are AES
    keys made at T0 and due after it: these are told apart by algorithm and time)."""
    deps, pool = await deps_for(store_settings, T0)
    old = T0 - timedelta(days=1000)
    signing = {"algorithm": "RSA", "size": 3072, "usages": ("sign", "verify"),
               "protection": "hsm-resident"}
    rsa = key(**signing, primary_since=old, created_at=old, versions={1: Version("active", old)})
    suspended = key(**signing, state="suspended")
    legacy = key(origin="observed", protection="observed", algorithm="HMAC-SHA1", size=160,
                 usages=("mac",), location="legacy://mac")
    try:
        await add_keys(deps, [rsa, suspended, legacy])
        async with deps.inventory.unit_of_work() as tx:
            assert (await tx.load_keys([rsa.key_id]))[rsa.key_id] == rsa  # protection kept
        inventory = deps.inventory
        assert isinstance(inventory, PgInventory)
        # the RSA signing key's 730-day cryptoperiod ended 270 days before T0
        figures = await inventory.figures(T0 - timedelta(days=200))
        assert figures.rotations_due == 1
        assert (await inventory.figures(T0 - timedelta(days=300))).rotations_due == 0
    finally:
        await pool.close()
    assert figures.keys[("active", "RSA-3072", "hsm-resident")] == 1
    assert figures.keys[("suspended", "RSA-3072", "hsm-resident")] == 1
    assert figures.keys[("active", "HMAC-SHA1-160", "observed")] == 1
    assert figures.oldest_active_since == old
