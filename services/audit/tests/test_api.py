"""The HTTP API on fakes: authentication, roles, tenant scoping, hostile input, pagination."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from klm_audit import handlers
from klm_audit.adapters.memory_store import MemoryAuditStore, MemoryTokenStore
from klm_audit.app import create_app
from klm_audit.bootstrap import Audit
from klm_audit.denials import ACCESS_DENIED, DenialRecorder
from klm_audit.domain.auth import Role, new_token
from klm_common.envelope import CloudEvent
from klm_common.settings import KlmSettings

from .factories import Events
from .test_ingest import accepted

INJECTIONS = ["' OR '1'='1", "1; DROP TABLE audit_log; --", "%' OR 1=1 --", "\\", "😀" * 300,
              "klm:key:../../etc/passwd", "$1", "' UNION SELECT * FROM api_tokens --"]


class Api:
    def __init__(self, client: TestClient, store: MemoryAuditStore, tokens: dict[str, str],
                 acme_key: CloudEvent, globex_key: CloudEvent) -> None:
        self.client, self.store, self.tokens = client, store, tokens
        self.acme_key, self.globex_key = acme_key, globex_key

    def get(self, path: str, as_: str | None = "auditor", **params: str):  # type: ignore[no-untyped-def]
        headers = {"Authorization": f"Bearer {self.tokens[as_]}"} if as_ else {}
        return self.client.get(path, headers=headers, params=params)


@pytest.fixture
def api(events: Events) -> Iterator[Api]:
    store = MemoryAuditStore()
    made = {"auditor": new_token(Role.AUDITOR, "a"), "admin": new_token(Role.ADMIN, "b"),
            "acme": new_token(Role.AUDITOR, "c", tenant="acme")}
    audit = Audit(settings=KlmSettings(), store=store,
                  tokens=MemoryTokenStore(t.stored for t in made.values()),
                  denials=DenialRecorder(store, interval=0.01))
    acme_key, globex_key = events.generated(owner="acme"), events.generated(owner="globex")
    with TestClient(create_app(KlmSettings(), audit)) as client:
        client.portal.call(handlers.append, store, accepted(  # type: ignore[union-attr]
            events.request(), acme_key, globex_key,
            *(events.generated(owner="acme") for _ in range(5))))
        yield Api(client, store, {k: t.token for k, t in made.items()}, acme_key, globex_key)


def denials(api: Api) -> list[dict[str, object]]:
    api.client.portal.call(api.client.app.state.audit.denials.flush)  # type: ignore[union-attr]
    return [r.canonical and __import__("json").loads(r.canonical)["data"]
            for r in api.store.rows if r.type == ACCESS_DENIED]


def test_no_token_or_a_bad_token_is_401_and_recorded(api: Api) -> None:
    assert api.get("/v1/keys", as_=None).status_code == 401
    forged = api.tokens["admin"][:-4] + "AAAA"
    response = api.client.get("/v1/keys", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith(
        "Bearer")
    assert api.client.get("/v1/keys", headers={"Authorization": "Basic eDp5"}).status_code == 401
    assert [d["status"] for d in denials(api)] == [401, 401, 401]


def test_wrong_role_is_403(api: Api) -> None:
    assert api.client.post("/v1/admin/projections/rebuild", headers={
        "Authorization": f"Bearer {api.tokens['auditor']}"}).status_code == 403
    assert api.get("/v1/audit/verify", as_="acme").status_code == 403
    assert api.client.post("/v1/admin/projections/rebuild", headers={
        "Authorization": f"Bearer {api.tokens['admin']}"}).json() == {"keys": 7}
    assert [d["reason"] for d in denials(api)] == ["forbidden", "forbidden"]


def test_a_tenant_sees_only_its_keys(api: Api) -> None:
    other = str(api.globex_key.subject)
    assert api.get(f"/v1/keys/{other}", as_="acme").status_code == 404
    assert api.get(f"/v1/keys/{other}/history", as_="acme").status_code == 404
    assert api.get(f"/v1/keys/{other}", as_="auditor").status_code == 200
    owners = {k["owner"] for k in api.get("/v1/keys", as_="acme").json()["keys"]}
    assert owners == {"acme"}
    assert api.get("/v1/keys", as_="acme", owner="globex").json()["keys"] == []
    tenants = {e["tenant"] for e in api.get("/v1/events", as_="acme").json()["events"]}
    assert tenants == {"acme"}
    assert [d["status"] for d in denials(api)] == [404, 404]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_hostile_filters_are_answered_without_error(api: Api, evil: str) -> None:
    for path, params in [("/v1/events", {"type": evil}), ("/v1/events", {"subject": evil}),
                         ("/v1/events", {"actor": evil}), ("/v1/keys", {"state": evil}),
                         ("/v1/keys", {"owner": evil}), ("/v1/keys", {"algorithm": evil}),
                         ("/v1/events", {"cursor": evil}), ("/v1/keys", {"cursor": evil}),
                         (f"/v1/keys/{evil}", {}), (f"/v1/keys/{evil}/history", {}),
                         ("/v1/events", {"since": evil}), ("/v1/events", {"limit": evil})]:
        response = api.get(path, as_="acme", **params)
        assert response.status_code < 500, (path, params, response.text)
        body = response.text
        assert "globex" not in body and "api_tokens" not in body.replace(evil, "")


def test_nul_bytes_are_refused_as_input_errors(api: Api) -> None:
    assert api.get("/v1/events", type="a\x00b").status_code == 422
    assert api.get("/v1/keys/a%00b/history").status_code in (404, 422)


def test_events_are_paged_by_a_stable_cursor(api: Api) -> None:
    seen, cursor = [], None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/events", **params).json()
        seen += [e["sequence"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(1, 9))


def test_verify_reports_the_chain(api: Api) -> None:
    body = api.get("/v1/audit/verify").json()
    assert body["ok"] and body["head_sequence"] == 8 and body["first_broken_sequence"] is None


def test_openapi_is_served(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    assert {"/v1/keys", "/v1/keys/{key_id}", "/v1/keys/{key_id}/history", "/v1/events",
            "/v1/audit/verify"} <= set(paths)
