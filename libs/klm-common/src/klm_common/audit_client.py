"""A small client of the audit HTTP API (DESIGN §6), used by the ``klm`` CLI.

The token comes from ``KLM_AUDIT_TOKEN``, else ``.klm/secrets/audit-admin-token`` (written by
``make up``); the base URL from ``KLM_AUDIT_URL``. HTTP errors become :class:`AuditApiError`
with the API's stable ``code``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx

from klm_common.errors import KlmError
from klm_common.settings import KlmSettings


class AuditApiError(KlmError):
    code = "audit_api_error"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, status=status, api_code=code)
        self.status, self.api_code = status, code

    def __str__(self) -> str:
        return f"{self.status} {self.api_code}: {self.message}"


def audit_token(settings: KlmSettings) -> str:
    token = os.environ.get("KLM_AUDIT_TOKEN")
    if token:
        return token
    try:
        return settings.secret("audit-admin-token")
    except FileNotFoundError:
        raise AuditApiError(0, "no_token", "set KLM_AUDIT_TOKEN or run `make up` "
                            "(writes .klm/secrets/audit-admin-token)") from None


class AuditClient:
    def __init__(self, settings: KlmSettings | None = None, *, token: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 60.0) -> None:
        settings = settings or KlmSettings()
        self._http = httpx.AsyncClient(
            base_url=settings.audit_url, timeout=timeout, transport=transport,
            headers={"Authorization": f"Bearer {token or audit_token(settings)}"})

    async def __aenter__(self) -> AuditClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._http.aclose()

    async def _get(self, path: str, **params: Any) -> httpx.Response:
        clean = {k: v for k, v in params.items() if v is not None}
        try:
            response = await self._http.get(path, params=clean)
        except httpx.HTTPError as exc:
            raise AuditApiError(0, "unreachable", f"audit API: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise AuditApiError(response.status_code, str(body.get("code", "http_error")),
                                str(body.get("message") or body.get("detail") or response.text))
        return response

    async def keys(self, **filters: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = (await self._get("/v1/keys", cursor=cursor, limit=1000, **filters)).json()
            out += page["keys"]
            cursor = page["next_cursor"]
            if cursor is None:
                return out

    async def key(self, key_id: str, at: str | None = None) -> dict[str, Any]:
        return dict((await self._get(f"/v1/keys/{key_id}", at=at)).json())

    async def history(self, key_id: str) -> list[dict[str, Any]]:
        return list((await self._get(f"/v1/keys/{key_id}/history")).json()["events"])

    async def events(self, limit: int = 1000, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        """Every matching event in sequence order, page by page."""
        cursor = None
        while True:
            page = (await self._get("/v1/events", cursor=cursor, limit=limit,
                                    **filters)).json()
            for event in page["events"]:
                yield event
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def verify(self) -> dict[str, Any]:
        return dict((await self._get("/v1/audit/verify")).json())

    async def compliance(self, fmt: str = "json") -> Any:
        response = await self._get("/v1/reports/compliance", format=fmt)
        return response.text if fmt == "csv" else response.json()

    async def cbom(self) -> dict[str, Any]:
        return dict((await self._get("/v1/reports/cbom")).json())
