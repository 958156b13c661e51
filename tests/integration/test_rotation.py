"""Rotation on the real Kafka + PostgreSQL + SoftHSM, with a policy of very short periods.

One policy day lasts ``DAY_SECONDS`` here: a 4-day cryptoperiod is 4 s, a 7-day destruction
waiting period 7 s. Keygen executes the commands that two rotation instances send.

The module runs in a namespace of its own (topic prefix and database; the session's SoftHSM
token): with a 4-second cryptoperiod, rotation would otherwise start rotating every key the
earlier modules of the session generated, and the timings below would measure that backlog.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import yaml

from klm_common.db import provision
from klm_common.envelope import CloudEvent, make_event
from klm_common.policy import load_policy
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration.harness import (
    EventLog,
    ServiceProcess,
    close_topics,
    open_topics,
    publish,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

DAY_SECONDS = 1.0
CRYPTOPERIOD = 4  # days (= seconds here)
PROCESS_ONLY = 3
LATENCY = 2.5  # seconds allowed between a due time and the fact that shows it was done


def short_policy(version: int = 1) -> dict[str, Any]:
    document = load_policy().model_dump(mode="json")
    document["name"], document["version"] = "it-short", version
    for rule in [*document["usages"].values(), *document["profiles"].values()]:
        rule.update(cryptoperiod_days=CRYPTOPERIOD, process_only_days=PROCESS_ONLY,
                    rotation="automatic", destruction_wait_days=7)
    document["defaults"].update(overdue_grace_days=3, redispatch_days=2, recent_use_days=2)
    return document


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def namespace_env(klm_env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """Topic prefix and database of this module (what ``start_service`` gets on top)."""
    settings = KlmSettings(home=Path(klm_env["KLM_HOME"]), pg_dsn=klm_env["KLM_PG_DSN"],
                           pg_admin_dsn=klm_env["KLM_PG_ADMIN_DSN"],
                           kafka_bootstrap=klm_env["KLM_KAFKA_BOOTSTRAP"])
    name = f"rot{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(settings.admin_dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    ours = own_settings(settings, name)
    await provision(ours)
    await open_topics(ours)
    yield {"KLM_TOPIC_PREFIX": ours.topic_prefix, "KLM_PG_DSN": ours.pg_dsn,
           "KLM_PG_ADMIN_DSN": ours.admin_dsn()}
    admin = await asyncpg.connect(settings.admin_dsn())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    await close_topics(ours)


def own_settings(session: KlmSettings, name: str) -> KlmSettings:
    return session.model_copy(update={
        "topic_prefix": f"{name}.", "pg_dsn": session.pg_dsn.rsplit("/", 1)[0] + f"/{name}",
        "pg_admin_dsn": session.admin_dsn().rsplit("/", 1)[0] + f"/{name}"})


@pytest.fixture(scope="module")
def settings(settings: KlmSettings, namespace_env: dict[str, str]) -> KlmSettings:
    """This module's settings (overrides the session's)."""
    return own_settings(settings, namespace_env["KLM_TOPIC_PREFIX"].rstrip("."))


@pytest.fixture(scope="module")
def topics(settings: KlmSettings) -> Topics:
    return Topics(settings.topic_prefix)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def lifecycle(settings: KlmSettings, topics: Topics) -> AsyncIterator[EventLog]:
    """This module's ``klm.lifecycle`` (overrides the session's)."""
    log = EventLog(settings.kafka_bootstrap, topics.lifecycle)
    await log.start()
    yield log
    await log.stop()


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(short_policy()))
    return path


@pytest.fixture(scope="module")
def keygen(start_service: Any, namespace_env: dict[str, str]) -> Iterator[ServiceProcess]:
    proc: ServiceProcess = start_service("keygen", KLM_DAY_SECONDS=str(DAY_SECONDS),
                                         **namespace_env)
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def schedulers(start_service: Any, keygen: ServiceProcess, policy_file: Path,
               namespace_env: dict[str, str]) -> Iterator[list[ServiceProcess]]:
    """Two rotation instances on the same database: they share the work."""
    env = {**namespace_env, "KLM_DAY_SECONDS": str(DAY_SECONDS),
           "KLM_POLICY_FILE": str(policy_file),
           "KLM_POLICY_POLL_SECONDS": "0.5", "KLM_FINDINGS_GAUGE_SECONDS": "0.5"}
    procs: list[ServiceProcess] = [start_service("rotation", **env),
                                   start_service("rotation", **env)]
    yield procs
    for proc in procs:
        proc.terminate()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def requests_log(settings: KlmSettings, topics: Topics) -> AsyncIterator[EventLog]:
    log = EventLog(settings.kafka_bootstrap, topics.requests)
    await log.start()
    yield log
    await log.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def commands_log(settings: KlmSettings, topics: Topics) -> AsyncIterator[EventLog]:
    log = EventLog(settings.kafka_bootstrap, topics.commands)
    await log.start()
    yield log
    await log.stop()


async def send(settings: KlmSettings, topic: str, *events: CloudEvent) -> None:
    await publish(settings.kafka_bootstrap, topic, [(e.partition_key, e.to_bytes())
                                                    for e in events])


async def generate(settings: KlmSettings, topics: Topics, lifecycle: EventLog,
                   count: int = 1) -> list[CloudEvent]:
    requests = [make_event("klm.request.generate_key",
                           {"owner": "acme", "name": f"rot-{i}", "algorithm": "AES-256"},
                           source="tests") for i in range(count)]
    await send(settings, topics.requests, *requests)
    facts = []
    for request in requests:
        [fact] = await lifecycle.wait_for(lambda e, r=request: e.correlationid == r.id)
        assert fact.type == "klm.key.generated", fact.data
        facts.append(fact)
    return facts


def facts_of(lifecycle: EventLog, key_id: str, type_: str) -> list[CloudEvent]:
    return lifecycle.matching(lambda e: e.subject == key_id and e.type == f"klm.key.{type_}")


def at(event: CloudEvent, field: str = "created_at") -> datetime:
    return datetime.fromisoformat(event.data[field])


async def request_and_answer(settings: KlmSettings, topics: Topics, lifecycle: EventLog,
                             type_: str, key_id: str, **data: Any) -> CloudEvent:
    request = make_event(f"klm.request.{type_}", {"key_id": key_id, **data}, source="tests",
                         subject=key_id)
    await send(settings, topics.requests, request)
    [answer] = await lifecycle.wait_for(lambda e: e.correlationid == request.id)
    return answer


async def test_keys_rotate_on_time_once_and_old_versions_are_deactivated_on_time(
        schedulers: list[ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog, requests_log: EventLog) -> None:
    keys = [f.subject for f in await generate(settings, topics, lifecycle, count=4)]
    for key in keys:
        assert key is not None
        await lifecycle.wait_for(lambda e, k=key: e.subject == k and e.type == "klm.key.rotated"
                                 and e.data["version"] == 3, timeout=30)
        [v1] = facts_of(lifecycle, key, "generated")
        rotations = sorted(facts_of(lifecycle, key, "rotated"), key=lambda e: e.data["version"])
        # each version lasted one cryptoperiod: not earlier, and not much later
        starts = [at(v1), *(at(r) for r in rotations)]
        for before, after in itertools.pairwise(starts):
            lived = (after - before).total_seconds()
            assert CRYPTOPERIOD * DAY_SECONDS <= lived < CRYPTOPERIOD * DAY_SECONDS + LATENCY
        # two schedulers, redispatch: still one rotation per version
        assert [r.data["version"] for r in rotations][:2] == [2, 3]
        ours = requests_log.matching(lambda e, k=key: e.subject == k
                                     and e.type == "klm.request.rotate_key")
        assert all(e.source == "klm/rotation" for e in ours)
        # version 1 stops processing PROCESS_ONLY days after it was superseded
        [gone] = await lifecycle.wait_for(
            lambda e, k=key: e.subject == k and e.type == "klm.key.version_deactivated"
            and e.data["version"] == 1, timeout=15)
        deactivated_after = (gone.time - at(rotations[0])).total_seconds()
        assert PROCESS_ONLY * DAY_SECONDS <= deactivated_after < PROCESS_ONLY + LATENCY


async def test_two_schedulers_never_rotate_a_version_twice(
        schedulers: list[ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog, requests_log: EventLog) -> None:
    keys = [f.subject for f in await generate(settings, topics, lifecycle, count=20)]
    await asyncio.sleep(CRYPTOPERIOD * DAY_SECONDS * 2 + LATENCY)
    for key in keys:
        versions = [e.data["version"] for e in facts_of(lifecycle, key or "", "rotated")]
        assert versions and len(versions) == len(set(versions)), versions
        assert sorted(versions) == list(range(2, 2 + len(versions)))
        assert len(versions) <= 2  # two cryptoperiods passed: at most two rotations
        sent = {e.id for e in requests_log.matching(
            lambda e, k=key: e.subject == k and e.type == "klm.request.rotate_key")}
        assert len(sent) <= len(versions) + 1  # one request per version (+ one in flight)


async def test_a_compromised_key_is_sent_for_rotation_at_once(
        schedulers: list[ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog, requests_log: EventLog) -> None:
    [generated] = await generate(settings, topics, lifecycle)
    key = generated.subject or ""
    answer = await request_and_answer(settings, topics, lifecycle, "revoke_key", key,
                                      reason="compromised")
    assert answer.type == "klm.key.compromised", answer.data
    [rotate] = await requests_log.wait_for(
        lambda e: e.subject == key and e.type == "klm.request.rotate_key"
        and e.data.get("reason") == "compromised", timeout=10)
    assert (rotate.time - answer.time).total_seconds() < LATENCY
    # keygen re-keys it: a new active primary version; the compromised one only processes
    [reply] = await lifecycle.wait_for(lambda e: e.correlationid == rotate.id, timeout=10)
    assert reply.type == "klm.key.rotated", reply.data
    assert reply.data["state"] == "active" and reply.data["version"] == 2


async def test_destruction_happens_after_the_waiting_period_and_cancellation_holds(
        schedulers: list[ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog, commands_log: EventLog) -> None:
    doomed, spared = [f.subject or "" for f in await generate(settings, topics, lifecycle, 2)]
    scheduled = {}
    for key in (doomed, spared):
        answer = await request_and_answer(settings, topics, lifecycle, "revoke_key", key,
                                          reason="cessation")
        assert answer.type == "klm.key.deactivated", answer.data
        scheduled[key] = await request_and_answer(
            settings, topics, lifecycle, "schedule_destruction", key, waiting_days=7)
        assert scheduled[key].type == "klm.key.destruction_scheduled", scheduled[key].data
    cancelled = await request_and_answer(settings, topics, lifecycle, "cancel_destruction",
                                         spared)
    assert cancelled.type == "klm.key.destruction_cancelled"

    [destroyed] = await lifecycle.wait_for(
        lambda e: e.subject == doomed and e.type == "klm.key.destroyed", timeout=20)
    destroy_after = at(scheduled[doomed], "destroy_after")
    [command] = commands_log.matching(lambda e: e.subject == doomed
                                      and e.type == "klm.command.destroy_key")
    assert command.time >= destroy_after  # not before
    assert destroyed.time >= destroy_after
    assert (destroyed.time - destroy_after).total_seconds() < LATENCY  # and on time
    await asyncio.sleep(max(0.0, (at(scheduled[spared], "destroy_after")
                                  - datetime.now(UTC)).total_seconds()) + LATENCY)
    assert commands_log.matching(lambda e: e.subject == spared) == []
    assert facts_of(lifecycle, spared, "destroyed") == []


async def test_a_restart_mid_schedule_misses_nothing(
        schedulers: list[ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog) -> None:
    for proc in schedulers:
        proc.kill()  # no graceful shutdown
    keys = [f.subject or "" for f in await generate(settings, topics, lifecycle, count=3)]
    await asyncio.sleep(CRYPTOPERIOD * DAY_SECONDS + 1)  # due while no scheduler runs
    down_until = datetime.now(UTC)
    for proc in schedulers:
        proc.start()
    for key in keys:
        [first] = await lifecycle.wait_for(
            lambda e, k=key: e.subject == k and e.type == "klm.key.rotated"
            and e.data["version"] == 2, timeout=30)
        assert at(first) >= down_until  # done late, after the restart — but done
    await asyncio.sleep(1.0)
    for key in keys:
        versions = [e.data["version"] for e in facts_of(lifecycle, key, "rotated")]
        assert len(versions) == len(set(versions))


def observed(name: str, algorithm: str, size: int, usages: list[str]) -> CloudEvent:
    return make_event("klm.request.import_observed_key", {
        "owner": "acme", "name": name, "algorithm": algorithm, "size": size, "usages": usages,
        "location": f"legacy://{name}",
        "created_at": (datetime.now(UTC) - timedelta(days=400)).isoformat()},
        source="tests/scanner")


async def test_weak_observed_keys_produce_findings_with_the_right_codes(
        schedulers: list[ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog) -> None:
    rsa = observed("legacy-ca", "RSA", 1024, ["sign", "verify"])
    sha1 = observed("legacy-mac", "HMAC-SHA1", 160, ["mac"])
    bad = make_event("klm.request.import_observed_key", {"owner": "acme"}, source="tests")
    await send(settings, topics.inventory_requests, rsa, sha1, bad)
    answers = {}
    for request in (rsa, sha1, bad):
        [answers[request.id]] = await lifecycle.wait_for(
            lambda e, r=request: e.correlationid == r.id and e.source == "klm/rotation")
    assert answers[bad.id].type == "klm.request.rejected"
    assert answers[bad.id].data["code"] == "invalid_request"
    expected = {answers[rsa.id].subject: "key_size_below_minimum",
                answers[sha1.id].subject: "algorithm_not_approved"}
    for key, code in expected.items():
        [finding] = await lifecycle.wait_for(
            lambda e, k=key, c=code: e.subject == k and e.type == "klm.key.policy_violation"
            and e.data["code"] == c, timeout=15)
        assert finding.data["severity"] in ("high", "critical") and not finding.data["cleared"]
    # old and never rotatable: the observed RSA key is past its cryptoperiod too
    await lifecycle.wait_for(
        lambda e: e.subject == answers[rsa.id].subject
        and e.data.get("code") == "cryptoperiod_exceeded", timeout=15)
    # and the findings are a metric
    await asyncio.sleep(1.5)
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{schedulers[0].url}/metrics")).text
    gauge = [line for line in metrics.splitlines() if line.startswith("klm_policy_violations{")
             and 'code="key_size_below_minimum"' in line]
    assert gauge and float(gauge[0].rsplit(" ", 1)[1]) >= 1, metrics[-2000:]


async def test_a_policy_change_is_picked_up_and_recorded(
        schedulers: list[ServiceProcess], policy_file: Path, lifecycle: EventLog) -> None:
    marker = uuid.uuid4().int % 1000 + 10
    await asyncio.to_thread(policy_file.write_text,
                            yaml.safe_dump(short_policy(version=marker)))
    [change] = await lifecycle.wait_for(
        lambda e: e.type == "klm.policy.changed" and e.data["version"] == marker, timeout=15)
    assert change.data["changed"] == ["version"]
    assert change.data["path"] == str(policy_file)
    await asyncio.sleep(2.0)  # both instances saw it; one event only
    assert len(lifecycle.matching(lambda e: e.type == "klm.policy.changed"
                                  and e.data["version"] == marker)) == 1


async def test_sighup_reloads_even_when_the_file_looks_unchanged(
        schedulers: list[ServiceProcess], policy_file: Path, lifecycle: EventLog) -> None:
    before = await asyncio.to_thread(policy_file.stat)
    text = await asyncio.to_thread(policy_file.read_text)
    old = yaml.safe_load(text)["version"]
    new = old + 1 if len(str(old + 1)) == len(str(old)) else old - 1
    changed = yaml.safe_dump(short_policy(version=new))
    assert len(changed) == len(text)  # same size and, below, same mtime: no poll notices
    await asyncio.to_thread(policy_file.write_text, changed)
    os.utime(policy_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    await asyncio.sleep(1.5)
    assert not lifecycle.matching(lambda e: e.type == "klm.policy.changed"
                                  and e.data["version"] == new)
    assert schedulers[0].proc is not None
    schedulers[0].proc.send_signal(signal.SIGHUP)
    [change] = await lifecycle.wait_for(
        lambda e: e.type == "klm.policy.changed" and e.data["version"] == new, timeout=10)
    assert change.data["changed"] == ["version"]
    assert schedulers[0].proc.poll() is None  # SIGHUP reloads, it does not stop the service


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric family in Prometheus text: (labels, value)."""
    out = []
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head != name and not head.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', head[len(name):]))
        out.append((labels, float(value)))
    return out


async def test_inventory_gauges_on_the_metrics_endpoint(
        schedulers: list[ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog) -> None:
    await generate(settings, topics, lifecycle)
    deadline = asyncio.get_running_loop().time() + 30
    async with httpx.AsyncClient(base_url=schedulers[0].url) as http:
        while True:
            text = (await http.get("/metrics")).text
            keys = samples(text, "klm_keys")
            age = samples(text, "klm_key_oldest_active_age_seconds")
            due = samples(text, "klm_rotation_due")
            if keys and age and due:
                break
            assert asyncio.get_running_loop().time() < deadline, text[-3000:]
            await asyncio.sleep(0.5)
    wrapped = [n for labels, n in keys if labels.get("klm_key_state") == "active"
               and labels.get("klm_key_algorithm") == "AES-256"
               and labels.get("klm_key_protection") == "hsm-wrapped"]
    assert wrapped and wrapped[0] >= 1, keys
    assert all(set(labels) >= {"klm_key_state", "klm_key_algorithm", "klm_key_protection"}
               for labels, _ in keys)
    if lifecycle.matching(lambda e: e.type == "klm.key.observed"):
        assert any(labels["klm_key_protection"] == "observed" for labels, _ in keys), keys
    [(_, oldest)] = age
    assert oldest > 0
    [(_, due_now)] = due
    assert due_now >= 0
