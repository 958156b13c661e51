"""The auditor API on the real stack: tokens from the database, tenants, hostile input, and
the independent verifier recomputing the chain from the API's output alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from klm_audit.adapters.tokens import create_token, revoke_token
from klm_audit.domain.auth import Role
from klm_common.envelope import make_event
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import ServiceProcess
from tests.integration.test_audit_ingest import generated, request, send, wait_history

pytestmark = pytest.mark.asyncio(loop_scope="session")
REPO = Path(__file__).resolve().parents[2]
EVIL = ["' OR '1'='1", "1; DROP TABLE audit.audit_log; --", "%' OR 1=1 --", "\\x", "$1",
        "' UNION SELECT token_id FROM audit.api_tokens --", "a" * 300, "🔑" * 10]


@pytest.fixture(scope="module")
def audit(start_service: Any) -> ServiceProcess:
    return start_service("audit")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tokens(settings: KlmSettings) -> dict[str, str]:
    async def make() -> dict[str, str]:
        return {"admin": await create_token(settings, Role.ADMIN, "it-admin"),
                "auditor": await create_token(settings, Role.AUDITOR, "it-auditor"),
                "acme": await create_token(settings, Role.AUDITOR, "it-acme", tenant="acme")}
    return asyncio.run(make())


async def get(audit: ServiceProcess, path: str, token: str | None,
              **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=audit.url, timeout=30) as http:
        return await http.get(path, headers=headers, params=params)


async def test_roles_tenants_and_hostile_input(audit: ServiceProcess, tokens: dict[str, str],
                                               settings: KlmSettings, topics: Topics) -> None:
    acme, globex = generated(request("acme"), "acme"), generated(request("globex"), "globex")
    await send(settings, topics.lifecycle, acme, globex)
    await wait_history(audit, tokens["admin"], str(globex.subject), 1)

    assert (await get(audit, "/v1/keys", None)).status_code == 401
    assert (await get(audit, "/v1/keys", tokens["admin"] + "x")).status_code == 401
    async with httpx.AsyncClient(base_url=audit.url) as http:
        rebuilt = await http.post("/v1/admin/projections/rebuild",
                                  headers={"Authorization": f"Bearer {tokens['auditor']}"})
    assert rebuilt.status_code == 403
    assert (await get(audit, "/v1/audit/verify", tokens["acme"])).status_code == 403
    assert (await get(audit, f"/v1/keys/{globex.subject}", tokens["acme"])).status_code == 404
    assert (await get(audit, f"/v1/keys/{globex.subject}/history",
                      tokens["acme"])).status_code == 404
    assert (await get(audit, f"/v1/keys/{acme.subject}", tokens["acme"])).status_code == 200
    listed = (await get(audit, "/v1/keys", tokens["acme"])).json()["keys"]
    assert {k["owner"] for k in listed} == {"acme"}

    for evil in EVIL:
        for path, params in [("/v1/events", {"type": evil}), ("/v1/events", {"subject": evil}),
                             ("/v1/events", {"actor": evil}), ("/v1/events", {"cursor": evil}),
                             ("/v1/events", {"since": evil}), ("/v1/keys", {"state": evil}),
                             ("/v1/keys", {"owner": evil}), ("/v1/keys", {"cursor": evil}),
                             (f"/v1/keys/{evil}", {}), (f"/v1/keys/{evil}/history", {}),
                             (f"/v1/keys/{acme.subject}", {"at": evil})]:
            response = await get(audit, path, tokens["acme"], **params)
            assert response.status_code < 500, (path, params, response.text)
            assert "globex" not in response.text

    await asyncio.sleep(0.5)  # denials are appended in the background
    denied = (await get(audit, "/v1/events", tokens["admin"], type="klm.audit.access_denied",
                        limit="1000")).json()["events"]
    assert {e["event"]["data"]["status"] for e in denied} >= {401, 403, 404}


async def test_a_revoked_token_is_refused(audit: ServiceProcess, settings: KlmSettings) -> None:
    token = await create_token(settings, Role.AUDITOR, "short-lived")
    assert (await get(audit, "/v1/keys", token)).status_code == 200
    assert await revoke_token(settings, token.split("_")[1])
    await asyncio.sleep(5.5)  # the service caches a token for 5 s
    assert (await get(audit, "/v1/keys", token)).status_code == 401


async def test_state_at_a_past_time_by_replay(audit: ServiceProcess, tokens: dict[str, str],
                                              settings: KlmSettings, topics: Topics) -> None:
    fact = generated(request())
    suspended = make_event("klm.key.suspended", {
        "key_id": fact.subject, "owner": "acme", "state": "suspended",
        "previous_state": "active"}, source="klm/keygen", subject=fact.subject)
    await send(settings, topics.lifecycle, fact, suspended)
    await wait_history(audit, tokens["admin"], str(fact.subject), 2)
    now = await get(audit, f"/v1/keys/{fact.subject}", tokens["auditor"])
    before = await get(audit, f"/v1/keys/{fact.subject}", tokens["auditor"],
                       at=fact.time.isoformat())
    assert now.json()["state"] == "suspended" and before.json()["state"] == "active"
    earlier = await get(audit, f"/v1/keys/{fact.subject}", tokens["auditor"],
                        at="2000-01-01T00:00:00Z")
    assert earlier.status_code == 404


async def test_the_independent_verifier_recomputes_the_chain(
        audit: ServiceProcess, tokens: dict[str, str]) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(REPO / "tools" / "verify_chain.py"),
                               "--url", audit.url, "--token", tokens["auditor"], *extra],
                              capture_output=True, text=True, timeout=120, check=False)

    ok = run()
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    head = (await get(audit, "/v1/audit/verify", tokens["auditor"])).json()
    assert head["ok"]
    good = f"{head['head_sequence']}:{head['head_hash']}"
    assert run("--checkpoint", good).returncode == 0
    beyond = run("--checkpoint", f"{head['head_sequence'] + 1000}:{'0' * 64}")
    assert beyond.returncode == 1 and "truncated" in beyond.stdout
