"""Rotation's handlers: one small function per message type or periodic job, each taking
its dependencies (:class:`Deps`) and doing its work in one unit of work.

* ``klm.lifecycle`` facts → inventory projection, schedule, findings (:func:`handle_facts`)
* ``klm.inventory.requests`` → observed keys (:func:`import_observed_key`)
* due work → rotate / deactivate / destroy commands (:func:`dispatch_due`)
* continuous compliance scan (:func:`scan_page`) and policy (re)loads (:func:`apply_policies`)

Every key is planned and judged under the policy it names (:class:`PolicyInForce`), the
default one when it names none — or names one that is not loaded (with a finding).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import ConsumerRecord

from klm_common.envelope import CloudEvent, make_event, now
from klm_common.errors import KlmError, RequestInvalid, UnknownRequestType
from klm_common.events import (
    DestructionScheduled,
    EventData,
    ImportObservedKey,
    PolicyChanged,
    RequestRejected,
    parse_data,
)
from klm_common.kafka import DeadLetters, Inbound, split_batch
from klm_common.policy import SHIPPED_DEFAULT, CryptoPolicy, PolicySet, changed_sections
from klm_common.topics import Topics
from klm_rotation.domain import compliance, schedule
from klm_rotation.domain.inventory import InventoryKey, apply, note_rejection
from klm_rotation.domain.observed import observed_fact, rejection
from klm_rotation.metrics import RotationMetrics
from klm_rotation.ports import Inventory, RowId, Tx

log = logging.getLogger(__name__)


class PolicyInForce:
    """The policies rotation applies now; a reload swaps the whole set. A single
    :class:`CryptoPolicy` makes a set of one (unit tests, benchmarks)."""

    def __init__(self, policies: PolicySet | CryptoPolicy, path: str | None = None) -> None:
        self.policies = policies if isinstance(policies, PolicySet) else PolicySet(
            policies, origins={policies.name: path or SHIPPED_DEFAULT})

    @property
    def policy(self) -> CryptoPolicy:
        """The default policy: what a key naming no policy follows."""
        return self.policies.default

    def of(self, key: InventoryKey) -> CryptoPolicy:
        """The policy that governs ``key`` (the default while its name is unknown)."""
        return self.policies.applied(key.policy)


@dataclass
class Deps:
    inventory: Inventory
    policy: PolicyInForce
    topics: Topics
    day_seconds: float
    dead_letters: DeadLetters | None = None
    metrics: RotationMetrics = field(default_factory=RotationMetrics)
    on_commit: Callable[[], None] = lambda: None
    wake_scheduler: Callable[[], None] = lambda: None
    clock: Callable[[], datetime] = now
    dispatch_batch: int = 2000
    dispatch_workers: int = 2
    instance: str = "klm/rotation"


# ------------------------------------------------------------------ shared steps
def _fresh(inbound: Sequence[Inbound]) -> list[CloudEvent]:
    seen: set[str] = set()
    out = []
    for item in inbound:
        if item.event.id not in seen:
            seen.add(item.event.id)
            out.append(item.event)
    return out


async def reconcile(tx: Tx, keys: Sequence[InventoryKey], policies: PolicyInForce,
                    day_seconds: float) -> None:
    """Make the due-work rows of ``keys`` match their plan (each under its own policy); rows
    whose planned time is unchanged are left alone (they keep their dispatch state)."""
    if not keys:
        return
    existing = await tx.planned([k.key_id for k in keys])
    desired = {(k.key_id, d.kind, d.version): d
               for k in keys for d in schedule.plan(k, policies.of(k), day_seconds)}
    upserts = [(rid[0], due) for rid, due in desired.items() if existing.get(rid) != due.planned_at]
    deletes = [rid for rid in existing if rid not in desired]
    await tx.write_schedule(upserts, deletes)


async def assess(tx: Tx, keys: Sequence[InventoryKey], deps: Deps,
                 changes: compliance.Changes) -> None:
    """Evaluate ``keys`` now and record what changed in their findings."""
    if not keys:
        return
    current = await tx.findings_of([k.key_id for k in keys])
    moment = deps.clock()
    for key in keys:
        after = compliance.evaluate_in(key, deps.policy.policies, moment, deps.day_seconds)
        compliance.compare(key, current.get(key.key_id, {}), after, changes)


async def _publish_findings(tx: Tx, deps: Deps, changes: compliance.Changes) -> None:
    await tx.save_findings(changes)
    await tx.outbox(deps.topics.lifecycle, changes.events)


# ------------------------------------------------------------------ klm.lifecycle
#: facts on klm.lifecycle that say nothing about a key's inventory entry (including the
#: findings rotation publishes itself)
NOT_INVENTORY = frozenset({"klm.key.policy_violation", "klm.key.usage_denied",
                           "klm.key.orphan_destroyed"})


def _parse_fact(event: CloudEvent) -> EventData | None:
    """Facts rotation applies; anything else on the topic is someone else's business."""
    if not (event.type.startswith("klm.key.") or event.type == RequestRejected.event_type):
        return None
    if event.type in NOT_INVENTORY:
        return None
    try:
        return parse_data(event)
    except KlmError as exc:
        log.warning("ignoring %s %s: %s", event.type, event.id, exc)
        return None


async def handle_facts(records: Sequence[ConsumerRecord[bytes, bytes]], deps: Deps) -> None:
    """One batch of ``klm.lifecycle``: project, reschedule, reassess, in one transaction."""
    assert deps.dead_letters is not None
    events = _fresh(await split_batch(records, deps.dead_letters))
    facts = [(e, d) for e in events if (d := _parse_fact(e)) is not None]
    if not facts:
        return
    async with deps.inventory.unit_of_work() as tx:
        fresh = await tx.claim([e.id for e, _ in facts])
        await project(tx, [(e, d) for e, d in facts if e.id in fresh], deps)
    deps.on_commit()
    deps.wake_scheduler()


@dataclass
class Projection:
    """What one batch of facts did to the inventory, before it is written."""

    keys: dict[str, InventoryKey]
    planned: dict[RowId, datetime]
    touched: dict[str, InventoryKey] = field(default_factory=dict)
    retries: list[RowId] = field(default_factory=list)
    records: list[CloudEvent] = field(default_factory=list)

    def refused(self, event: CloudEvent, data: RequestRejected, deps: Deps) -> None:
        """Keygen refused one of our commands: count it once, retry it later under a new id
        (a refused command did not happen, so the new one cannot double it)."""
        key = self.keys.get(data.key_id or event.subject or "")
        row = key and schedule.refused_work(key, self.planned, event.correlationid or "",
                                            data.request_type)
        if key is None or not row:
            return
        self.keys[key.key_id] = self.touched[key.key_id] = note_rejection(
            key, row[1], row[2], schedule.MAX_REFUSALS)
        self.retries.append(row)
        deps.metrics.rejected(row[1], data.code)

    def applied(self, event: CloudEvent, data: EventData, deps: Deps) -> None:
        before = self.keys.get(event.subject or "")
        key = apply(before, event, data)
        if key is None or key == before:
            return
        self.keys[key.key_id] = self.touched[key.key_id] = key
        if isinstance(data, DestructionScheduled):
            record = compliance.override_record(key, deps.policy.of(key), deps.clock(),
                                                deps.day_seconds, event)
            self.records += [record] if record else []


async def _postpone_retries(tx: Tx, batch: Projection, deps: Deps) -> None:
    """A refused command is tried again after its key's policy's redispatch period."""
    by_wait: dict[float, list[RowId]] = {}
    for row in batch.retries:
        key = batch.keys.get(row[0])
        policy = deps.policy.of(key) if key is not None else deps.policy.policy
        by_wait.setdefault(policy.defaults.redispatch_days, []).append(row)
    for wait, rows in sorted(by_wait.items()):
        await tx.postpone(rows, deps.clock() + schedule.days(wait, deps.day_seconds))


def _subject(event: CloudEvent, data: EventData) -> str | None:
    if isinstance(data, RequestRejected):
        return data.key_id or event.subject
    return event.subject


async def project(tx: Tx, facts: Sequence[tuple[CloudEvent, EventData]], deps: Deps) -> None:
    """Apply facts to the inventory, then re-plan and reassess the keys they changed."""
    day = deps.day_seconds
    keys = await tx.load_keys([k for e, d in facts if (k := _subject(e, d))])
    refused = [k for e, d in facts if isinstance(d, RequestRejected) and (k := _subject(e, d))]
    batch = Projection(keys, await tx.planned(refused) if refused else {})
    for event, data in facts:
        if isinstance(data, RequestRejected):
            batch.refused(event, data, deps)
        else:
            batch.applied(event, data, deps)
    changed = sorted(batch.touched.values(), key=lambda k: k.key_id)
    await tx.save_keys(changed)
    await reconcile(tx, changed, deps.policy, day)
    await _postpone_retries(tx, batch, deps)
    changes = compliance.Changes(events=batch.records)
    await assess(tx, changed, deps, changes)
    await _publish_findings(tx, deps, changes)
    deps.metrics.findings(changes)


# ------------------------------------------------------------------ klm.inventory.requests
def _answer(request: CloudEvent, policies: PolicySet, existing: InventoryKey | None
            ) -> CloudEvent:
    try:
        data = parse_data(request)
        if not isinstance(data, ImportObservedKey):
            raise UnknownRequestType(f"rotation does not serve {request.type!r} on this topic")
        if existing is not None and existing.origin == "klm":
            raise RequestInvalid(f"{existing.key_id} is a KLM key, not an observed one",
                                 key_id=existing.key_id)
        # the policy the key will follow says who may import it (an unknown name: refused)
        return observed_fact(request, data, policies.for_key(data.policy))
    except KlmError as exc:
        return rejection(request, exc)


async def import_observed_key(records: Sequence[ConsumerRecord[bytes, bytes]],
                              deps: Deps) -> None:
    """``klm.request.import_observed_key``: one answer per request (fact or rejection); the
    fact reaches the inventory through :func:`handle_facts` like every other fact."""
    assert deps.dead_letters is not None
    requests = _fresh(await split_batch(records, deps.dead_letters))
    if not requests:
        return
    async with deps.inventory.unit_of_work() as tx:
        fresh = await tx.claim([r.id for r in requests])
        todo = [r for r in requests if r.id in fresh]
        named = [str(r.data.get("key_id")) for r in todo if r.data.get("key_id")]
        existing = await tx.read_keys(named) if named else {}
        answers = [_answer(r, deps.policy.policies, existing.get(str(r.data.get("key_id"))))
                   for r in todo]
        await tx.outbox(deps.topics.lifecycle, answers)
    deps.on_commit()


# ------------------------------------------------------------------ due work
@dataclass
class Dispatch:
    to_requests: list[CloudEvent] = field(default_factory=list)
    to_commands: list[CloudEvent] = field(default_factory=list)
    dropped: list[RowId] = field(default_factory=list)
    assess: dict[str, InventoryKey] = field(default_factory=dict)


def _route(rows: Sequence[schedule.DueRow], keys: dict[str, InventoryKey], deps: Deps,
           moment: datetime) -> Dispatch:
    out = Dispatch()
    for row in rows:
        rid: RowId = (row.key_id, row.kind, row.version)
        key = keys.get(row.key_id)
        policy = deps.policy.of(key) if key is not None else deps.policy.policy
        decision = schedule.decide(row, key, policy, moment, deps.day_seconds)
        if decision.drop:
            out.dropped.append(rid)
            continue
        if decision.evaluate and key is not None:
            out.assess[key.key_id] = key
        if decision.command is not None:
            target = out.to_requests if decision.target == "requests" else out.to_commands
            target.append(decision.command)
            deps.metrics.dispatched(row.kind, row.reason)
    return out


async def dispatch_due(deps: Deps) -> int:
    """Send every command that is due; return how many rows were handled.

    ``deps.dispatch_workers`` loops run at once, a batch per transaction each: rows are
    claimed with SKIP LOCKED and re-armed before commit, so neither another loop nor another
    instance sends the same work (and a re-send keeps the same request id). Several loops
    overlap Python's work on one batch with Postgres' work on another."""
    counts = await asyncio.gather(*(_dispatch_loop(deps) for _ in range(deps.dispatch_workers)))
    return sum(counts)


async def _dispatch_loop(deps: Deps) -> int:
    total = 0
    while True:
        handled = await _dispatch_batch(deps)
        total += handled
        if handled < deps.dispatch_batch:
            return total


async def _dispatch_batch(deps: Deps) -> int:
    moment = deps.clock()
    # rows are re-armed in the statement that claims them, before their keys are read: the
    # default policy's redispatch period applies to every key
    policy = deps.policy.policy
    next_at = moment + schedule.days(policy.defaults.redispatch_days, deps.day_seconds)
    async with deps.inventory.unit_of_work() as tx:
        rows = await tx.claim_due(moment, deps.dispatch_batch, next_at)
        if not rows:
            return 0
        keys = await tx.read_keys(sorted({r.key_id for r in rows}))
        plan = _route(rows, keys, deps, moment)
        await tx.outbox(deps.topics.requests, plan.to_requests)
        await tx.outbox(deps.topics.commands, plan.to_commands)
        await tx.delete_rows(plan.dropped)
        changes = compliance.Changes()
        await assess(tx, list(plan.assess.values()), deps, changes)
        await _publish_findings(tx, deps, changes)
    deps.metrics.findings(changes)
    if plan.to_requests or plan.to_commands or changes.events:
        deps.on_commit()
    return len(rows)


# ------------------------------------------------------------------ compliance scan
async def scan_page(deps: Deps, limit: int) -> int | None:
    """Assess (and reschedule) the next page of the inventory; the number of keys, or None
    when another instance holds the scan."""
    async with deps.inventory.unit_of_work() as tx:
        keys = await tx.scan_page(limit)
        if keys is None:
            return None
        await reconcile(tx, keys, deps.policy, deps.day_seconds)
        changes = compliance.Changes()
        await assess(tx, keys, deps, changes)
        await _publish_findings(tx, deps, changes)
    deps.metrics.findings(changes)
    if changes.events:
        deps.on_commit()
    deps.wake_scheduler()
    return len(keys)


# ------------------------------------------------------------------ policy
async def apply_policies(deps: Deps, policies: PolicySet) -> list[str]:
    """Put the set in force. One ``klm.policy.changed`` per policy that differs from the one
    last recorded under its name (by any instance), and per recorded policy no longer loaded
    (``removed``); the scan then re-plans and reassesses everything. Returns the names of the
    policies that changed."""
    events: list[CloudEvent] = []
    async with deps.inventory.unit_of_work() as tx:
        for policy in policies:
            path = policies.origin(policy)
            changed, previous_sha, document = await tx.record_policy(policy, path)
            if changed:
                events.append(_policy_event(PolicyChanged(
                    name=policy.name, version=policy.version, sha256=policy.digest(),
                    previous_sha256=previous_sha, path=path, loaded_by=deps.instance,
                    changed=changed_sections(_previous(document), policy))))
        for gone in await tx.forget_policies(policies.names):
            events.append(_policy_event(PolicyChanged(
                name=gone.name, version=gone.version, sha256=gone.sha256,
                previous_sha256=gone.sha256, path=gone.path or "", loaded_by=deps.instance,
                removed=True)))
        await tx.outbox(deps.topics.lifecycle, events)
    deps.policy.policies = policies
    for event in events:
        log.info("policy %s v%s (%s) %s", event.data["name"], event.data["version"],
                 event.data["sha256"][:12],
                 "no longer loaded" if event.data["removed"] else "in force")
    if events:
        deps.on_commit()
    return [e.data["name"] for e in events]


def _policy_event(data: PolicyChanged) -> CloudEvent:
    return make_event(data.event_type, data, source=schedule.SOURCE)


def _previous(document: dict[str, Any] | None) -> CryptoPolicy | None:
    if document is None:
        return None
    try:
        return CryptoPolicy.model_validate(document)
    except ValueError:  # recorded by an older policy schema: report every section
        return None
