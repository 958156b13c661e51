"""A few hundred hostile records against the REAL keygen (Kafka, PostgreSQL, SoftHSM), made by
the same hypothesis strategies as the unit fuzzing (libs/klm-common/tests/fuzz_records.py),
with oversize and non-UTF-8 record headers on the wire.

Afterwards: DLQ letters + answered requests add up to what was sent (each bad record in the
DLQ once, each well-formed request id answered exactly once, rejections coded), keygen is
still alive and still serves a valid request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from klm_common.envelope import EnvelopeInvalid, make_event, parse_envelope
from klm_common.events import BackupKey, GenerateKey, RestoreKey
from klm_common.kafka import kafka_security
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import EventLog, ServiceProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parents[2]
RECORDS = 400
#: keep every record under the broker's default message.max.bytes (1 MiB)
MAX_WIRE_BYTES = 900_000
SERVED_ELSEWHERE = {BackupKey.event_type, RestoreKey.event_type}


def fuzz_records() -> Any:
    name = "klm_fuzz_records"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "libs" / "klm-common" / "tests" / "fuzz_records.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def hostile_batch(n: int) -> list[Any]:
    """``n`` hostile records drawn as in the unit fuzzing (generation only, no shrinking)."""
    drawn: list[Any] = []

    @settings(max_examples=n // 40 + 1, database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(fuzz_records().hostile(), min_size=40, max_size=40))
    def collect(items: list[Any]) -> None:
        drawn.extend(items)

    collect()
    fitting = []
    for item in drawn[:n]:
        size = len(item.value or b"") + sum(len(k) + len(v) for k, v in item.headers)
        if size <= MAX_WIRE_BYTES:
            fitting.append(item)
    return fitting


def well_formed(value: bytes | None) -> Any:
    try:
        return parse_envelope(value)
    except EnvelopeInvalid:
        return None


@pytest.fixture(scope="module")
def keygen(start_service: Any) -> Iterator[ServiceProcess]:
    proc: ServiceProcess = start_service("keygen")
    yield proc
    proc.terminate()


async def send_raw(settings: KlmSettings, topic: str, items: list[Any]
                   ) -> list[tuple[int, int]]:
    """Send the records; return where each landed (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True, max_request_size=1_048_000,
                                **kafka_security(settings))
    await producer.start()
    try:
        futures = [await producer.send(topic, item.value, key=uuid.uuid4().bytes,
                                       headers=item.headers) for item in items]
        return [(md.partition, md.offset) for md in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


async def test_hostile_records_against_real_keygen(keygen: ServiceProcess,
                                                   settings: KlmSettings, topics: Topics,
                                                   lifecycle: EventLog, dlq: EventLog) -> None:
    items = hostile_batch(RECORDS)
    # duplicate ids on the wire: the first 20 records a second time
    items += items[:20]
    landed = await send_raw(settings, topics.requests, items)

    events = [e for e in (well_formed(i.value) for i in items) if e is not None]
    bad_at = {at for at, item in zip(landed, items, strict=True) if well_formed(item.value) is None}
    bad = len(bad_at)
    expected_ids = {e.id for e in events if e.type not in SERVED_ELSEWHERE}

    # a valid request sent after the storm is still served
    probe = make_event(GenerateKey.event_type, {"owner": "fuzz", "name": "after",
                                                "algorithm": "AES-256"}, source="tests")
    await send_raw(settings, topics.requests, [fuzz_records().Hostile("valid", probe.to_bytes(),
                                                                      [])])
    [answer] = await lifecycle.wait_for(lambda e: e.correlationid == probe.id, timeout=180)
    assert answer.type == "klm.key.generated"

    await lifecycle.wait_for(lambda e: e.correlationid in expected_ids,
                             count=len(expected_ids), timeout=120)
    answers = Counter(e.correlationid for e in lifecycle.events
                      if e.correlationid in expected_ids)
    # checked first: a request answered twice also makes the wait above end before the last
    # answer arrived, which would read as a request never answered
    twice = sorted(i for i, n in answers.items() if n > 1)
    assert not twice, f"answered more than once: {twice[:5]}"
    assert set(answers) == expected_ids
    rejected = Counter(e.data["code"] for e in lifecycle.events
                       if e.correlationid in expected_ids and e.type == "klm.request.rejected")
    assert all(code for code in rejected)

    def ours(e: Any) -> bool:
        return e.data["topic"] == topics.requests and \
            (e.data["partition"], e.data["offset"]) in bad_at

    await dlq.wait_for(ours, count=bad, timeout=120)
    letters = Counter((e.data["partition"], e.data["offset"]) for e in dlq.matching(ours))
    assert set(letters) == bad_at and set(letters.values()) == {1}
    assert keygen.proc is not None and keygen.proc.poll() is None, "keygen died"
    print(f"\nreal keygen: {len(items)} hostile records ({bad} to the DLQ, "
          f"{len(expected_ids)} request ids answered once: "
          f"{sum(answers.values()) - sum(rejected.values())} facts, "
          f"rejections {dict(rejected)}); served a valid request afterwards")
