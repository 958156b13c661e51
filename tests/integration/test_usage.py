"""Key usage over Kafka on the real Kafka + PostgreSQL + SoftHSM: every operation runs in
keygen's HSM session; signatures are checked with ``cryptography`` (not KLM)."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from klm_common.client import KlmClient
from klm_common.crypto_channel import Ciphertext, CryptoOperationError
from klm_common.envelope import CloudEvent, make_event
from klm_common.events import (
    CryptoSign,
    DestroyKey,
    RevokeKey,
    RotateKey,
    ScheduleDestruction,
    SuspendKey,
)
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.conftest import REPO, settings_for
from tests.integration.harness import EventLog, ServiceProcess, open_topics, publish

pytestmark = pytest.mark.asyncio(loop_scope="session")
OWNER = "usage-tests"
#: a policy day lasts 0.2 s in this module: a 7-day destruction wait passes in 1.4 s
DAY_SECONDS = "0.2"


# This module runs its keygen on topics of its own (the session prefix + "usage."): another
# module's keygen, still running in the same pytest session with other settings (policy
# day, summary interval), cannot take a share of these requests. Database and token are
# the session's.
@pytest.fixture(scope="module")
def settings(klm_env: dict[str, str]) -> KlmSettings:
    prefix = klm_env["KLM_TOPIC_PREFIX"] + "usage."
    settings = settings_for({**klm_env, "KLM_TOPIC_PREFIX": prefix})
    asyncio.run(open_topics(settings))
    return settings


@pytest.fixture(scope="module")
def topics(settings: KlmSettings) -> Topics:
    return Topics(settings.topic_prefix)


@pytest.fixture(scope="module")
def keygen(klm_env: dict[str, str], settings: KlmSettings,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {**klm_env, "KLM_TOPIC_PREFIX": settings.topic_prefix,
           "KLM_USAGE_SUMMARY_SECONDS": "1", "KLM_DAY_SECONDS": DAY_SECONDS}
    proc = ServiceProcess("keygen", REPO, env, tmp_path_factory.mktemp("usage-logs"))
    proc.start()
    yield proc
    proc.terminate()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def lifecycle(keygen: ServiceProcess, settings: KlmSettings,
                    topics: Topics) -> AsyncIterator[EventLog]:
    log = EventLog(settings.kafka_bootstrap, topics.lifecycle)
    await log.start()
    yield log
    await log.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def dlq(keygen: ServiceProcess, settings: KlmSettings,
              topics: Topics) -> AsyncIterator[EventLog]:
    log = EventLog(settings.kafka_bootstrap, topics.dlq)
    await log.start()
    yield log
    await log.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def klm(keygen: ServiceProcess, settings: KlmSettings) -> AsyncIterator[KlmClient]:
    async with KlmClient(settings, source="tests/usage", timeout=60) as client:
        yield client


async def new_key(klm: KlmClient, algorithm: str, **fields: Any) -> dict[str, Any]:
    fact = await klm.generate_key(owner=fields.pop("owner", OWNER), name=f"u-{algorithm}",
                                  algorithm=algorithm, **fields)
    assert fact.type == "klm.key.generated", fact
    return fact.data


def public_key(fact: dict[str, Any]) -> Any:
    return serialization.load_pem_public_key(fact["public_key_pem"].encode())


async def test_ecdsa_sign_verifies_with_the_public_key_from_the_fact(klm: KlmClient) -> None:
    key = await new_key(klm, "EC", curve="P-256")
    message = b"pay 100 to alice"
    sig = await klm.sign(key["key_id"], message, owner=OWNER)
    assert (sig.version, sig.algorithm) == (1, "ECDSA-SHA256")
    public = public_key(key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig.signature, message, ec.ECDSA(hashes.SHA256()))  # raises if invalid
    assert await klm.verify(key["key_id"], message, sig, owner=OWNER)
    assert not await klm.verify(key["key_id"], b"pay 999 to mallory", sig, owner=OWNER)


async def test_p384_ed25519_and_rsa_signatures(klm: KlmClient) -> None:
    p384 = await new_key(klm, "EC", curve="P-384")
    sig = await klm.sign(p384["key_id"], b"m", owner=OWNER)
    assert sig.algorithm == "ECDSA-SHA384"
    public_key(p384).verify(sig.signature, b"m", ec.ECDSA(hashes.SHA384()))

    # SoftHSM cannot KWP-wrap an Ed25519 private key: it lives on the token (CKA_ID path)
    edkey = await new_key(klm, "Ed25519", protection="hsm-resident")
    sig = await klm.sign(edkey["key_id"], b"m", owner=OWNER)
    edpub = public_key(edkey)
    assert isinstance(edpub, ed25519.Ed25519PublicKey)
    edpub.verify(sig.signature, b"m")

    rsakey = await new_key(klm, "RSA-2048")
    rsapub = public_key(rsakey)
    assert isinstance(rsapub, rsa.RSAPublicKey)
    pss = await klm.sign(rsakey["key_id"], b"m", owner=OWNER)
    assert pss.algorithm == "RSA-PSS-SHA256"
    rsapub.verify(pss.signature, b"m", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                  hashes.SHA256())
    v15 = await klm.sign(rsakey["key_id"], b"m", owner=OWNER, scheme="pkcs1v15")
    rsapub.verify(v15.signature, b"m", padding.PKCS1v15(), hashes.SHA256())
    assert await klm.verify(rsakey["key_id"], b"m", v15, owner=OWNER, scheme="pkcs1v15")


async def test_a_burst_of_mixed_requests_is_answered_each_once_and_correctly(
        klm: KlmClient) -> None:
    """More requests than one HSM chunk (keygen serves a batch in chunks of 64), signs and
    refusals mixed: every call gets its own answer, and every signature verifies."""
    signer = await new_key(klm, "EC", curve="P-256")
    encryptor = await new_key(klm, "AES-256")
    messages = [f"burst message {i}".encode() for i in range(200)]

    async def one(i: int) -> Any:
        if i % 10 == 9:  # an AES key cannot sign: refused by usage, in the same batches
            with pytest.raises(CryptoOperationError) as refused:
                await klm.sign(encryptor["key_id"], messages[i], owner=OWNER)
            return refused.value.code
        return await klm.sign(signer["key_id"], messages[i], owner=OWNER)

    answers = await asyncio.gather(*(one(i) for i in range(len(messages))))
    public = public_key(signer)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for i, answer in enumerate(answers):
        if i % 10 == 9:
            assert answer == "usage_not_permitted"
        else:
            public.verify(answer.signature, messages[i], ec.ECDSA(hashes.SHA256()))


async def test_aes_gcm_round_trip_and_wrong_aad_fails(klm: KlmClient) -> None:
    key = await new_key(klm, "AES-256")
    sealed = await klm.encrypt(key["key_id"], b"card 4111", owner=OWNER, aad=b"order-1")
    assert sealed.algorithm == "AES-GCM" and sealed.version == 1 and len(sealed.nonce or b"") == 12
    assert b"card" not in sealed.ciphertext
    opened = await klm.decrypt(sealed, owner=OWNER, aad=b"order-1")
    assert opened.data == b"card 4111" and opened.warning is None
    with pytest.raises(CryptoOperationError) as wrong:
        await klm.decrypt(sealed, owner=OWNER, aad=b"order-2")
    assert wrong.value.code == "decryption_failed"
    tampered = Ciphertext(sealed.key_id, 1, sealed.algorithm,
                          bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:], sealed.nonce)
    with pytest.raises(CryptoOperationError):
        await klm.decrypt(tampered, owner=OWNER, aad=b"order-1")


async def test_rsa_oaep_interoperates_with_cryptography(klm: KlmClient) -> None:
    key = await new_key(klm, "RSA-3072", usages=["encrypt", "decrypt"])
    sealed = await klm.encrypt(key["key_id"], b"dek", owner=OWNER, aad=b"label")
    assert (await klm.decrypt(sealed, owner=OWNER, aad=b"label")).data == b"dek"
    public = public_key(key)
    assert isinstance(public, rsa.RSAPublicKey)
    outside = public.encrypt(b"from outside", padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                           hashes.SHA256(), b"l2"))
    opened = await klm.decrypt(Ciphertext(key["key_id"], 1, "RSA-OAEP-SHA256", outside),
                               owner=OWNER, aad=b"l2")
    assert opened.data == b"from outside"


async def test_hmac_and_key_wrapping(klm: KlmClient) -> None:
    hkey = await new_key(klm, "HMAC-SHA256")
    tag = await klm.mac(hkey["key_id"], b"event", owner=OWNER)
    assert len(tag.mac) == 32 and tag.algorithm == "HMAC-SHA256"
    assert await klm.verify_mac(hkey["key_id"], b"event", tag, owner=OWNER)
    assert not await klm.verify_mac(hkey["key_id"], b"event!", tag, owner=OWNER)

    kek = await new_key(klm, "AES-256", usages=["wrap", "unwrap"])
    dek = os.urandom(32)
    wrapped = await klm.wrap(kek["key_id"], dek, owner=OWNER)
    assert wrapped.algorithm == "AES-KWP" and len(wrapped.ciphertext) == 40
    assert (await klm.unwrap(wrapped, owner=OWNER)).data == dek


def denials_of(lifecycle: EventLog, key_id: str) -> list[CloudEvent]:
    return lifecycle.matching(lambda e: e.type == "klm.key.usage_denied" and e.subject == key_id)


async def test_encrypt_only_key_asked_to_sign_is_refused_and_recorded(
        klm: KlmClient, lifecycle: EventLog) -> None:
    key = await new_key(klm, "AES-256", usages=["encrypt"])
    with pytest.raises(CryptoOperationError) as refused:
        await klm.sign(key["key_id"], b"x", owner=OWNER)
    assert refused.value.code == "usage_not_permitted"
    sealed = await klm.encrypt(key["key_id"], b"x", owner=OWNER)
    with pytest.raises(CryptoOperationError) as no_decrypt:
        await klm.decrypt(sealed, owner=OWNER)
    assert no_decrypt.value.code == "usage_not_permitted"
    found = await lifecycle.wait_for(
        lambda e: e.type == "klm.key.usage_denied" and e.subject == key["key_id"], count=2)
    assert {d.data["operation"] for d in found} == {"sign", "decrypt"}
    assert all(d.data["code"] == "usage_not_permitted" and d.data["requester"] == "tests/usage"
               for d in found)


async def test_another_tenant_is_forbidden(klm: KlmClient, lifecycle: EventLog) -> None:
    key = await new_key(klm, "EC")
    with pytest.raises(CryptoOperationError) as refused:
        await klm.sign(key["key_id"], b"x", owner="someone-else")
    assert refused.value.code == "forbidden"
    [denied] = await lifecycle.wait_for(
        lambda e: e.type == "klm.key.usage_denied" and e.subject == key["key_id"])
    assert denied.data["tenant"] == "someone-else" and denied.data["owner"] == OWNER


async def test_unknown_key_is_answered_not_found(klm: KlmClient) -> None:
    with pytest.raises(CryptoOperationError) as refused:
        await klm.sign("klm:key:00000000-0000-4000-8000-000000000000", b"x", owner=OWNER)
    assert refused.value.code == "key_not_found"


async def lifecycle_request(klm: KlmClient, data: Any) -> CloudEvent:
    return await klm.request(data, subject=data.key_id)


async def test_a_new_key_does_not_notify_the_usage_cache_a_rotation_does(
        klm: KlmClient, settings: KlmSettings) -> None:
    """klm_key_changed makes every keygen's usage cache forget a key. A key's first version
    is inserted with the key, before any cache can hold it, so it does not notify
    (migrations/004); a new version (rotation) does."""
    heard: list[str] = []
    conn = await asyncpg.connect(settings.service_dsn("keygen"))
    try:
        await conn.add_listener("klm_key_changed", lambda *args: heard.append(args[3]))
        key = await new_key(klm, "AES-256")
        await klm.encrypt(key["key_id"], b"x", owner=OWNER)  # cached by keygen's usage side
        await asyncio.sleep(0.5)
        assert key["key_id"] not in heard
        await lifecycle_request(klm, RotateKey(key_id=key["key_id"]))
        for _ in range(50):
            if key["key_id"] in heard:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the rotation did not notify klm_key_changed")
    finally:
        await conn.close()


async def test_rotation_old_ciphertexts_decrypt_new_ones_use_the_new_version(
        klm: KlmClient) -> None:
    key = await new_key(klm, "AES-256")
    old = await klm.encrypt(key["key_id"], b"v1 data", owner=OWNER)
    rotated = await lifecycle_request(klm, RotateKey(key_id=key["key_id"]))
    assert rotated.type == "klm.key.rotated" and rotated.data["version"] == 2
    new = await klm.encrypt(key["key_id"], b"v2 data", owner=OWNER)
    assert (old.version, new.version) == (1, 2)
    assert (await klm.decrypt(old, owner=OWNER)).data == b"v1 data"
    assert (await klm.decrypt(new, owner=OWNER)).version == 2

    ec_key = await new_key(klm, "EC")
    sig1 = await klm.sign(ec_key["key_id"], b"m", owner=OWNER)
    await lifecycle_request(klm, RotateKey(key_id=ec_key["key_id"]))
    sig2 = await klm.sign(ec_key["key_id"], b"m", owner=OWNER)
    assert (sig1.version, sig2.version) == (1, 2)
    assert await klm.verify(ec_key["key_id"], b"m", sig1, owner=OWNER)
    assert await klm.verify(ec_key["key_id"], b"m", sig2, owner=OWNER)


async def test_suspended_key_refuses_protect_and_process(klm: KlmClient) -> None:
    key = await new_key(klm, "AES-256")
    sealed = await klm.encrypt(key["key_id"], b"x", owner=OWNER)
    await lifecycle_request(klm, SuspendKey(key_id=key["key_id"]))
    for call in (klm.encrypt(key["key_id"], b"y", owner=OWNER), klm.decrypt(sealed, owner=OWNER)):
        with pytest.raises(CryptoOperationError) as refused:
            await call
        assert refused.value.code == "key_not_active"


async def test_compromised_key_only_processes_with_a_warning(klm: KlmClient) -> None:
    key = await new_key(klm, "AES-256")
    sealed = await klm.encrypt(key["key_id"], b"x", owner=OWNER)
    await lifecycle_request(klm, RevokeKey(key_id=key["key_id"], reason="compromised"))
    opened = await klm.decrypt(sealed, owner=OWNER)
    assert opened.data == b"x" and opened.warning and "compromised" in opened.warning
    with pytest.raises(CryptoOperationError) as refused:
        await klm.encrypt(key["key_id"], b"y", owner=OWNER)
    assert refused.value.code == "key_not_active"


async def test_destroyed_key_refuses_everything(klm: KlmClient, settings: KlmSettings,
                                                topics: Topics, lifecycle: EventLog,
                                                keygen: ServiceProcess) -> None:
    key = await new_key(klm, "AES-256", usages=["encrypt", "decrypt"])
    key_id = key["key_id"]
    sealed = await klm.encrypt(key_id, b"x", owner=OWNER)
    assert (await klm.decrypt(sealed, owner=OWNER)).data == b"x"  # cached handle now
    await lifecycle_request(klm, RevokeKey(key_id=key_id, reason="cessation"))
    # the state change reached keygen's usage side (NOTIFY): it dropped the cached handle
    for _ in range(50):
        if f"handle(s) of changed keys {key_id}" in keygen.log_path.read_text():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the unwrapped handle was not dropped on the state change")
    assert (await klm.decrypt(sealed, owner=OWNER)).data == b"x"  # deactivated: process only
    await lifecycle_request(klm, ScheduleDestruction(key_id=key_id, waiting_days=7))
    await asyncio.sleep(7 * float(DAY_SECONDS) + 0.5)
    command = make_event(DestroyKey.event_type, DestroyKey(key_id=key_id), source="tests",
                         subject=key_id)
    await publish(settings.kafka_bootstrap, topics.commands,
                  [(command.partition_key, command.to_bytes())])
    await lifecycle.wait_for(lambda e: e.type == "klm.key.destroyed" and e.subject == key_id)
    for call in (klm.encrypt(key_id, b"y", owner=OWNER), klm.decrypt(sealed, owner=OWNER)):
        with pytest.raises(CryptoOperationError) as refused:
            await call
        assert refused.value.code == "key_not_active"


async def test_uses_are_summarised_per_key_and_interval(klm: KlmClient, lifecycle: EventLog,
                                                        settings: KlmSettings) -> None:
    key = await new_key(klm, "HMAC-SHA256")
    for _ in range(5):
        await klm.mac(key["key_id"], b"x", owner=OWNER)
    await klm.verify_mac(key["key_id"], b"x", b"\0" * 32, owner=OWNER)
    summaries = await lifecycle.wait_for(
        lambda e: e.type == "klm.key.usage_summary" and e.subject == key["key_id"],
        timeout=90)
    ops: dict[str, int] = {}
    for _ in range(20):  # a later interval may hold the rest
        summaries = lifecycle.matching(
            lambda e: e.type == "klm.key.usage_summary" and e.subject == key["key_id"])
        ops = {}
        for s in summaries:
            for op, n in s.data["operations"].items():
                ops[op] = ops.get(op, 0) + n
        if sum(ops.values()) >= 6:
            break
        await asyncio.sleep(0.5)
    assert ops == {"mac": 5, "mac_verify": 1}
    assert len(summaries) <= 6  # aggregated, not one event per operation
    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        row = await conn.fetchrow("SELECT last_used_at, use_count FROM keygen.key_usage "
                                  "WHERE key_id = $1", key["key_id"])
    finally:
        await conn.close()
    assert row is not None and row["use_count"] == 6


async def test_reply_topic_outside_the_prefix_goes_to_the_dlq(
        klm: KlmClient, settings: KlmSettings, topics: Topics, dlq: EventLog) -> None:
    key = await new_key(klm, "EC")
    request = make_event(CryptoSign.event_type, CryptoSign(
        key_id=key["key_id"], owner=OWNER, reply_to=topics.lifecycle, data_b64="eA=="),
        source="tests", subject=key["key_id"])
    await publish(settings.kafka_bootstrap, topics.crypto_requests,
                  [(request.partition_key, request.to_bytes())])
    [letter] = await dlq.wait_for(
        lambda e: "reply_to" in e.data.get("error", "") and
        request.id.encode() in base64.b64decode(e.data["original_b64"]))
    assert letter.data["topic"] == topics.crypto_requests


async def test_a_malformed_request_is_answered_with_its_code(klm: KlmClient) -> None:
    key = await new_key(klm, "EC")
    channel = await klm.crypto()
    bad = CryptoSign.model_construct(key_id=key["key_id"], owner=OWNER,
                                     reply_to=channel.reply_topic, data_b64="%%% not base64")
    with pytest.raises(CryptoOperationError) as refused:
        await channel.call(bad)
    assert refused.value.code == "invalid_request"
