"""Hand-written fakes behind keygen's ports (cosmicpython style), and the ``deps`` fixture."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import pytest

from klm_common.algorithms import KeySpec, Protection
from klm_common.envelope import CloudEvent
from klm_common.errors import HsmUnavailable, KlmError
from klm_common.kafka import DeadLetters
from klm_common.topics import Topics
from klm_keygen.domain.generation import NewKey
from klm_keygen.domain.lifecycle import KeyRecord, VersionRecord
from klm_keygen.domain.material import GeneratedVersion
from klm_keygen.handlers.requests import Deps


class FakeHsm:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.destroyed: list[bytes] = []
        self.available = True

    async def generate(self, specs: Sequence[tuple[KeySpec, Protection, bytes]]
                       ) -> list[GeneratedVersion | KlmError]:
        if not self.available:
            raise HsmUnavailable("token removed")
        self.calls.append(len(specs))
        return [GeneratedVersion(None, None, hashlib.sha256(os.urandom(8)).hexdigest()[:6],
                                 hsm_object_id=obj_id)
                if protection is Protection.HSM_RESIDENT else
                GeneratedVersion(os.urandom(40), None,
                                 hashlib.sha256(os.urandom(8)).hexdigest()[:6])
                for _, protection, obj_id in specs]

    async def healthy(self) -> bool:
        return self.available

    async def destroy_objects(self, object_ids: Sequence[bytes]) -> dict[str, list[str]]:
        if not self.available:
            raise HsmUnavailable("token removed")
        self.destroyed.extend(object_ids)
        return {oid.hex(): ["private_key", "public_key"] for oid in object_ids}

    @property
    def token_label(self) -> str:
        return "fake"


class FakeUnit:
    """A transaction on the fake keystore: changes land only if the block ends normally."""

    def __init__(self, store: FakeKeystore) -> None:
        self.keystore = store
        self.inbox: set[str] = set()
        self.new_keys: list[NewKey] = []
        self.records: dict[str, KeyRecord] = {}
        self.outbox: list[CloudEvent] = []

    async def claim(self, request_ids: Sequence[str]) -> set[str]:
        claimed = set(request_ids) - self.keystore.inbox
        self.inbox |= claimed
        return claimed

    async def insert_keys(self, keys: Sequence[NewKey]) -> set[str]:
        existing = self.keystore.keys.keys() | self.keystore.records.keys()
        self.new_keys.extend(k for k in keys if k.plan.key_id not in existing)
        return {k.plan.request.id for k in keys if k.plan.key_id in existing}

    async def save_new(self, request_ids: Sequence[str], keys: Sequence[NewKey],
                       answers: Sequence[CloudEvent]) -> set[str]:
        claimed = await self.claim(request_ids)
        claimed -= await self.insert_keys([k for k in keys if k.plan.request.id in claimed])
        await self.queue([a for a in answers if a.correlationid in claimed])
        return claimed

    async def lock_keys(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        return {k: self.keystore.records[k] for k in key_ids if k in self.keystore.records}

    async def store(self, before: KeyRecord, after: KeyRecord, at: datetime) -> None:
        self.records[after.key_id] = after

    async def queue(self, answers: Sequence[CloudEvent]) -> None:
        self.outbox.extend(answers)


class FakeKeystore:
    def __init__(self) -> None:
        self.inbox: set[str] = set()
        self.keys: dict[str, NewKey] = {}
        self.records: dict[str, KeyRecord] = {}
        self.outbox: list[CloudEvent] = []

    async def processed(self, request_ids: Sequence[str]) -> set[str]:
        return self.inbox & set(request_ids)

    @contextlib.asynccontextmanager
    async def unit(self) -> AsyncIterator[FakeUnit]:
        unit = FakeUnit(self)
        yield unit
        self.inbox |= unit.inbox
        for key in unit.new_keys:
            self.keys[key.plan.key_id] = key
            self.records[key.plan.key_id] = record_of(key)
        self.records.update(unit.records)
        self.outbox.extend(unit.outbox)

    async def known_object_ids(self, object_ids: Sequence[bytes]) -> set[bytes]:
        return {v.hsm_object_id for k in self.records.values() for v in k.versions
                if v.hsm_object_id in object_ids}

    async def queue_facts(self, facts: Sequence[CloudEvent]) -> None:
        self.outbox.extend(facts)

    async def count_keys(self) -> int:
        return len(self.keys)


def record_of(key: NewKey) -> KeyRecord:
    """The keystore's view of a freshly generated key (what PgUnit.lock_keys returns)."""
    spec = key.plan.spec
    return KeyRecord(key.plan.key_id, key.plan.data.owner, spec.algorithm.value, spec.size,
                     spec.curve, tuple(sorted(u.value for u in spec.usages)),
                     key.plan.protection, key.state, 1, None,
                     (VersionRecord(1, key.state, key.material.hsm_object_id),))


class FakeBroker:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, value: bytes, topic: str, **_: Any) -> None:
        self.published.append((topic, value))


@pytest.fixture
def deps() -> Deps:
    broker: Any = FakeBroker()
    return Deps(hsm=FakeHsm(), keystore=FakeKeystore(),
                dead_letters=DeadLetters(broker, Topics(), "keygen"), retry_delay=0)
