"""How keygen serves one Kafka batch (requests or internal commands), shared by the areas.

parse (bad bytes → DLQ) → skip ids already answered (inbox) → route each event to its
handler (bad ones → ``klm.request.rejected``) → per chunk of up to ``chunk_size`` events:
generate its new keys (one HSM call) → ONE Postgres transaction: claim the ids, insert the
new keys, lock the existing keys the chunk changes, apply the key handlers round by round
(HSM work of a round in one call each), store the keys' next state, queue every answer →
commit (a chunk with no step on an existing key: claim, insert and queue in one statement,
``KeystoreUnit.save_new``). The next chunk's keys are generated while a chunk commits.
Offsets are committed by the caller once every chunk of the batch is. On ``klm.requests``
the subscribers are pipelined (:mod:`.pipeline`): the next batch's keys are generated while
this one commits, its transaction follows this one's, and offsets are committed once both
are durable.

A crash anywhere before the commit leaves nothing: session objects die with the process,
resident objects made meanwhile are orphans that the start-up sweep destroys, and the
uncommitted batch is delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import ConsumerRecord

from klm_common.authorization import authorize, tenant_of_topic
from klm_common.envelope import CloudEvent, now
from klm_common.errors import (
    Forbidden,
    InfrastructureError,
    KeyNotFound,
    KlmError,
    UnknownRequestType,
)
from klm_common.events import EventData, GenerateKey, parse_data
from klm_common.kafka import DeadLetters, Inbound, split_batch
from klm_common.policy import CryptoPolicy, PolicySet
from klm_keygen.adapters.certificate_requests import CertificateRequests
from klm_keygen.adapters.hsm import Hsm
from klm_keygen.adapters.keystore import KeystorePort, KeystoreUnit
from klm_keygen.domain.generation import (
    GenerationPlan,
    NewKey,
    generated_fact,
    initial_state,
    plan_generation,
    rejection,
)
from klm_keygen.domain.lifecycle import KeyRecord, Outcome
from klm_keygen.domain.material import GeneratedVersion
from klm_keygen.handlers.pipeline import Turn

log = logging.getLogger(__name__)


@dataclass
class Deps:
    hsm: Hsm
    keystore: KeystorePort
    dead_letters: DeadLetters
    on_commit: Callable[[], None] = lambda: None
    #: back-off before a batch that hit an infrastructure error is redelivered
    retry_delay: float = 1.0
    #: length of a policy day in seconds (``KlmSettings.day_seconds``)
    day_seconds: float = 86400.0
    clock: Callable[[], datetime] = now
    counters: dict[str, int] = field(default_factory=dict)
    #: what tenants may request (klm_common.authorization); None: owner checks only
    policy: CryptoPolicy | None = None
    #: the policies a new key may name (a generate naming another is rejected with
    #: policy_unknown); None: any name
    policies: PolicySet | None = None
    #: CSRs of certificate-profile keys (generation and rotation); None: no CSRs
    csrs: CertificateRequests | None = None
    #: a batch is served in chunks of this many events, pipelined (HSM ∥ Postgres)
    chunk_size: int = 128
    #: ids being served by a batch of this process (the subscribers run concurrently)
    in_flight: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class KeyStep:
    """One request or command on an existing key, with the key as locked for this batch."""

    request: CloudEvent
    data: Any
    key: KeyRecord


@dataclass(frozen=True, slots=True)
class Context:
    hsm: Hsm
    at: datetime
    day_seconds: float
    #: request id → tenant of the topic it came from (None: the shared topic)
    tenants: Mapping[str, str | None] = field(default_factory=dict)
    policy: CryptoPolicy | None = None
    csrs: CertificateRequests | None = None


#: a key handler serves every step of its type in one round: one result per step, in order
KeyHandler = Callable[[Sequence[KeyStep], Context], Awaitable[list[Outcome | KlmError]]]


@dataclass
class BatchResult:
    """What a batch produced, before it is committed."""

    keys: list[NewKey] = field(default_factory=list)
    answers: list[CloudEvent] = field(default_factory=list)

    def reject(self, request: CloudEvent, error: KlmError, key_id: str | None = None) -> None:
        self.answers.append(rejection(request, error, key_id or request.subject))


@dataclass(frozen=True)
class Routes:
    """What an area serves on its topic: key handlers by payload type, whether it generates,
    and the types other services answer (skipped without an answer)."""

    key_handlers: Mapping[type[EventData], KeyHandler]
    generate: bool = False
    served_elsewhere: frozenset[str] = frozenset()
    reject_unknown: bool = True

    @property
    def types(self) -> frozenset[str]:
        served = {cls.event_type for cls in self.key_handlers}
        return frozenset(served | ({GenerateKey.event_type} if self.generate else set()))


async def handle_batch(records: Sequence[ConsumerRecord[bytes, bytes]], deps: Deps,
                       routes: Routes) -> None:
    """Handle one batch; raise to have it redelivered (its offsets are not committed)."""
    try:
        await serve_batch(records, deps, routes)
    except InfrastructureError as exc:
        log.warning("batch not served (%s); it will be redelivered", exc)
        await asyncio.sleep(deps.retry_delay)
        raise


async def serve_batch(records: Sequence[ConsumerRecord[bytes, bytes]], deps: Deps,
                      routes: Routes, turn: Turn | None = None) -> None:
    """Serve one batch; raise if it was not (nothing of it committed after the failure).

    ``turn`` (pipelined subscribers, :mod:`.pipeline`): the first chunk's keys are generated
    at once, but its transaction waits until every earlier batch has committed, so requests
    on the same key are applied in their order."""
    inbound = _dedupe(await split_batch(records, deps.dead_letters))
    # an id another batch of this process is serving right now (the same request sent to
    # two topics) is left to that batch: it answers it, or fails and is redelivered. Two
    # concurrent attempts would both pass the inbox pre-check, and a resident key's retry
    # clean-up (same CKA_ID) could destroy the object of the attempt that commits.
    inbound = [i for i in inbound if i.event.id not in deps.in_flight]
    ids = {i.event.id for i in inbound}
    deps.in_flight |= ids
    try:
        done = await deps.keystore.processed([i.event.id for i in inbound])
        fresh = [i.event for i in inbound if i.event.id not in done]
        if not fresh:
            return
        tenants = {i.event.id: tenant_of_topic(i.record.topic) for i in inbound}
        size = max(1, deps.chunk_size)
        chunks = [c for c in (_prepare(fresh[i:i + size], routes, tenants, deps.policy,
                                       deps.policies)
                              for i in range(0, len(fresh), size)) if c.handled]
        await _serve_pipelined(chunks, deps, routes, tenants, turn)
    finally:
        deps.in_flight -= ids


@dataclass
class Chunk:
    """Consecutive events of a batch, routed: served by one HSM call and one transaction."""

    handled: list[CloudEvent]
    plans: list[GenerationPlan]
    steps: list[tuple[CloudEvent, EventData]]
    result: BatchResult


def _prepare(events: Sequence[CloudEvent], routes: Routes, tenants: Mapping[str, str | None],
             policy: CryptoPolicy | None, policies: PolicySet | None = None) -> Chunk:
    result = BatchResult()
    plans: list[GenerationPlan] = []
    steps: list[tuple[CloudEvent, EventData]] = []
    handled = [ev for ev in events
               if _route(ev, routes, result, plans, steps, tenants.get(ev.id), policy, policies)]
    return Chunk(handled, plans, steps, result)


async def _serve_pipelined(chunks: Sequence[Chunk], deps: Deps, routes: Routes,
                           tenants: Mapping[str, str | None], turn: Turn | None = None) -> None:
    """Chunk *i+1*'s keys are generated on the HSM thread while chunk *i* commits, so the
    HSM does not wait for Postgres (nor Postgres for the HSM). Chunks commit in order; a
    failure leaves the rest uncommitted and the whole batch is redelivered (the inbox makes
    the committed chunks no-ops)."""
    pending = _generation(chunks[0], deps) if chunks else None
    for i, chunk in enumerate(chunks):
        assert pending is not None
        await pending
        if i == 0 and turn is not None:
            await turn.wait()  # earlier batches committed (else Abandoned: nothing is)
        pending = _generation(chunks[i + 1], deps) if i + 1 < len(chunks) else None
        try:
            await _commit(chunk, deps, routes, tenants)
        except BaseException:
            if pending is not None:
                with contextlib.suppress(BaseException):
                    await pending
            raise


def _generation(chunk: Chunk, deps: Deps) -> asyncio.Future[None]:
    async def generate() -> None:
        await generate_keys(chunk.plans, deps.hsm, chunk.result)
        if deps.csrs is not None:
            await deps.csrs.attach_to_generated(chunk.result.keys, chunk.result.answers)

    return asyncio.ensure_future(generate())


async def _commit(chunk: Chunk, deps: Deps, routes: Routes,
                  tenants: Mapping[str, str | None]) -> None:
    result = chunk.result
    at = deps.clock()
    async with deps.keystore.unit() as unit:
        if not chunk.steps:  # only new keys (and refusals): one statement
            claimed = await unit.save_new([ev.id for ev in chunk.handled], result.keys,
                                          result.answers)
        else:
            claimed = await unit.claim([ev.id for ev in chunk.handled])
            claimed -= await unit.insert_keys(
                [k for k in result.keys if k.plan.request.id in claimed])
            mine = [(ev, data) for ev, data in chunk.steps if ev.id in claimed]
            ctx = Context(deps.hsm, at, deps.day_seconds, tenants, deps.policy, deps.csrs)
            await apply_key_steps(unit, mine, routes, ctx, result)
            await unit.queue([a for a in result.answers if a.correlationid in claimed])
    deps.on_commit()
    _count(deps, result, claimed)


def _route(event: CloudEvent, routes: Routes, result: BatchResult,
           plans: list[GenerationPlan], steps: list[tuple[CloudEvent, EventData]],
           tenant: str | None = None, policy: CryptoPolicy | None = None,
           policies: PolicySet | None = None) -> bool:
    """File one event under generation or key steps, or reject it; False = not ours.

    A tenant's request (from its own topic) must name the tenant as the new key's owner and
    be a type its policy grants; requests on existing keys are checked once the key is
    locked (:func:`apply_key_steps`)."""
    if event.type in routes.served_elsewhere:
        return False
    if not routes.reject_unknown and event.type not in routes.types:
        return False
    try:
        data = parse_data(event)
        authorize(tenant, event.type, data.owner if isinstance(data, GenerateKey) else None,
                  policy)
        if routes.generate and isinstance(data, GenerateKey):
            plans.append(plan_generation(event, data, policies))
        elif type(data) in routes.key_handlers:
            steps.append((event, data))
        elif routes.reject_unknown:
            raise UnknownRequestType(f"keygen does not serve {event.type!r} on this topic")
        else:
            return False
    except KlmError as exc:
        result.reject(event, exc)
    return True


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


async def apply_key_steps(unit: KeystoreUnit, steps: Sequence[tuple[CloudEvent, EventData]],
                          routes: Routes, ctx: Context, result: BatchResult) -> None:
    """Apply requests on existing keys in arrival order per key.

    Round *n* holds each key's *n*-th request of the batch, so a round touches a key at most
    once and each handler gets all its steps of the round at once (one HSM call)."""
    if not steps:
        return
    keys = await unit.lock_keys([getattr(data, "key_id", "") for _, data in steps])
    before = dict(keys)
    for round_ in _rounds(steps):
        live: list[tuple[CloudEvent, EventData, KeyRecord]] = []
        for event, data in round_:
            key = keys.get(data.key_id)  # type: ignore[attr-defined]
            if key is None:
                result.reject(event, KeyNotFound(f"no key {data.key_id}"))  # type: ignore[attr-defined]
            elif (refusal := _refusal(ctx, event, key)) is not None:
                result.reject(event, refusal, key.key_id)
            else:
                live.append((event, data, key))
        for kind in dict.fromkeys(type(d) for _, d, _ in live):
            mine = [KeyStep(e, d, k) for e, d, k in live if type(d) is kind]
            outcomes = await routes.key_handlers[kind](mine, ctx)
            for step, outcome in zip(mine, outcomes, strict=True):
                if isinstance(outcome, KlmError):
                    result.reject(step.request, outcome, step.key.key_id)
                else:
                    keys[step.key.key_id] = outcome.key
                    result.answers.extend(outcome.facts)
    for key_id, key in keys.items():
        if key is not before[key_id]:
            await unit.store(before[key_id], key, ctx.at)


def _refusal(ctx: Context, event: CloudEvent, key: KeyRecord) -> Forbidden | None:
    """``forbidden`` if the request's tenant does not own the key (authorization.py)."""
    try:
        authorize(ctx.tenants.get(event.id), event.type, key.owner, ctx.policy)
    except Forbidden as exc:
        return exc
    return None


def _rounds(steps: Sequence[tuple[CloudEvent, EventData]]
            ) -> list[list[tuple[CloudEvent, EventData]]]:
    seen: dict[str, int] = {}
    rounds: list[list[tuple[CloudEvent, EventData]]] = []
    for event, data in steps:
        n = seen.get(data.key_id, 0)  # type: ignore[attr-defined]
        seen[data.key_id] = n + 1  # type: ignore[attr-defined]
        if n == len(rounds):
            rounds.append([])
        rounds[n].append((event, data))
    return rounds


def each(steps: Sequence[KeyStep], rule: Callable[[KeyStep], Outcome]
         ) -> list[Outcome | KlmError]:
    """Apply a pure rule to each step; a coded error answers that step only."""
    results: list[Outcome | KlmError] = []
    for step in steps:
        try:
            results.append(rule(step))
        except KlmError as exc:
            results.append(exc)
    return results


def _dedupe(inbound: list[Inbound]) -> list[Inbound]:
    """The same event twice in one batch is handled once."""
    seen: set[str] = set()
    out = []
    for item in inbound:
        if item.event.id not in seen:
            seen.add(item.event.id)
            out.append(item)
    return out


def _count(deps: Deps, result: BatchResult, claimed: set[str]) -> None:
    for answer in result.answers:
        if answer.correlationid in claimed:
            deps.counters[answer.type] = deps.counters.get(answer.type, 0) + 1
