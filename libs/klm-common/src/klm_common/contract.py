"""The public contract, exported from the code: a JSON Schema per event type and an
AsyncAPI 3.0 document of the KLM topics. ``klm schemas export`` writes them to
``docs/contract/``; a unit test fails when the checked-in copies drift from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klm_common.envelope import SCHEMA_VERSION, CloudEvent
from klm_common.events import EVENT_TYPES, EventData
from klm_common.telemetry import VERSION
from klm_common.topics import (
    BACKUP,
    BACKUP_COMMANDS,
    COMMANDS,
    CRYPTO_REQUESTS,
    DLQ,
    INVENTORY_REQUESTS,
    LIFECYCLE,
    PARTITIONS,
    REQUESTS,
)

#: the reply topic a crypto requester names in ``reply_to`` (one per client)
CRYPTO_REPLIES = "klm.crypto.replies.{client}"
#: events that never travel on a topic: the audit service writes them to its own log
AUDIT_ONLY = "(audit log only)"

#: which topic carries which event types: exact types first, then by type prefix
_TOPIC_OF_TYPE = {
    "klm.request.rejected": LIFECYCLE,
    "klm.request.import_observed_key": INVENTORY_REQUESTS,
    "klm.crypto.reply": CRYPTO_REPLIES,
    "klm.audit.access_denied": AUDIT_ONLY,
    "klm.backup.wrap_versions": BACKUP_COMMANDS,
    "klm.backup.restore_versions": BACKUP_COMMANDS,
    "klm.backup.check_blobs": BACKUP_COMMANDS,
    "klm.backup.versions_wrapped": BACKUP,
    "klm.backup.blobs_checked": BACKUP,
    "klm.backup.recover_all": BACKUP,
    "klm.backup.start_drill": BACKUP,
    "klm.backup.shredded": LIFECYCLE,
    "klm.backup.drill_completed": LIFECYCLE,
    "klm.backup.recovery_started": LIFECYCLE,
}
_TOPIC_OF_PREFIX = [
    ("klm.request.", REQUESTS),
    ("klm.command.", COMMANDS),
    ("klm.crypto.", CRYPTO_REQUESTS),
    ("klm.dlq.", DLQ),
    ("klm.key.", LIFECYCLE),
    ("klm.audit.", LIFECYCLE),
    ("klm.policy.", LIFECYCLE),
]


def topic_of(event_type: str) -> str:
    """The topic (or channel address) an event type travels on; KeyError if unmapped, so a
    new event type cannot be added without saying where it goes."""
    if event_type in _TOPIC_OF_TYPE:
        return _TOPIC_OF_TYPE[event_type]
    for prefix, topic in _TOPIC_OF_PREFIX:
        if event_type.startswith(prefix):
            return topic
    raise KeyError(f"no topic for {event_type}: add it to klm_common.contract")


def event_schema(event_type: str, cls: type[EventData]) -> dict[str, Any]:
    """JSON Schema of a whole CloudEvent whose ``data`` is ``cls``."""
    envelope = CloudEvent.model_json_schema()
    data = cls.model_json_schema()
    defs = {**envelope.pop("$defs", {}), **data.pop("$defs", {})}
    envelope["properties"]["type"] = {"const": event_type, "type": "string"}
    envelope["properties"]["data"] = data
    envelope["title"] = event_type
    envelope["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    envelope["$id"] = f"urn:klm:schema:{event_type}:{SCHEMA_VERSION}"
    if defs:
        envelope["$defs"] = defs
    return envelope


def json_schemas() -> dict[str, dict[str, Any]]:
    return {name: event_schema(name, cls) for name, cls in sorted(EVENT_TYPES.items())}


def asyncapi_document() -> dict[str, Any]:
    """AsyncAPI 3.0: one channel per topic, one message per event type."""
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    for name, cls in sorted(EVENT_TYPES.items()):
        key = name.replace(".", "_")
        messages[key] = {
            "name": name, "title": name, "summary": (cls.__doc__ or name).strip().split("\n")[0],
            "contentType": "application/cloudevents+json",
            "payload": {"$ref": f"schemas/{name}.json"},
        }
        topic = topic_of(name)
        if topic == AUDIT_ONLY:
            continue
        channel = channels.setdefault(_channel_id(topic), {
            "address": topic, "messages": {}, "description": _describe(topic)})
        channel["messages"][key] = {"$ref": f"#/components/messages/{key}"}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "KLM — key lifecycle management", "version": VERSION,
                 "description": "CloudEvents 1.0 structured JSON on every topic; "
                                f"klmschema {SCHEMA_VERSION}."},
        "defaultContentType": "application/cloudevents+json",
        "channels": channels,
        "components": {"messages": messages},
    }


def _channel_id(topic: str) -> str:
    return topic.replace("{client}", "client").replace(".", "_")


def _describe(topic: str) -> str:
    if topic == CRYPTO_REPLIES:
        return ("the requester's own reply topic, named in the request's reply_to; "
                "answers matched by correlationid")
    return (f"{PARTITIONS[topic]} partitions, record key = key_id "
            "(or the request id before a key exists)")


def render() -> dict[str, str]:
    """Relative path → file text of everything ``export`` writes."""
    files = {f"schemas/{name}.json": _dump(schema) for name, schema in json_schemas().items()}
    files["asyncapi.json"] = _dump(asyncapi_document())
    return files


def export(folder: Path) -> list[Path]:
    written = []
    for relative, text in render().items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
