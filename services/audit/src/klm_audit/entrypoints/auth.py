"""FastAPI dependencies: who is calling (bearer token) and may they (role, tenant).

Every refusal (401, 403, and 404 for another tenant's key) is recorded by the
:class:`~klm_audit.denials.DenialRecorder` before the error is returned.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from klm_audit.bootstrap import Audit
from klm_audit.domain.auth import Principal, Role, check, split_token
from klm_audit.domain.queries import Scope


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def audit_of(request: Request) -> Audit:
    audit: Audit = request.app.state.audit
    return audit


def deny(request: Request, status: int, code: str, message: str, *,
         principal: Principal | None = None, token_id: str | None = None) -> ApiError:
    """Record the refusal and return the error to raise."""
    audit_of(request).denials.record(
        status=status, reason=code, method=request.method, path=request.url.path,
        client=request.client.host if request.client else None,
        token_id=principal.token_id if principal else token_id,
        tenant=principal.tenant if principal else None)
    headers = {"WWW-Authenticate": 'Bearer realm="klm-audit"'} if status == 401 else None
    return ApiError(status, code, message, headers)


async def authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise deny(request, 401, "unauthenticated", "a bearer token is required")
    parts = split_token(token.strip())
    if parts is None:
        raise deny(request, 401, "unauthenticated", "the bearer token is not valid")
    token_id, secret = parts
    principal = check(secret, await audit_of(request).tokens.get(token_id))
    if principal is None:
        raise deny(request, 401, "unauthenticated", "the bearer token is not valid",
                   token_id=token_id)
    return principal


def require(*roles: Role, unscoped: bool = False) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting ``roles``; ``unscoped`` also refuses tenant-scoped tokens."""

    async def dependency(request: Request,
                         principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in roles:
            raise deny(request, 403, "forbidden",
                       f"role {principal.role.value} may not call this", principal=principal)
        if unscoped and principal.tenant is not None:
            raise deny(request, 403, "forbidden",
                       "a tenant-scoped token may not call this", principal=principal)
        return principal

    return dependency


def scope_of(principal: Principal) -> Scope:
    return Scope(principal.tenant)


reader = require(Role.AUDITOR, Role.ADMIN)
unscoped_reader = require(Role.AUDITOR, Role.ADMIN, unscoped=True)
admin = require(Role.ADMIN, unscoped=True)
