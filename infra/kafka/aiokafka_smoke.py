#!/usr/bin/env python3
"""Check that aiokafka works against the local broker (infra/stack.sh up).

What KLM relies on (DESIGN.md section 3):
  1. topic creation through the admin client;
  2. idempotent producer (enable_idempotence=True, acks='all'), send_and_wait;
  3. consumer group, enable_auto_commit=False, explicit commit;
  4. a second consumer in the same group resumes after the committed offset.

usage: python infra/kafka/aiokafka_smoke.py [BOOTSTRAP]   (needs aiokafka)
Prints one line per check and "aiokafka smoke: ok" at the end; exit 1 on failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        names = await admin.list_topics()
        assert topic in names, names
    finally:
        await admin.close()
    print(f"1 admin create_topics: ok ({topic})")


async def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        offsets = []
        for i in range(n):
            md = await producer.send_and_wait(topic, f"m{i}".encode(), key=b"k")
            offsets.append(md.offset)
        assert offsets == list(range(n)), offsets
        # private attribute, read only as evidence that InitProducerId worked
        pid = getattr(getattr(producer, "_txn_manager", None), "producer_id", "?")
    finally:
        await producer.stop()
    print(f"2 idempotent acks=all send_and_wait: ok (producer id {pid}, offsets 0..{n - 1})")


async def consume(bootstrap: str, topic: str, group: str, start: int, count: int) -> list[bytes]:
    """Read `count` records, commit after each, check the committed offset, stop."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    seen: list[bytes] = []
    try:
        while len(seen) < count:
            batch = await consumer.getmany(timeout_ms=10_000, max_records=count - len(seen))
            if not batch:
                raise RuntimeError("no records within 10 s")
            for records in batch.values():
                for record in records:
                    seen.append(record.value)
                    tp = TopicPartition(record.topic, record.partition)
                    await consumer.commit({tp: record.offset + 1})
        committed = await consumer.committed(TopicPartition(topic, 0))
        assert committed == start + count, committed
    finally:
        await consumer.stop()
    return seen


async def main(bootstrap: str) -> None:
    topic = f"klm.smoke.{uuid.uuid4().hex[:8]}"
    group = f"klm-smoke-{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, topic)
    await produce(bootstrap, topic, 10)
    first = await consume(bootstrap, topic, group, 0, 4)
    assert first == [f"m{i}".encode() for i in range(4)], first
    print("3 group consumer, manual commit: ok (m0..m3, committed offset 4)")
    second = await consume(bootstrap, topic, group, 4, 6)
    assert second == [f"m{i}".encode() for i in range(4, 10)], second
    print("4 second consumer same group resumes: ok (m4..m9)")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    print("aiokafka smoke: ok")


if __name__ == "__main__":
    default = os.environ.get("KLM_KAFKA_BOOTSTRAP", "localhost:9092")
    target = sys.argv[1] if len(sys.argv) > 1 else default
    try:
        asyncio.run(main(target))
    except Exception as exc:  # a smoke test reports anything
        print(f"aiokafka smoke: FAILED {type(exc).__name__}: {exc}")
        sys.exit(1)
