"""What one audit row says about an event, derived from the canonical envelope (pure).

The indexed columns (type, subject, tenant, version, …) are conveniences for queries; the
hash covers only the canonical JSON, so :func:`derived_mismatch`-style checks in the store
compare them back to it during verification.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from klm_common.envelope import CloudEvent


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record was read from ('' topic for events the audit service writes itself)."""

    topic: str
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One row of the audit log."""

    sequence: int
    event_id: str
    type: str
    subject: str | None
    key_version: int | None
    source: str
    tenant: str | None
    correlation_id: str | None
    occurred_at: datetime
    recorded_at: datetime
    canonical: bytes
    prev_hash: bytes
    hash: bytes


def key_id_of(event: CloudEvent) -> str | None:
    """The key an event is about: its subject, else ``data.key_id`` when it is a string."""
    if event.subject:
        return event.subject
    key_id = event.data.get("key_id")
    return key_id if isinstance(key_id, str) else None


def version_of(data: dict[str, Any]) -> int | None:
    version = data.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def owner_of(data: dict[str, Any]) -> str | None:
    owner = data.get("owner")
    return owner if isinstance(owner, str) and owner else None
