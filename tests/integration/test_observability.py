"""Observability on the real stack: one trace per request across processes, metric names.

keygen and audit run as their own processes, exporting over OTLP/HTTP to a receiver in this
test. They use their own topic prefix (so no other keygen of this pytest session shares
their partitions); the database and HSM token are the session's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import GenerateKey
from klm_common.metrics import prometheus_names
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import EventLog, ServiceProcess, open_topics, publish, stack_login
from tests.integration.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def obs_topics(namespace: str, settings: KlmSettings) -> Topics:
    prefix = f"{namespace}.obs."
    asyncio.run(open_topics(settings.model_copy(update={"topic_prefix": prefix})))
    return Topics(prefix)


@pytest.fixture(scope="module")
def services(start_service: Any, receiver: OtlpReceiver, obs_topics: Topics
             ) -> Iterator[dict[str, ServiceProcess]]:
    env = {"KLM_TOPIC_PREFIX": obs_topics.prefix,
           "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000",
           "KLM_LOG_LEVEL": "DEBUG"}
    procs = {"keygen": start_service("keygen", **env), "audit": start_service("audit", **env)}
    yield procs
    for proc in procs.values():
        proc.terminate()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def obs_lifecycle(settings: KlmSettings, obs_topics: Topics,
                        services: dict[str, ServiceProcess]) -> AsyncIterator[EventLog]:
    log = EventLog(settings.kafka_bootstrap, obs_topics.lifecycle)
    await log.start()
    yield log
    await log.stop()


def generate_request(owner: str = "obs", algorithm: str = "AES") -> CloudEvent:
    size = 256 if algorithm == "AES" else None
    curve = "P-256" if algorithm == "EC" else None
    return make_event(GenerateKey.event_type,
                      GenerateKey(owner=owner, name=f"k-{uuid.uuid4().hex[:6]}",
                                  algorithm=algorithm, size=size, curve=curve),
                      source="tests/observability")


async def publish_traced(settings: KlmSettings, topic: str, event: CloudEvent,
                         context: Any) -> None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                **stack_login())
    await producer.start()
    try:
        await producer.send_and_wait(topic, event.to_bytes(), key=event.partition_key,
                                     headers=[(k, v.encode()) for k, v in carrier.items()])
    finally:
        await producer.stop()


async def spans_until(receiver: OtlpReceiver, trace_id: str, wanted: dict[str, Any],
                      timeout: float = 30.0) -> dict[str, ReceivedSpan]:
    """Wait until a span matching each predicate of ``wanted`` arrived in ``trace_id``."""
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.in_trace(trace_id)
        found = {name: next((s for s in spans if pred(s)), None)
                 for name, pred in wanted.items()}
        if all(found.values()) or time.monotonic() > deadline:
            missing = [n for n, s in found.items() if s is None]
            assert not missing, (f"no {missing} span in trace {trace_id}; got "
                                 f"{[(s.service, s.name) for s in spans]}")
            return {n: s for n, s in found.items() if s is not None}
        await asyncio.sleep(0.3)


async def test_one_trace_from_requester_through_keygen_relay_and_audit(
        settings: KlmSettings, obs_topics: Topics, receiver: OtlpReceiver,
        obs_lifecycle: EventLog) -> None:
    # the requester traces with its own SDK; an in-memory exporter shows what it sent
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    request = generate_request(algorithm="EC")
    with provider.get_tracer("requester").start_as_current_span(
            "request generate_key", kind=SpanKind.PRODUCER) as span:
        await publish_traced(settings, obs_topics.requests, request, set_span_in_context(span))
    [requester] = exporter.get_finished_spans()
    trace_id = f"{requester.context.trace_id:032x}"
    requester_id = f"{requester.context.span_id:016x}"

    [answer] = await obs_lifecycle.wait_for(lambda e: e.correlationid == request.id)
    assert answer.type == "klm.key.generated"

    lifecycle, requests = obs_topics.lifecycle, obs_topics.requests
    got = await spans_until(receiver, trace_id, {
        "keygen": lambda s: s.service == "klm-keygen" and s.name == f"klm.consume {requests}",
        "relay": lambda s: s.service == "klm-keygen"
        and s.name == f"klm.outbox.publish {lifecycle}",
        "audit_request": lambda s: s.service == "klm-audit"
        and s.name == f"klm.consume {requests}",
        "audit_answer": lambda s: s.service == "klm-audit"
        and s.name == f"klm.consume {lifecycle}",
    })
    # parent chain: requester → keygen's record span → relay publish → audit's insert span
    assert got["keygen"].parent_span_id == requester_id
    assert got["relay"].parent_span_id == got["keygen"].span_id
    assert got["audit_answer"].parent_span_id == got["relay"].span_id
    assert got["audit_request"].parent_span_id == requester_id
    # the per-record spans link the batch span FastStream opened for the whole batch
    batch_links = {sid for _, sid in got["keygen"].links}
    batch_spans = [s for s in receiver.spans
                   if s.service == "klm-keygen" and s.span_id in batch_links]
    assert batch_spans, "keygen's record span does not link its batch span"
    # (FastStream's own batch span links only records carrying its ``correlation_id`` header,
    # so the link from each record's span to the batch is what ties the two views together)
    assert batch_spans[0].name == f"{requests} process"


async def test_metric_names_present_after_a_small_workload(
        settings: KlmSettings, obs_topics: Topics, receiver: OtlpReceiver,
        services: dict[str, ServiceProcess], obs_lifecycle: EventLog) -> None:
    good = [generate_request(algorithm=a) for a in ("AES", "EC", "AES")]
    bad = make_event(GenerateKey.event_type, {"owner": "obs", "name": "x", "algorithm": "DES"},
                     source="tests/observability")
    await publish(settings.kafka_bootstrap, obs_topics.requests,
                  [(e.partition_key, e.to_bytes()) for e in [*good, bad]]
                  + [(b"garbage", b"not a cloudevent")])
    for event in [*good, bad]:
        await obs_lifecycle.wait_for(lambda e, rid=event.id: e.correlationid == rid)

    scraped = await scrape_until(services["keygen"], [
        'klm_requests_total{klm_error_code="",klm_outcome="ok"',
        'klm_outcome="rejected"', 'klm_outcome="dead_letter"',
        "klm_request_duration_seconds_bucket", "klm_outbox_published_total",
        "klm_outbox_backlog", "klm_consumer_lag", "klm_dlq_records_total",
        "klm_hsm_operation_duration_seconds_bucket"])
    exposed = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines()
               if line and not line.startswith("#")}
    klm_names = {n for n in exposed if n.startswith("klm_")}
    assert klm_names <= prometheus_names(), klm_names - prometheus_names()
    # audit answers no request (no klm_requests_total there): its own figures
    await scrape_until(services["audit"], ["klm_audit_chain_head ", "klm_consumer_lag{"])
    # the same instruments reach an OTLP collector under their semantic-convention names
    wanted = {"klm.requests", "klm.request.duration", "klm.outbox.published",
              "klm.hsm.operation.duration"}
    deadline = time.monotonic() + 60
    while not wanted <= receiver.metric_names.get("klm-keygen", set()):
        assert time.monotonic() < deadline, receiver.metric_names
        await asyncio.sleep(0.3)


async def scrape_until(service: ServiceProcess, needles: list[str], timeout: float = 60.0
                       ) -> str:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=service.url) as http:
        while True:
            text = (await http.get("/metrics")).text
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            assert time.monotonic() < deadline, f"/metrics lacks {missing}"
            await asyncio.sleep(0.5)


async def test_logs_are_json_with_trace_ids_and_no_key_material(
        services: dict[str, ServiceProcess]) -> None:
    for proc in services.values():
        lines = [line for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
        assert lines, f"{proc.name} wrote no JSON log lines"
        entries = [json.loads(line) for line in lines]
        assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
        text = "\n".join(lines).lower()
        for secret_marker in ("wrapped_b64", "private_key", "-----begin private",
                              "key_material", "plaintext"):
            assert secret_marker not in text, f"{proc.name} logged {secret_marker!r}"
    keygen = [json.loads(line) for line in services["keygen"].log_path.read_text().splitlines()
              if line.startswith("{")]
    assert any("trace_id" in e for e in keygen), "no keygen log line carries a trace id"
