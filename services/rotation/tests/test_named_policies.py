"""Each key under the policy it names: schedules, compliance and import permissions follow
the named policy; a name that is not loaded gets the default policy and a finding."""

from __future__ import annotations

from typing import Any

import pytest
from services.rotation.tests.factories import T0, generated, key_id, later
from services.rotation.tests.fakes import Clock, FakeDeadLetters, FakeInventory, record

from klm_common.envelope import CloudEvent, make_event
from klm_common.policy import CryptoPolicy, PolicySet, load_policy
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
DEFAULT = load_policy()


def short(name: str = "short", cryptoperiod: float = 10, **changes: Any) -> CryptoPolicy:
    document = DEFAULT.model_dump(mode="json")
    document["name"] = name
    for rule in [*document["usages"].values(), *document["profiles"].values()]:
        rule["cryptoperiod_days"] = cryptoperiod
    document.update(changes)
    return CryptoPolicy.model_validate(document)


SET = PolicySet(DEFAULT, [short()], {"klm-default": "default.yaml", "short": "d/short.yaml"})


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def deps(clock: Clock) -> Deps:
    return Deps(inventory=FakeInventory(), policy=PolicyInForce(SET), topics=TOPICS,
                day_seconds=1.0, dead_letters=FakeDeadLetters(),  # type: ignore[arg-type]
                clock=clock)


def inv(deps: Deps) -> FakeInventory:
    assert isinstance(deps.inventory, FakeInventory)
    return deps.inventory


async def feed(deps: Deps, *events: Any) -> None:
    await handle_facts([record(e, offset=i) for i, e in enumerate(events)], deps)


def findings(deps: Deps, key: str) -> dict[str, Any]:
    return dict(inv(deps).state.findings.get(key, {}))


def lifecycle(deps: Deps, type_: str) -> list[CloudEvent]:
    return [e for e in inv(deps).sent(TOPICS.lifecycle) if e.type == type_]


async def test_each_key_rotates_under_the_policy_it_names(deps: Deps, clock: Clock) -> None:
    fast, slow = key_id(), key_id()
    await feed(deps, generated(fast, policy="short"), generated(slow))
    assert inv(deps).state.schedule[(fast, "rotate", 1)].planned_at == later(10)
    assert inv(deps).state.schedule[(slow, "rotate", 1)].planned_at == later(730)
    clock.now = later(10)
    await dispatch_due(deps)
    [command] = inv(deps).sent(TOPICS.requests)
    assert command.subject == fast
    assert command.data["reason"] == "cryptoperiod of 10 days reached"


async def test_compliance_follows_the_named_policy(deps: Deps, clock: Clock) -> None:
    fast, slow = key_id(), key_id()
    await feed(deps, generated(fast, policy="short"), generated(slow))
    clock.now = later(12)
    await scan_page(deps, 100)
    assert set(findings(deps, fast)) == {"cryptoperiod_exceeded"}
    assert findings(deps, slow) == {}


async def test_an_unknown_policy_gets_the_default_and_a_finding_until_it_is_loaded(
        deps: Deps, clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key, policy="later"))
    finding = findings(deps, key)["policy_unknown"]
    assert finding.severity == "high"
    assert finding.evidence["policy"] == "later"
    assert finding.evidence["applied"] == "klm-default"
    # meanwhile: the default policy's 730-day cryptoperiod
    assert inv(deps).state.schedule[(key, "rotate", 1)].planned_at == later(730)
    # the policy arrives (a reload): the scan re-plans and clears the finding
    await apply_policies(deps, PolicySet(DEFAULT, [short(), short("later", 20)]))
    clock.now = later(1)
    await scan_page(deps, 100)
    assert "policy_unknown" not in findings(deps, key)
    assert inv(deps).state.schedule[(key, "rotate", 1)].planned_at == later(20)
    cleared = [e for e in lifecycle(deps, "klm.key.policy_violation") if e.data["cleared"]]
    assert [e.data["code"] for e in cleared] == ["policy_unknown"]


async def test_one_change_event_per_changed_policy_and_one_per_removed(deps: Deps) -> None:
    assert await apply_policies(deps, SET) == ["klm-default", "short"]
    assert await apply_policies(deps, SET) == []
    edited = PolicySet(DEFAULT, [short(cryptoperiod=11), short("extra")])
    assert await apply_policies(deps, edited) == ["extra", "short"]  # default first, by name
    assert await apply_policies(deps, PolicySet(DEFAULT, [short("extra")])) == ["short"]
    changes = lifecycle(deps, "klm.policy.changed")
    assert [(e.data["name"], e.data["removed"]) for e in changes] == [
        ("klm-default", False), ("short", False), ("extra", False), ("short", False),
        ("short", True)]
    assert changes[0].data["path"] == "default.yaml"
    assert changes[1].data["path"] == "d/short.yaml"
    assert {"usages.encrypt", "profiles.tls-server"} <= set(changes[3].data["changed"])
    assert changes[4].data["sha256"] == changes[3].data["sha256"]
    assert deps.policy.policies.names == ["extra", "klm-default"]


def import_request(**data: Any) -> CloudEvent:
    fields = {"owner": "acme", "name": "legacy", "algorithm": "RSA", "size": 2048,
              "usages": ["sign"], "location": "ldap://legacy", "created_at": T0.isoformat(),
              **data}
    return make_event("klm.request.import_observed_key", fields, source="scanner")


async def test_an_import_follows_the_permissions_of_the_policy_it_names(deps: Deps) -> None:
    locked = short("locked", permissions=[{"request": "import_observed_key",
                                           "requesters": ["klm/discovery*"]}])
    deps.policy = PolicyInForce(PolicySet(DEFAULT, [locked]))
    plain, under_locked, unknown = (import_request(), import_request(policy="locked"),
                                    import_request(policy="nope"))
    await import_observed_key([record(e, offset=i) for i, e in
                               enumerate((plain, under_locked, unknown))], deps)
    answers = {e.correlationid: e for e in inv(deps).sent(TOPICS.lifecycle)}
    assert answers[plain.id].type == "klm.key.observed"
    assert answers[under_locked.id].data["code"] == "forbidden"
    assert answers[unknown.id].data["code"] == "policy_unknown"
