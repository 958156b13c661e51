"""The backup process: three batch subscribers, the outbox relay, the drill schedule and
health, under one lifespan. It never opens an HSM session: keygen wraps and unwraps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from klm_backup.bootstrap import Backup, bootstrap
from klm_backup.handlers import (
    handle_backup_topic,
    handle_lifecycle,
    handle_requests,
    start_drill,
)
from klm_common.authorization import tenant_request_topics
from klm_common.kafka import ensure_topics, subscriber_options
from klm_common.service import Health, serve, service_app
from klm_common.settings import KlmSettings
from klm_common.telemetry import setup_telemetry

log = logging.getLogger(__name__)


def register(backup: Backup) -> None:
    settings, topics, broker = backup.settings, backup.topics, backup.broker

    @broker.subscriber(topics.lifecycle, **subscriber_options(settings, "klm-backup"))
    async def on_lifecycle(records: list[Any]) -> None:
        await handle_lifecycle(records, backup.deps)

    @broker.subscriber(topics.backup, **subscriber_options(settings, "klm-backup-internal"))
    async def on_backup(records: list[Any]) -> None:
        await handle_backup_topic(records, backup.deps)

    @broker.subscriber(topics.requests, **subscriber_options(settings, "klm-backup-requests"))
    async def on_requests(records: list[Any]) -> None:
        await handle_requests(records, backup.deps)

    # every tenant's own request topic (the tenant follows from the topic)
    @broker.subscriber(pattern=tenant_request_topics(topics),
                       **subscriber_options(settings, "klm-backup-tenants"))
    async def on_tenant_requests(records: list[Any]) -> None:
        await handle_requests(records, backup.deps)


async def drill_schedule(backup: Backup) -> None:
    """A restore drill every ``KLM_BACKUP_DRILL_INTERVAL`` seconds (first after one period)."""
    interval = backup.backup_settings.drill_interval
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            async with backup.deps.store.unit() as unit:
                drill_id = await start_drill(unit, backup.deps,
                                             backup.backup_settings.drill_sample)
            backup.relay.wake()
            log.info("scheduled restore drill %s started", drill_id)
        except Exception:
            log.exception("scheduled restore drill could not start; next period retries")


def create_app(settings: KlmSettings | None = None) -> Starlette:
    settings = settings or KlmSettings()
    health = Health()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        setup_telemetry("backup")
        await ensure_topics(settings)
        backup = await bootstrap(settings)
        health.add("postgres", lambda: _pg_ok(backup))
        health.add("kafka", lambda: _kafka_ok(backup))
        register(backup)
        await backup.producer.start()
        backup.relay.start()
        await backup.broker.start()
        drills = asyncio.create_task(drill_schedule(backup), name="backup-drills")
        log.info("backup ready: consuming %s, %s, %s", backup.topics.lifecycle,
                 backup.topics.backup, backup.topics.requests)
        try:
            yield
        finally:
            drills.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drills
            await backup.broker.stop()
            await backup.relay.stop()
            await backup.producer.stop()
            await backup.pool.close()

    return service_app(health, lifespan)


async def _pg_ok(backup: Backup) -> bool:
    return bool(await backup.pool.fetchval("SELECT 1"))


async def _kafka_ok(backup: Backup) -> bool:
    return bool(await backup.broker.ping(timeout=2.0)) and backup.relay.healthy


def main() -> None:
    settings = KlmSettings()
    serve(create_app(settings), settings.http_host, settings.backup_port)


if __name__ == "__main__":
    main()
