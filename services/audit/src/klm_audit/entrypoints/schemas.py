"""Response bodies of the auditor API (they are the OpenAPI schema at ``/openapi.json``)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from pydantic_core import to_json

from klm_audit.domain.checkpoints import Checkpoint
from klm_audit.domain.entries import StoredEntry
from klm_audit.domain.inventory import KeyView


class EventOut(BaseModel):
    """One audit row. ``event`` is the stored canonical envelope, parsed; re-encoding it
    canonically and hashing it with ``prev_hash`` and ``sequence`` gives ``hash``."""

    sequence: int
    id: str
    type: str
    subject: str | None
    key_version: int | None
    source: str
    tenant: str | None
    correlation_id: str | None
    time: datetime
    recorded_at: datetime
    prev_hash: str = Field(description="hex SHA-256 of the previous row (64 zeros at genesis)")
    hash: str = Field(description="hex SHA-256(prev_hash || uint64_be(sequence) || canonical)")
    event: dict[str, Any]

    @classmethod
    def of(cls, entry: StoredEntry) -> EventOut:
        return cls(
            sequence=entry.sequence, id=entry.event_id, type=entry.type, subject=entry.subject,
            key_version=entry.key_version, source=entry.source, tenant=entry.tenant,
            correlation_id=entry.correlation_id, time=entry.occurred_at,
            recorded_at=entry.recorded_at, prev_hash=entry.prev_hash.hex(),
            hash=entry.hash.hex(), event=json.loads(entry.canonical))


def event_json(entry: StoredEntry) -> bytes:
    """One :class:`EventOut` as JSON, with the stored canonical bytes spliced in as
    ``event`` — no parse and re-serialisation of the event per row (the hot path of history
    and event pages; the canonical JSON is valid JSON by construction)."""
    meta = to_json({
        "sequence": entry.sequence, "id": entry.event_id, "type": entry.type,
        "subject": entry.subject, "key_version": entry.key_version, "source": entry.source,
        "tenant": entry.tenant, "correlation_id": entry.correlation_id,
        "time": entry.occurred_at, "recorded_at": entry.recorded_at,
        "prev_hash": entry.prev_hash.hex(), "hash": entry.hash.hex()})
    return meta[:-1] + b',"event":' + entry.canonical + b"}"


def events_json(entries: list[StoredEntry], **fields: object) -> bytes:
    """``{**fields, "events": [...]}`` as JSON (the body of HistoryOut and EventsPage)."""
    head = to_json(fields)[:-1] + (b',"events":[' if fields else b'"events":[')
    return head + b",".join(event_json(e) for e in entries) + b"]}"


class HistoryOut(BaseModel):
    key_id: str
    events: list[EventOut]


class EventsPage(BaseModel):
    events: list[EventOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at "
                                                "the end (for now: new events get later ones)")


class KeyOut(KeyView):
    age_days: float | None = Field(default=None, description="days since created_at")
    as_of: datetime | None = Field(default=None, description="set when rebuilt with ?at=")

    @classmethod
    def of(cls, view: KeyView, now: datetime | None = None,
           as_of: datetime | None = None) -> KeyOut:
        now = as_of or now or datetime.now(UTC)
        age = (now - view.created_at).total_seconds() / 86400 if view.created_at else None
        return cls(**view.model_dump(), age_days=age, as_of=as_of)


class KeysPage(BaseModel):
    keys: list[KeyOut]
    next_cursor: str | None


class VerifyOut(BaseModel):
    ok: bool
    checked: int = Field(description="rows whose link was checked")
    head_sequence: int
    head_hash: str
    first_broken_sequence: int | None = None
    reason: str | None = None
    checkpoints_checked: int = Field(default=0, description="signed checkpoints verified")
    checkpoint_keys: list[str] = Field(default_factory=list, description="SHA-256 (hex) of "
                                       "the public keys that signed them")
    last_checkpoint: CheckpointOut | None = None


class CheckpointOut(BaseModel):
    """A signed chain head: keep it outside KLM and pass it to tools/verify_chain.py."""

    sequence: int
    head_hash: str
    time: datetime
    algorithm: str
    signing_key_id: str
    signature: str = Field(description="base64 DER")
    public_key: str = Field(description="base64 DER SubjectPublicKeyInfo")
    event_sequence: int = Field(description="where the checkpoint event itself is stored")

    @classmethod
    def of(cls, cp: Checkpoint) -> CheckpointOut:
        return cls(sequence=cp.sequence, head_hash=cp.head_hash.hex(), time=cp.signed_at,
                   algorithm=cp.algorithm, signing_key_id=cp.signing_key_id,
                   signature=base64.b64encode(cp.signature).decode(),
                   public_key=base64.b64encode(cp.public_key).decode(),
                   event_sequence=cp.log_sequence)


class ErrorOut(BaseModel):
    code: str
    message: str
