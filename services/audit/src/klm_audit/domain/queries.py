"""Query parameters of the read API, as plain values the stores understand (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose data a caller may see: ``tenant=None`` means every tenant."""

    tenant: str | None = None

    def allows(self, tenant: str | None) -> bool:
        return self.tenant is None or tenant == self.tenant


@dataclass(frozen=True, slots=True)
class EventFilter:
    type: str | None = None
    subject: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_sequence: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class KeyFilter:
    state: str | None = None
    algorithm: str | None = None
    owner: str | None = None
    after_key_id: str | None = None
    limit: int = 100
