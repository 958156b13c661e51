"""Token storage: the service reads ``api_tokens`` (SELECT only); the provisioning CLI,
connected as the admin role, writes them. Also the development tokens ``make up`` creates.
"""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg

from klm_audit.domain.auth import (
    NewToken,
    Role,
    StoredToken,
    hash_secret,
    new_token,
    split_token,
)
from klm_common.settings import KlmSettings

DEV_TOKENS = {Role.ADMIN: "audit-admin-token", Role.AUDITOR: "audit-auditor-token"}


class PostgresTokenStore:
    """Reads tokens by id, caching each answer briefly (a revocation applies within ``ttl``)."""

    def __init__(self, pool: asyncpg.Pool, ttl: float = 5.0) -> None:
        self._pool = pool
        self._ttl = ttl
        self._cache: dict[str, tuple[float, StoredToken | None]] = {}

    async def get(self, token_id: str) -> StoredToken | None:
        hit = self._cache.get(token_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        row = await self._pool.fetchrow(
            "SELECT token_id, secret_sha256, role, tenant, name, revoked_at IS NOT NULL AS revoked "
            "FROM api_tokens WHERE token_id = $1", token_id)
        token = None if row is None else StoredToken(
            row["token_id"], bytes(row["secret_sha256"]), Role(row["role"]), row["tenant"],
            row["name"], row["revoked"])
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token_id] = (time.monotonic() + self._ttl, token)
        return token


async def insert_token(conn: asyncpg.Connection, token: NewToken) -> None:
    s = token.stored
    await conn.execute(
        "INSERT INTO audit.api_tokens (token_id, secret_sha256, role, tenant, name) "
        "VALUES ($1, $2, $3, $4, $5)", s.token_id, s.secret_sha256, s.role.value, s.tenant,
        s.name)


async def create_token(settings: KlmSettings, role: Role, name: str,
                       tenant: str | None = None, database: str | None = None) -> str:
    """Register a new token (as the admin role) and return it; it is shown only once."""
    token = new_token(role, name, tenant)
    conn = await asyncpg.connect(settings.admin_dsn(), database=database)
    try:
        await insert_token(conn, token)
    finally:
        await conn.close()
    return token.token


async def revoke_token(settings: KlmSettings, token_id: str, database: str | None = None) -> bool:
    conn = await asyncpg.connect(settings.admin_dsn(), database=database)
    try:
        status = await conn.execute(
            "UPDATE audit.api_tokens SET revoked_at = now() "
            "WHERE token_id = $1 AND revoked_at IS NULL", token_id)
    finally:
        await conn.close()
    return bool(status.endswith(" 1"))


async def ensure_dev_tokens(settings: KlmSettings, database: str | None = None) -> dict[Role, Path]:
    """Create ``.klm/secrets/audit-{admin,auditor}-token`` (0600) if missing; register them.

    Idempotent: an existing file whose token is not registered (a fresh database) is
    registered again with the same secret.
    """
    conn = await asyncpg.connect(settings.admin_dsn(), database=database)
    try:
        return {role: await _ensure_one(conn, settings, role, filename)
                for role, filename in DEV_TOKENS.items()}
    finally:
        await conn.close()


async def _ensure_one(conn: asyncpg.Connection, settings: KlmSettings, role: Role,
                      filename: str) -> Path:
    path = settings.secrets_dir / filename
    parts = split_token(path.read_text().strip()) if path.exists() else None
    if parts is None:
        token = new_token(role, f"dev-{role.value}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(token.token + "\n")
        parts = split_token(token.token)
        assert parts is not None
    token_id, secret = parts
    await conn.execute(
        "INSERT INTO audit.api_tokens (token_id, secret_sha256, role, tenant, name) "
        "VALUES ($1, $2, $3, NULL, $4) ON CONFLICT (token_id) DO NOTHING",
        token_id, hash_secret(secret), role.value, f"dev-{role.value}")
    return path
