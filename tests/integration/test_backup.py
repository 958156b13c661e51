"""Backup and recovery on the real Kafka + PostgreSQL + SoftHSM.

This module runs in a namespace of its OWN (topic prefix, database, SoftHSM token), because
its last test wipes the token and the keystore: no other test's keys are ever touched.
The custody ceremony runs first (`klm ceremony init`, 3-of-5 shares), then keygen and the
backup service; the tests run in file order and the disaster recovery is the last one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from klm_backup.domain.integrity import compute_tag
from klm_common.client import KlmClient
from klm_common.db import provision
from klm_common.envelope import CloudEvent, make_event
from klm_common.events import RotateKey
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.conftest import REPO, _create_namespace, _drop_namespace, settings_for
from tests.integration.harness import EventLog, ServiceProcess, create_topic, publish

pytestmark = pytest.mark.asyncio(loop_scope="session")
OWNER = "backup-tests"
TENANTS = (OWNER, "intruder")  # request topics of their own: klm.requests.<tenant>
DAY_SECONDS = "0.2"  # a 7-day destruction wait lasts 1.4 s


# ---- a namespace of this module's own ------------------------------------------------------
def _softhsm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["softhsm2-util", *args], env={**os.environ, **env},
                          capture_output=True, text=True, check=False)


def init_token(env: dict[str, str]) -> None:
    pin = Path(env["KLM_HSM_PIN_FILE"]).read_text().strip()
    done = _softhsm(env, "--init-token", "--free", "--label", env["KLM_HSM_TOKEN_LABEL"],
                    "--pin", pin, "--so-pin", secrets.token_hex(8))
    assert done.returncode == 0, done.stderr


def delete_token(env: dict[str, str]) -> None:
    _softhsm(env, "--delete-token", "--token", env["KLM_HSM_TOKEN_LABEL"])


@pytest.fixture(scope="module")
def ns(endpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[dict[str, str]]:
    name = f"bk{uuid.uuid4().hex[:10]}"
    folder = tmp_path_factory.mktemp("backup-ns")
    pin_file = folder / "pin"
    pin_file.write_text(secrets.token_hex(8))
    pin_file.chmod(0o600)
    admin_dsn = endpoints["KLM_PG_ADMIN_DSN"]
    base = admin_dsn.rsplit("/", 1)[0].split("@", 1)[1]
    env = {"KLM_HOME": endpoints.get("KLM_HOME", str(REPO / ".klm")),
           "KLM_KAFKA_BOOTSTRAP": endpoints["KLM_KAFKA_BOOTSTRAP"],
           "KLM_PG_ADMIN_DSN": admin_dsn.rsplit("/", 1)[0] + f"/{name}",
           "KLM_PG_DSN": f"postgresql://{base}/{name}", "KLM_TOPIC_PREFIX": f"{name}.",
           "KLM_HSM_MODULE": endpoints["KLM_HSM_MODULE"],
           "SOFTHSM2_CONF": endpoints["SOFTHSM2_CONF"], "KLM_HSM_TOKEN_LABEL": name,
           "KLM_HSM_PIN_FILE": str(pin_file)}
    init_token(env)
    asyncio.run(_create_namespace(admin_dsn, name, env))
    for tenant in TENANTS:  # before the services start: their pattern subscriptions see them
        asyncio.run(create_topic(env["KLM_KAFKA_BOOTSTRAP"], f"{name}.klm.requests.{tenant}"))
    yield env
    asyncio.run(_drop_namespace(admin_dsn, name, env))
    delete_token(env)


def klm_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / ".venv" / "bin" / "klm"), *args],
                          env={**os.environ, **env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def shares(ns: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The custody ceremony, before any service runs: 5 custodian files, 3 recover."""
    out = tmp_path_factory.mktemp("custodians") / "shares"
    done = klm_cli(ns, "ceremony", "init", "--out", str(out), "--shares", "5",
                   "--threshold", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(out.glob("custodian-*.share"))
    assert len(files) == 5
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)
    return files


@pytest.fixture(scope="module")
def services(ns: dict[str, str], shares: list[Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, ServiceProcess]]:
    logs = tmp_path_factory.mktemp("backup-logs")
    keygen = ServiceProcess("keygen", REPO, {**ns, "KLM_DAY_SECONDS": DAY_SECONDS}, logs)
    backup = ServiceProcess("backup", REPO, {**ns, "KLM_BACKUP_DRILL_INTERVAL": "4",
                                             "KLM_BACKUP_DRILL_SAMPLE": "5"}, logs)
    keygen.start()
    backup.start()
    yield {"keygen": keygen, "backup": backup}
    backup.terminate()
    keygen.terminate()


@pytest.fixture(scope="module")
def settings(ns: dict[str, str]) -> KlmSettings:
    return settings_for(ns)


@pytest.fixture(scope="module")
def topics(settings: KlmSettings) -> Topics:
    return Topics(settings.topic_prefix)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def events(settings: KlmSettings, topics: Topics, services: Any
                 ) -> AsyncIterator[EventLog]:
    log = EventLog(settings.kafka_bootstrap, topics.lifecycle)
    await log.start()
    yield log
    await log.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def klm(settings: KlmSettings, services: Any) -> AsyncIterator[KlmClient]:
    async with KlmClient(settings, source="tests/backup", timeout=60) as client:
        yield client


# ---- helpers --------------------------------------------------------------------------------
async def admin(settings: KlmSettings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def send(settings: KlmSettings, topic: str, *evs: CloudEvent) -> None:
    await publish(settings.kafka_bootstrap, topic, [(e.partition_key, e.to_bytes()) for e in evs])


def request(type_: str, **data: Any) -> CloudEvent:
    return make_event(f"klm.request.{type_}", data, source="tests/backup",
                      subject=data.get("key_id"))


async def new_key(klm: KlmClient, algorithm: str, **fields: Any) -> dict[str, Any]:
    fact = await klm.generate_key(owner=OWNER, name=f"b-{algorithm}-{uuid.uuid4().hex[:4]}",
                                  algorithm=algorithm, **fields)
    assert fact.type == "klm.key.generated", fact.data
    return fact.data


async def backed_up(events: EventLog, key_id: str, version: int = 1,
                    timeout: float = 60) -> CloudEvent:
    [fact] = await events.wait_for(lambda e: e.type == "klm.key.backed_up"
                                   and e.subject == key_id and e.data["version"] == version,
                                   timeout=timeout)
    return fact


async def only_answer(events: EventLog, req: CloudEvent, timeout: float = 60) -> CloudEvent:
    [answer] = await events.wait_for(lambda e: e.correlationid == req.id, timeout=timeout)
    await asyncio.sleep(1.0)
    assert len(events.answers_to(req.id)) == 1, [e.type for e in events.answers_to(req.id)]
    return answer


KEYS: dict[str, dict[str, Any]] = {}


# ---- backups --------------------------------------------------------------------------------
async def test_every_new_version_is_backed_up_or_its_skip_recorded(
        klm: KlmClient, events: EventLog, settings: KlmSettings) -> None:
    KEYS["aes"] = await new_key(klm, "AES-256")
    KEYS["hmac"] = await new_key(klm, "HMAC-SHA256")
    KEYS["rsa_enc"] = await new_key(klm, "RSA-2048", usages=["encrypt", "decrypt"])
    KEYS["ca"] = await new_key(klm, "EC", curve="P-256", labels={"klm.backup": "required"})
    KEYS["resident"] = await new_key(klm, "AES-128", protection="hsm-resident")
    KEYS["signer"] = await new_key(klm, "EC", curve="P-256")  # private signature key
    KEYS["resident_ca"] = await new_key(klm, "EC", curve="P-384", protection="hsm-resident",
                                        labels={"klm.backup": "required"})
    for name in ("aes", "hmac", "rsa_enc", "ca", "resident", "signer", "resident_ca"):
        fact = await backed_up(events, KEYS[name]["key_id"])
        assert fact.data["skipped"] is (name == "signer"), (name, fact.data)
    signer = await backed_up(events, KEYS["signer"]["key_id"])
    assert "SP 800-57" in signer.data["skip_reason"]

    rows = {r["key_id"]: r for r in await admin(
        settings, "SELECT key_id, blob, blob_sha256, tag, skip_reason, metadata "
        "FROM backup.backups")}
    keystore = {r["key_id"]: r["wrapped"] for r in await admin(
        settings, "SELECT key_id, wrapped FROM keygen.key_versions")}
    for name in ("aes", "hmac", "rsa_enc", "ca", "resident", "resident_ca"):
        row = rows[KEYS[name]["key_id"]]
        assert row["blob"] and len(row["tag"]) == 32
        assert hashlib.sha256(row["blob"]).hexdigest() == row["blob_sha256"]
        assert row["blob"] != keystore[KEYS[name]["key_id"]]  # another KEK than the master
    assert len(rows[KEYS["aes"]["key_id"]]["blob"]) == 40  # KWP of 32 bytes
    assert rows[KEYS["signer"]["key_id"]]["blob"] is None  # public-only
    assert '"public_der_b64":"' in rows[KEYS["signer"]["key_id"]]["metadata"]


async def test_rotation_backs_up_the_new_version(klm: KlmClient, events: EventLog,
                                                 settings: KlmSettings) -> None:
    rotated = await klm.request(RotateKey(key_id=KEYS["aes"]["key_id"]))
    assert rotated.type == "klm.key.rotated", rotated.data
    fact = await backed_up(events, KEYS["aes"]["key_id"], version=2)
    assert not fact.data["skipped"]


async def test_backup_key_request_gets_one_answer(events: EventLog,
                                                  settings: KlmSettings, topics: Topics) -> None:
    req = request("backup_key", key_id=KEYS["hmac"]["key_id"])
    await send(settings, topics.requests, req)
    answer = await only_answer(events, req)
    assert answer.type == "klm.key.backed_up" and answer.data["version"] == 1


# ---- restore --------------------------------------------------------------------------------
async def test_lost_key_version_is_restored_from_its_backup(
        klm: KlmClient, events: EventLog, settings: KlmSettings, topics: Topics) -> None:
    key = await new_key(klm, "AES-256")
    key_id = key["key_id"]
    await backed_up(events, key_id)
    await admin(settings, "UPDATE keygen.key_versions SET wrapped = $2 WHERE key_id = $1",
                key_id, os.urandom(40))  # the stored material is lost
    req = request("restore_key", key_id=key_id)
    await send(settings, topics.requests, req)
    answer = await only_answer(events, req)
    assert answer.type == "klm.key.restored", answer.data
    assert answer.data["versions"] == [1] and answer.data["backup_id"]
    sealed = await klm.encrypt(key_id, b"after restore", owner=OWNER)
    assert (await klm.decrypt(sealed, owner=OWNER)).data == b"after restore"


async def test_tampered_blob_is_refused(klm: KlmClient, events: EventLog,
                                        settings: KlmSettings, topics: Topics) -> None:
    key_id = KEYS["hmac"]["key_id"]
    [row] = await admin(settings, "SELECT blob, metadata, tag FROM backup.backups "
                        "WHERE key_id = $1", key_id)
    flipped = bytes([row["blob"][0] ^ 0x01]) + row["blob"][1:]
    try:
        # 1) the row changed behind the service's back: the tag catches it
        await admin(settings, "UPDATE backup.backups SET blob = $2 WHERE key_id = $1",
                    key_id, flipped)
        req = request("restore_key", key_id=key_id)
        await send(settings, topics.requests, req)
        answer = await only_answer(events, req)
        assert (answer.type, answer.data["code"]) == ("klm.request.rejected",
                                                      "integrity_check_failed"), answer.data
        # 2) even with a valid tag (a forger holding the tag key), the HSM refuses the blob
        tag_key = bytes.fromhex((settings.secrets_dir / "backup-tag-key").read_text().strip())
        await admin(settings, "UPDATE backup.backups SET tag = $2 WHERE key_id = $1",
                    key_id, compute_tag(tag_key, row["metadata"], flipped))
        req = request("restore_key", key_id=key_id)
        await send(settings, topics.requests, req)
        answer = await only_answer(events, req)
        assert (answer.type, answer.data["code"]) == ("klm.request.rejected",
                                                      "integrity_check_failed"), answer.data
        assert "unwrap" in answer.data["message"]
    finally:
        await admin(settings, "UPDATE backup.backups SET blob = $2, tag = $3 WHERE key_id = $1",
                    key_id, row["blob"], row["tag"])


async def test_restore_of_unknown_key_is_rejected(events: EventLog, settings: KlmSettings,
                                                  topics: Topics) -> None:
    req = request("restore_key", key_id=f"klm:key:{uuid.uuid4()}")
    await send(settings, topics.requests, req)
    answer = await only_answer(events, req)
    assert answer.data["code"] == "backup_not_found"


async def test_tenants_back_up_and_restore_only_their_own_keys(
        events: EventLog, settings: KlmSettings, topics: Topics) -> None:
    """A request's tenant is the one whose topic it came from (not a field anyone can
    write): the owner is served, another tenant is refused with ``forbidden``."""
    key_id = KEYS["hmac"]["key_id"]
    for request_type in ("backup_key", "restore_key"):
        req = request(request_type, key_id=key_id)
        await send(settings, topics.name("klm.requests.intruder"), req)
        answer = await only_answer(events, req)
        assert (answer.type, answer.data["code"]) == ("klm.request.rejected", "forbidden"), \
            answer.data
    own = request("backup_key", key_id=key_id)
    await send(settings, topics.name(f"klm.requests.{OWNER}"), own)
    answer = await only_answer(events, own)
    assert answer.type == "klm.key.backed_up" and answer.data["version"] == 1, answer.data


# ---- drills ---------------------------------------------------------------------------------
async def drill(settings: KlmSettings, topics: Topics, events: EventLog) -> CloudEvent:
    start = make_event("klm.backup.start_drill", {"sample": 1000}, source="tests/backup")
    await send(settings, topics.backup, start)
    [done] = await events.wait_for(lambda e: e.type == "klm.backup.drill_completed"
                                   and e.correlationid == start.id, timeout=90)
    return done


async def test_drill_passes_then_catches_a_corrupted_blob(
        events: EventLog, settings: KlmSettings, topics: Topics) -> None:
    good = await drill(settings, topics, events)
    wrapped = await admin(settings, "SELECT count(*) AS n FROM backup.backups "
                          "WHERE blob IS NOT NULL")
    assert good.data["sampled"] == wrapped[0]["n"] >= 6
    assert (good.data["passed"], good.data["failed"]) == (good.data["sampled"], 0), good.data

    key_id = KEYS["rsa_enc"]["key_id"]
    [row] = await admin(settings, "SELECT blob, tag FROM backup.backups WHERE key_id = $1",
                        key_id)
    try:
        await admin(settings, "UPDATE backup.backups SET blob = $2 WHERE key_id = $1",
                    key_id, row["blob"][:-8])  # truncated
        bad = await drill(settings, topics, events)
        assert bad.data["failed"] == 1, bad.data
        [failure] = bad.data["failures"]
        assert (failure["key_id"], failure["code"]) == (key_id, "integrity_check_failed")
    finally:
        await admin(settings, "UPDATE backup.backups SET blob = $2, tag = $3 WHERE key_id = $1",
                    key_id, row["blob"], row["tag"])


async def test_drills_also_run_on_a_schedule(events: EventLog) -> None:
    scheduled = (await events.wait_for(lambda e: e.type == "klm.backup.drill_completed"
                                       and e.data["sampled"] == 5, timeout=60))[0]
    assert scheduled.data["passed"] + scheduled.data["failed"] == 5


async def test_backup_and_drill_metrics_are_exposed(
        services: dict[str, ServiceProcess]) -> None:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{services['backup'].url}/metrics", timeout=5)).text
    for name in ("klm_backup_versions_backed_up", "klm_backup_versions_skipped",
                 "klm_backup_drills", "klm_backup_drill_failed_blobs"):
        assert name in text, name


# ---- destruction ----------------------------------------------------------------------------
async def test_destroyed_key_is_shredded_and_not_restorable(
        klm: KlmClient, events: EventLog, settings: KlmSettings, topics: Topics) -> None:
    key = await new_key(klm, "AES-256")
    key_id = key["key_id"]
    KEYS["destroyed"] = key
    await backed_up(events, key_id)
    for req in (request("revoke_key", key_id=key_id, reason="cessation"),
                request("schedule_destruction", key_id=key_id, waiting_days=7)):
        await send(settings, topics.requests, req)
        await only_answer(events, req)
    await asyncio.sleep(7 * float(DAY_SECONDS) + 0.5)
    destroy = make_event("klm.command.destroy_key", {"key_id": key_id}, source="tests/backup",
                         subject=key_id)
    await send(settings, topics.commands, destroy)
    [gone] = await events.wait_for(lambda e: e.correlationid == destroy.id)
    assert gone.type == "klm.key.destroyed", gone.data
    [shred] = await events.wait_for(lambda e: e.type == "klm.backup.shredded"
                                    and e.subject == key_id)
    assert shred.data["versions"] == [1] and shred.data["destroyed_event_id"] == gone.id
    assert len(shred.data["blob_sha256"][0]) == 64
    assert await admin(settings, "SELECT 1 FROM backup.backups WHERE key_id = $1", key_id) == []
    req = request("restore_key", key_id=key_id)
    await send(settings, topics.requests, req)
    answer = await only_answer(events, req)
    assert (answer.type, answer.data["code"]) == ("klm.request.rejected", "key_destroyed")


# ---- crashes --------------------------------------------------------------------------------
async def test_backups_survive_crashes_and_are_reported_once(
        events: EventLog, settings: KlmSettings, topics: Topics,
        services: dict[str, ServiceProcess]) -> None:
    """SIGKILL the backup service, then keygen, while versions are being backed up: every
    version ends up stored once and announced by one (deduplicated) event, never before its
    row exists."""
    reqs = [make_event("klm.request.generate_key",
                       {"owner": OWNER, "name": f"crash-{i}", "algorithm": "AES-256"},
                       source="tests/backup") for i in range(300)]
    await send(settings, topics.requests, *reqs)
    await asyncio.sleep(0.5)
    services["backup"].kill()
    await asyncio.sleep(1.0)
    services["keygen"].kill()
    services["backup"].start()
    services["keygen"].start()
    ids = {r.id for r in reqs}
    generated = await events.wait_for(lambda e: e.type == "klm.key.generated"
                                      and e.correlationid in ids, count=len(reqs), timeout=120)
    keys = {e.subject for e in generated}
    await events.wait_for(lambda e: e.type == "klm.key.backed_up" and e.subject in keys,
                          count=len(keys), timeout=120)
    facts: dict[str, set[str]] = {}
    for e in events.matching(lambda e: e.type == "klm.key.backed_up" and e.subject in keys):
        facts.setdefault(str(e.subject), set()).add(e.id)
    assert all(len(v) == 1 for v in facts.values()), "a version was announced twice"
    rows = await admin(settings, "SELECT key_id, backup_id FROM backup.backups "
                       "WHERE key_id = ANY($1)", list(keys))
    assert {r["key_id"] for r in rows} == keys and len(rows) == len(keys)
    announced = {e.data["backup_id"] for e in events.matching(
        lambda e: e.type == "klm.key.backed_up" and e.subject in keys)}
    assert announced == {r["backup_id"] for r in rows}


# ---- disaster recovery ----------------------------------------------------------------------
async def test_disaster_recovery_from_three_of_five_custodians(
        klm: KlmClient, events: EventLog, settings: KlmSettings, topics: Topics,
        services: dict[str, ServiceProcess], ns: dict[str, str], shares: list[Path]) -> None:
    # before: signatures, ciphertexts and MACs made with the keys
    message = b"signed before the disaster"
    ca_sig = await klm.sign(KEYS["ca"]["key_id"], message, owner=OWNER)
    resident_sig = await klm.sign(KEYS["resident_ca"]["key_id"], message, owner=OWNER)
    signer_sig = await klm.sign(KEYS["signer"]["key_id"], message, owner=OWNER)
    aes_sealed = await klm.encrypt(KEYS["aes"]["key_id"], b"secret v2", owner=OWNER, aad=b"a")
    rsa_sealed = await klm.encrypt(KEYS["rsa_enc"]["key_id"], b"dek", owner=OWNER)
    res_sealed = await klm.encrypt(KEYS["resident"]["key_id"], b"resident", owner=OWNER)
    live = {k["key_id"] for name, k in KEYS.items() if name != "destroyed"}

    # the disaster: keygen down, its token and its keystore gone
    services["keygen"].terminate()
    delete_token(ns)
    assert "klm-master-kek" not in _softhsm(ns, "--show-slots").stdout
    conn = await asyncpg.connect(settings.admin_dsn())
    try:
        await conn.execute("DROP SCHEMA keygen CASCADE")
    finally:
        await conn.close()
    await provision(settings, ("keygen",))
    init_token(ns)  # a new, empty token

    # two custodians are not enough; three are
    refused = klm_cli(ns, "ceremony", "recover", "--share", str(shares[0]),
                      "--share", str(shares[3]))
    assert refused.returncode == 1 and "needs 3 of 5" in refused.stdout, refused.stdout
    recovered = klm_cli(ns, "ceremony", "recover", *[a for s in (shares[0], shares[2], shares[4])
                                                     for a in ("--share", str(s))])
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    services["keygen"].start()  # a new master KEK is created on the new token

    recover = make_event("klm.backup.recover_all", {"reason": "test"}, source="tests/backup")
    await send(settings, topics.backup, recover)
    [started] = await events.wait_for(lambda e: e.type == "klm.backup.recovery_started"
                                      and e.correlationid == recover.id)
    restored = await events.wait_for(lambda e: e.type == "klm.key.restored"
                                     and e.data.get("recovery_id") == recover.id,
                                     count=started.data["keys"], timeout=120)
    assert {e.subject for e in restored} >= live
    assert KEYS["destroyed"]["key_id"] not in {e.subject for e in restored}
    assert started.data["refused"] == []
    keystore = await admin(settings, "SELECT key_id, version FROM keygen.key_versions")
    assert KEYS["destroyed"]["key_id"] not in {r["key_id"] for r in keystore}
    assert {(KEYS["aes"]["key_id"], 1), (KEYS["aes"]["key_id"], 2)} <= {
        (r["key_id"], r["version"]) for r in keystore}

    # after: old signatures verify, old ciphertexts decrypt, the restored keys work
    for key, sig in ((KEYS["ca"], ca_sig), (KEYS["signer"], signer_sig)):
        public = serialization.load_pem_public_key(key["public_key_pem"].encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(sig.signature, message, ec.ECDSA(hashes.SHA256()))
        assert await klm.verify(key["key_id"], message, sig, owner=OWNER)
    new_sig = await klm.sign(KEYS["ca"]["key_id"], b"after", owner=OWNER)
    serialization.load_pem_public_key(KEYS["ca"]["public_key_pem"].encode()).verify(
        new_sig.signature, b"after", ec.ECDSA(hashes.SHA256()))
    assert (await klm.decrypt(aes_sealed, owner=OWNER, aad=b"a")).data == b"secret v2"
    assert (await klm.decrypt(rsa_sealed, owner=OWNER)).data == b"dek"
    assert (await klm.decrypt(res_sealed, owner=OWNER)).data == b"resident"
    # the resident key pair is back on the token: both halves, found by CKA_ID
    assert await klm.verify(KEYS["resident_ca"]["key_id"], message, resident_sig, owner=OWNER)
    again = await klm.sign(KEYS["resident_ca"]["key_id"], b"after", owner=OWNER)
    serialization.load_pem_public_key(KEYS["resident_ca"]["public_key_pem"].encode()).verify(
        again.signature, b"after", ec.ECDSA(hashes.SHA384()))
