"""Walking skeleton, keygen side, on the real Kafka + PostgreSQL + SoftHSM."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import GenerateKey
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import EventLog, ServiceProcess, publish

pytestmark = pytest.mark.asyncio(loop_scope="session")


def generate_request(**fields: Any) -> CloudEvent:
    data = {"owner": "acme", "name": "k", "algorithm": "AES-256", **fields}
    return make_event(GenerateKey.event_type, data, source="tests")


async def send(settings: KlmSettings, topics: Topics, *events: CloudEvent) -> None:
    await publish(settings.kafka_bootstrap, topics.requests,
                  [(e.partition_key, e.to_bytes()) for e in events])


async def admin_fetch(settings: KlmSettings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def keygen(start_service: Any) -> Iterator[ServiceProcess]:
    # one keygen per module: two in one consumer group would split the partitions
    proc: ServiceProcess = start_service("keygen")
    yield proc
    proc.terminate()


async def test_generate_aes_and_ec_keys(keygen: ServiceProcess, settings: KlmSettings,
                                        topics: Topics, lifecycle: EventLog) -> None:
    aes = generate_request(name="payments", algorithm="AES-256")
    p256 = generate_request(name="signer", algorithm="EC", curve="P-256")
    await send(settings, topics, aes, p256)

    [aes_fact] = await lifecycle.wait_for(lambda e: e.correlationid == aes.id)
    [ec_fact] = await lifecycle.wait_for(lambda e: e.correlationid == p256.id)
    assert aes_fact.type == ec_fact.type == "klm.key.generated"
    assert aes_fact.data["algorithm"] == "AES" and aes_fact.data["size"] == 256
    assert len(aes_fact.data["kcv"]) == 6 and "public_key_pem" not in aes_fact.data
    assert aes_fact.data["state"] == "active" and aes_fact.data["version"] == 1
    public = serialization.load_pem_public_key(ec_fact.data["public_key_pem"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    assert len(ec_fact.data["fingerprint_sha256"]) == 64
    assert ec_fact.subject == ec_fact.data["key_id"]

    rows = await admin_fetch(settings, "SELECT k.key_id, v.wrapped, v.kek_label "
                             "FROM keygen.keys k JOIN keygen.key_versions v USING (key_id) "
                             "WHERE k.key_id = ANY($1)",
                             [aes_fact.subject, ec_fact.subject])
    wrapped = {r["key_id"]: r for r in rows}
    assert len(wrapped[aes_fact.subject]["wrapped"]) == 40  # KWP of 32 bytes
    assert wrapped[ec_fact.subject]["kek_label"] == "klm-master-kek"


async def test_replayed_request_makes_one_key(keygen: ServiceProcess, settings: KlmSettings,
                                              topics: Topics, lifecycle: EventLog) -> None:
    request = generate_request(name="replayed")
    await send(settings, topics, request, request)
    await lifecycle.wait_for(lambda e: e.correlationid == request.id)
    await send(settings, topics, request)  # a later replay, after the answer
    await asyncio.sleep(2.0)
    assert len(lifecycle.answers_to(request.id)) == 1
    rows = await admin_fetch(settings, "SELECT count(*) AS n FROM keygen.keys "
                             "WHERE request_id = $1", request.id)
    assert rows[0]["n"] == 1


@pytest.mark.parametrize(("fields", "code"), [
    ({"algorithm": "BLOWFISH"}, "algorithm_not_approved"),
    ({"algorithm": "3DES"}, "algorithm_not_approved"),
    ({"algorithm": "RSA", "size": 1024}, "key_size_below_minimum"),
    ({"algorithm": "AES", "size": 192}, "key_size_invalid"),
    ({"algorithm": "AES-256", "usages": ["sign"]}, "usage_not_permitted"),
    ({"owner": None}, "invalid_request"),
])
async def test_invalid_request_is_rejected_with_code(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics, lifecycle: EventLog,
        fields: dict[str, Any], code: str) -> None:
    data = {"owner": "acme", "name": "bad", "algorithm": "AES-256", **fields}
    request = make_event(GenerateKey.event_type, {k: v for k, v in data.items() if v},
                         source="tests")
    await send(settings, topics, request)
    [answer] = await lifecycle.wait_for(lambda e: e.correlationid == request.id)
    assert answer.type == "klm.request.rejected"
    assert answer.data["code"] == code, answer.data
    assert answer.data["message"]


async def test_unknown_type_and_future_schema_are_rejected(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics,
        lifecycle: EventLog) -> None:
    unknown = make_event("klm.request.make_coffee", {}, source="tests")
    future = generate_request().model_copy(update={"klmschema": 99})
    await send(settings, topics, unknown, future)
    [a] = await lifecycle.wait_for(lambda e: e.correlationid == unknown.id)
    [b] = await lifecycle.wait_for(lambda e: e.correlationid == future.id)
    assert (a.data["code"], b.data["code"]) == ("unknown_request_type",
                                                "unsupported_schema_version")


async def test_garbage_goes_to_dlq_with_reason_and_origin(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics, dlq: EventLog) -> None:
    marker = uuid.uuid4().hex.encode()
    garbage = [b"\xff\xfe" + marker, b"{not json " + marker,
               json.dumps({"hello": marker.decode()}).encode()]
    await publish(settings.kafka_bootstrap, topics.requests, [(marker, g) for g in garbage])
    letters = await dlq.wait_for(
        lambda e: base64.b64decode(e.data["original_b64"]) in garbage, count=3)
    reasons = sorted(e.data["error"].split(":")[0] for e in letters)
    assert reasons == ["not JSON", "not UTF-8", "not a KLM CloudEvent"]
    for letter in letters:
        assert letter.data["topic"] == topics.requests and letter.data["offset"] >= 0
        assert letter.data["consumer"] == "keygen"
