"""Per-record traces and request metrics for KLM's batch consumers.

FastStream's telemetry middleware gives a batch one ``process`` span in a *new* trace that
links the records' spans. That keeps the batch honest but breaks "one trace per request".
:class:`InboundTelemetry` (a broker middleware, inside FastStream's) therefore also opens
one span per record, **a child of the trace in that record's ``traceparent``** and linked
to the batch span; it lasts as long as the batch's handling (the shared work: the HSM call,
the transaction). :func:`klm_common.outbox.add_to_outbox` writes each event's outbox row
with the context of the record that caused it (by ``causationid``/``correlationid``), and
the relay publishes it under a child span — so requester → keygen → relay → audit insert is
one trace.

The same middleware measures, when the batch's handler returned (its effects are durable):
requests by type and outcome, end-to-end latency (the record's Kafka timestamp to now),
and consumer lag per partition.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import ConsumerRecord, TopicPartition
from faststream import BaseMiddleware
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from klm_common import metrics, telemetry
from klm_common.envelope import CloudEvent

log = logging.getLogger(__name__)
#: inbound event types that are requests (answered once, counted in ``klm.requests``)
REQUEST_PREFIXES = ("klm.request.", "klm.command.", "klm.crypto.")
_TRACER = "klm.inbound"
T = TypeVar("T")


class _HeaderGetter(Getter[Sequence[tuple[str, bytes]]]):
    """Reads W3C trace headers straight from a ConsumerRecord's ``headers``."""

    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        values = [v.decode("utf-8", "replace") for k, v in carrier if k == key and v]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


HEADER_GETTER = _HeaderGetter()


def record_context(record: ConsumerRecord[bytes, bytes]) -> Context:
    """The trace context a record carries (empty when it has no ``traceparent``)."""
    return propagate.extract(list(record.headers or ()), getter=HEADER_GETTER)


@dataclass(slots=True)
class _Inbound:
    record: ConsumerRecord[bytes, bytes]
    span: trace.Span
    event_type: str | None = None
    outcome: tuple[str, str] | None = None  # (outcome, error code)


@dataclass(slots=True)
class BatchObservation:
    """What one batch's handler did to each of its records (lives in a ContextVar)."""

    inbound: list[_Inbound]
    by_event_id: dict[str, _Inbound] = field(default_factory=dict)
    by_position: dict[tuple[str, int, int], _Inbound] = field(default_factory=dict)
    #: set by :func:`defer_close`: the batch's work finishes after its handler returned
    until: Any = None

    def context_for(self, event: CloudEvent) -> Context | None:
        """Trace context of the inbound record that caused ``event`` (None: not from us)."""
        for ref in (event.causationid, event.correlationid):
            if ref and (found := self.by_event_id.get(ref)) is not None:
                if not found.span.get_span_context().is_valid:
                    return None  # the record carried no trace: use the current one
                return trace.set_span_in_context(found.span)
        return None


_current: contextvars.ContextVar[BatchObservation | None] = contextvars.ContextVar(
    "klm_batch_observation", default=None)


def current_batch() -> BatchObservation | None:
    return _current.get()


def defer_close(until: Any) -> None:
    """A handler that hands its batch on (keygen's pipelined subscribers) calls this with a
    future: the batch's spans end, and its requests are counted, when that future is done
    rather than when the handler returns."""
    batch = _current.get()
    if batch is not None:
        batch.until = until


def note_parsed(records: Iterable[tuple[CloudEvent, ConsumerRecord[bytes, bytes]]]) -> None:
    """Called by :func:`klm_common.kafka.split_batch`: which event each record holds."""
    batch = _current.get()
    if batch is None:
        return
    for event, record in records:
        found = batch.by_position.get((record.topic, record.partition, record.offset))
        if found is not None:
            found.event_type = event.type
            batch.by_event_id.setdefault(event.id, found)


def note_dead_letter(record: ConsumerRecord[bytes, bytes]) -> None:
    batch = _current.get()
    if batch is None:
        return
    found = batch.by_position.get((record.topic, record.partition, record.offset))
    if found is not None:
        found.outcome = ("dead_letter", "envelope_invalid")


def note_answers(events: Iterable[CloudEvent]) -> None:
    """Called by the outbox: ``events`` answer the requests they name (first answer wins)."""
    batch = _current.get()
    if batch is None:
        return
    for event in events:
        for ref in (event.causationid, event.correlationid):
            found = batch.by_event_id.get(ref) if ref else None
            if found is not None:
                if found.outcome is None:
                    found.outcome = _outcome_of(event)
                break


def _outcome_of(answer: CloudEvent) -> tuple[str, str]:
    if answer.type == "klm.request.rejected":
        code = answer.data.get("code") if isinstance(answer.data, dict) else None
        return "rejected", str(code or "")
    return "ok", ""


class InboundTelemetry(BaseMiddleware):
    """Broker middleware: per-record spans, request outcomes, latency and lag."""

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        raw = msg.raw_message
        records: Sequence[ConsumerRecord[bytes, bytes]] = (
            raw if isinstance(raw, tuple | list) else (raw,))
        return await observed(records, getattr(msg, "consumer", None), lambda: call_next(msg))


async def observed(records: Sequence[ConsumerRecord[bytes, bytes]], consumer: Any,
                   handle: Callable[[], Awaitable[T]]) -> T:
    """Run ``handle()`` (the batch's handler) with ``records`` observed: the middleware's
    work, also called by consumers that bypass FastStream (keygen's
    :class:`~klm_keygen.handlers.pipeline.PipelinedConsumer`). Telemetry never decides a
    batch's fate: its own failures are logged, not raised."""
    try:
        batch = _open(records)
    except Exception:
        log.exception("inbound telemetry: cannot observe this batch")
        return await handle()
    token = _current.set(batch)
    try:
        result = await handle()
    except BaseException as exc:
        _safely(_close, batch, exc)
        raise
    finally:
        _current.reset(token)
    if batch.until is not None and not batch.until.done():
        batch.until.add_done_callback(lambda _: _finish(batch, consumer, records))
    else:
        _finish(batch, consumer, records)
    return result


def _finish(batch: BatchObservation, consumer: Any,
            records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
    _safely(_close, batch, None)
    _safely(_observe_lag, consumer, records)


def _safely(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("inbound telemetry: %s failed", getattr(fn, "__name__", fn))


def _open(records: Sequence[ConsumerRecord[bytes, bytes]]) -> BatchObservation:
    tracer = trace.get_tracer(_TRACER)
    batch_span = trace.get_current_span()
    links = [Link(batch_span.get_span_context())] if batch_span.get_span_context().is_valid \
        else []
    recording = telemetry.exports_spans()
    inbound = []
    for record in records:
        parent = record_context(record)
        if not recording:  # pass the record's own context on (see telemetry.exports_spans)
            inbound.append(_Inbound(record, trace.get_current_span(parent)))
            continue
        span = tracer.start_span(
            f"klm.consume {record.topic}", context=parent, kind=SpanKind.CONSUMER,
            links=links, attributes={
                "messaging.system": "kafka", "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset})
        inbound.append(_Inbound(record, span))
    batch = BatchObservation(inbound)
    batch.by_position = {(i.record.topic, i.record.partition, i.record.offset): i
                         for i in inbound}
    return batch


def _close(batch: BatchObservation, error: BaseException | None) -> None:
    now = time.time()
    for item in batch.inbound:
        if error is not None:
            item.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        elif item.outcome is not None:
            _count_request(item, now)
        if item.span.is_recording():
            if item.event_type:
                item.span.set_attribute("cloudevents.event_type", item.event_type)
            item.span.end()


def _count_request(item: _Inbound, now: float) -> None:
    assert item.outcome is not None
    outcome, code = item.outcome
    request_type = item.event_type or "unparseable"
    if outcome != "dead_letter" and not request_type.startswith(REQUEST_PREFIXES):
        return
    metrics.add(metrics.REQUESTS, 1, {"klm.request.type": request_type, "klm.outcome": outcome,
                                      "klm.error.code": code})
    if item.record.timestamp:
        metrics.record(metrics.REQUEST_DURATION, max(0.0, now - item.record.timestamp / 1000),
                       {"klm.request.type": request_type, "klm.outcome": outcome})


def _observe_lag(consumer: Any, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
    """Lag = high watermark − next offset, per partition of the batch (aiokafka keeps the
    watermark from the last fetch response, so this costs no request)."""
    if consumer is None or not hasattr(consumer, "highwater"):
        return
    group = str(getattr(consumer, "_group_id", "") or "")
    last: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        last[key] = max(last.get(key, -1), record.offset)
    for (topic, partition), offset in last.items():
        highwater = consumer.highwater(TopicPartition(topic, partition))
        if highwater is None:
            continue
        metrics.set_gauge(metrics.CONSUMER_LAG, max(0, highwater - offset - 1), {
            "messaging.consumer.group.name": group, "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(partition)})
