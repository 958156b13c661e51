"""A lifecycle observer service: consumes ``klm.lifecycle`` as its own consumer group,
records each event id in its inbox and hands the new events to a callback.

Rotation and backup start as observers (issue 2's walking skeleton) and grow their own
handlers on top of the same consume → inbox → commit loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette

from klm_common import inbox
from klm_common.db import create_pool
from klm_common.envelope import CloudEvent
from klm_common.kafka import (
    DeadLetters,
    ensure_topics,
    make_broker,
    split_batch,
    subscriber_options,
)
from klm_common.service import Health, service_app
from klm_common.settings import KlmSettings
from klm_common.telemetry import setup_telemetry
from klm_common.topics import Topics

log = logging.getLogger(__name__)

OnEvents = Callable[[Sequence[CloudEvent]], Awaitable[None]]


async def log_events(events: Sequence[CloudEvent]) -> None:
    for ev in events:
        log.info("observed %s subject=%s id=%s", ev.type, ev.subject, ev.id)


def observer_app(service: str, settings: KlmSettings, on_events: OnEvents = log_events
                 ) -> Starlette:
    health = Health()
    topics = Topics(settings.topic_prefix)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        setup_telemetry(service)
        await ensure_topics(settings, topics)
        pool = await create_pool(settings, service)
        broker = make_broker(settings, f"klm-{service}")
        dead_letters = DeadLetters(broker, topics, service)

        @broker.subscriber(topics.lifecycle, **subscriber_options(settings, f"klm-{service}"))
        async def on_lifecycle(records: list[Any]) -> None:
            events = [i.event for i in await split_batch(records, dead_letters)]
            async with pool.acquire() as conn, conn.transaction():
                fresh = await inbox.claim(conn, [e.id for e in events])
            await on_events([e for e in events if e.id in fresh])

        async def pg_ok() -> bool:
            return bool(await pool.fetchval("SELECT 1"))

        async def kafka_ok() -> bool:
            return bool(await broker.ping(timeout=2.0))

        health.add("postgres", pg_ok)
        health.add("kafka", kafka_ok)
        await broker.start()
        log.info("%s ready: observing %s", service, topics.lifecycle)
        try:
            yield
        finally:
            await broker.stop()
            await pool.close()

    return service_app(health, lifespan)
