"""``klm demo``: a first tour of a running KLM — requests in, facts out, history read back."""

from __future__ import annotations

import asyncio
import os

import httpx
from rich.console import Console
from rich.table import Table

from klm_common.client import KlmClient, RequestRejectedError
from klm_common.events import GenerateKey
from klm_common.settings import KlmSettings

DEMO_REQUESTS = [
    GenerateKey(owner="demo", name="payments-dek", algorithm="AES-256"),
    GenerateKey(owner="demo", name="api-signing", algorithm="EC-P-256"),
    GenerateKey(owner="demo", name="tokens-mac", algorithm="HMAC-SHA256"),
    GenerateKey(owner="demo", name="legacy", algorithm="RSA", size=1024),  # rejected: too weak
]


def audit_token(settings: KlmSettings) -> str:
    return os.environ.get("KLM_AUDIT_TOKEN") or settings.secret("audit-admin-token")


async def run_demo(console: Console) -> None:
    settings = KlmSettings()
    table = Table(title="requests → answers (klm.lifecycle)")
    for column in ("request", "answer", "key / code", "detail"):
        table.add_column(column)
    key_ids: list[str] = []
    async with KlmClient(settings, source="klm/demo") as klm:
        for request in DEMO_REQUESTS:
            label = f"{request.algorithm}{'-' + str(request.size) if request.size else ''}"
            try:
                fact = await klm.request(request)
            except RequestRejectedError as exc:
                table.add_row(label, "[red]rejected[/red]", exc.code, exc.message)
                continue
            key_ids.append(str(fact.subject))
            kcv = fact.data.get("kcv")
            detail = f"kcv {kcv}" if kcv else \
                f"spki sha256 {str(fact.data.get('fingerprint_sha256'))[:16]}…"
            table.add_row(label, f"[green]{fact.type}[/green]", str(fact.subject), detail)
    console.print(table)
    await _show_history(console, settings, key_ids)


async def _show_history(console: Console, settings: KlmSettings, key_ids: list[str]) -> None:
    headers = {"Authorization": f"Bearer {audit_token(settings)}"}
    async with httpx.AsyncClient(base_url=settings.audit_url, headers=headers,
                                 timeout=10) as http:
        for key_id in key_ids:
            events = await _history(http, key_id)
            table = Table(title=f"audit history of {key_id}")
            for column in ("seq", "time", "type", "hash"):
                table.add_column(column)
            for ev in events:
                table.add_row(str(ev.get("sequence")), str(ev.get("time") or
                              ev.get("occurred_at")), str(ev.get("type")),
                              str(ev.get("hash", ""))[:16] + "…")
            console.print(table)


async def _history(http: httpx.AsyncClient, key_id: str) -> list[dict[str, object]]:
    """The audit service ingests asynchronously: wait (briefly) until the key shows up."""
    for _ in range(50):
        response = await http.get(f"/v1/keys/{key_id}/history")
        if response.status_code == 200:
            body = response.json()
            events = body.get("events", body) if isinstance(body, dict) else body
            if events:
                return list(events)
        await asyncio.sleep(0.2)
    return []
