"""Wiring: real adapters for the running service (unit tests wire fakes into ``Deps``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker

from klm_common.db import create_pool
from klm_common.kafka import DeadLetters, make_broker, make_producer
from klm_common.outbox import OutboxRelay
from klm_common.topics import Topics
from klm_rotation.adapters.inventory_store import PgInventory
from klm_rotation.adapters.policy_source import PolicySource
from klm_rotation.handlers import Deps, PolicyInForce
from klm_rotation.metrics import RotationMetrics
from klm_rotation.settings import RotationSettings


@dataclass
class Rotation:
    settings: RotationSettings
    topics: Topics
    broker: KafkaBroker
    producer: AIOKafkaProducer
    pool: asyncpg.Pool
    relay: OutboxRelay
    policy_source: PolicySource
    deps: Deps


async def bootstrap(settings: RotationSettings, metrics: RotationMetrics) -> Rotation:
    topics = Topics(settings.topic_prefix)
    source = PolicySource(settings.policy_file, settings.policy_dir)
    policies = source.load()  # an invalid policy stops the start: nothing runs unchecked
    broker = make_broker(settings, "klm-rotation")
    producer = make_producer(settings, "klm-rotation-outbox")
    pool = await create_pool(settings, "rotation")
    relay = OutboxRelay(pool, producer, batch=settings.outbox_batch)
    deps = Deps(inventory=PgInventory(pool), policy=PolicyInForce(policies),
                topics=topics, day_seconds=settings.day_seconds,
                dead_letters=DeadLetters(broker, topics, "rotation"), metrics=metrics,
                on_commit=relay.wake, dispatch_batch=settings.dispatch_batch,
                dispatch_workers=settings.dispatch_workers,
                instance=f"klm/rotation@{os.uname().nodename}:{os.getpid()}")
    return Rotation(settings, topics, broker, producer, pool, relay, source, deps)
