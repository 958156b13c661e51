"""Kafka plumbing shared by the services: broker factory, topics, record decoding, DLQ.

Delivery rules (DESIGN §3): idempotent producer with ``acks=all``; consumers never
auto-commit — a batch's offsets are committed only after the handler returned, i.e. after
its effects are durable (``AckPolicy.NACK_ON_ERROR``: an exception leaves the batch
uncommitted and it is delivered again).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.middlewares import AckPolicy
from faststream.security import SASLScram512
from opentelemetry import metrics, trace

from klm_common import inbound_telemetry
from klm_common import metrics as klm_metrics
from klm_common.envelope import (
    MAX_RECORD_BYTES,
    CloudEvent,
    EnvelopeInvalid,
    make_event,
    parse_envelope,
)
from klm_common.events import DeadLetter
from klm_common.inbound_telemetry import InboundTelemetry
from klm_common.settings import KlmSettings
from klm_common.topics import Topics

log = logging.getLogger(__name__)

#: uuid5 namespace for ids derived from a record's position (DLQ records, replies)
KLM_NAMESPACE = uuid.UUID("5b0f5c8e-2a4e-4c57-9a59-6f3f0f1b4a11")

#: the KLM services, each its own Kafka principal on the secured stack (infra/kafka/acl_plan.py)
SERVICE_PRINCIPALS = ("keygen", "rotation", "backup", "audit")


def principal_for(client_id: str) -> str:
    """The Kafka user a client logs in as when ``KLM_KAFKA_USERNAME`` is unset: the service
    named by a ``klm-<service>[-…]`` client id, else ``admin`` (CLI, SDK, tests)."""
    parts = client_id.split("-")
    if len(parts) >= 2 and parts[0] == "klm" and parts[1] in SERVICE_PRINCIPALS:
        return parts[1]
    return "admin"


def kafka_security(settings: KlmSettings, default_user: str = "admin") -> dict[str, Any]:
    """The aiokafka keyword arguments of KLM's Kafka security, used by every client factory:
    nothing when ``kafka_security`` is ``none``; SASL/SCRAM-SHA-512 when it is ``sasl``."""
    if settings.kafka_security == "none":
        return {}
    user, password = settings.kafka_login(default_user)
    return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user, "sasl_plain_password": password}


def broker_security(settings: KlmSettings, default_user: str = "admin") -> SASLScram512 | None:
    """The same login for a FastStream broker."""
    if settings.kafka_security == "none":
        return None
    return SASLScram512(*settings.kafka_login(default_user))


def make_broker(settings: KlmSettings, client_id: str, **kwargs: Any) -> KafkaBroker:
    """A FastStream broker with KLM's delivery settings and tracing: the telemetry middleware
    continues the trace found in each record's ``traceparent`` header (batches link theirs),
    and events written to an outbox inside a handler carry that context onwards."""
    kwargs.setdefault("security", broker_security(settings, principal_for(client_id)))
    kwargs.setdefault("parser", tolerant_headers)
    return KafkaBroker(
        settings.kafka_bootstrap,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=0,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        graceful_timeout=15.0,
        # FastStream's span per batch (links its records), then KLM's span per record (a
        # child of the record's own trace) and request/lag metrics — see inbound_telemetry
        middlewares=[KafkaTelemetryMiddleware(tracer_provider=trace.get_tracer_provider(),
                                              meter_provider=metrics.get_meter_provider()),
                     InboundTelemetry],
        **kwargs,
    )


def _decodable(headers: Sequence[tuple[str, bytes | None]]) -> bool:
    try:
        for _, value in headers:
            value.decode()  # type: ignore[union-attr]  # None is not decodable either
    except (UnicodeDecodeError, AttributeError):
        return False
    return True


async def tolerant_headers(msg: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream decodes every header value as UTF-8 before a handler runs: ONE record with a
    non-UTF-8 (or null) header value would fail its whole batch on every redelivery — a
    poison pill that stalls the partition (found by fuzzing, docs/reliability.md). Such
    values are replaced (U+FFFD) in place; the record's value, key and position are
    untouched, so the handler still parses it (and dead-letters it if it is bad)."""
    for record in msg if isinstance(msg, tuple) else (msg,):
        if not _decodable(record.headers):
            record.headers = [(name, (value or b"").decode("utf-8", "replace").encode())
                              for name, value in record.headers]
    return await original(msg)


def make_producer(settings: KlmSettings, client_id: str, **options: Any) -> AIOKafkaProducer:
    """A raw idempotent producer (the outbox relay batches its sends with it); ``options``
    are further aiokafka producer arguments (e.g. a ``partitioner``)."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=0,
        max_batch_size=256 * 1024,
        request_timeout_ms=30000,
        **kafka_security(settings, principal_for(client_id)),
        **options,
    )


async def ensure_topics(settings: KlmSettings, topics: Topics | None = None) -> None:
    """Create the KLM topics with their partition counts if they do not exist yet."""
    topics = topics or Topics(settings.topic_prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                **kafka_security(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(name, num_partitions=n, replication_factor=1)
                  for name, n in topics.all().items() if name not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won
                await admin.create_topics(wanted)
    finally:
        await admin.close()


async def _wait_for_records(self: BatchSubscriber, consumer: Any) -> tuple[Any, ...]:
    """FastStream's batch subscriber (0.7) calls ``getmany(timeout_ms=batch_timeout_ms)``
    and, when nothing came, sleeps ``batch_timeout_ms`` more before asking again. But
    ``getmany`` already returns as soon as records arrive, so the sleep only delays a record
    that arrives during it, and a short timeout makes an idle subscriber wake up some 100
    times a second: measured, the four idle services used ~30 % of a core doing that. KLM's
    subscribers wait in ``getmany`` alone (``batch_timeout_ms`` is then only how often an
    idle loop turns)."""
    messages = await consumer.getmany(timeout_ms=self.batch_timeout_ms,
                                      max_records=self.max_records)
    return tuple(chain(*messages.values()))


if not hasattr(BatchSubscriber, "get_msg"):  # pragma: no cover - a FastStream upgrade
    raise ImportError("FastStream's BatchSubscriber.get_msg is gone: review _wait_for_records")
BatchSubscriber.get_msg = _wait_for_records  # type: ignore[method-assign]


def subscriber_options(settings: KlmSettings, group_id: str) -> dict[str, Any]:
    """Batch consumer options shared by every KLM subscriber.

    The group id carries the topic prefix: a consumer of another namespace (another test
    run or benchmark on the same Kafka) joining or leaving never rebalances this one."""
    return {
        "batch": True,
        "group_id": f"{settings.topic_prefix}{group_id}",
        "auto_offset_reset": "earliest",
        "max_records": settings.batch_max_records,
        "batch_timeout_ms": settings.batch_timeout_ms,
        "decoder": raw_records,
        "session_timeout_ms": 30000,
        "heartbeat_interval_ms": 3000,
        "max_poll_interval_ms": 300000,
    }


async def raw_records(msg: Any) -> Any:
    """FastStream decoder that hands handlers the aiokafka records untouched (we parse)."""
    return msg.raw_message


@dataclass(frozen=True, slots=True)
class Inbound:
    """One record that parsed as a CloudEvent, with where it came from."""

    event: CloudEvent
    record: ConsumerRecord[bytes, bytes]


def dead_letter_id(record: ConsumerRecord[bytes, bytes]) -> str:
    """Deterministic, so a redelivered bad record makes an identical DLQ event."""
    return str(uuid.uuid5(KLM_NAMESPACE, f"{record.topic}/{record.partition}/{record.offset}"))


#: the largest record a dead letter copies whole: its base64 plus the envelope must stay
#: under MAX_RECORD_BYTES, or the letter itself is unreadable by KLM consumers (audit), and
#: copies of records over Kafka's message size would fail the DLQ publish and stall the batch
DLQ_COPY_MAX = (MAX_RECORD_BYTES - 8192) * 3 // 4
#: how much of a larger record its dead letter keeps (with the SHA-256 of all of it)
OVERSIZE_KEPT = 4096


class DeadLetters:
    """Publishes unparseable input to ``klm.dlq`` and waits until Kafka has it (acks=all)."""

    def __init__(self, broker: KafkaBroker, topics: Topics, consumer: str) -> None:
        self._broker = broker
        self._topic = topics.dlq
        self._consumer = consumer
        self.count = 0

    def letter(self, record: ConsumerRecord[bytes, bytes], error: str) -> CloudEvent:
        original = record.value or b""
        if len(original) > DLQ_COPY_MAX:  # keep a prefix + digest, so the letter fits
            error = (f"(first {OVERSIZE_KEPT} of {len(original)} bytes kept, sha256 "
                     f"{hashlib.sha256(original).hexdigest()}) {error}")
            original = original[:OVERSIZE_KEPT]
        key = (record.key or b"")[:1024]  # record keys are small; a hostile one is cut
        data = DeadLetter(
            original_b64=base64.b64encode(original).decode(),
            original_key_b64=base64.b64encode(key).decode() if key else None,
            topic=record.topic, partition=record.partition, offset=record.offset,
            error=error[:2000], consumer=self._consumer)
        return make_event(DeadLetter.event_type, data, source=f"klm/{self._consumer}",
                          event_id=dead_letter_id(record))

    async def publish(self, letters: Sequence[CloudEvent]) -> None:
        if not letters:
            return
        await asyncio.gather(*(
            self._broker.publish(ev.to_bytes(), self._topic, key=ev.id.encode(),
                                 headers={"content-type": "application/cloudevents+json"})
            for ev in letters))
        self.count += len(letters)
        klm_metrics.add(klm_metrics.DLQ_RECORDS, len(letters), {"klm.consumer": self._consumer})
        log.warning("sent %d record(s) to %s", len(letters), self._topic)


async def split_batch(
    records: Iterable[ConsumerRecord[bytes, bytes]], dead_letters: DeadLetters,
) -> list[Inbound]:
    """Parse a batch: good records are returned, the rest are in the DLQ before this returns."""
    good: list[Inbound] = []
    bad: list[CloudEvent] = []
    for record in records:
        try:
            good.append(Inbound(parse_envelope(record.value), record))
        except EnvelopeInvalid as exc:
            bad.append(dead_letters.letter(record, exc.message))
            inbound_telemetry.note_dead_letter(record)
    await dead_letters.publish(bad)
    inbound_telemetry.note_parsed((i.event, i.record) for i in good)
    return good
