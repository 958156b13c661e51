"""The inventory gauges rotation feeds (klm.keys, klm.key.oldest_active.age,
klm.rotation.due), through the fake inventory: facts in, one refresh, readings out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from services.rotation.tests.factories import T0, fact, generated, key_id, later
from services.rotation.tests.fakes import Clock, FakeDeadLetters, FakeInventory, record

from klm_common import metrics as catalogue
from klm_common.envelope import make_event
from klm_common.policy import load_policy
from klm_common.topics import Topics
from klm_rotation.domain.inventory import InventoryFigures
from klm_rotation.handlers import Deps, PolicyInForce, handle_facts, import_observed_key
from klm_rotation.jobs import refresh_gauges
from klm_rotation.metrics import inventory_readings

TOPICS = Topics("t.")


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def deps(clock: Clock) -> Deps:
    return Deps(inventory=FakeInventory(), policy=PolicyInForce(load_policy(), "default"),
                topics=TOPICS, day_seconds=1.0, dead_letters=FakeDeadLetters(),  # type: ignore[arg-type]
                clock=clock)


async def feed(deps: Deps, *events: Any) -> None:
    await handle_facts([record(e, offset=i) for i, e in enumerate(events)], deps)


def readings(spec: catalogue.MetricSpec) -> dict[tuple[tuple[str, Any], ...], float]:
    return {tuple(sorted((o.attributes or {}).items())): float(o.value)
            for o in catalogue._gauges.observations(spec.name)}


def key_labels(state: str, algorithm: str, protection: str) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({"klm.key.state": state, "klm.key.algorithm": algorithm,
                         "klm.key.protection": protection}.items()))


async def observe(deps: Deps, name: str, algorithm: str, size: int) -> None:
    request = make_event("klm.request.import_observed_key", {
        "owner": "acme", "name": name, "algorithm": algorithm, "size": size,
        "usages": ["sign"], "location": f"legacy://{name}",
        "created_at": (T0 - timedelta(seconds=400)).isoformat()}, source="tests/scanner")
    await import_observed_key([record(request)], deps)
    inventory = deps.inventory
    assert isinstance(inventory, FakeInventory)
    [answer] = [e for e in inventory.sent(TOPICS.lifecycle) if e.correlationid == request.id]
    await feed(deps, answer)


async def test_keys_by_state_algorithm_and_protection(deps: Deps, clock: Clock) -> None:
    wrapped, resident = key_id(), key_id()
    await feed(deps, generated(wrapped), generated(key_id()),
               generated(resident, later(5), algorithm="EC", size=256, curve="P-256",
                         usages=["sign", "verify"], protection="hsm-resident"),
               generated(key_id(), state="pre-active"))
    await observe(deps, "legacy-ca", "RSA", 1024)
    clock.now = later(10)
    await refresh_gauges(deps, notice_days=1)
    assert readings(catalogue.KEYS) == {
        key_labels("active", "AES-256", "hsm-wrapped"): 2,
        key_labels("pre-active", "AES-256", "hsm-wrapped"): 1,
        key_labels("active", "EC-P-256", "hsm-resident"): 1,
        key_labels("active", "RSA-1024", "observed"): 1}
    # the observed key is the oldest active one: made 400 s (policy days) before T0
    assert readings(catalogue.OLDEST_ACTIVE_KEY_AGE) == {(): 410.0}


async def test_a_vanished_combination_stops_being_reported(deps: Deps, clock: Clock) -> None:
    key = key_id()
    await feed(deps, generated(key))
    await refresh_gauges(deps, notice_days=1)
    assert key_labels("active", "AES-256", "hsm-wrapped") in readings(catalogue.KEYS)
    await feed(deps, fact("suspended", key, state="suspended", previous_state="active"))
    await refresh_gauges(deps, notice_days=1)
    assert readings(catalogue.KEYS) == {key_labels("suspended", "AES-256", "hsm-wrapped"): 1}
    assert readings(catalogue.OLDEST_ACTIVE_KEY_AGE) == {}  # no active key: no reading


async def test_rotations_due_count_the_notice_window(deps: Deps, clock: Clock) -> None:
    # the default policy rotates AES encryption keys after 730 days (1 s each here)
    await feed(deps, generated(key_id()), generated(key_id(), later(100)),
               generated(key_id(), later(200)))
    clock.now = later(700)
    await refresh_gauges(deps, notice_days=40)  # due by 740: the first key only
    assert readings(catalogue.ROTATIONS_DUE) == {(): 1.0}
    await refresh_gauges(deps, notice_days=140)  # due by 840: the first two
    assert readings(catalogue.ROTATIONS_DUE) == {(): 2.0}
    clock.now = later(1000)  # all three past due, none done yet: still due
    await refresh_gauges(deps, notice_days=0)
    assert readings(catalogue.ROTATIONS_DUE) == {(): 3.0}


def test_readings_without_keys() -> None:
    out = inventory_readings(InventoryFigures({}, None, 0), T0)
    assert out == {catalogue.KEYS: [], catalogue.OLDEST_ACTIVE_KEY_AGE: [],
                   catalogue.ROTATIONS_DUE: [(0.0, {})]}
