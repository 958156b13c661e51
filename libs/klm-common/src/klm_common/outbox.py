"""Transactional outbox: events are saved with the state change, then relayed to Kafka.

A handler calls :func:`add_to_outbox` inside its transaction; :class:`OutboxRelay` publishes
committed rows in ``seq`` order with an idempotent producer and deletes them once Kafka has
acknowledged them (acks=all). A crash between the two republishes — consumers dedupe by
event ``id`` — so nothing is lost and nothing is applied twice.

Every service's migrations create the same table::

    CREATE TABLE outbox (seq bigserial PRIMARY KEY, topic text NOT NULL, key bytea,
                         value bytea NOT NULL, headers jsonb NOT NULL DEFAULT '{}',
                         created_at timestamptz NOT NULL DEFAULT now());
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from klm_common import inbound_telemetry, metrics, telemetry
from klm_common.background import BackgroundTask, Wakeup
from klm_common.envelope import CloudEvent

log = logging.getLogger(__name__)

#: only one relay per schema publishes at a time (keeps per-key order across instances)
RELAY_LOCK_ID = 7243100
#: the relay's transaction only deletes rows Kafka already has: if a crash loses that commit
#: the rows are published again and consumers drop the duplicates by event id — so it need
#: not wait for the WAL flush (synchronous_commit off, this transaction only)
_LOCKED_BATCH = """
    WITH relay_lock AS MATERIALIZED (
        SELECT pg_try_advisory_xact_lock($1) AS held,
               set_config('synchronous_commit', 'off', true) AS no_flush_wait)
    SELECT seq, topic, key, value, headers FROM outbox, relay_lock
    WHERE relay_lock.held ORDER BY seq LIMIT $2"""


async def add_to_outbox(conn: asyncpg.Connection, topic: str,
                        events: Sequence[CloudEvent]) -> None:
    """Queue ``events`` for ``topic`` in the caller's transaction, with the trace context:
    that of the inbound record the event answers when a batch consumer is handling one
    (see :mod:`klm_common.inbound_telemetry`), else the current one."""
    if not events:
        return
    batch = inbound_telemetry.current_batch()
    current = _headers_json(None)
    keys, values, headers = [], [], []
    for ev in events:
        context = batch.context_for(ev) if batch is not None else None
        keys.append(ev.partition_key)
        values.append(ev.to_bytes())
        headers.append(current if context is None else _headers_json(context))
    # one statement for the batch (unnest keeps the order, so seq follows the events' order)
    await conn.execute(
        "INSERT INTO outbox (topic, key, value, headers) "
        "SELECT $1, k, v, h::jsonb FROM unnest($2::bytea[], $3::bytea[], $4::text[]) "
        "WITH ORDINALITY AS e(k, v, h, n) ORDER BY n", topic, keys, values, headers)
    inbound_telemetry.note_answers(events)


def _headers_json(context: Context | None) -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return json.dumps({"content-type": "application/cloudevents+json", **carrier})


class OutboxRelay(BackgroundTask):
    """Background task publishing the outbox; :meth:`wake` after a commit for low latency."""

    task_name = "outbox-relay"

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, *, batch: int = 1000,
                 idle_poll: float = 0.5) -> None:
        self._pool = pool
        self._producer = producer
        self._batch = batch
        self._idle_poll = idle_poll
        self._wakeup = Wakeup()
        self.published = 0
        self.backlog = 0
        self.healthy = True

    def wake(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            try:
                moved = await self.relay_once()
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except Exception:
                self.healthy = False
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(1.0)
                continue
            if moved < self._batch:  # a wake during the round runs the next one at once
                await self._wakeup.wait(self._idle_poll)

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows were moved."""
        async with self._pool.acquire() as conn, conn.transaction():
            # one round trip: take the relay lock, and read a batch only if we got it
            rows = await conn.fetch(_LOCKED_BATCH, RELAY_LOCK_ID, self._batch)
            if not rows:
                if self.backlog:
                    self.backlog = 0
                    self._observe(0, 0.0)
                return 0
            started = time.perf_counter()
            spans = []
            futures = []
            for row in rows:
                headers, span = _publish_span(row["topic"], json.loads(row["headers"]))
                spans.append(span)
                futures.append(await self._producer.send(
                    row["topic"], row["value"], key=row["key"], headers=headers))
            try:
                await asyncio.gather(*futures)
            finally:
                for span in spans:
                    span.end()
            await conn.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])",
                               [r["seq"] for r in rows])
            # a full batch means more may wait: count them (cheap, the table stays small)
            self.backlog = (await conn.fetchval("SELECT count(*) FROM outbox")
                            if len(rows) >= self._batch else 0)
        self.published += len(rows)
        self._observe(len(rows), time.perf_counter() - started)
        return len(rows)

    def _observe(self, published: int, seconds: float) -> None:
        attrs = {"klm.service": telemetry.service_name()}
        if published:
            metrics.add(metrics.OUTBOX_PUBLISHED, published, attrs)
            metrics.record(metrics.OUTBOX_PUBLISH_DURATION, seconds, attrs)
        metrics.set_gauge(metrics.OUTBOX_BACKLOG, self.backlog, attrs)


def _publish_span(topic: str, stored: dict[str, str]) -> tuple[list[tuple[str, bytes]], Any]:
    """A PRODUCER span per relayed row, child of the context saved with the row; the record
    carries the span's own context onwards (consumers continue from the publish). Without a
    span exporter the saved headers go out as they are (see telemetry.exports_spans)."""
    if not telemetry.exports_spans():
        return [(k, v.encode()) for k, v in stored.items()], trace.INVALID_SPAN
    parent = propagate.extract(stored)
    span = trace.get_tracer("klm.outbox").start_span(
        f"klm.outbox.publish {topic}", context=parent, kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                    "messaging.operation.type": "send"})
    carrier = {k: v for k, v in stored.items() if k not in ("traceparent", "tracestate")}
    propagate.inject(carrier, context=trace.set_span_in_context(span, parent))
    return [(k, v.encode()) for k, v in carrier.items()], span
