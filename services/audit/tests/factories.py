"""Event factories for unit tests (the events are the klm-common models, never redefined)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import GenerateKey, KeyGenerated

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Events:
    """Builds envelopes of a key's life, with times advancing one day per event."""

    def __init__(self) -> None:
        self.clock = T0

    def tick(self) -> datetime:
        self.clock += timedelta(days=1)
        return self.clock

    def request(self, owner: str = "acme", **fields: Any) -> CloudEvent:
        data = GenerateKey(owner=owner, name=fields.pop("name", "k"),
                           algorithm=fields.pop("algorithm", "AES"), **fields)
        return make_event(GenerateKey.event_type, data, source="tests", time=self.tick())

    def generated(self, owner: str = "acme", cause: CloudEvent | None = None,
                  **fields: Any) -> CloudEvent:
        key_id = fields.pop("key_id", f"klm:key:{uuid.uuid4()}")
        data = KeyGenerated(
            key_id=key_id, owner=owner, state=fields.pop("state", "active"),
            name=fields.pop("name", "k"), algorithm=fields.pop("algorithm", "AES"),
            size=fields.pop("size", 256), usages=fields.pop("usages", ["encrypt", "decrypt"]),
            protection="hsm-wrapped", version=1, created_at=self.clock, kcv="a1b2c3", **fields)
        return make_event(KeyGenerated.event_type, data, source="klm/keygen", subject=key_id,
                          cause=cause, time=self.tick())

    def fact(self, type_: str, key: CloudEvent, **data: Any) -> CloudEvent:
        payload = {"key_id": key.subject, "owner": key.data["owner"], **data}
        return make_event(type_, payload, source="klm/keygen", subject=key.subject,
                          time=self.tick())

    def request_for(self, type_: str, key: CloudEvent, **data: Any) -> CloudEvent:
        return make_event(type_, {"key_id": key.subject, **data}, source="tests",
                          subject=key.subject, time=self.tick())
