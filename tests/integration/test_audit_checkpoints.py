"""Signed checkpoints on the real stack: audit asks keygen, keygen signs in SoftHSM, audit
records and verifies them; tampering and rollbacks are caught by the last signed checkpoint.

This module runs its own namespace (topics, database, SoftHSM token): tampering breaks
the chain for good, and checkpoints must be about this database only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from klm_audit.adapters.tokens import create_token
from klm_audit.domain.auth import Role
from klm_common.envelope import make_event
from klm_common.events import AuditCheckpoint
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.conftest import _create_namespace, _drop_namespace, settings_for
from tests.integration.harness import ServiceProcess, create_topic
from tests.integration.test_audit_ingest import generated, request, send

pytestmark = pytest.mark.asyncio(loop_scope="session")
REPO = Path(__file__).resolve().parents[2]
EVERY_EVENTS = 20


@pytest.fixture(scope="module")
def ns_env(klm_env: dict[str, str], namespace: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, str]]:
    """A namespace of our own: topics, database (all migrations) and SoftHSM token."""
    name = f"{namespace}ck"
    pin = tmp_path_factory.mktemp("ck-hsm") / "pin"
    pin.write_text(secrets.token_hex(8))
    pin.chmod(0o600)
    hsm_env = {**os.environ, "SOFTHSM2_CONF": klm_env["SOFTHSM2_CONF"]}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", name, "--pin",
                    pin.read_text(), "--so-pin", secrets.token_hex(8)],
                   capture_output=True, env=hsm_env, check=True)
    admin = klm_env["KLM_PG_ADMIN_DSN"].rsplit("/", 1)[0]
    env = {**klm_env, "KLM_PG_ADMIN_DSN": f"{admin}/{name}",
           "KLM_PG_DSN": klm_env["KLM_PG_DSN"].rsplit("/", 1)[0] + f"/{name}",
           "KLM_TOPIC_PREFIX": f"{name}.", "KLM_HSM_TOKEN_LABEL": name,
           "KLM_HSM_PIN_FILE": str(pin)}
    asyncio.run(_create_namespace(f"{admin}/postgres", name, env))
    asyncio.run(create_topic(env["KLM_KAFKA_BOOTSTRAP"], f"{name}.klm.requests.acme"))
    try:
        yield env
    finally:
        asyncio.run(_drop_namespace(f"{admin}/postgres", name, env))
        subprocess.run(["softhsm2-util", "--delete-token", "--token", name],
                       capture_output=True, env=hsm_env, check=False)


@pytest.fixture(scope="module")
def ns(ns_env: dict[str, str]) -> KlmSettings:
    return settings_for(ns_env)


@pytest.fixture(scope="module")
def services(ns_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[ServiceProcess]:
    """keygen (the signer) and audit (checkpoint every 20 events or 1 s); yields audit."""
    logs = tmp_path_factory.mktemp("ck-logs")
    keygen = ServiceProcess("keygen", REPO, ns_env, logs)
    audit = ServiceProcess("audit", REPO, {
        **ns_env, "KLM_AUDIT_CHECKPOINT_EVERY_EVENTS": str(EVERY_EVENTS),
        "KLM_AUDIT_CHECKPOINT_EVERY_SECONDS": "1"}, logs)
    keygen.start()
    audit.start()
    try:
        yield audit
    finally:
        audit.terminate()
        keygen.terminate()


@pytest.fixture(scope="module")
def token(ns: KlmSettings) -> str:
    return asyncio.run(create_token(ns, Role.AUDITOR, "ck-auditor"))


async def verify(audit: ServiceProcess, token: str, **params: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=audit.url, timeout=60) as http:
        response = await http.get("/v1/audit/verify", params=params,
                                  headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_checkpoint(audit: ServiceProcess, token: str, covering: int,
                          timeout: float = 90.0) -> dict[str, Any]:
    """Verification once a checkpoint covers at least ``covering`` events."""
    deadline = time.monotonic() + timeout
    while True:
        body = await verify(audit, token)
        last = body.get("last_checkpoint") or {}
        if last.get("sequence", 0) >= covering or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.5)


class Superuser:
    """Tampering as a superuser, with the append-only triggers disabled."""

    def __init__(self, settings: KlmSettings) -> None:
        self.dsn = settings.admin_dsn()

    async def run(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                for table in ("audit_log", "checkpoints"):
                    await conn.execute(f"ALTER TABLE audit.{table} DISABLE TRIGGER USER")
                for sql, args in statements:
                    await conn.execute(sql, *args)
                for table in ("audit_log", "checkpoints"):
                    await conn.execute(f"ALTER TABLE audit.{table} ENABLE ALWAYS TRIGGER "
                                       f"{table}_append_only")
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def signed(services: ServiceProcess, token: str, ns: KlmSettings
                 ) -> AsyncIterator[dict[str, Any]]:
    """Enough events for a checkpoint on the count, then a quiet log (a stable chain)."""
    events = []
    for _ in range(EVERY_EVENTS + 5):
        cause = request()
        events += [cause, generated(cause)]
    await send(ns, Topics(ns.topic_prefix).lifecycle, *events)
    await wait_checkpoint(services, token, covering=len(events))
    await asyncio.sleep(3)  # let the time-based checkpoint of the tail arrive too
    yield await verify(services, token)


async def test_checkpoints_are_signed_by_the_hsm_key_and_verify(
        signed: dict[str, Any], ns: KlmSettings) -> None:
    assert signed["ok"], signed
    assert signed["checkpoints_checked"] >= 1
    [key_id] = signed["checkpoint_keys"]
    last = signed["last_checkpoint"]
    assert last["algorithm"] == "ECDSA-P256-SHA256" and last["signing_key_id"] == key_id
    assert hashlib.sha256(__import__("base64").b64decode(last["public_key"])).hexdigest() \
        == key_id
    rows = await Superuser(ns).fetch(
        "SELECT type, canonical FROM audit.audit_log WHERE sequence = $1",
        last["event_sequence"])
    assert rows[0]["type"] == AuditCheckpoint.event_type
    assert json.loads(rows[0]["canonical"])["source"] == "klm/keygen"


async def test_a_pinned_key_is_required_when_given(services: ServiceProcess, token: str,
                                                   signed: dict[str, Any]) -> None:
    assert (await verify(services, token, trusted_key=signed["checkpoint_keys"][0]))["ok"]
    other = await verify(services, token, trusted_key="ab" * 32)
    assert not other["ok"] and "not a trusted checkpoint key" in other["reason"]


async def test_a_forged_checkpoint_signature_fails(services: ServiceProcess, token: str,
                                                   signed: dict[str, Any],
                                                   ns: KlmSettings) -> None:
    db = Superuser(ns)
    seq = signed["last_checkpoint"]["event_sequence"]
    [row] = await db.fetch("SELECT signature FROM audit.checkpoints WHERE log_sequence = $1",
                           seq)
    forged = bytes(row["signature"])[:-1] + bytes([row["signature"][-1] ^ 1])
    await db.run(("UPDATE audit.checkpoints SET signature = $1 WHERE log_sequence = $2",
                  (forged, seq)))
    try:
        body = await verify(services, token)
        assert not body["ok"] and body["first_broken_sequence"] == seq
        assert "signature does not verify" in body["reason"]
    finally:
        await db.run(("UPDATE audit.checkpoints SET signature = $1 WHERE log_sequence = $2",
                      (bytes(row["signature"]), seq)))
    assert (await verify(services, token))["ok"]


async def test_a_tampered_row_before_a_checkpoint_is_named(
        services: ServiceProcess, token: str, signed: dict[str, Any], ns: KlmSettings) -> None:
    """Even with every later hash recomputed, the signed checkpoint disagrees."""
    db = Superuser(ns)
    covered = signed["last_checkpoint"]["sequence"]
    target = covered // 2
    rows = await db.fetch("SELECT sequence, canonical, prev_hash, hash FROM audit.audit_log "
                          "ORDER BY sequence")
    original = [(r["sequence"], r["canonical"], bytes(r["prev_hash"]), bytes(r["hash"]))
                for r in rows]
    await db.run(("UPDATE audit.audit_log SET canonical = replace(canonical, '\"k\"', "
                  "'\"evil\"') WHERE sequence = $1", (target,)))
    try:
        plain = await verify(services, token)
        assert not plain["ok"] and plain["first_broken_sequence"] == target
        await db.run(*_rehash_from(await db.fetch(
            "SELECT sequence, canonical FROM audit.audit_log ORDER BY sequence")))
        rehashed = await verify(services, token, columns="false")
        assert not rehashed["ok"] and target <= rehashed["first_broken_sequence"] <= covered
        assert "differs from the checkpoint" in rehashed["reason"], rehashed
    finally:
        await db.run(*[("UPDATE audit.audit_log SET canonical = $2, prev_hash = $3, hash = $4 "
                        "WHERE sequence = $1", row) for row in original])
    assert (await verify(services, token))["ok"]


async def test_a_truncated_tail_is_caught_by_the_last_checkpoint(
        services: ServiceProcess, token: str, signed: dict[str, Any], ns: KlmSettings,
        tmp_path: Path) -> None:
    """The service catches it from its checkpoints table; the independent verifier, which
    sees only the (truncated) API output, from the checkpoint the auditor kept."""
    kept = tmp_path / "last-checkpoint.json"
    kept.write_text(json.dumps(signed["last_checkpoint"]))
    db = Superuser(ns)
    covered = signed["last_checkpoint"]["sequence"]
    cut = covered - 3
    saved = await db.fetch("SELECT * FROM audit.audit_log WHERE sequence > $1", cut)
    await db.run(("DELETE FROM audit.audit_log WHERE sequence > $1", (cut,)))
    try:
        body = await verify(services, token)
        assert not body["ok"] and body["first_broken_sequence"] == cut + 1
        assert "rollback" in body["reason"] and body["head_sequence"] == cut
        alone = _verify_chain(services, token)
        assert alone.returncode == 0  # the API output alone is a valid, shorter chain
        tool = _verify_chain(services, token, "--checkpoint-file", str(kept))
        assert tool.returncode == 1 and "rollback" in tool.stdout, tool.stdout + tool.stderr
    finally:
        conn = await asyncpg.connect(db.dsn)
        try:
            await conn.copy_records_to_table("audit_log", schema_name="audit",
                                             records=[tuple(r.values()) for r in saved],
                                             columns=list(saved[0].keys()))
        finally:
            await conn.close()
    assert (await verify(services, token))["ok"]
    assert _verify_chain(services, token, "--checkpoint-file", str(kept)).returncode == 0


async def test_the_independent_verifier_checks_the_checkpoints(
        services: ServiceProcess, token: str, signed: dict[str, Any],
        tmp_path: Path) -> None:
    ok = _verify_chain(services, token, "--trusted-key", signed["checkpoint_keys"][0])
    assert ok.returncode == 0 and "signed checkpoint" in ok.stdout, ok.stdout + ok.stderr
    kept = tmp_path / "checkpoint.json"
    last = dict(signed["last_checkpoint"])
    kept.write_text(json.dumps({**last, "sequence": last["sequence"] + 10**6}))
    forged = _verify_chain(services, token, "--checkpoint-file", str(kept))
    assert forged.returncode == 1 and "signature" in forged.stdout, forged.stdout


async def test_tenant_request_topics_and_internal_topics_are_audited(
        services: ServiceProcess, token: str, ns: KlmSettings) -> None:
    """klm.requests.<tenant> (by pattern), klm.inventory.requests, klm.backup(.commands)."""
    topics = Topics(ns.topic_prefix)
    cause = request()
    sent = {topics.requests + ".acme": cause, topics.lifecycle: generated(cause)}
    for topic in (topics.inventory_requests, topics.backup_commands, topics.backup):
        sent[topic] = generated(request())
    for topic, event in sent.items():
        await send(ns, topic, event)
    ids = {e.id for e in sent.values()}
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=services.url, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        while True:
            stored = {e["id"]: e["tenant"] for e in
                      (await http.get("/v1/events", params={"limit": "1000"})).json()["events"]}
            if ids <= set(stored) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert ids <= set(stored), ids - set(stored)
    assert stored[cause.id] == "acme"


async def test_a_forged_checkpoint_published_on_kafka_is_named(
        services: ServiceProcess, token: str, signed: dict[str, Any], ns: KlmSettings) -> None:
    """Last: it stays in the append-only log for good (evidence of a forger on the topic)."""
    last = signed["last_checkpoint"]
    fake = make_event(AuditCheckpoint.event_type, AuditCheckpoint(
        sequence=last["sequence"], head_hash=last["head_hash"], time=last["time"],
        signature=last["signature"][:-8] + "AAAAAAA=", signing_key_id=last["signing_key_id"],
        algorithm=last["algorithm"], public_key=last["public_key"]), source="klm/keygen")
    await send(ns, Topics(ns.topic_prefix).lifecycle, fake)
    deadline = time.monotonic() + 60
    body = await verify(services, token)
    while body["ok"] and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        body = await verify(services, token)
    assert not body["ok"] and "signature does not verify" in body["reason"]


def _rehash_from(rows: list[asyncpg.Record]) -> list[tuple[str, tuple[Any, ...]]]:
    prev, out = bytes(32), []
    for r in rows:
        digest = hashlib.sha256(prev + struct.pack(">Q", r["sequence"])
                                + r["canonical"].encode()).digest()
        out.append(("UPDATE audit.audit_log SET prev_hash = $2, hash = $3 WHERE sequence = $1",
                    (r["sequence"], prev, digest)))
        prev = digest
    return out


def _verify_chain(audit: ServiceProcess, token: str, *extra: str
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "tools" / "verify_chain.py"),
                           "--url", audit.url, "--token", token, *extra],
                          capture_output=True, text=True, timeout=120, check=False)
