"""``klm.commands``: internal commands to keygen, one small function per command type.

The rotation service sends ``destroy_key`` when a scheduled destruction is due and
``deactivate_version`` when an old version's process-only period ends. Every command gets
one answer on ``klm.lifecycle`` (the fact, or ``klm.request.rejected``). Command types of
other areas (backup wrapping, …) are left to their own subscribers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRecord

from klm_common.errors import KlmError
from klm_common.events import DeactivateVersion, DestroyKey
from klm_common.kafka import subscriber_options
from klm_keygen.domain import lifecycle
from klm_keygen.domain.lifecycle import DestructionPlan, Outcome
from klm_keygen.handlers.batch import Context, Deps, KeyStep, Routes, each, handle_batch

if TYPE_CHECKING:
    from klm_keygen.bootstrap import Keygen

GROUP_ID = "klm-keygen-commands"


async def destroy_key(steps: Sequence[KeyStep], ctx: Context) -> list[Outcome | KlmError]:
    """``klm.command.destroy_key``: refused before ``destroy_after``; else the resident
    objects are destroyed in the HSM (one call for the round) and the wrapped material is
    cleared when the key is stored; the fact carries what was destroyed."""
    plans: list[DestructionPlan | KlmError] = []
    for step in steps:
        try:
            plans.append(lifecycle.plan_destruction(step.key, ctx.at))
        except KlmError as exc:
            plans.append(exc)
    resident = [oid for p in plans if isinstance(p, DestructionPlan)
                for oid in p.resident_object_ids]
    destroyed = await ctx.hsm.destroy_objects(resident) if resident else {}
    results: list[Outcome | KlmError] = []
    for step, plan in zip(steps, plans, strict=True):
        if isinstance(plan, KlmError):
            results.append(plan)
            continue
        results.append(lifecycle.destroyed(step.key, step.request, plan,
                                           _evidence(step.key.versions, plan, destroyed, ctx),
                                           ctx.at))
    return results


def _evidence(versions: Sequence[lifecycle.VersionRecord], plan: DestructionPlan,
              destroyed: dict[str, list[str]], ctx: Context) -> dict[str, object]:
    """What an auditor needs to see that nothing usable is left, and when."""
    wrapped = [v.version for v in versions if v.version in plan.versions
               and v.hsm_object_id is None]
    return {
        "destroyed_at": ctx.at.isoformat(),
        "token": ctx.hsm.token_label,
        "hsm_objects_destroyed": {oid.hex(): destroyed.get(oid.hex(), [])
                                  for oid in plan.resident_object_ids},
        "wrapped_material_cleared_versions": wrapped,
    }


async def deactivate_version(steps: Sequence[KeyStep], ctx: Context
                             ) -> list[Outcome | KlmError]:
    """``klm.command.deactivate_version``: an old version stops processing."""
    return each(steps, lambda s: lifecycle.deactivate_version(s.key, s.request, s.data, ctx.at))


ROUTES = Routes(key_handlers={DestroyKey: destroy_key, DeactivateVersion: deactivate_version},
                reject_unknown=False)


async def handle_command_batch(records: Sequence[ConsumerRecord[bytes, bytes]],
                               deps: Deps) -> None:
    await handle_batch(records, deps, ROUTES)


def register(keygen: Keygen) -> None:
    """Subscribe the ``klm.commands`` batch handler (its own consumer group)."""
    options = subscriber_options(keygen.settings, GROUP_ID)

    @keygen.broker.subscriber(keygen.topics.commands, **options)
    async def on_commands(records: list[Any]) -> None:
        await handle_command_batch(records, keygen.deps)

