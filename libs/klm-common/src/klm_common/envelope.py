"""The CloudEvents 1.0 envelope (structured JSON mode) carried on every KLM topic.

Parsing is two steps, so bad input gets the right answer:

* :func:`parse_envelope` — bytes → :class:`CloudEvent`. Failure means the record cannot be
  answered (no usable ``id``): it goes to ``klm.dlq`` with the reason.
* :func:`klm_common.events.parse_data` — envelope → typed payload. Failure has an ``id`` to
  correlate with, so it is answered with ``klm.request.rejected`` and a code.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klm_common.errors import KlmError

#: the klmschema version this code writes and the highest it reads
SCHEMA_VERSION = 1
#: records larger than this are refused before JSON parsing (DoS guard)
MAX_RECORD_BYTES = 256 * 1024


class EnvelopeInvalid(KlmError):
    """The record is not a CloudEvent KLM can answer: it goes to the DLQ."""

    code = "envelope_invalid"


class CloudEvent(BaseModel):
    """CloudEvents 1.0 attributes plus KLM extensions (klmschema, correlationid, causationid)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=128, pattern=r"^[a-z0-9_.]+$")
    time: datetime
    subject: str | None = Field(default=None, max_length=256)
    datacontenttype: Literal["application/json"] = "application/json"
    klmschema: int = SCHEMA_VERSION
    correlationid: str | None = Field(default=None, max_length=128)
    causationid: str | None = Field(default=None, max_length=128)
    data: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def to_jsonable(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def partition_key(self) -> bytes:
        """Kafka record key: the key id, or the request id when there is no key yet."""
        return (self.subject or self.correlationid or self.id).encode()


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


def make_event(
    type_: str,
    data: BaseModel | dict[str, Any],
    *,
    source: str,
    subject: str | None = None,
    cause: CloudEvent | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
) -> CloudEvent:
    """Build an envelope; ``cause`` sets causationid and carries its correlationid on."""
    payload = data.model_dump(mode="json", exclude_none=True) if isinstance(data, BaseModel) \
        else data
    correlation = None
    if cause is not None:
        correlation = cause.correlationid or cause.id
    return CloudEvent(
        id=event_id or new_id(),
        source=source,
        type=type_,
        time=time or now(),
        subject=subject,
        correlationid=correlation,
        causationid=cause.id if cause is not None else None,
        data=payload,
    )


def parse_envelope(raw: bytes | None) -> CloudEvent:
    """Parse one Kafka record value; raise :class:`EnvelopeInvalid` with a precise reason."""
    if raw is None:
        raise EnvelopeInvalid("record has no value")
    if len(raw) > MAX_RECORD_BYTES:
        raise EnvelopeInvalid(f"record of {len(raw)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EnvelopeInvalid(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise EnvelopeInvalid(f"not JSON: {exc.msg} at line {exc.lineno} col {exc.colno}") \
            from None
    except RecursionError:  # e.g. 1,000 nested "[": a poison pill otherwise (fuzzing found it)
        raise EnvelopeInvalid("not JSON: nesting too deep") from None
    if not isinstance(obj, dict):
        raise EnvelopeInvalid(f"not a CloudEvent: JSON {type(obj).__name__}, expected object")
    try:
        return CloudEvent.model_validate(obj)
    except ValidationError as exc:
        raise EnvelopeInvalid(f"not a KLM CloudEvent: {_summarise(exc)}") from None
    except RecursionError:
        raise EnvelopeInvalid("not a KLM CloudEvent: nesting too deep") from None


def _summarise(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def validation_message(exc: ValidationError) -> str:
    """A short human message for a pydantic error (shared by envelope and payload parsing)."""
    return _summarise(exc)
