"""Hand-written fakes behind keygen's ports (cosmicpython style), and the ``deps`` fixture."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import pytest

from klm_common.algorithms import KeySpec, Protection
from klm_common.envelope import CloudEvent
from klm_common.errors import HsmUnavailable, KlmError
from klm_common.kafka import DeadLetters
from klm_common.topics import Topics
from klm_keygen.domain.generation import NewKey
from klm_keygen.domain.material import GeneratedVersion
from klm_keygen.handlers.requests import Deps


class FakeHsm:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.available = True

    async def generate(self, specs: Sequence[tuple[KeySpec, Protection, bytes]]
                       ) -> list[GeneratedVersion | KlmError]:
        if not self.available:
            raise HsmUnavailable("token removed")
        self.calls.append(len(specs))
        return [GeneratedVersion(os.urandom(40), None,
                                 hashlib.sha256(os.urandom(8)).hexdigest()[:6])
                for _ in specs]

    async def healthy(self) -> bool:
        return self.available


class FakeKeystore:
    def __init__(self) -> None:
        self.inbox: set[str] = set()
        self.keys: dict[str, NewKey] = {}
        self.outbox: list[CloudEvent] = []

    async def processed(self, request_ids: Sequence[str]) -> set[str]:
        return self.inbox & set(request_ids)

    async def save(self, request_ids: Sequence[str], keys: Sequence[NewKey],
                   answers: Sequence[CloudEvent]) -> set[str]:
        claimed = set(request_ids) - self.inbox
        self.inbox |= claimed
        self.keys.update({k.plan.key_id: k for k in keys if k.plan.request.id in claimed})
        self.outbox.extend(a for a in answers if a.correlationid in claimed)
        return claimed

    async def count_keys(self) -> int:
        return len(self.keys)


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
