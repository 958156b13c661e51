"""Rotation, state changes and destruction through the batch handlers, on fakes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import ConsumerRecord

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import GenerateKey
from klm_keygen.handlers.batch import Deps
from klm_keygen.handlers.commands import handle_command_batch
from klm_keygen.handlers.requests import handle_request_batch


def record(event: CloudEvent, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    value = event.to_bytes()
    return ConsumerRecord("t", 0, offset, 0, 0, b"k", value, None, 1, len(value), [])


def ev(type_: str, **data: Any) -> CloudEvent:
    return make_event(f"klm.{type_}", data, source="test")


async def send(deps: Deps, *events: CloudEvent, command: bool = False) -> list[CloudEvent]:
    before = len(deps.keystore.outbox)  # type: ignore[attr-defined]
    handler = handle_command_batch if command else handle_request_batch
    await handler([record(e, i) for i, e in enumerate(events)], deps)
    return deps.keystore.outbox[before:]  # type: ignore[attr-defined,no-any-return]


async def new_key(deps: Deps, **fields: Any) -> str:
    data = {"owner": "acme", "name": "k", "algorithm": "EC-P-256", **fields}
    [fact] = await send(deps, make_event(GenerateKey.event_type, data, source="test"))
    return str(fact.subject)


async def test_rotation_makes_a_primary_version_and_keeps_the_old_one_processing(
        deps: Deps) -> None:
    key_id = await new_key(deps)
    [rotated] = await send(deps, ev("request.rotate_key", key_id=key_id))
    assert rotated.type == "klm.key.rotated"
    assert (rotated.data["version"], rotated.data["previous_version"]) == (2, 1)
    key = deps.keystore.records[key_id]  # type: ignore[attr-defined]
    assert key.primary_version == 2
    assert [v.state.value for v in key.versions] == ["active", "active"]
    [done] = await send(deps, ev("command.deactivate_version", key_id=key_id, version=1),
                        command=True)
    assert done.type == "klm.key.version_deactivated"
    [refused] = await send(deps, ev("command.deactivate_version", key_id=key_id, version=2),
                           command=True)
    assert refused.data["code"] == "illegal_transition"


async def test_rotation_with_policy_deactivates_previous_at_once(deps: Deps) -> None:
    key_id = await new_key(deps)
    facts = await send(deps, ev("request.rotate_key", key_id=key_id, deactivate_previous=True))
    assert [f.type for f in facts] == ["klm.key.rotated", "klm.key.version_deactivated"]


async def test_requests_on_one_key_in_one_batch_apply_in_order(deps: Deps) -> None:
    key_id = await new_key(deps)
    facts = await send(deps, ev("request.suspend_key", key_id=key_id),
                       ev("request.rotate_key", key_id=key_id),
                       ev("request.reactivate_key", key_id=key_id),
                       ev("request.rotate_key", key_id=key_id))
    assert [f.type for f in facts] == ["klm.key.suspended", "klm.request.rejected",
                                       "klm.key.reactivated", "klm.key.rotated"]
    assert facts[1].data["details"]["current_state"] == "suspended"


async def test_illegal_transition_names_the_current_state(deps: Deps) -> None:
    key_id = await new_key(deps)
    [refused] = await send(deps, ev("request.reactivate_key", key_id=key_id))
    assert refused.data["code"] == "illegal_transition"
    assert refused.data["details"]["current_state"] == "active"
    [missing] = await send(deps, ev("request.suspend_key",
                                    key_id="klm:key:00000000-0000-0000-0000-000000000000"))
    assert missing.data["code"] == "key_not_found"


async def test_destruction_waits_for_its_date_then_destroys_resident_objects(
        deps: Deps) -> None:
    clock = [datetime(2026, 1, 1, tzinfo=UTC)]
    deps.clock = lambda: clock[0]
    deps.day_seconds = 10.0
    key_id = await new_key(deps, protection="hsm-resident")
    [early] = await send(deps, ev("request.schedule_destruction", key_id=key_id))
    assert early.data["code"] == "illegal_transition"  # an active key is not destroyed
    await send(deps, ev("request.revoke_key", key_id=key_id, reason="cessation"))
    [scheduled] = await send(deps, ev("request.schedule_destruction", key_id=key_id,
                                      waiting_days=7))
    assert scheduled.data["destroy_after"].startswith("2026-01-01T00:01:10")
    [not_due] = await send(deps, ev("command.destroy_key", key_id=key_id), command=True)
    assert not_due.data["code"] == "destruction_not_due"
    clock[0] += timedelta(seconds=70)
    [gone] = await send(deps, ev("command.destroy_key", key_id=key_id), command=True)
    assert gone.type == "klm.key.destroyed" and gone.data["state"] == "destroyed"
    assert deps.hsm.destroyed  # type: ignore[attr-defined]
    [after] = await send(deps, ev("request.rotate_key", key_id=key_id))
    assert after.data["details"]["current_state"] == "destroyed"


async def test_compromised_key_is_destroyed_compromised(deps: Deps) -> None:
    deps.day_seconds = 0.0
    key_id = await new_key(deps, algorithm="AES-256")
    await send(deps, ev("request.revoke_key", key_id=key_id, reason="compromised"))
    await send(deps, ev("request.schedule_destruction", key_id=key_id))
    [gone] = await send(deps, ev("command.destroy_key", key_id=key_id), command=True)
    assert gone.data["state"] == "destroyed-compromised"
    assert gone.data["evidence"]["wrapped_material_cleared_versions"] == [1]


async def test_other_areas_commands_are_left_alone(deps: Deps) -> None:
    assert await send(deps, ev("command.wrap_for_backup", key_id="x"), command=True) == []


async def test_compromised_key_is_rekeyed_and_its_old_version_stays_compromised(
        deps: Deps) -> None:
    key_id = await new_key(deps)
    await send(deps, ev("request.revoke_key", key_id=key_id, reason="compromised"))
    [rotated] = await send(deps, ev("request.rotate_key", key_id=key_id, reason="compromised"))
    assert (rotated.type, rotated.data["state"]) == ("klm.key.rotated", "active")
    key = deps.keystore.records[key_id]  # type: ignore[attr-defined]
    assert [v.state.value for v in key.versions] == ["compromised", "active"]
