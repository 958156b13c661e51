"""The backup handlers' decisions, through a hand-written in-memory store (the same
operations as :class:`klm_backup.adapters.store.Unit`; the Postgres one is exercised by
tests/integration/test_backup.py)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from klm_backup import handlers
from klm_backup.adapters.store import KeyRow
from klm_backup.domain.integrity import StoredBackup
from klm_common.envelope import CloudEvent, make_event
from klm_common.events import BackupMaterial
from klm_common.topics import Topics

TAG_KEY = bytes(32)
T0 = datetime(2026, 11, 28, tzinfo=UTC)
KEY = "klm:key:6f1c1c2e-0c1a-4f39-9f55-7a1d8b1e2f30"
TOPICS = Topics("t.")


class FakeUnit:
    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.backups: dict[str, StoredBackup] = {}
        self.destroyed_ids: set[str] = set()
        self.sent: list[tuple[str, CloudEvent]] = []

    async def emit(self, topic: str, events: Sequence[CloudEvent]) -> None:
        self.sent += [(topic, e) for e in events]

    def note_key(self, key_id: str, owner: str, state: str, primary_version: int | None,
                 generated: dict[str, Any] | None = None) -> None:
        row = self.keys.setdefault(key_id, {"owner": owner, "primary": 1, "generated": None})
        row["state"] = state
        row["primary"] = primary_version or row["primary"]
        row["generated"] = generated or row["generated"]

    async def states(self, key_ids: Sequence[str]) -> dict[str, str]:
        return {k: self.keys[k]["state"] for k in key_ids if k in self.keys}

    async def key(self, key_id: str) -> KeyRow | None:
        r = self.keys.get(key_id)
        return KeyRow(key_id, r["owner"], r["state"], r["primary"], r["generated"]) if r else None

    async def destroyed(self, key_ids: Sequence[str]) -> set[str]:
        return self.destroyed_ids & set(key_ids)

    async def insert_backups(self, backups: Sequence[StoredBackup]) -> set[str]:
        new = {b.backup_id for b in backups if b.backup_id not in self.backups}
        self.backups.update({b.backup_id: b for b in backups if b.backup_id in new})
        return new

    async def backups_of(self, key_id: str, version: int | None = None) -> list[StoredBackup]:
        return sorted((b for b in self.backups.values() if b.key_id == key_id
                       and version in (None, b.version)), key=lambda b: b.version)

    async def shred(self, key_id: str, destroyed_event_id: str) -> list[StoredBackup]:
        self.destroyed_ids.add(key_id)
        gone = [b for b in self.backups.values() if b.key_id == key_id]
        for b in gone:
            del self.backups[b.backup_id]
        return gone

    def types(self, topic: str) -> list[str]:
        return [e.type for t, e in self.sent if t == topic]


def deps() -> handlers.Deps:
    return handlers.Deps(store=None, topics=TOPICS, tag_key=TAG_KEY,  # type: ignore[arg-type]
                         dead_letters=None)  # type: ignore[arg-type]


def generated(algorithm: str = "AES", usages: list[str] | None = None, **extra: Any
              ) -> CloudEvent:
    data = {"key_id": KEY, "owner": "acme", "state": "active", "name": "k",
            "algorithm": algorithm, "size": 256, "usages": usages or ["encrypt", "decrypt"],
            "protection": "hsm-wrapped", "version": 1, "created_at": T0.isoformat(), **extra}
    return make_event("klm.key.generated", data, source="klm/keygen", subject=KEY)


def wrapped_reply(command: CloudEvent) -> CloudEvent:
    material = BackupMaterial(
        key_id=KEY, version=1, owner="acme", name="k", algorithm="AES", size=256,
        usages=["encrypt"], protection="hsm-wrapped", key_created_at=T0,
        version_state="active", version_created_at=T0, kcv="abcdef",
        blob_b64=base64.b64encode(os.urandom(40)).decode(), backup_kek_kcv="123456")
    return make_event("klm.backup.versions_wrapped", {"materials": [
        json.loads(material.model_dump_json())]}, source="klm/keygen", cause=command)


pytestmark = pytest.mark.asyncio


async def test_a_new_secret_key_is_sent_to_keygen_for_wrapping_then_stored_once() -> None:
    unit = FakeUnit()
    await handlers.apply_lifecycle(unit, [generated()], deps())  # type: ignore[arg-type]
    [(topic, command)] = unit.sent
    assert (topic, command.type) == (TOPICS.backup_commands, "klm.backup.wrap_versions")
    assert command.data["versions"] == [{"key_id": KEY, "version": 1}]
    reply = wrapped_reply(command)
    await handlers.apply_backup_topic(unit, [reply], deps())  # type: ignore[arg-type]
    await handlers.apply_backup_topic(unit, [reply], deps())  # type: ignore[arg-type]
    assert unit.types(TOPICS.lifecycle) == ["klm.key.backed_up"]
    [stored] = unit.backups.values()
    assert stored.blob and stored.verified(TAG_KEY).kcv == "abcdef"


async def test_a_private_signature_key_gets_a_public_only_backup() -> None:
    unit = FakeUnit()
    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    await handlers.apply_lifecycle(unit, [generated("EC", ["sign", "verify"], curve="P-256",  # type: ignore[arg-type]
                                                    public_key_pem=pem)], deps())
    assert unit.types(TOPICS.backup_commands) == []
    [(_, fact)] = unit.sent
    assert fact.type == "klm.key.backed_up" and fact.data["skipped"] is True
    [stored] = unit.backups.values()
    assert stored.blob is None and stored.verified(TAG_KEY).public_der_b64


async def test_destruction_shreds_and_later_blobs_and_restores_are_refused() -> None:
    unit = FakeUnit()
    await handlers.apply_lifecycle(unit, [generated()], deps())  # type: ignore[arg-type]
    command = unit.sent[0][1]
    await handlers.apply_backup_topic(unit, [wrapped_reply(command)], deps())  # type: ignore[arg-type]
    destroyed = make_event("klm.key.destroyed", {
        "key_id": KEY, "owner": "acme", "state": "destroyed", "previous_state": "deactivated",
        "versions": [1]}, source="klm/keygen", subject=KEY)
    await handlers.apply_lifecycle(unit, [destroyed], deps())  # type: ignore[arg-type]
    assert unit.backups == {}
    shredded = [e for _, e in unit.sent if e.type == "klm.backup.shredded"]
    assert shredded[0].data["versions"] == [1]
    assert shredded[0].data["destroyed_event_id"] == destroyed.id
    await handlers.apply_backup_topic(unit, [wrapped_reply(command)], deps())  # type: ignore[arg-type]
    assert unit.backups == {}  # a late blob of a destroyed key is dropped
    restore = make_event("klm.request.restore_key", {"key_id": KEY}, source="t", subject=KEY)
    await handlers.apply_requests(unit, [restore], deps())  # type: ignore[arg-type]
    answer = unit.sent[-1][1]
    assert (answer.type, answer.data["code"]) == ("klm.request.rejected", "key_destroyed")
    assert answer.correlationid == restore.id


async def test_restore_of_a_tampered_backup_is_refused_before_keygen() -> None:
    unit = FakeUnit()
    await handlers.apply_lifecycle(unit, [generated()], deps())  # type: ignore[arg-type]
    await handlers.apply_backup_topic(unit, [wrapped_reply(unit.sent[0][1])], deps())  # type: ignore[arg-type]
    [(backup_id, stored)] = unit.backups.items()
    blob = stored.blob or b""
    unit.backups[backup_id] = StoredBackup(**{
        **{n: getattr(stored, n) for n in StoredBackup.__slots__},
        "blob": bytes([blob[0] ^ 1]) + blob[1:]})
    restore = make_event("klm.request.restore_key", {"key_id": KEY}, source="t", subject=KEY)
    await handlers.apply_requests(unit, [restore], deps())  # type: ignore[arg-type]
    assert unit.types(TOPICS.backup_commands) == ["klm.backup.wrap_versions"]  # no restore
    assert unit.sent[-1][1].data["code"] == "integrity_check_failed"


async def backed_up_unit() -> FakeUnit:
    """A unit holding one backed-up key of tenant ``acme``."""
    unit = FakeUnit()
    await handlers.apply_lifecycle(unit, [generated()], deps())  # type: ignore[arg-type]
    await handlers.apply_backup_topic(unit, [wrapped_reply(unit.sent[0][1])], deps())  # type: ignore[arg-type]
    return unit


@pytest.mark.parametrize("request_type", ["restore_key", "backup_key"])
async def test_a_tenant_may_not_act_on_another_tenants_key(request_type: str) -> None:
    unit = await backed_up_unit()
    sent = len(unit.sent)
    req = make_event(f"klm.request.{request_type}", {"key_id": KEY}, source="t", subject=KEY)
    await handlers.apply_requests(unit, [req], deps(),  # type: ignore[arg-type]
                                  tenants={req.id: "intruder"})
    [(topic, answer)] = unit.sent[sent:]
    assert topic == TOPICS.lifecycle
    assert (answer.type, answer.data["code"]) == ("klm.request.rejected", "forbidden")
    assert answer.correlationid == req.id


async def test_a_tenant_gets_nothing_on_a_key_backup_does_not_know() -> None:
    unit = FakeUnit()
    other = "klm:key:00000000-0000-4000-8000-000000000000"
    req = make_event("klm.request.restore_key", {"key_id": other}, source="t", subject=other)
    await handlers.apply_requests(unit, [req], deps(),  # type: ignore[arg-type]
                                  tenants={req.id: "acme"})
    assert unit.sent[-1][1].data["code"] == "forbidden"  # not "backup_not_found": no probing


async def test_the_owner_tenant_and_operators_are_served() -> None:
    unit = await backed_up_unit()
    own = make_event("klm.request.restore_key", {"key_id": KEY}, source="t", subject=KEY)
    operator = make_event("klm.request.restore_key", {"key_id": KEY}, source="t", subject=KEY)
    await handlers.apply_requests(unit, [own, operator], deps(),  # type: ignore[arg-type]
                                  tenants={own.id: "acme", operator.id: None})
    restores = [e for t, e in unit.sent if t == TOPICS.backup_commands
                and e.type == "klm.backup.restore_versions"]
    assert [e.correlationid for e in restores] == [own.id, operator.id]


async def test_the_policy_decides_which_requests_a_tenant_may_send() -> None:
    from klm_common.policy import Permission, load_policy

    policy = load_policy()
    policy = policy.model_copy(update={"permissions": [
        *policy.permissions, Permission(request="restore_key", requesters=["ops-*"])]})
    unit = await backed_up_unit()
    req = make_event("klm.request.restore_key", {"key_id": KEY}, source="t", subject=KEY)
    strict = handlers.Deps(store=None, topics=TOPICS, tag_key=TAG_KEY,  # type: ignore[arg-type]
                           dead_letters=None, policy=policy)  # type: ignore[arg-type]
    await handlers.apply_requests(unit, [req], strict,  # type: ignore[arg-type]
                                  tenants={req.id: "acme"})
    answer = unit.sent[-1][1]
    assert answer.data["code"] == "forbidden" and "restore_key" in answer.data["message"]
