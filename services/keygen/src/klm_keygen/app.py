"""The keygen process: the hot topics' consumers, FastStream subscribers, the outbox relay
and health, under one lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from klm_common.errors import KlmError
from klm_common.kafka import ensure_topics
from klm_common.service import Health, serve, service_app
from klm_common.settings import KlmSettings
from klm_common.telemetry import setup_telemetry
from klm_keygen.bootstrap import Keygen, bootstrap
from klm_keygen.handlers import backup, checkpoint, commands, requests, usage
from klm_keygen.handlers.orphans import destroy_orphans

log = logging.getLogger(__name__)
#: handler areas; each module's register(keygen) subscribes its handlers
AREAS = [requests, commands, backup, usage, checkpoint]


async def _open_hsm_until_ready(keygen: Keygen) -> None:
    """Keep trying the HSM; consume requests only once a session is open."""
    delay = 0.5
    while True:
        try:
            await keygen.hsm.open()
            return
        except KlmError as exc:
            log.warning("HSM not ready (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _start_consuming(keygen: Keygen) -> None:
    await _open_hsm_until_ready(keygen)
    await _sweep_orphans(keygen)
    await keygen.broker.start()
    for consumer in keygen.consumers:
        await consumer.start()
    log.info("keygen ready: consuming %s", keygen.topics.requests)


async def _sweep_orphans(keygen: Keygen) -> None:
    """Before consuming: resident objects left by a crash before commit are destroyed."""
    delay = 0.5
    while True:
        try:
            await destroy_orphans(keygen.hsm, keygen.deps.keystore)
            return
        except Exception as exc:  # consuming must start once the HSM is back
            log.warning("orphan sweep failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _started(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def create_app(settings: KlmSettings | None = None) -> Starlette:
    settings = settings or KlmSettings()
    health = Health()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        setup_telemetry("keygen")
        await ensure_topics(settings)
        keygen = await bootstrap(settings)
        health.add("hsm", keygen.hsm.healthy)
        health.add("postgres", lambda: _pg_ok(keygen))
        health.add("kafka", lambda: _kafka_ok(keygen))
        health.add("consuming", lambda: _started(starting))
        for area in AREAS:
            area.register(keygen)
        await keygen.producer.start()
        keygen.relay.start()
        # HTTP (health) is served while the HSM is still being waited for
        starting = asyncio.create_task(_start_consuming(keygen), name="keygen-start")
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            for consumer in keygen.consumers:  # answers in flight are sent and committed
                await consumer.stop()
            await keygen.broker.stop()
            for last_words in keygen.on_stop:  # nothing is served any more
                await last_words()
            await keygen.relay.stop()
            await keygen.producer.stop()
            await keygen.hsm.close()
            await keygen.pool.close()

    return service_app(health, lifespan)


async def _pg_ok(keygen: Keygen) -> bool:
    return bool(await keygen.pool.fetchval("SELECT 1"))


async def _kafka_ok(keygen: Keygen) -> bool:
    return bool(await keygen.broker.ping(timeout=2.0)) and keygen.relay.healthy


def main() -> None:
    settings = KlmSettings()
    serve(create_app(settings), settings.http_host, settings.keygen_port)


if __name__ == "__main__":
    main()
