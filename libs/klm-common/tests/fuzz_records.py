"""Hypothesis strategies for hostile Kafka records (used by the fuzz tests).

Each record carries the *kind* of damage it was made with, so a test can state what must
happen to it: bytes that are not a KLM CloudEvent go to the DLQ; a well-formed envelope
whose payload is wrong gets ``klm.request.rejected`` with a code; nothing crashes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord
from hypothesis import strategies as st

from klm_common.envelope import MAX_RECORD_BYTES

#: kinds whose bytes can never be a CloudEvent: they must all end in the DLQ
NEVER_AN_ENVELOPE = frozenset({"truncated", "invalid_utf8", "huge", "not_object",
                               "deep_nesting", "no_value"})

ALGORITHMS = [("AES-256", {}), ("AES-128", {}), ("EC", {"curve": "P-256"}),
              ("EC", {"curve": "P-384"}), ("Ed25519", {}), ("HMAC-SHA-256", {})]
ABSURD_SIZES = [-(10**30), -1, 0, 1, 7, 127, 129, 2**15, 2**31, 2**63, 10**30]
REQUEST_TYPES = ["generate_key", "rotate_key", "suspend_key", "reactivate_key",
                 "revoke_key", "schedule_destruction", "cancel_destruction", "backup_key",
                 "restore_key"]
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70),
                                                               max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


@dataclass(frozen=True)
class Hostile:
    kind: str
    value: bytes | None
    headers: list[tuple[str, bytes]]


def envelope(event_id: str, kind: str, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": "fuzz",
            "type": f"klm.request.{kind}", "time": "2026-11-28T10:00:00Z",
            "datacontenttype": "application/json", "klmschema": 1, "data": data, **extra}


@st.composite
def valid_request(draw: st.DrawFn) -> dict[str, Any]:
    """A request keygen would accept (or answer on its merits, e.g. key_not_found)."""
    event_id = str(draw(st.uuids()))
    kind = draw(st.sampled_from(["generate_key"] * 3 + REQUEST_TYPES))
    if kind == "generate_key":
        algorithm, extra = draw(st.sampled_from(ALGORITHMS))
        data: dict[str, Any] = {"owner": "acme", "name": "fuzz", "algorithm": algorithm,
                                **extra}
    else:
        data = {"key_id": f"klm:key:{draw(st.uuids())}"}
    return envelope(event_id, kind, data)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:  # noqa: PLR0912 - one branch per kind of damage
    kind = draw(st.sampled_from([
        "valid", "truncated", "invalid_utf8", "huge", "huge_field", "wrong_envelope_type",
        "wrong_data_type", "unknown_type", "fact_as_request", "future_schema", "key_size",
        "random_json", "random_bytes", "not_object", "deep_nesting", "no_value",
        "missing_field", "extra_fields"]))
    base = draw(valid_request())
    raw = dumps(base)
    value: bytes | None
    if kind == "valid":
        value = raw
    elif kind == "truncated":
        value = raw[:draw(st.integers(0, len(raw) - 1))]
    elif kind == "invalid_utf8":
        at = draw(st.integers(0, len(raw)))
        value = raw[:at] + draw(st.sampled_from(BAD_UTF8)) + raw[at:]
    elif kind == "huge":
        size = draw(st.integers(MAX_RECORD_BYTES + 1, MAX_RECORD_BYTES * 3))
        value = raw[:-1] + b', "pad": "' + b"A" * size + b'"}'  # valid JSON, too big
    elif kind == "huge_field":  # under the record limit, over a field's limit
        field = draw(st.sampled_from(["id", "source", "subject", "correlationid"]))
        base[field] = "x" * draw(st.integers(300, 100_000))
        value = dumps(base)
    elif kind == "wrong_envelope_type":
        field = draw(st.sampled_from(["id", "source", "type", "time", "klmschema", "data",
                                      "specversion", "subject"]))
        base[field] = draw(json_values)
        value = dumps(base)
    elif kind == "wrong_data_type":
        field = draw(st.sampled_from(["owner", "name", "algorithm", "size", "usages",
                                      "labels", "protection", "key_id", "curve"]))
        base["data"][field] = draw(json_values)
        value = dumps(base)
    elif kind == "unknown_type":
        base["type"] = "klm.request." + draw(st.from_regex(r"[a-z_]{1,24}", fullmatch=True))
        value = dumps(base)
    elif kind == "fact_as_request":
        base["type"] = draw(st.sampled_from(["klm.key.generated", "klm.key.destroyed",
                                             "klm.request.rejected", "klm.dlq.dead_letter"]))
        value = dumps(base)
    elif kind == "future_schema":
        base["klmschema"] = draw(st.one_of(st.integers(2, 2**40), st.integers(-(2**40), 0)))
        value = dumps(base)
    elif kind == "key_size":
        base["type"] = "klm.request.generate_key"
        base["data"] = {"owner": "acme", "name": "k",
                        "algorithm": draw(st.sampled_from(["AES", "RSA", "HMAC-SHA-256",
                                                           "EC"])),
                        "size": draw(st.one_of(st.sampled_from(ABSURD_SIZES), st.integers()))}
        value = dumps(base)
    elif kind == "random_json":
        value = dumps(draw(st.dictionaries(st.text(max_size=12), json_values, max_size=8)))
    elif kind == "random_bytes":
        value = draw(st.binary(max_size=600))
    elif kind == "not_object":
        value = dumps(draw(st.one_of(st.lists(json_values, max_size=5), json_scalars)))
    elif kind == "deep_nesting":
        depth = draw(st.integers(1_000, MAX_RECORD_BYTES // 2))
        inner = b"[" * (depth - 10) + b"]" * (depth - 10)
        value = draw(st.sampled_from([b"[" * depth + b"]" * depth, b'{"data":' + inner + b"}"]))
    elif kind == "no_value":
        value = None
    elif kind == "missing_field":
        del base[draw(st.sampled_from(["id", "source", "type", "specversion"]))]
        value = dumps(base)
    else:  # extra_fields: unknown attributes are tolerated or refused, never a crash
        base.update(draw(st.dictionaries(st.from_regex(r"[a-z]{1,12}", fullmatch=True),
                                         json_values, min_size=1, max_size=5)))
        value = dumps(base)
    header_value = st.one_of(st.binary(max_size=40), st.sampled_from(BAD_UTF8),
                             st.integers(1, 1 << 20).map(lambda n: b"h" * n))  # oversize
    headers = draw(st.lists(st.tuples(st.text(max_size=300), header_value), max_size=3))
    return Hostile(kind, value, headers)


def as_records(items: list[Hostile], topic: str, duplicates: list[int]
               ) -> list[ConsumerRecord[bytes, bytes]]:
    """Kafka records of ``items``, with the items at ``duplicates`` sent a second time."""
    values = [*items, *(items[i] for i in duplicates if i < len(items))]
    return [ConsumerRecord(topic, 0, offset, 0, 0, b"k", item.value, None, 1,
                           len(item.value or b""), item.headers)
            for offset, item in enumerate(values)]
