"""What is due when, and what is sent for it (pure)."""

from __future__ import annotations

import uuid
from dataclasses import replace

from services.rotation.tests.factories import T0, inventory_key, later

from klm_common.kafka import KLM_NAMESPACE
from klm_common.policy import load_policy
from klm_rotation.domain.inventory import Version, note_rejection
from klm_rotation.domain.schedule import DueRow, command_id, decide, name_uuid, plan

POLICY = load_policy()
DAY = 1.0


def test_an_active_key_is_due_for_rotation_at_the_end_of_its_cryptoperiod() -> None:
    [due] = plan(inventory_key(), POLICY, DAY)
    assert (due.kind, due.version, due.planned_at) == ("rotate", 1, later(730))


def test_superseded_versions_are_deactivated_after_the_process_only_period() -> None:
    key = inventory_key(primary_version=2, primary_since=later(730), versions={
        1: Version("active", T0, superseded_at=later(730)), 2: Version("active", later(730))})
    dues = {(d.kind, d.version): d.planned_at for d in plan(key, POLICY, DAY)}
    assert dues == {("rotate", 2): later(1460), ("deactivate", 1): later(730 + 1095)}


def test_a_compromised_key_is_due_at_once_and_observed_keys_never() -> None:
    key = inventory_key(state="compromised", compromised_at=later(3))
    [due] = plan(key, POLICY, DAY)
    assert due.planned_at == later(3) and due.reason == "compromised"
    assert plan(replace(key, origin="observed"), POLICY, DAY) == []
    assert plan(inventory_key(state="suspended"), POLICY, DAY) == []


def test_command_ids_are_stable_until_keygen_refuses() -> None:
    key = inventory_key()
    first = command_id(key, "rotate", 1, later(730))
    assert command_id(key, "rotate", 1, later(730)) == first
    assert command_id(note_rejection(key, "rotate", 1, 3), "rotate", 1, later(730)) != first


def test_notify_mode_evaluates_instead_of_rotating() -> None:
    key = inventory_key(algorithm="EC", size=384, curve="P-384", usages=("sign", "verify"),
                        profile="code-signing")
    [due] = plan(key, POLICY, DAY)
    decision = decide(DueRow(key.key_id, "rotate", 1, due.planned_at, due.reason), key, POLICY,
                      due.planned_at, DAY)
    assert decision.command is None and decision.evaluate


def test_destroy_goes_to_commands_unless_guarded() -> None:
    key = inventory_key(state="deactivated", destroy_after=later(30))
    [due] = plan(key, POLICY, DAY)
    row = DueRow(key.key_id, "destroy", 0, due.planned_at, due.reason)
    decision = decide(row, key, POLICY, due.planned_at, DAY)
    assert decision.target == "commands"
    assert decision.command is not None and decision.command.type == "klm.command.destroy_key"
    used = replace(key, last_used_at=later(29))
    assert decide(row, used, POLICY, due.planned_at, DAY).hold
    forced = replace(used, destruction_override=True)
    assert decide(row, forced, POLICY, due.planned_at, DAY).command is not None


def test_a_row_from_an_older_view_of_the_key_is_dropped() -> None:
    key = inventory_key(primary_version=2, versions={1: Version("deactivated", T0),
                                                     2: Version("active", T0)})
    stale = DueRow(key.key_id, "rotate", 1, later(730), "cryptoperiod")
    assert decide(stale, key, POLICY, later(730), DAY).drop


def test_name_uuid_is_uuid5() -> None:
    for name in ("rotate/klm:key:x/1/0", "destroy/k/2026-01-01T00:00:00+00:00/2", ""):
        assert name_uuid(name) == str(uuid.uuid5(KLM_NAMESPACE, name))
