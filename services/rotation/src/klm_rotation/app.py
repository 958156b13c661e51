"""The rotation process: lifecycle and inventory-request subscribers, the outbox relay and
the background jobs (scheduler, compliance scan, policy watch), under one lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from klm_common.background import Wakeup
from klm_common.kafka import ensure_topics, subscriber_options
from klm_common.service import Health, serve, service_app
from klm_common.telemetry import setup_telemetry
from klm_rotation import jobs
from klm_rotation.bootstrap import Rotation, bootstrap
from klm_rotation.handlers import apply_policies, handle_facts, import_observed_key
from klm_rotation.metrics import RotationMetrics
from klm_rotation.settings import RotationSettings

log = logging.getLogger(__name__)
GROUP_ID = "klm-rotation"
#: its own group: a group whose members subscribe to different topics rebalances both
INVENTORY_GROUP_ID = "klm-rotation-inventory"


def register(rotation: Rotation) -> None:
    """Subscribe the handlers: facts from klm.lifecycle, imports from klm.inventory.requests."""
    options = subscriber_options(rotation.settings, GROUP_ID)
    deps = rotation.deps

    @rotation.broker.subscriber(rotation.topics.lifecycle, **options)
    async def on_lifecycle(records: list[Any]) -> None:
        await handle_facts(records, deps)

    @rotation.broker.subscriber(rotation.topics.inventory_requests,
                                **subscriber_options(rotation.settings, INVENTORY_GROUP_ID))
    async def on_inventory_requests(records: list[Any]) -> None:
        await import_observed_key(records, deps)


def _start_jobs(rotation: Rotation) -> list[asyncio.Task[None]]:
    s, deps = rotation.settings, rotation.deps
    wakeup = Wakeup()
    deps.wake_scheduler = wakeup.set
    return [
        asyncio.create_task(jobs.run_scheduler(deps, wakeup, s.schedule_poll), name="scheduler"),
        asyncio.create_task(jobs.run_scan(deps, s.scan_page_size, s.scan_pause), name="scan"),
        asyncio.create_task(jobs.run_policy_watch(deps, rotation.policy_source,
                                                  s.policy_poll_seconds), name="policy-watch"),
        asyncio.create_task(jobs.run_gauge(deps, s.findings_gauge_seconds,
                                           s.rotation_notice_days), name="gauges"),
    ]


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(settings: RotationSettings | None = None) -> Starlette:
    settings = settings or RotationSettings()
    health = Health()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        telemetry = setup_telemetry("rotation")
        await ensure_topics(settings)
        rotation = await bootstrap(settings, RotationMetrics(telemetry.meter("klm.rotation")))
        health.add("postgres", lambda: _pg_ok(rotation))
        health.add("kafka", lambda: _kafka_ok(rotation))
        register(rotation)
        await rotation.producer.start()
        rotation.relay.start()
        await apply_policies(rotation.deps, rotation.deps.policy.policies)
        await rotation.broker.start()
        tasks = _start_jobs(rotation)
        log.info("rotation ready: policies %s (default %s), day = %ss",
                 ", ".join(rotation.deps.policy.policies.names), rotation.policy_source.name,
                 settings.day_seconds)
        try:
            yield
        finally:
            await _stop(tasks)
            await rotation.broker.stop()
            await rotation.relay.stop()
            await rotation.producer.stop()
            await rotation.pool.close()

    return service_app(health, lifespan)


async def _pg_ok(rotation: Rotation) -> bool:
    return bool(await rotation.pool.fetchval("SELECT 1"))


async def _kafka_ok(rotation: Rotation) -> bool:
    return bool(await rotation.broker.ping(timeout=2.0)) and rotation.relay.healthy


def main() -> None:
    settings = RotationSettings()
    serve(create_app(settings), settings.http_host, settings.rotation_port)


if __name__ == "__main__":
    main()
