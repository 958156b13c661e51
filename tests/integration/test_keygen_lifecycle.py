"""keygen on the real Kafka + PostgreSQL + SoftHSM: every algorithm in both protection tiers,
misuse refused by the HSM itself, rotation, state changes, destruction, orphan sweep.

The test opens its own (read-mostly) session on the session's token to look at what is
really there: token objects by CKA_ID, and C_SignInit / C_DecryptInit on keys whose
attributes forbid it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, _pkcs11

from klm_common.algorithms import key_spec
from klm_common.envelope import CloudEvent, make_event
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from klm_keygen.adapters.hsm import MASTER_KEK_LABEL, _usage_attributes, object_id
from tests.integration.harness import EventLog, ServiceProcess, publish
from tests.integration.test_keygen_skeleton import admin_fetch, generate_request, send

pytestmark = pytest.mark.asyncio(loop_scope="session")

DAY_SECONDS = 0.2  # a 7-day waiting period lasts 1.4 s here

ALGORITHMS: list[dict[str, Any]] = [
    {"algorithm": "AES-128"}, {"algorithm": "AES-256"},
    {"algorithm": "HMAC-SHA256"}, {"algorithm": "HMAC-SHA384"}, {"algorithm": "HMAC-SHA512"},
    {"algorithm": "EC", "curve": "P-256"}, {"algorithm": "EC", "curve": "P-384"},
    {"algorithm": "Ed25519"},
    {"algorithm": "RSA-2048"}, {"algorithm": "RSA-3072"}, {"algorithm": "RSA-4096"},
]
TIERS = ["hsm-wrapped", "hsm-resident"]


@pytest.fixture(scope="module")
def keygen(start_service: Any) -> Iterator[ServiceProcess]:
    proc: ServiceProcess = start_service("keygen", KLM_DAY_SECONDS=str(DAY_SECONDS))
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def token(klm_env: dict[str, str]) -> Iterator[Any]:
    """A session of the test process on the same token (user logged in)."""
    os.environ["SOFTHSM2_CONF"] = klm_env["SOFTHSM2_CONF"]
    lib = pkcs11.lib(klm_env["KLM_HSM_MODULE"])
    lib.reinitialize()
    tok = lib.get_token(token_label=klm_env["KLM_HSM_TOKEN_LABEL"])
    pin = Path(klm_env["KLM_HSM_PIN_FILE"]).read_text().strip()
    session = tok.open(rw=True, user_pin=pin)
    yield session
    session.close()


def token_classes(session: Any, obj_id: bytes) -> list[str]:
    """The classes of the token objects with CKA_ID ``obj_id`` (empty when none)."""
    return sorted(ObjectClass(o[Attribute.CLASS]).name
                  for o in session.get_objects({Attribute.TOKEN: True, Attribute.ID: obj_id}))


def forced(obj: Any, mixin: type) -> Any:
    """The same object handle with an operation python-pkcs11 would hide because the key's
    attributes forbid it — so the call reaches the HSM (C_SignInit / C_DecryptInit) and the
    HSM is what refuses."""
    return type("Forced", (mixin, type(obj)), {})(obj.wrapper)


def refused_by_hsm(call: Any) -> str:
    with pytest.raises(pkcs11.PKCS11Error) as info:
        call()
    # CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68 (python-pkcs11 0.10 leaves it unmapped)
    assert "0x68" in str(info.value), info.value
    return str(info.value)


def request(type_: str, **data: Any) -> CloudEvent:
    # subject = key id: the Kafka record key, so one key's requests stay in order
    return make_event(f"klm.request.{type_}", data, source="tests", subject=data["key_id"])


def command(type_: str, **data: Any) -> CloudEvent:
    return make_event(f"klm.command.{type_}", data, source="tests", subject=data["key_id"])


async def send_commands(settings: KlmSettings, topics: Topics, *events: CloudEvent) -> None:
    await publish(settings.kafka_bootstrap, topics.commands,
                  [(e.partition_key, e.to_bytes()) for e in events])


async def answer(lifecycle: EventLog, ev: CloudEvent, count: int = 1,
                 timeout: float = 60) -> list[CloudEvent]:
    return await lifecycle.wait_for(lambda e: e.correlationid == ev.id, count, timeout)


async def new_key(settings: KlmSettings, topics: Topics, lifecycle: EventLog,
                  **fields: Any) -> CloudEvent:
    req = generate_request(name=f"lc-{uuid.uuid4().hex[:6]}", **fields)
    await send(settings, topics, req)
    [fact] = await answer(lifecycle, req)
    assert fact.type == "klm.key.generated", fact.data
    return fact


async def versions(settings: KlmSettings, key_id: str) -> list[Any]:
    return await admin_fetch(
        settings, "SELECT v.version, v.state, v.wrapped, v.hsm_object_id, k.primary_version, "
        "k.state AS key_state FROM keygen.key_versions v JOIN keygen.keys k USING (key_id) "
        "WHERE key_id = $1 ORDER BY version", key_id)


# ---- every algorithm × tier -----------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def generated(keygen: ServiceProcess, settings: KlmSettings, topics: Topics,
                    lifecycle: EventLog) -> dict[tuple[int, str], CloudEvent]:
    cases = {(i, tier): generate_request(name=f"all-{i}-{tier}", protection=tier, **fields)
             for i, fields in enumerate(ALGORITHMS) for tier in TIERS}
    await send(settings, topics, *cases.values())
    ids = {r.id for r in cases.values()}
    await lifecycle.wait_for(lambda e: e.correlationid in ids, count=len(ids), timeout=240)
    return {case: lifecycle.answers_to(r.id)[0] for case, r in cases.items()}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("index", range(len(ALGORITHMS)))
async def test_every_algorithm_in_both_tiers(generated: dict[tuple[int, str], CloudEvent],
                                             settings: KlmSettings, token: Any, index: int,
                                             tier: str) -> None:
    fact = generated[(index, tier)]
    if ALGORITHMS[index]["algorithm"] == "Ed25519" and tier == "hsm-wrapped" \
            and fact.type == "klm.request.rejected":
        # SoftHSM 2.6 cannot wrap an EdDSA private key: a clear code, no key
        assert fact.data["code"] == "mechanism_unavailable", fact.data
        assert "hsm-resident" in fact.data["message"]
        return
    assert fact.type == "klm.key.generated", fact.data
    spec = key_spec(ALGORITHMS[index]["algorithm"], None, ALGORITHMS[index].get("curve"))
    assert (fact.data["algorithm"], fact.data["size"]) == (spec.algorithm.value, spec.size)
    assert fact.data["protection"] == tier and fact.data["version"] == 1
    [row] = await versions(settings, fact.data["key_id"])
    obj_id = object_id(fact.data["key_id"], 1)
    asymmetric = spec.key_class.value == "asymmetric"
    if asymmetric:
        der = serialization.load_pem_public_key(fact.data["public_key_pem"].encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert fact.data["fingerprint_sha256"] == hashlib.sha256(der).hexdigest()
    else:
        assert len(fact.data["kcv"]) == 6
    if tier == "hsm-resident":
        assert row["wrapped"] is None and bytes(row["hsm_object_id"]) == obj_id
        expected = ["PRIVATE_KEY", "PUBLIC_KEY"] if asymmetric else ["SECRET_KEY"]
        assert token_classes(token, obj_id) == expected
        [secret] = [o for o in token.get_objects({Attribute.TOKEN: True, Attribute.ID: obj_id})
                    if o[Attribute.CLASS] != ObjectClass.PUBLIC_KEY]
        assert secret[Attribute.SENSITIVE] is True  # never readable in the clear
    else:
        assert row["wrapped"] and row["hsm_object_id"] is None
        assert token_classes(token, obj_id) == []


# ---- misuse refused by the HSM --------------------------------------------------------------
async def test_hsm_refuses_what_the_usages_do_not_allow(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics, lifecycle: EventLog,
        token: Any) -> None:
    aes = await new_key(settings, topics, lifecycle, algorithm="AES-256",
                        usages=["encrypt", "decrypt"], protection="hsm-resident")
    rsa = await new_key(settings, topics, lifecycle, algorithm="RSA-2048",
                        usages=["sign", "verify"], protection="hsm-resident")
    secret = token.get_key(id=object_id(aes.data["key_id"], 1),
                           object_class=ObjectClass.SECRET_KEY)
    assert secret[Attribute.SIGN] is False
    refused_by_hsm(lambda: forced(secret, _pkcs11.SignMixin).sign(
        b"x" * 16, mechanism=Mechanism.AES_CMAC))
    assert len(secret.encrypt(b"x" * 16, mechanism=Mechanism.AES_CBC_PAD,
                              mechanism_param=b"\0" * 16)) == 32  # its own usage works
    private = token.get_key(id=object_id(rsa.data["key_id"], 1),
                            object_class=ObjectClass.PRIVATE_KEY)
    refused_by_hsm(lambda: forced(private, _pkcs11.DecryptMixin).decrypt(
        b"x" * 256, mechanism=Mechanism.RSA_PKCS))
    assert len(private.sign(b"m", mechanism=Mechanism.SHA256_RSA_PKCS)) == 256


async def test_wrapped_key_unwrapped_with_its_usages_is_refused_by_the_hsm(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics, lifecycle: EventLog,
        token: Any) -> None:
    fact = await new_key(settings, topics, lifecycle, algorithm="AES-256",
                         usages=["encrypt", "decrypt"])
    [row] = await versions(settings, fact.data["key_id"])
    kek = token.get_key(label=MASTER_KEK_LABEL, object_class=ObjectClass.SECRET_KEY)
    spec = key_spec("AES-256", None, None, ["encrypt", "decrypt"])
    key = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, bytes(row["wrapped"]),
                         mechanism=Mechanism.AES_KEY_WRAP_PAD,
                         template={**_usage_attributes(spec.usages), Attribute.TOKEN: False})
    refused_by_hsm(lambda: forced(key, _pkcs11.SignMixin).sign(
        b"x" * 16, mechanism=Mechanism.AES_CMAC))
    key.destroy()


# ---- rotation -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [{"algorithm": "AES-256"},
                                    {"algorithm": "EC-P-256", "protection": "hsm-resident"}])
async def test_rotation_adds_a_primary_version_old_one_processes_until_deactivated(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics, lifecycle: EventLog,
        token: Any, fields: dict[str, Any]) -> None:
    fact = await new_key(settings, topics, lifecycle, **fields)
    key_id = fact.data["key_id"]
    rotate = request("rotate_key", key_id=key_id, reason="cryptoperiod")
    await send(settings, topics, rotate)
    [rotated] = await answer(lifecycle, rotate)
    assert rotated.type == "klm.key.rotated", rotated.data
    assert (rotated.data["version"], rotated.data["previous_version"]) == (2, 1)
    rows = await versions(settings, key_id)
    assert [(r["version"], r["state"]) for r in rows] == [(1, "active"), (2, "active")]
    assert rows[0]["primary_version"] == 2
    if fields.get("protection") == "hsm-resident":
        assert rotated.data["fingerprint_sha256"] != fact.data["fingerprint_sha256"]
        for version in (1, 2):
            assert token_classes(token, object_id(key_id, version)) == ["PRIVATE_KEY",
                                                                        "PUBLIC_KEY"]
    # the rotation service ends version 1's process-only period
    deactivate = command("deactivate_version", key_id=key_id, version=1)
    primary = command("deactivate_version", key_id=key_id, version=2)
    await send_commands(settings, topics, deactivate, primary)
    [done] = await answer(lifecycle, deactivate)
    [refused] = await answer(lifecycle, primary)
    assert done.type == "klm.key.version_deactivated" and done.data["version"] == 1
    assert refused.data["code"] == "illegal_transition"
    rows = await versions(settings, key_id)
    assert [(r["version"], r["state"]) for r in rows] == [(1, "deactivated"), (2, "active")]
    # a policy that deactivates the previous version at rotation
    again = request("rotate_key", key_id=key_id, deactivate_previous=True)
    await send(settings, topics, again)
    facts = await answer(lifecycle, again, count=2)
    assert sorted(f.type for f in facts) == ["klm.key.rotated", "klm.key.version_deactivated"]


# ---- state changes and destruction ----------------------------------------------------------
async def test_state_changes_follow_the_state_function(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics,
        lifecycle: EventLog) -> None:
    key_id = (await new_key(settings, topics, lifecycle, algorithm="EC-P-256")).data["key_id"]
    steps = [("suspend_key", {}, "klm.key.suspended", "suspended"),
             ("rotate_key", {}, "illegal_transition", "suspended"),
             ("reactivate_key", {}, "klm.key.reactivated", "active"),
             ("revoke_key", {"reason": "superseded"}, "klm.key.deactivated", "deactivated"),
             ("reactivate_key", {}, "illegal_transition", "deactivated"),
             ("cancel_destruction", {}, "illegal_transition", "deactivated"),
             ("revoke_key", {"reason": "compromised"}, "klm.key.compromised", "compromised")]
    for type_, extra, expected, state in steps:
        ev = request(type_, key_id=key_id, **extra)
        await send(settings, topics, ev)
        [got] = await answer(lifecycle, ev)
        if got.type == "klm.request.rejected":
            assert got.data["code"] == expected, (type_, got.data)
            assert got.data["details"]["current_state"] == state
        else:
            assert (got.type, got.data["state"]) == (expected, state)


@pytest.mark.parametrize("tier", TIERS)
async def test_destruction_when_due_leaves_nothing_usable(
        keygen: ServiceProcess, settings: KlmSettings, topics: Topics, lifecycle: EventLog,
        token: Any, tier: str) -> None:
    fact = await new_key(settings, topics, lifecycle, algorithm="EC-P-384", protection=tier)
    key_id = fact.data["key_id"]
    rotate = request("rotate_key", key_id=key_id)
    revoke = request("revoke_key", key_id=key_id, reason="cessation")
    schedule = request("schedule_destruction", key_id=key_id, waiting_days=7)
    await send(settings, topics, rotate, revoke, schedule)
    [scheduled] = await answer(lifecycle, schedule)
    assert scheduled.type == "klm.key.destruction_scheduled", scheduled.data
    [rotated] = await answer(lifecycle, rotate)
    assert rotated.type == "klm.key.rotated", rotated.data
    early = command("destroy_key", key_id=key_id)
    await send_commands(settings, topics, early)
    [not_due] = await answer(lifecycle, early)
    assert not_due.data["code"] == "destruction_not_due"
    await asyncio.sleep(7 * DAY_SECONDS + 0.5)
    due = command("destroy_key", key_id=key_id)
    await send_commands(settings, topics, due)
    [gone] = await answer(lifecycle, due)
    assert gone.type == "klm.key.destroyed", gone.data
    assert (gone.data["state"], gone.data["versions"]) == ("destroyed", [1, 2])
    rows = await versions(settings, key_id)
    assert [r["state"] for r in rows] == ["destroyed", "destroyed"]
    assert all(r["wrapped"] is None for r in rows)  # metadata stays, material is gone
    for version in (1, 2):
        assert token_classes(token, object_id(key_id, version)) == []
    evidence = gone.data["evidence"]
    if tier == "hsm-resident":
        assert set(evidence["hsm_objects_destroyed"]) == {object_id(key_id, v).hex()
                                                          for v in (1, 2)}
        assert all(c == ["private_key", "public_key"]
                   for c in evidence["hsm_objects_destroyed"].values())
    else:
        assert evidence["wrapped_material_cleared_versions"] == [1, 2]
    after = request("rotate_key", key_id=key_id)
    await send(settings, topics, after)
    [refused] = await answer(lifecycle, after)
    assert refused.data["details"]["current_state"] == "destroyed"


# ---- orphans --------------------------------------------------------------------------------
async def test_orphan_resident_object_is_destroyed_at_start_and_reported(
        keygen: ServiceProcess, lifecycle: EventLog, token: Any) -> None:
    keygen.terminate()
    # what a crash between the HSM call and the commit leaves: an object no row names
    orphan_id = object_id(f"klm:key:{uuid.uuid4()}", 1)
    token.generate_key(KeyType.AES, 256, store=True, id=orphan_id,
                       label=f"klm:{orphan_id.hex()}",
                       template={Attribute.TOKEN: True, Attribute.SENSITIVE: True})
    assert token_classes(token, orphan_id) == ["SECRET_KEY"]
    keygen.start()
    [fact] = await lifecycle.wait_for(
        lambda e: e.type == "klm.key.orphan_destroyed"
        and e.data["hsm_object_id"] == orphan_id.hex(), timeout=60)
    assert fact.data["object_classes"] == ["secret_key"]
    assert token_classes(token, orphan_id) == []
