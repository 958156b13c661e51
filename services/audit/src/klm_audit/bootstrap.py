"""Wiring: real adapters (Postgres pool, Kafka broker) or the fakes the unit tests pass in."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker
from opentelemetry.metrics import Counter

from klm_audit import handlers
from klm_audit.adapters.postgres_store import PgChainSource, PostgresAuditStore
from klm_audit.adapters.tokens import PostgresTokenStore
from klm_audit.checkpointing import Checkpointer
from klm_audit.denials import DenialRecorder
from klm_audit.ports import AuditStore, TokenStore
from klm_audit.projection import Projector
from klm_common import metrics as klm_metrics
from klm_common.authorization import tenant_request_topics
from klm_common.db import create_pool
from klm_common.envelope import CloudEvent
from klm_common.kafka import make_broker, subscriber_options
from klm_common.settings import KlmSettings
from klm_common.telemetry import setup_telemetry
from klm_common.topics import Topics

log = logging.getLogger(__name__)

GROUP_ID = "klm-audit"
TENANT_GROUP_ID = "klm-audit-tenants"


@dataclass(slots=True)
class Metrics:
    stored: Counter
    duplicates: Counter
    skipped: Counter


@dataclass(slots=True)
class Audit:
    """Everything the HTTP API and the consumer need, created in the lifespan."""

    settings: KlmSettings
    store: AuditStore
    tokens: TokenStore
    denials: DenialRecorder
    metrics: Metrics | None = None
    pool: asyncpg.Pool | None = None
    broker: KafkaBroker | None = None
    projector: Projector | None = None
    checkpointer: Checkpointer | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def start_background(self) -> None:
        """Denials recorder, projector and checkpointer (the broker must be started)."""
        self.denials.start()
        for task in (self.projector, self.checkpointer):
            if task is not None:
                task.start()

    async def close(self) -> None:
        for task in (self.checkpointer, self.projector):
            if task is not None:
                await task.stop()
        await self.denials.stop()
        if self.broker is not None:
            await self.broker.stop()
        if self.pool is not None:
            await self.pool.close()


def audit_topics(settings: KlmSettings) -> list[str]:
    """Every KLM topic except ``klm.crypto.requests``, whose payloads may hold plaintext
    (the tenants' ``klm.requests.<tenant>`` come by :func:`tenant_request_topics`)."""
    topics = Topics(settings.topic_prefix)
    return [topics.lifecycle, topics.requests, topics.commands, topics.dlq,
            topics.inventory_requests, topics.backup_commands, topics.backup]


def make_metrics() -> Metrics:
    meter = setup_telemetry("audit").meter("klm.audit")
    return Metrics(
        stored=meter.create_counter("klm_audit_events_stored", description="rows appended"),
        duplicates=meter.create_counter("klm_audit_duplicates",
                                        description="redelivered events stored before"),
        skipped=meter.create_counter("klm_audit_records_skipped",
                                     description="records that are not KLM CloudEvents"))


async def bootstrap(settings: KlmSettings) -> Audit:
    pool = await create_pool(settings, "audit")
    # verification's worker processes read the chain over connections of their own
    store = PostgresAuditStore(pool, PgChainSource(settings.service_dsn("audit")))
    audit = Audit(settings=settings, store=store, tokens=PostgresTokenStore(pool),
                  denials=DenialRecorder(store), metrics=make_metrics(), pool=pool,
                  projector=Projector(store))
    audit.broker = _consumer(settings, audit)
    audit.checkpointer = Checkpointer(store, _publisher(audit.broker,
                                                       Topics(settings.topic_prefix).commands))
    return audit


def _publisher(broker: KafkaBroker, topic: str) -> Callable[[CloudEvent], Awaitable[None]]:
    async def publish(event: CloudEvent) -> None:
        await broker.publish(event.to_bytes(), topic, key=event.partition_key,
                             headers={"content-type": "application/cloudevents+json"})
    return publish


def _consumer(settings: KlmSettings, audit: Audit) -> KafkaBroker:
    broker = make_broker(settings, client_id="klm-audit")

    @broker.subscriber(  # type: ignore[untyped-decorator, unused-ignore]
        *audit_topics(settings), **subscriber_options(settings, GROUP_ID))
    async def on_topics(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        await ingest(records)

    @broker.subscriber(  # type: ignore[untyped-decorator, unused-ignore]
        pattern=tenant_request_topics(Topics(settings.topic_prefix)),
        **subscriber_options(settings, TENANT_GROUP_ID))
    async def on_tenant_requests(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        await ingest(records)

    async def ingest(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        # returning commits the batch's offsets; raising leaves them for redelivery
        batch, skipped = handlers.accept(records)
        result = await handlers.append(audit.store, batch)
        if audit.projector is not None and result.stored:
            audit.projector.wake()
        if audit.checkpointer is not None and result.counted:
            audit.checkpointer.note(result.counted)
        if audit.metrics is not None:
            audit.metrics.stored.add(result.stored)
            audit.metrics.duplicates.add(result.duplicates)
            audit.metrics.skipped.add(skipped)
        if result.head is not None:  # the ops dashboard's chain head (klm_common.metrics)
            klm_metrics.set_gauge(klm_metrics.AUDIT_CHAIN_HEAD, result.head.sequence)

    return broker
