"""``klm.requests``: one small function per public lifecycle request type.

``generate_key`` batches are one HSM call + one transaction (see :mod:`.batch`); the
requests on existing keys (rotate, suspend, reactivate, revoke, schedule and cancel
destruction) take the key as locked in that transaction and return its next state and the
facts, by the pure rules of :mod:`klm_keygen.domain.lifecycle`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiokafka import ConsumerRecord
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from klm_common.authorization import tenant_request_topics
from klm_common.errors import KlmError
from klm_common.events import (
    BackupKey,
    CancelDestruction,
    ReactivateKey,
    RestoreKey,
    RevokeKey,
    RotateKey,
    ScheduleDestruction,
    SuspendKey,
)
from klm_keygen.domain import lifecycle
from klm_keygen.domain.lifecycle import Outcome, RotationPlan
from klm_keygen.domain.material import GeneratedVersion
from klm_keygen.handlers.batch import (
    Context,
    Deps,
    KeyStep,
    Routes,
    each,
    generate_keys,
    handle_batch,
    serve_batch,
)
from klm_keygen.handlers.pipeline import PipelinedConsumer, Serve

if TYPE_CHECKING:
    from klm_keygen.bootstrap import Keygen

__all__ = ["Deps", "generate_keys", "handle_request_batch", "register"]

log = logging.getLogger(__name__)
GROUP_ID = "klm-keygen"
TENANT_GROUP_ID = "klm-keygen-tenants"


async def rotate_key(steps: Sequence[KeyStep], ctx: Context) -> list[Outcome | KlmError]:
    """``klm.request.rotate_key``: a new version, same spec, made in one HSM call per round."""
    plans: list[RotationPlan | KlmError] = []
    for step in steps:
        try:
            plans.append(lifecycle.plan_rotation(step.key))
        except KlmError as exc:
            plans.append(exc)
    todo = [p for p in plans if isinstance(p, RotationPlan)]
    made = iter(await ctx.hsm.generate([(p.spec, p.protection, p.hsm_object_id)
                                        for p in todo]) if todo else [])
    results: list[Outcome | KlmError] = []
    for step, plan in zip(steps, plans, strict=True):
        material = plan if isinstance(plan, KlmError) else next(made)
        if isinstance(material, GeneratedVersion):
            assert isinstance(plan, RotationPlan)
            results.append(lifecycle.rotated(step.key, step.request, step.data, plan,
                                             material, ctx.at))
        else:
            assert isinstance(material, KlmError)
            results.append(material)
    if ctx.csrs is not None:  # a profile key's new version gets a new CSR
        return await ctx.csrs.attach_to_rotated(steps, results)
    return results


async def suspend_key(steps: Sequence[KeyStep], ctx: Context) -> list[Outcome | KlmError]:
    return each(steps, lambda s: lifecycle.suspend(s.key, s.request, s.data, ctx.at))


async def reactivate_key(steps: Sequence[KeyStep], ctx: Context) -> list[Outcome | KlmError]:
    return each(steps, lambda s: lifecycle.reactivate(s.key, s.request, s.data, ctx.at))


async def revoke_key(steps: Sequence[KeyStep], ctx: Context) -> list[Outcome | KlmError]:
    return each(steps, lambda s: lifecycle.revoke(s.key, s.request, s.data, ctx.at))


async def schedule_destruction(steps: Sequence[KeyStep], ctx: Context
                               ) -> list[Outcome | KlmError]:
    return each(steps, lambda s: lifecycle.schedule_destruction(
        s.key, s.request, s.data, ctx.at, ctx.day_seconds))


async def cancel_destruction(steps: Sequence[KeyStep], ctx: Context
                             ) -> list[Outcome | KlmError]:
    return each(steps, lambda s: lifecycle.cancel_destruction(s.key, s.request, s.data, ctx.at))


ROUTES = Routes(
    key_handlers={RotateKey: rotate_key, SuspendKey: suspend_key,
                  ReactivateKey: reactivate_key, RevokeKey: revoke_key,
                  ScheduleDestruction: schedule_destruction,
                  CancelDestruction: cancel_destruction},
    generate=True,
    # the backup service answers these (and sends keygen internal commands)
    served_elsewhere=frozenset({BackupKey.event_type, RestoreKey.event_type}),
)


async def handle_request_batch(records: Sequence[ConsumerRecord[bytes, bytes]],
                               deps: Deps) -> None:
    """Handle one batch from ``klm.requests``; raise to have it redelivered."""
    await handle_batch(records, deps, ROUTES)


class RequestSettings(BaseSettings):
    """``KLM_REQUESTS_PIPELINE_DEPTH``: batches of ``klm.requests`` served at once (see
    :mod:`.pipeline`); 1: one at a time, offsets committed before the next is served."""

    model_config = SettingsConfigDict(env_prefix="KLM_REQUESTS_", extra="ignore")
    pipeline_depth: int = Field(3, ge=1)


def register(keygen: Keygen) -> None:
    """Consume ``klm.requests``, and every tenant's ``klm.requests.<tenant>`` by pattern
    (the tenant follows from the topic, see :mod:`klm_common.authorization`), each with a
    :class:`PipelinedConsumer`: the next batch's keys are generated while this one's
    transaction commits; transactions stay in order; offsets are committed once durable."""
    depth = RequestSettings().pipeline_depth

    def serve(records: Sequence[ConsumerRecord[bytes, bytes]]) -> Serve:
        return lambda turn: serve_batch(records, keygen.deps, ROUTES, turn)

    keygen.consumers += [
        PipelinedConsumer("requests", keygen.settings, GROUP_ID, serve,
                          topic=keygen.topics.requests, depth=depth,
                          retry_delay=keygen.deps.retry_delay),
        PipelinedConsumer("tenant-requests", keygen.settings, TENANT_GROUP_ID, serve,
                          pattern=tenant_request_topics(keygen.topics), depth=depth,
                          retry_delay=keygen.deps.retry_delay)]
