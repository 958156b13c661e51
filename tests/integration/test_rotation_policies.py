"""Named policies on the real Kafka + PostgreSQL + SoftHSM: a key follows the policy it
names. The default policy is the shipped one (730-day cryptoperiods); a policy directory
adds ``it-fast``, whose policy day cryptoperiod is ``CRYPTOPERIOD`` days — seconds here, as
``KLM_DAY_SECONDS`` is 1. A key under ``it-fast`` rotates on time, a key under the default
does not; a generate naming a policy nobody loaded is refused (``policy_unknown``).

Its own namespace (topic prefix and database), like test_rotation: no other module's keys
get rotated under these policies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from klm_common.envelope import CloudEvent, make_event
from klm_common.policy import load_policy
from klm_common.settings import KlmSettings
from klm_common.topics import Topics
from tests.integration import test_rotation as rotation_module
from tests.integration.harness import EventLog, ServiceProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")

# this module's own namespace: the same module-scoped fixtures as test_rotation's
namespace_env = rotation_module.namespace_env
settings = rotation_module.settings
topics = rotation_module.topics
lifecycle = rotation_module.lifecycle
send = rotation_module.send

DAY_SECONDS = 1.0
CRYPTOPERIOD = 4  # policy days of it-fast (= seconds here)
LATENCY = 2.5  # seconds allowed between a due time and the fact that shows it was done
FAST = "it-fast"


def fast_policy() -> dict[str, Any]:
    document = load_policy().model_dump(mode="json")
    document["name"] = FAST
    for rule in [*document["usages"].values(), *document["profiles"].values()]:
        rule.update(cryptoperiod_days=CRYPTOPERIOD, process_only_days=CRYPTOPERIOD,
                    rotation="automatic")
    return document


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("policies")
    (folder / "fast.yaml").write_text(yaml.safe_dump(fast_policy()))
    return folder


@pytest.fixture(scope="module")
def services(start_service: Any, namespace_env: dict[str, str],
             policy_dir: Path) -> Iterator[dict[str, ServiceProcess]]:
    env = {**namespace_env, "KLM_DAY_SECONDS": str(DAY_SECONDS),
           "KLM_POLICY_DIR": str(policy_dir), "KLM_POLICY_POLL_SECONDS": "0.5"}
    procs = {"keygen": start_service("keygen", **env),
             "rotation": start_service("rotation", **env)}
    yield procs
    for proc in procs.values():
        proc.terminate()


async def generate(settings: KlmSettings, topics: Topics,
                   lifecycle: EventLog, **data: Any) -> CloudEvent:
    request = make_event("klm.request.generate_key",
                         {"owner": "acme", "name": "named", "algorithm": "AES-256", **data},
                         source="tests")
    await send(settings, topics.requests, request)
    [answer] = await lifecycle.wait_for(lambda e: e.correlationid == request.id)
    return answer


def rotations(lifecycle: EventLog, key_id: str) -> list[CloudEvent]:
    return lifecycle.matching(lambda e: e.subject == key_id and e.type == "klm.key.rotated")


async def test_both_policies_are_recorded_in_force(
        services: dict[str, ServiceProcess], lifecycle: EventLog,
        policy_dir: Path) -> None:
    [fast] = await lifecycle.wait_for(
        lambda e: e.type == "klm.policy.changed" and e.data["name"] == FAST, timeout=30)
    assert fast.data["path"] == str(policy_dir / "fast.yaml")
    await lifecycle.wait_for(
        lambda e: e.type == "klm.policy.changed" and e.data["name"] == "klm-default")


async def test_only_the_key_under_the_short_policy_rotates(
        services: dict[str, ServiceProcess], settings: KlmSettings,
        topics: Topics, lifecycle: EventLog) -> None:
    fast = await generate(settings, topics, lifecycle, policy=FAST)
    default = await generate(settings, topics, lifecycle)
    assert fast.type == default.type == "klm.key.generated", (fast.data, default.data)
    assert fast.data["policy"] == FAST and default.data.get("policy") is None
    [rotated] = await lifecycle.wait_for(
        lambda e: e.subject == fast.subject and e.type == "klm.key.rotated", timeout=30)
    lived = (rotated.time - fast.time).total_seconds()
    assert CRYPTOPERIOD * DAY_SECONDS <= lived < CRYPTOPERIOD * DAY_SECONDS + LATENCY
    await asyncio.sleep(CRYPTOPERIOD * DAY_SECONDS + LATENCY)  # a second fast period
    assert len(rotations(lifecycle, fast.subject or "")) >= 2
    assert rotations(lifecycle, default.subject or "") == []


async def test_a_generate_naming_an_unknown_policy_is_rejected(
        services: dict[str, ServiceProcess], settings: KlmSettings,
        topics: Topics, lifecycle: EventLog) -> None:
    answer = await generate(settings, topics, lifecycle, policy="no-such-policy")
    assert answer.type == "klm.request.rejected"
    assert answer.data["code"] == "policy_unknown"
    assert FAST in answer.data["message"]


def finding(key_id: str, cleared: bool) -> Any:
    return lambda e: (e.subject == key_id and e.type == "klm.key.policy_violation"
                      and e.data["code"] == "policy_unknown" and e.data["cleared"] is cleared)


async def test_a_removed_policy_is_recorded_and_its_keys_get_a_finding_until_it_is_back(
        services: dict[str, ServiceProcess], settings: KlmSettings, topics: Topics,
        lifecycle: EventLog, policy_dir: Path) -> None:
    key = await generate(settings, topics, lifecycle, policy=FAST)
    assert key.type == "klm.key.generated", key.data
    path = policy_dir / "fast.yaml"
    text = await asyncio.to_thread(path.read_text)
    await asyncio.to_thread(path.unlink)
    [removed] = await lifecycle.wait_for(
        lambda e: e.type == "klm.policy.changed" and e.data["name"] == FAST
        and e.data["removed"], timeout=15)
    assert removed.data["path"] == str(path)
    [raised] = await lifecycle.wait_for(finding(key.subject or "", False),
                                        timeout=15)
    assert raised.data["severity"] == "high"
    assert raised.data["evidence"]["applied"] == "klm-default"
    await asyncio.to_thread(path.write_text, text)  # back: recorded again, finding cleared
    await lifecycle.wait_for(
        lambda e: e.type == "klm.policy.changed" and e.data["name"] == FAST
        and not e.data["removed"] and e.time > removed.time, timeout=15)
    await lifecycle.wait_for(finding(key.subject or "", True), timeout=15)
