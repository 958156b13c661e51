"""Bearer tokens of the auditor API: format, hashing and constant-time check (pure).

A token reads ``klmat_<token_id>_<secret>``. The id finds the row; only SHA-256(secret) is
stored, and the presented secret's hash is compared with :func:`hmac.compare_digest`, so
neither a database dump nor response timing reveals a usable token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

PREFIX = "klmat"
_TOKEN = re.compile(r"^klmat_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
_DUMMY_HASH = hashlib.sha256(b"no such token").digest()


class Role(StrEnum):
    AUDITOR = "auditor"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class StoredToken:
    token_id: str
    secret_sha256: bytes
    role: Role
    tenant: str | None
    name: str
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a role and, for a tenant's auditor, the one tenant it may see."""

    token_id: str
    role: Role
    tenant: str | None
    name: str


@dataclass(frozen=True, slots=True)
class NewToken:
    token: str
    stored: StoredToken


def new_token(role: Role, name: str, tenant: str | None = None) -> NewToken:
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    stored = StoredToken(token_id, hash_secret(secret), role, tenant, name)
    return NewToken(f"{PREFIX}_{token_id}_{secret}", stored)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_token(token: str) -> tuple[str, str] | None:
    """``(token_id, secret)`` of a well-formed token, else None."""
    match = _TOKEN.match(token)
    return (match.group(1), match.group(2)) if match else None


def check(secret: str, stored: StoredToken | None) -> Principal | None:
    """The principal if ``secret`` matches ``stored`` (constant time), else None."""
    expected = stored.secret_sha256 if stored is not None else _DUMMY_HASH
    matches = hmac.compare_digest(hash_secret(secret), expected)
    if stored is None or stored.revoked or not matches:
        return None
    return Principal(stored.token_id, stored.role, stored.tenant, stored.name)
