"""The klm-audit process: Kafka ingest + the auditor HTTP API in one ASGI app.

``klm-audit`` (no arguments) serves; ``klm-audit tokens ...`` manages API tokens as the
admin role; ``klm-audit projections rebuild`` replays the log into the read models.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import typer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from klm_audit.bootstrap import Audit, bootstrap
from klm_audit.entrypoints.auth import ApiError
from klm_audit.entrypoints.http import router
from klm_common.kafka import ensure_topics
from klm_common.service import Health, health_routes, serve
from klm_common.settings import KlmSettings

log = logging.getLogger(__name__)


def create_app(settings: KlmSettings | None = None, audit: Audit | None = None) -> FastAPI:
    """The ASGI app. Pass ``audit`` to run the API on fakes (no Kafka, no Postgres)."""
    settings = settings or KlmSettings()
    health = Health()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        wired = audit or await _start(settings)
        app.state.audit = wired
        health.add("postgres", wired.store.ping)
        if wired.broker is not None:
            broker = wired.broker
            health.add("kafka", lambda: broker.ping(timeout=2.0))
        wired.start_background()
        try:
            yield
        finally:
            await wired.close()

    app = FastAPI(title="KLM audit", version="1.0.0", lifespan=lifespan,
                  description="Tamper-evident key history for auditors (DESIGN §6).")
    app.include_router(router)
    app.router.routes.extend(health_routes(health))
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    return app


async def _start(settings: KlmSettings) -> Audit:
    await ensure_topics(settings)
    audit = await bootstrap(settings)
    assert audit.broker is not None
    await audit.broker.start()
    log.info("audit consuming as group klm-audit")
    return audit


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.status,
                        headers=exc.headers)


cli = typer.Typer(add_completion=False, help="KLM audit service")


@cli.callback(invoke_without_command=True)
def run(ctx: typer.Context) -> None:
    """Serve the audit API and ingest (the default when no command is given)."""
    if ctx.invoked_subcommand is None:
        settings = KlmSettings()
        serve(create_app(settings), settings.http_host, settings.audit_port)


def main() -> None:
    from klm_audit.cli import register

    register(cli)
    cli()


if __name__ == "__main__":
    main()
