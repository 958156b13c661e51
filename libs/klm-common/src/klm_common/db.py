"""Postgres: per-service pools and provisioning (role, schema, migrations).

Each service owns one schema named after it and logs in as its own role ``klm_<service>``
(DESIGN §1). The schema and its tables belong to the admin role that runs the migrations;
the service role gets only the privileges its migrations GRANT it, so a service can never
alter its own tables (and audit can never UPDATE or DELETE).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from importlib import resources
from pathlib import Path

import asyncpg

from klm_common.settings import KlmSettings

log = logging.getLogger(__name__)

SERVICES = ("keygen", "rotation", "backup", "audit")


async def create_pool(settings: KlmSettings, service: str, **kwargs: object) -> asyncpg.Pool:
    """A pool for ``service``'s role with its schema first on the search path."""
    return await asyncpg.create_pool(
        settings.service_dsn(service),
        min_size=1,
        max_size=settings.pg_pool_max,
        server_settings={"search_path": service, "application_name": f"klm-{service}"},
        **kwargs,
    )


def migrations_of(service: str) -> list[tuple[str, str]]:
    """``(name, sql)`` of ``klm_<service>/migrations/*.sql`` in name order."""
    folder = resources.files(f"klm_{service}").joinpath("migrations")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name, f.read_text()) for f in files]


def _ensure_password(settings: KlmSettings, service: str) -> str:
    path: Path = settings.secrets_dir / f"pg-{service}-password"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


async def provision(settings: KlmSettings, services: tuple[str, ...] = SERVICES,
                    database: str | None = None) -> None:
    """Create roles, schemas and apply pending migrations; idempotent."""
    admin = await asyncpg.connect(settings.admin_dsn(), database=database)
    try:
        for service in services:
            await _provision_one(admin, settings, service)
    finally:
        await admin.close()


async def _provision_one(admin: asyncpg.Connection, settings: KlmSettings, service: str) -> None:
    role = f"klm_{service}"
    password = _ensure_password(settings, service)
    # roles are cluster-wide; serialise their creation across concurrent provisioners
    async with admin.transaction():
        await admin.execute("SELECT pg_advisory_xact_lock(7243001)")
        exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        verb = "ALTER" if exists else "CREATE"
        # identifiers cannot be parameters: role comes from SERVICES, password is quoted
        await admin.execute(
            f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT "
            f"PASSWORD {_literal(password)}")
        await admin.execute(f"CREATE SCHEMA IF NOT EXISTS {service}")
        await admin.execute(f"REVOKE ALL ON SCHEMA {service} FROM PUBLIC")
        await admin.execute(f"GRANT USAGE ON SCHEMA {service} TO {role}")
        await admin.execute(f"""CREATE TABLE IF NOT EXISTS {service}.schema_migrations (
            name text PRIMARY KEY, sha256 text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
    for name, sql in migrations_of(service):
        digest = hashlib.sha256(sql.encode()).hexdigest()
        async with admin.transaction():
            await admin.execute("SELECT pg_advisory_xact_lock(7243002)")
            done = await admin.fetchval(
                f"SELECT sha256 FROM {service}.schema_migrations WHERE name = $1",  # noqa: S608
                name)
            if done is not None:
                if done != digest:
                    log.warning("migration %s/%s changed after it was applied", service, name)
                continue
            await admin.execute(f"SET LOCAL search_path = {service}")
            await admin.execute(sql)
            await admin.execute(
                f"INSERT INTO {service}.schema_migrations (name, sha256) VALUES ($1, $2)",  # noqa: S608
                name, digest)
            log.info("applied migration %s/%s", service, name)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
