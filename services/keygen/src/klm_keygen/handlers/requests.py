"""Keygen's message handlers: one small function per request type, taking its dependencies.

A Kafka batch flows: parse (bad bytes → DLQ) → skip requests already answered (inbox) →
validate each request (bad ones → ``klm.request.rejected``) → one HSM call for the batch →
one Postgres transaction (inbox + keystore + outbox) → offsets committed by the caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRecord

from klm_common.envelope import CloudEvent, now
from klm_common.errors import InfrastructureError, KlmError, UnknownRequestType
from klm_common.events import GenerateKey, parse_data
from klm_common.kafka import DeadLetters, Inbound, split_batch, subscriber_options
from klm_keygen.adapters.hsm import Hsm
from klm_keygen.adapters.keystore import KeystorePort
from klm_keygen.domain.generation import (
    GenerationPlan,
    NewKey,
    generated_fact,
    initial_state,
    plan_generation,
    rejection,
)
from klm_keygen.domain.material import GeneratedVersion

if TYPE_CHECKING:
    from klm_keygen.bootstrap import Keygen

log = logging.getLogger(__name__)
GROUP_ID = "klm-keygen"


@dataclass
class Deps:
    hsm: Hsm
    keystore: KeystorePort
    dead_letters: DeadLetters
    on_commit: Callable[[], None] = lambda: None
    #: back-off before a batch that hit an infrastructure error is redelivered
    retry_delay: float = 1.0
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class BatchResult:
    """What a batch produced, before it is committed."""

    keys: list[NewKey] = field(default_factory=list)
    answers: list[CloudEvent] = field(default_factory=list)

    def reject(self, request: CloudEvent, error: KlmError) -> None:
        self.answers.append(rejection(request, error, request.subject))


async def handle_request_batch(records: Sequence[ConsumerRecord[bytes, bytes]],
                               deps: Deps) -> None:
    """Handle one batch from ``klm.requests``; raise to have it redelivered."""
    try:
        await _handle(records, deps)
    except InfrastructureError as exc:
        log.warning("batch not served (%s); it will be redelivered", exc.code)
        await asyncio.sleep(deps.retry_delay)
        raise


async def _handle(records: Sequence[ConsumerRecord[bytes, bytes]], deps: Deps) -> None:
    inbound = await split_batch(records, deps.dead_letters)
    inbound = _dedupe(inbound)
    done = await deps.keystore.processed([i.event.id for i in inbound])
    fresh = [i.event for i in inbound if i.event.id not in done]
    if not fresh:
        return
    result = BatchResult()
    plans = [p for p in (_plan(ev, result) for ev in fresh) if p is not None]
    await generate_keys(plans, deps.hsm, result)
    claimed = await deps.keystore.save([ev.id for ev in fresh], result.keys, result.answers)
    deps.on_commit()
    _count(deps, result, claimed)


def register(keygen: Keygen) -> None:
    """Subscribe the ``klm.requests`` batch handler."""
    options = subscriber_options(keygen.settings, GROUP_ID)

    @keygen.broker.subscriber(keygen.topics.requests, **options)
    async def on_requests(records: list[Any]) -> None:
        await handle_request_batch(records, keygen.deps)


def _dedupe(inbound: list[Inbound]) -> list[Inbound]:
    """The same request twice in one batch is handled once."""
    seen: set[str] = set()
    out = []
    for item in inbound:
        if item.event.id not in seen:
            seen.add(item.event.id)
            out.append(item)
    return out


def _plan(request: CloudEvent, result: BatchResult) -> GenerationPlan | None:
    """Route one request; requests that cannot be carried out are rejected here."""
    try:
        data = parse_data(request)
        if isinstance(data, GenerateKey):
            return plan_generation(request, data)
        raise UnknownRequestType(f"keygen does not serve {request.type!r} on this topic")
    except KlmError as exc:
        result.reject(request, exc)
        return None


async def generate_keys(plans: Sequence[GenerationPlan], hsm: Hsm, result: BatchResult) -> None:
    """``klm.request.generate_key``: one HSM round trip for every plan of the batch."""
    if not plans:
        return
    outcomes = await hsm.generate([(p.spec, p.protection, p.hsm_object_id) for p in plans])
    created = now()
    for plan, outcome in zip(plans, outcomes, strict=True):
        if isinstance(outcome, KlmError):
            result.reject(plan.request, outcome)
            continue
        assert isinstance(outcome, GeneratedVersion)
        key = NewKey(plan, outcome, initial_state(plan.data, created), created)
        result.keys.append(key)
        result.answers.append(generated_fact(key))


def _count(deps: Deps, result: BatchResult, claimed: set[str]) -> None:
    for answer in result.answers:
        if answer.correlationid in claimed:
            deps.counters[answer.type] = deps.counters.get(answer.type, 0) + 1
