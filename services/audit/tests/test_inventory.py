"""The inventory is a fold of events: the same events give the same view, at any time."""

from __future__ import annotations

from klm_audit import handlers
from klm_audit.adapters.memory_store import MemoryAuditStore
from klm_audit.domain.inventory import Fact, replay
from klm_audit.domain.queries import KeyFilter, Scope
from klm_common.envelope import CloudEvent

from .factories import Events
from .test_ingest import accepted


def fact(event: CloudEvent, sequence: int) -> Fact:
    return Fact(sequence=sequence, type=event.type, time=event.time, data=event.data)


def life(events: Events) -> list[CloudEvent]:
    key = events.generated(algorithm="EC", size=256, curve="P-256", usages=["sign", "verify"])
    return [
        key,
        events.fact("klm.key.rotated", key, state="active", version=2, previous_version=1,
                    created_at=events.clock.isoformat()),
        events.fact("klm.key.policy_violation", key, code="overdue", severity="high",
                    rule="rotate yearly"),
        events.fact("klm.key.suspended", key, state="suspended", previous_state="active"),
        events.fact("klm.key.reactivated", key, state="active", previous_state="suspended"),
        events.fact("klm.key.deactivated", key, state="deactivated", previous_state="active"),
        events.fact("klm.key.destruction_scheduled", key, state="deactivated",
                    destroy_after=events.clock.isoformat(), waiting_days=7),
        events.fact("klm.key.destroyed", key, state="destroyed", previous_state="deactivated",
                    versions=[1, 2]),
    ]


def test_a_keys_life_folds_into_its_view(events: Events) -> None:
    history = life(events)
    view = replay(fact(e, i) for i, e in enumerate(history, 1))
    assert view is not None
    assert view.state == "destroyed" and view.primary_version == 2
    assert [v.state for v in view.versions] == ["destroyed", "destroyed"]
    assert view.last_rotated_at == history[1].time and view.destroyed_at == history[-1].time
    assert [f.code for f in view.findings] == ["overdue"]
    assert view.last_sequence == len(history)


def test_state_at_a_past_time_is_the_fold_of_the_events_before_it(events: Events) -> None:
    history = life(events)
    at = history[3].time  # suspended
    view = replay(fact(e, i) for i, e in enumerate(history, 1) if e.time <= at)
    assert view is not None and view.state == "suspended"


def test_a_malformed_fact_is_stored_but_not_projected(events: Events) -> None:
    key = events.generated()
    bad = events.fact("klm.key.rotated", key, state="active", version="two")
    view = replay([fact(key, 1), fact(bad, 2)])
    assert view is not None and view.primary_version == 1 and view.last_sequence == 1
    assert replay([fact(events.fact("klm.key.generated", key), 1)]) is None


async def test_rebuilding_the_projection_gives_the_same_answers(events: Events) -> None:
    store = MemoryAuditStore()
    for _ in range(3):
        await handlers.append(store, accepted(*life(events)))
    await handlers.append(store, accepted(events.generated(owner="globex")))
    assert await handlers.project(store) == len(store.rows)
    before = await store.keys(KeyFilter(limit=1000), Scope())
    assert len(before) == 4
    store.inventory.clear()
    assert await store.rebuild_projections() == 4
    assert await store.keys(KeyFilter(limit=1000), Scope()) == before
    assert [v.owner for v in await store.keys(KeyFilter(), Scope("globex"))] == ["globex"]
