"""``klm-audit`` administration commands (run as the admin role, e.g. by ``make up``)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from klm_audit.adapters.postgres_store import PostgresAuditStore
from klm_audit.adapters.tokens import create_token, ensure_dev_tokens, revoke_token
from klm_audit.domain.auth import Role
from klm_common.db import create_pool
from klm_common.settings import KlmSettings

tokens = typer.Typer(add_completion=False, help="API bearer tokens")
projections = typer.Typer(add_completion=False, help="read models")


@tokens.command("ensure-dev")
def tokens_ensure_dev() -> None:
    """Create .klm/secrets/audit-{admin,auditor}-token if missing and register them."""
    paths = asyncio.run(ensure_dev_tokens(KlmSettings()))
    for role, path in paths.items():
        typer.echo(f"{role.value}: {path}")


@tokens.command("create")
def tokens_create(role: Annotated[Role, typer.Option()],
                  name: Annotated[str, typer.Option()],
                  tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """Register a token and print it (it is not stored anywhere in the clear)."""
    typer.echo(asyncio.run(create_token(KlmSettings(), role, name, tenant)))


@tokens.command("revoke")
def tokens_revoke(token_id: str) -> None:
    if not asyncio.run(revoke_token(KlmSettings(), token_id)):
        raise typer.Exit(1)


@projections.command("rebuild")
def projections_rebuild() -> None:
    """Drop the read models and replay the whole log into them."""

    async def run() -> int:
        pool = await create_pool(KlmSettings(), "audit")
        try:
            return await PostgresAuditStore(pool).rebuild_projections()
        finally:
            await pool.close()

    typer.echo(json.dumps({"keys": asyncio.run(run())}))


def register(app: typer.Typer) -> None:
    app.add_typer(tokens, name="tokens")
    app.add_typer(projections, name="projections")
