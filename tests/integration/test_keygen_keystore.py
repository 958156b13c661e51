"""Keygen's keystore against real PostgreSQL: a chunk of new keys saved in one statement
(``PgUnit.save_new``: inbox claim, keys, versions and outbox rows) gives what the separate
claim, insert and queue give — redeliveries write nothing, a replayed request whose key id
already exists (its key came back through a disaster recovery) gets no second key and no
answer."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest_asyncio

from klm_common.db import create_pool
from klm_common.envelope import CloudEvent, make_event
from klm_common.errors import AlgorithmNotApproved
from klm_common.events import GenerateKey
from klm_common.states import KeyState
from klm_common.topics import Topics
from klm_keygen.adapters.keystore import PgKeystore
from klm_keygen.domain.generation import (
    NewKey,
    generated_fact,
    plan_generation,
    rejection,
)
from klm_keygen.domain.material import GeneratedVersion
from tests.integration.conftest import settings_for

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest_asyncio.fixture(loop_scope="session")
async def pool(klm_env: dict[str, str]) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings_for(klm_env), "keygen")
    try:
        yield pool
    finally:
        await pool.close()


def request(name: str) -> CloudEvent:
    return make_event(GenerateKey.event_type,
                      {"owner": "keystore-test", "name": name, "algorithm": "AES-256"},
                      source="tests")


def new_key(event: CloudEvent) -> NewKey:
    plan = plan_generation(event, GenerateKey.model_validate(event.data))
    return NewKey(plan, GeneratedVersion(os.urandom(40), None, "abcdef"), KeyState.ACTIVE, NOW)


async def outbox_values(pool: asyncpg.Pool, ids: list[str]) -> list[str]:
    """The ids of the events queued for ``ids``' requests, in outbox order."""
    events = [json.loads(bytes(r["value"]))
              for r in await pool.fetch("SELECT value FROM outbox ORDER BY seq")]
    return [e["id"] for e in events if e.get("correlationid") in ids]


async def test_a_chunk_of_new_keys_is_claimed_inserted_and_queued_in_one_statement(
        pool: asyncpg.Pool, klm_env: dict[str, str]) -> None:
    # no relay here: the rows stay in the outbox (a keygen of another test on this database
    # may publish them meanwhile: to the namespace's own lifecycle topic)
    keystore = PgKeystore(pool, Topics(klm_env["KLM_TOPIC_PREFIX"]).lifecycle)
    queued: list[str] = []
    try:
        await _save_new(pool, keystore, queued)
    finally:  # keys and versions stay (the role may not delete them), the answers go
        await pool.execute("DELETE FROM outbox WHERE convert_from(value, 'UTF8') "
                           "LIKE ANY($1::text[])", [f"%{i}%" for i in queued])
        assert await outbox_values(pool, queued) == []


async def _save_new(pool: asyncpg.Pool, keystore: PgKeystore, queued: list[str]) -> None:
    made, refused = [request("a"), request("b")], request("c")
    keys = [new_key(e) for e in made]
    answers = [generated_fact(keys[0]), rejection(refused, AlgorithmNotApproved("no")),
               generated_fact(keys[1])]
    ids = [e.id for e in (*made, refused)]
    queued += ids
    async with keystore.unit() as unit:
        assert await unit.save_new(ids, keys, answers) == set(ids)
    assert await keystore.processed(ids) == set(ids)
    stored = await pool.fetch(
        "SELECT k.key_id, k.usages, v.version, v.state, v.wrapped FROM keys k "
        "JOIN key_versions v USING (key_id) WHERE k.key_id = ANY($1::text[]) ORDER BY k.name",
        [k.plan.key_id for k in keys])
    assert [(r["key_id"], r["version"], r["state"], bytes(r["wrapped"])) for r in stored] == [
        (k.plan.key_id, 1, "active", k.material.wrapped) for k in keys]
    assert all(list(r["usages"]) for r in stored)
    assert await outbox_values(pool, ids) == [a.id for a in answers]  # in the answers' order

    # delivered again: already claimed, nothing written twice
    async with keystore.unit() as unit:
        assert await unit.save_new(ids, keys, answers) == set()
    assert await outbox_values(pool, ids) == [a.id for a in answers]

    # a replay whose key id exists already (the inbox was lost in a disaster recovery):
    # claimed, but no second key and no answer; a fresh request beside it is served
    replay = make_event(GenerateKey.event_type, made[0].data, source="tests")
    again = dataclasses.replace(keys[0], plan=dataclasses.replace(keys[0].plan, request=replay))
    fresh = request("d")
    fresh_key = new_key(fresh)
    queued += [replay.id, fresh.id]
    async with keystore.unit() as unit:
        claimed = await unit.save_new([replay.id, fresh.id], [again, fresh_key],
                                      [generated_fact(again), generated_fact(fresh_key)])
    assert claimed == {fresh.id}
    assert await keystore.processed([replay.id, fresh.id]) == {replay.id, fresh.id}
    assert await outbox_values(pool, [replay.id, fresh.id]) == [generated_fact(fresh_key).id]
    assert await pool.fetchval("SELECT count(*) FROM key_versions WHERE key_id = $1",
                               keys[0].plan.key_id) == 1
