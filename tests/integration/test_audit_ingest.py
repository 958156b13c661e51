"""Audit on the real Kafka + PostgreSQL: every topic ingested once, in order, durably."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from klm_audit.adapters.tokens import create_token
from klm_audit.domain.auth import Role
from klm_common.envelope import CloudEvent, make_event
from klm_common.events import GenerateKey, KeyGenerated, KeySuspended
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import EventLog, ServiceProcess, publish

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def audit(start_service: Any) -> Iterator[ServiceProcess]:
    proc: ServiceProcess = start_service("audit")
    yield proc
    proc.terminate()  # a later module's audit must not share this one's partitions


@pytest.fixture(scope="module")
def admin_token(settings: KlmSettings) -> str:
    return asyncio.run(create_token(settings, Role.ADMIN, "it-admin"))


def request(owner: str = "acme") -> CloudEvent:
    return make_event(GenerateKey.event_type,
                      GenerateKey(owner=owner, name="k", algorithm="AES", size=256),
                      source="tests")


def generated(cause: CloudEvent, owner: str = "acme") -> CloudEvent:
    key_id = f"klm:key:{uuid.uuid4()}"
    data = KeyGenerated(key_id=key_id, owner=owner, state="active", name="k", algorithm="AES",
                        size=256, usages=["encrypt"], protection="hsm-wrapped", version=1,
                        created_at=datetime.now(UTC), kcv="a1b2c3")
    return make_event(KeyGenerated.event_type, data, source="klm/keygen", subject=key_id,
                      cause=cause)


async def send(settings: KlmSettings, topic: str, *events: CloudEvent) -> None:
    await publish(settings.kafka_bootstrap, topic,
                  [(e.partition_key, e.to_bytes()) for e in events])


async def wait_history(audit: ServiceProcess, token: str, key_id: str, count: int,
                       timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=audit.url,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        while True:
            response = await http.get(f"/v1/keys/{key_id}/history")
            events = response.json()["events"] if response.status_code == 200 else []
            if len(events) >= count or time.monotonic() > deadline:
                return list(events)
            await asyncio.sleep(0.2)


async def admin_fetch(settings: KlmSettings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def verify(audit: ServiceProcess, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=audit.url, timeout=60) as http:
        response = await http.get("/v1/audit/verify",
                                  headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    return dict(response.json())


async def test_history_of_a_key_from_requests_and_lifecycle(
        audit: ServiceProcess, admin_token: str, settings: KlmSettings, topics: Topics) -> None:
    req = request()
    fact = generated(req)
    suspended = make_event(KeySuspended.event_type, KeySuspended(
        key_id=str(fact.subject), owner="acme", state="suspended", previous_state="active"),
        source="klm/keygen", subject=fact.subject)
    await send(settings, topics.requests, req)
    await send(settings, topics.lifecycle, fact, fact, suspended)  # fact delivered twice
    await publish(settings.kafka_bootstrap, topics.requests, [(b"x", b"\xffnot json")])

    history = await wait_history(audit, admin_token, str(fact.subject), 3)
    assert [e["type"] for e in history] == [
        "klm.request.generate_key", "klm.key.generated", "klm.key.suspended"]
    assert [e["id"] for e in history] == [req.id, fact.id, suspended.id]
    assert history[1]["prev_hash"] != history[1]["hash"]
    rows = await admin_fetch(settings, "SELECT count(*) AS n FROM audit.audit_log "
                             "WHERE event_id = $1", fact.id)
    assert rows[0]["n"] == 1
    assert (await verify(audit, admin_token))["ok"]


async def test_dead_letters_and_commands_are_audited(
        audit: ServiceProcess, admin_token: str, settings: KlmSettings, topics: Topics) -> None:
    fact = generated(request())
    command = make_event("klm.command.destroy_key", {"key_id": fact.subject},
                         source="klm/rotation", subject=fact.subject)
    letter = make_event("klm.dlq.dead_letter", {
        "original_b64": "AA==", "topic": topics.requests, "partition": 0, "offset": 1,
        "error": "not JSON", "consumer": "keygen"}, source="klm/keygen")
    await send(settings, topics.lifecycle, fact)
    await send(settings, topics.commands, command)
    await send(settings, topics.dlq, letter)
    history = await wait_history(audit, admin_token, str(fact.subject), 2)
    assert [e["type"] for e in history] == ["klm.key.generated", "klm.command.destroy_key"]
    async with httpx.AsyncClient(base_url=audit.url) as http:
        for _ in range(100):
            page = (await http.get("/v1/events", params={"type": "klm.dlq.dead_letter"},
                                   headers={"Authorization": f"Bearer {admin_token}"})).json()
            if any(e["id"] == letter.id for e in page["events"]):
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("dead letter not audited")


async def test_kill_during_ingest_loses_nothing_and_doubles_nothing(
        audit: ServiceProcess, admin_token: str, settings: KlmSettings, topics: Topics) -> None:
    owner = f"crash{uuid.uuid4().hex[:6]}"
    facts = [generated(request(owner), owner) for _ in range(4000)]
    sender = asyncio.create_task(send(settings, topics.lifecycle, *facts))
    await asyncio.sleep(0.5)
    audit.kill()  # SIGKILL in the middle of the stream: no graceful commit
    await sender
    audit.start()
    ids = [f.id for f in facts]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = await admin_fetch(settings, "SELECT count(*) AS n FROM audit.audit_log "
                                 "WHERE event_id = ANY($1::text[])", ids)
        if rows[0]["n"] >= len(ids):
            break
        await asyncio.sleep(0.5)
    rows = await admin_fetch(settings, "SELECT count(*) AS n, count(DISTINCT event_id) AS d, "
                             "max(sequence) AS hi, count(*) FILTER (WHERE true) AS all_rows "
                             "FROM audit.audit_log")
    assert rows[0]["n"] == rows[0]["d"] == rows[0]["hi"]  # gap-free and no duplicate
    stored = await admin_fetch(settings, "SELECT count(*) AS n FROM audit.audit_log "
                               "WHERE event_id = ANY($1::text[])", ids)
    assert stored[0]["n"] == len(ids)
    result = await verify(audit, admin_token)
    assert result["ok"], result


async def test_keygen_to_audit_walking_skeleton(
        audit: ServiceProcess, admin_token: str, start_service: Any, settings: KlmSettings,
        topics: Topics, lifecycle: EventLog) -> None:
    keygen = start_service("keygen")
    try:
        await _request_to_history(audit, admin_token, settings, topics, lifecycle)
    finally:
        keygen.terminate()  # a keygen left running would serve later modules' requests


async def _request_to_history(audit: ServiceProcess, admin_token: str, settings: KlmSettings,
                              topics: Topics, lifecycle: EventLog) -> None:
    req = make_event(GenerateKey.event_type, {"owner": "acme", "name": "skeleton",
                                              "algorithm": "EC", "curve": "P-256"},
                     source="tests")
    await send(settings, topics.requests, req)
    [fact] = await lifecycle.wait_for(lambda e: e.correlationid == req.id, timeout=90)
    assert fact.type == "klm.key.generated"
    history = await wait_history(audit, admin_token, str(fact.subject), 2)
    assert [e["type"] for e in history] == ["klm.request.generate_key", "klm.key.generated"]
    assert history[1]["event"]["data"]["public_key_pem"].startswith("-----BEGIN PUBLIC KEY")
