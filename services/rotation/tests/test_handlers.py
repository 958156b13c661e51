"""Rotation's handlers through fakes: facts in, due work out, findings, observed keys."""

from __future__ import annotations

from typing import Any

import pytest
from services.rotation.tests.factories import T0, fact, generated, key_id, later, rotated
from services.rotation.tests.fakes import Clock, FakeDeadLetters, FakeInventory, record

from klm_common.envelope import make_event
from klm_common.policy import PolicySet, load_policy
from klm_common.topics import Topics
from klm_rotation.handlers import (
    Deps,
    PolicyInForce,
    apply_policies,
    dispatch_due,
    handle_facts,
    import_observed_key,
    scan_page,
)

TOPICS = Topics("t.")


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def deps(clock: Clock) -> Deps:
    return Deps(inventory=FakeInventory(), policy=PolicyInForce(load_policy(), "default"),
                topics=TOPICS, day_seconds=1.0, dead_letters=FakeDeadLetters(),  # type: ignore[arg-type]
                clock=clock)


def inv(deps: Deps) -> FakeInventory:
    assert isinstance(deps.inventory, FakeInventory)
    return deps.inventory


async def feed(deps: Deps, *events: Any) -> None:
    await handle_facts([record(e, offset=i) for i, e in enumerate(events)], deps)


async def test_a_generated_key_rotates_once_when_its_cryptoperiod_ends(deps: Deps,
                                                                       clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key))
    clock.now = later(729)
    assert await dispatch_due(deps) == 0
    clock.now = later(730)
    assert await dispatch_due(deps) == 1
    [command] = inv(deps).sent(TOPICS.requests)
    assert command.type == "klm.request.rotate_key" and command.subject == key
    assert command.source == "klm/rotation"
    assert await dispatch_due(deps) == 0  # claimed and re-armed: not sent twice
    clock.now = later(731)  # unanswered for a day: re-sent with the SAME id (keygen dedupes)
    await dispatch_due(deps)
    again = inv(deps).sent(TOPICS.requests)
    assert len(again) == 2 and again[1].id == command.id


async def test_rotation_reschedules_and_the_old_version_is_deactivated(deps: Deps,
                                                                        clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key), rotated(key, 2, later(730)))
    rows = inv(deps).state.schedule
    assert rows[(key, "rotate", 2)].planned_at == later(1460)
    assert rows[(key, "deactivate", 1)].planned_at == later(730 + 1095)
    clock.now = later(730 + 1095)
    await dispatch_due(deps)
    [command] = inv(deps).sent(TOPICS.commands)
    assert command.type == "klm.command.deactivate_version" and command.data["version"] == 1
    await feed(deps, fact("version_deactivated", key, later(1826), state="active", version=1))
    assert (key, "deactivate", 1) not in inv(deps).state.schedule


async def test_a_compromised_key_is_rotated_at_once(deps: Deps, clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key))
    clock.now = later(5)
    await feed(deps, fact("compromised", key, later(5), state="compromised",
                          previous_state="active"))
    assert await dispatch_due(deps) == 1
    [command] = inv(deps).sent(TOPICS.requests)
    assert command.data["reason"] == "compromised"


async def test_a_refused_command_is_retried_under_a_new_id(deps: Deps, clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key))
    clock.now = later(730)
    await dispatch_due(deps)
    [first] = inv(deps).sent(TOPICS.requests)
    refusal = make_event("klm.request.rejected", {"code": "illegal_transition", "message": "no",
                         "request_type": first.type, "key_id": key},
                         source="klm/keygen", subject=key, cause=first)
    await feed(deps, refusal)
    clock.now = later(731)
    await dispatch_due(deps)
    second = inv(deps).sent(TOPICS.requests)[-1]
    assert second.id != first.id


async def test_destruction_is_sent_after_the_waiting_period_and_cancel_stops_it(
        deps: Deps, clock: Clock) -> None:
    kept, destroyed = key_id(), key_id()
    for key in (kept, destroyed):
        await feed(deps, generated(key),
                   fact("destruction_scheduled", key, later(1), state="deactivated",
                        destroy_after=later(8).isoformat(), waiting_days=7))
    await feed(deps, fact("destruction_cancelled", kept, later(2), state="deactivated"))
    clock.now = later(7.9)
    await dispatch_due(deps)
    assert inv(deps).sent(TOPICS.commands) == []
    clock.now = later(8.1)
    await dispatch_due(deps)
    [command] = inv(deps).sent(TOPICS.commands)
    assert command.type == "klm.command.destroy_key" and command.subject == destroyed


async def test_a_recently_used_key_is_not_destroyed_without_override(deps: Deps,
                                                                      clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key),
               make_event("klm.key.usage_summary", {
                   "key_id": key, "owner": "acme", "interval_start": later(0).isoformat(),
                   "interval_end": later(1).isoformat(), "last_used_at": later(1).isoformat(),
                   "total": 3, "operations": {"encrypt": 3}}, source="klm/keygen", subject=key),
               fact("destruction_scheduled", key, later(1), state="deactivated",
                    destroy_after=later(8).isoformat(), waiting_days=7))
    clock.now = later(9)
    await dispatch_due(deps)
    assert inv(deps).sent(TOPICS.commands) == []
    findings = [e for e in inv(deps).sent(TOPICS.lifecycle) if e.data["code"] ==
                "destruction_blocked"]
    assert len(findings) == 1 and not findings[0].data["cleared"]
    await feed(deps, fact("destruction_scheduled", key, later(9), state="deactivated",
                          destroy_after=later(16).isoformat(), waiting_days=7, override=True))
    records = [e for e in inv(deps).sent(TOPICS.lifecycle)
               if e.data["code"] == "destruction_override"]
    assert records and records[0].data["severity"] == "info"
    clock.now = later(17)
    await dispatch_due(deps)
    assert [c.type for c in inv(deps).sent(TOPICS.commands)] == ["klm.command.destroy_key"]


def observed_request(**data: Any) -> Any:
    fields = {"owner": "acme", "name": "legacy", "algorithm": "RSA", "size": 1024,
              "usages": ["sign", "verify"], "location": "ldap://legacy/ca",
              "created_at": T0.isoformat(), **data}
    return make_event("klm.request.import_observed_key", fields, source="scanner")


async def test_observed_keys_are_answered_then_assessed(deps: Deps) -> None:
    rsa, sha1 = observed_request(), observed_request(algorithm="HMAC-SHA1", size=160,
                                                     usages=["mac"])
    bogus = make_event("klm.request.rotate_key", {"key_id": key_id()}, source="x")
    await import_observed_key([record(rsa), record(sha1, offset=1), record(bogus, offset=2)],
                              deps)
    answers = {e.correlationid: e for e in inv(deps).sent(TOPICS.lifecycle)}
    assert answers[rsa.id].type == answers[sha1.id].type == "klm.key.observed"
    assert answers[bogus.id].data["code"] == "unknown_request_type"
    await feed(deps, answers[rsa.id], answers[sha1.id])
    codes = {(e.subject, e.data["code"]) for e in inv(deps).sent(TOPICS.lifecycle)
             if e.type == "klm.key.policy_violation"}
    assert (answers[rsa.id].subject, "key_size_below_minimum") in codes
    assert (answers[sha1.id].subject, "algorithm_not_approved") in codes
    assert inv(deps).state.schedule == {}  # KLM never rotates a key it does not hold


async def test_a_replayed_fact_is_applied_once(deps: Deps) -> None:
    key = key_id()
    event = generated(key)
    await feed(deps, event, event)
    await feed(deps, event)
    assert len(inv(deps).state.schedule) == 1


async def test_the_scan_raises_time_based_findings_and_clears_them(deps: Deps,
                                                                   clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key, usages=["decrypt", "encrypt"]))
    clock.now = later(740)
    assert await scan_page(deps, 100) == 1
    open_codes = set(inv(deps).state.findings[key])
    assert open_codes == {"cryptoperiod_exceeded", "rotation_overdue"}
    await feed(deps, rotated(key, 2, later(740)))
    assert inv(deps).state.findings.get(key, {}) == {}
    cleared = [e for e in inv(deps).sent(TOPICS.lifecycle) if e.data.get("cleared")]
    assert {e.data["code"] for e in cleared} == open_codes


async def test_a_policy_change_is_recorded_once(deps: Deps) -> None:
    policy = load_policy()
    assert await apply_policies(deps, PolicySet(policy))
    assert not await apply_policies(deps, PolicySet(policy))
    stricter = policy.model_copy(update={"version": 2})
    assert await apply_policies(deps, PolicySet(stricter, origins={policy.name: "p.yaml"}))
    changes = [e for e in inv(deps).sent(TOPICS.lifecycle) if e.type == "klm.policy.changed"]
    assert [e.data["version"] for e in changes] == [1, 2]
    assert changes[1].data["changed"] == ["version"]
    assert deps.policy.policy.version == 2


async def test_work_refused_again_and_again_stops_with_a_finding(deps: Deps,
                                                                 clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key))
    ids = set()
    for attempt in range(4):
        clock.now = later(730 + attempt * 1.01)
        await dispatch_due(deps)
        sent = inv(deps).sent(TOPICS.requests)
        if len(sent) > len(ids):
            ids.add(sent[-1].id)
            await feed(deps, refused(sent[-1], key))
    assert len(ids) == 3
    assert inv(deps).state.schedule == {}
    assert "command_refused" in inv(deps).state.findings[key]


async def test_a_refused_compromise_rotation_is_a_finding_at_once(deps: Deps,
                                                                  clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key))
    await feed(deps, fact("compromised", key, later(1), state="compromised",
                          previous_state="active"))
    clock.now = later(1)
    await dispatch_due(deps)
    [sent] = inv(deps).sent(TOPICS.requests)
    await feed(deps, refused(sent, key))
    assert inv(deps).state.schedule == {}
    finding = inv(deps).state.findings[key]["command_refused"]
    assert finding.evidence["reasons"] == ["compromised"]


def refused(command: Any, key: str) -> Any:
    return make_event("klm.request.rejected", {
        "code": "illegal_transition", "message": "no", "request_type": command.type,
        "key_id": key}, source="klm/keygen", subject=key, cause=command)


async def test_a_repeated_answer_to_one_refused_request_counts_once(deps: Deps,
                                                                    clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key))
    clock.now = later(730)
    await dispatch_due(deps)
    [sent] = inv(deps).sent(TOPICS.requests)
    for _ in range(2):  # keygen answering a replayed request again: a new event, same cause
        await feed(deps, make_event("klm.request.rejected", {
            "code": "illegal_transition", "message": "no", "request_type": sent.type,
            "key_id": key}, source="klm/keygen", subject=key, cause=sent))
    assert inv(deps).state.keys[key].rejections == {"rotate:1": 1}


async def test_own_findings_on_the_topic_do_not_touch_the_inventory(deps: Deps) -> None:
    rsa = observed_request()
    await import_observed_key([record(rsa)], deps)
    [answer] = inv(deps).sent(TOPICS.lifecycle)
    await feed(deps, answer)
    findings = [e for e in inv(deps).sent(TOPICS.lifecycle) if e.type.endswith("violation")]
    before = len(inv(deps).state.outbox)
    await feed(deps, *findings)
    assert len(inv(deps).state.outbox) == before
