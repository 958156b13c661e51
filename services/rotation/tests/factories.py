"""Builders of inventory keys and facts for rotation's unit tests."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from klm_common.envelope import CloudEvent, make_event
from klm_rotation.domain.inventory import InventoryKey, Version

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def key_id() -> str:
    return f"klm:key:{uuid.uuid4()}"


def inventory_key(**fields: Any) -> InventoryKey:
    created = fields.pop("created_at", T0)
    key = InventoryKey(
        key_id=key_id(), owner="acme", name="k", algorithm="AES", size=256, curve=None,
        usages=("decrypt", "encrypt"), profile=None, policy=None, origin="klm", location=None,
        state="active", primary_version=1, primary_since=created, created_at=created,
        versions={1: Version("active", created)})
    return replace(key, **fields)


def fact(type_: str, key: str, when: datetime = T0, **data: Any) -> CloudEvent:
    return make_event(f"klm.key.{type_}", {"key_id": key, "owner": "acme", **data},
                      source="klm/keygen", subject=key, time=when)


def generated(key: str, when: datetime = T0, **data: Any) -> CloudEvent:
    fields = {"state": "active", "name": "k", "algorithm": "AES", "size": 256,
              "usages": ["encrypt", "decrypt"], "protection": "hsm-wrapped", "version": 1,
              "created_at": when.isoformat(), **data}
    return fact("generated", key, when, **fields)


def rotated(key: str, version: int, when: datetime) -> CloudEvent:
    return fact("rotated", key, when, state="active", version=version,
                previous_version=version - 1, created_at=when.isoformat())


def later(days: float, day_seconds: float = 1.0) -> datetime:
    return T0 + timedelta(seconds=days * day_seconds)
