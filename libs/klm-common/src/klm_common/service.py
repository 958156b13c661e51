"""What every KLM service process shares: an HTTP face (health, readiness, metrics) and
the run loop. The service's own lifespan starts its broker, pool and background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from klm_common.logging import configure_logging

HealthCheck = Callable[[], Awaitable[bool]]

log = logging.getLogger(__name__)


class Health:
    """Named readiness checks (HSM session, Kafka, Postgres, …) a service registers."""

    def __init__(self) -> None:
        self.checks: dict[str, HealthCheck] = {}

    def add(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    async def report(self) -> dict[str, bool]:
        async def run(check: HealthCheck) -> bool:
            try:
                return await asyncio.wait_for(check(), timeout=3.0)
            except Exception:
                return False

        results = await asyncio.gather(*(run(c) for c in self.checks.values()))
        return dict(zip(self.checks, results, strict=True))


def health_routes(health: Health) -> list[BaseRoute]:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(_: Request) -> Response:
        report = await health.report()
        ready = all(report.values())
        return JSONResponse({"ready": ready, "checks": report}, status_code=200 if ready else 503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]


def service_app(health: Health,
                lifespan: Callable[[Any], AbstractAsyncContextManager[None]],
                routes: Sequence[BaseRoute] = ()) -> Starlette:
    return Starlette(routes=[*health_routes(health), *routes], lifespan=lifespan)


def serve(app: Any, host: str, port: int) -> None:
    """Run an ASGI app until SIGTERM/SIGINT (uvicorn handles both gracefully)."""
    configure_logging()
    uvicorn.run(app, host=host, port=port, log_config=None,
                access_log=os.environ.get("KLM_ACCESS_LOG") == "1")


