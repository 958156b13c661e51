"""``klm.crypto.requests``: usage operations (sign, verify, encrypt, decrypt, mac,
mac_verify, wrap, unwrap), answered on the reply topic each request names.

Operators write the shared ``klm.crypto.requests`` and may name any owner; a tenant writes
its own ``klm.crypto.requests.<tenant>`` (the only one its Kafka login may write, see
:mod:`klm_common.authorization`), may use only its own keys (``forbidden`` otherwise) and
gets its answers only on its own reply topics ``klm.crypto.replies.<tenant>-*``.

A Kafka batch flows: parse (bad bytes, or no safe reply topic → DLQ) → load the batch's
keys (one query) → authorise each request (tenant, usage, version state; refusals are
answered and misuse attempts recorded as ``klm.key.usage_denied`` facts) → ONE HSM call
for every granted operation → refusal facts committed (outbox) → replies published and
acknowledged → offsets committed by the caller. A redelivered batch makes the same replies
(same ids); clients drop answers they no longer wait for.

Successful uses are counted in memory and summarised per key and interval
(``klm.key.usage_summary`` + ``key_usage.last_used_at``), not one event per operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from klm_common.authorization import tenant_of_topic, tenant_request_topics
from klm_common.envelope import CloudEvent, now
from klm_common.errors import (
    Forbidden,
    InfrastructureError,
    KlmError,
    RequestInvalid,
    UnknownRequestType,
)
from klm_common.events import REPLY_TOPIC_BASE, CryptoReply, parse_data
from klm_common.kafka import DeadLetters, Inbound, split_batch
from klm_common.states import TERMINAL_STATES
from klm_common.topics import CRYPTO_REQUESTS
from klm_keygen.adapters.hsm_usage import (
    HsmOp,
    HsmOutcome,
    KeyHandles,
    KeyVersionRef,
    evict_keys,
    execute_batch,
)
from klm_keygen.adapters.usage_store import KeyCache, PgUsageStore, UsageStorePort
from klm_keygen.domain.usage import (
    DENIAL_CODES,
    OPERATION_OF,
    CryptoRequest,
    Grant,
    Operation,
    UsageKey,
    UsageTally,
    authorise,
    b64,
    decode_b64,
    denial_fact,
    refusal,
    reply_event,
    reply_topic_allowed,
    summary_event,
)
from klm_keygen.handlers.pipeline import PipelinedConsumer, Serve

if TYPE_CHECKING:
    from klm_keygen.bootstrap import Keygen

log = logging.getLogger(__name__)
GROUP_ID = "klm-keygen-usage"
#: its own group: members of one group subscribing to different topics rebalance both
TENANT_GROUP_ID = "klm-keygen-usage-tenants"
T = TypeVar("T")


class UsageSettings(BaseSettings):
    """Usage knobs (``KLM_USAGE_*``); the reply prefix defaults to
    ``<topic prefix>klm.crypto.replies.``."""

    model_config = SettingsConfigDict(env_prefix="KLM_USAGE_", extra="ignore")
    summary_seconds: float = 60.0
    reply_prefix: str | None = None
    cache_size: int = 4096
    #: how long a key record may be served from memory (0: read Postgres every batch)
    key_cache_seconds: float = 2.0
    #: batches served at once: the next is fetched and served while earlier replies wait
    #: for their acks and offsets are committed (see :mod:`.pipeline`); 1: one at a time
    pipeline_depth: int = Field(4, ge=1)


class HsmRunner(Protocol):
    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


class ReplySender(Protocol):
    async def send(self, replies: Sequence[tuple[str, CloudEvent]]) -> None: ...


class KafkaReplies:
    """Publishes replies straight to the requesters' topics and waits for the acks."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def send(self, replies: Sequence[tuple[str, CloudEvent]]) -> None:
        if not replies:
            return
        headers = [("content-type", b"application/cloudevents+json")]
        futures = [await self._producer.send(topic, event.to_bytes(), key=event.partition_key,
                                             headers=headers)
                   for topic, event in replies]
        await asyncio.gather(*futures)


@dataclass
class UsageDeps:
    hsm: HsmRunner
    store: UsageStorePort
    replies: ReplySender
    dead_letters: DeadLetters
    reply_prefix: str
    handles: KeyHandles = field(default_factory=KeyHandles)
    tally: UsageTally = field(default_factory=lambda: UsageTally(now()))
    on_commit: Callable[[], None] = lambda: None
    retry_delay: float = 1.0
    clock: Callable[[], datetime] = now
    unsent: list[Any] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Pending:
    """A request that parsed and has a reply topic keygen may write to."""

    event: CloudEvent
    data: CryptoRequest
    operation: Operation
    #: the tenant whose topic the request came from; None: the operators' shared topic
    tenant: str | None = None


#: requests per HSM call: within a batch the HSM works on one chunk while the event loop
#: parses the next and answers the previous, and the first answers leave early (with whole
#: batches of 256 a closed loop ran in lock-step: parse, then HSM, then answer, ~165 ms a turn)
CHUNK = 64


@dataclass
class _Chunk:
    """One chunk's requests, authorised, with its HSM call under way."""

    granted: list[tuple[Pending, Grant, HsmOp]]
    outcomes: asyncio.Future[list[Any]]
    replies: list[tuple[str, CloudEvent]] = field(default_factory=list)
    denials: list[CloudEvent] = field(default_factory=list)


async def _handle(records: Sequence[ConsumerRecord[bytes, bytes]], deps: UsageDeps) -> None:
    """Serve one batch, chunk by chunk (see :data:`CHUNK`); return once every reply is
    acknowledged by Kafka; raise (the batch is delivered again) if the HSM, Postgres or
    Kafka failed — replies have deterministic ids, so a repeated one is dropped."""
    sends: list[asyncio.Future[None]] = []
    chunks: list[_Chunk] = []
    try:
        for start in range(0, len(records), CHUNK):
            chunks.append(await _prepare(records[start:start + CHUNK], deps))
            if len(chunks) > 1:  # this chunk's HSM call is queued: answer the previous one
                sends.append(await _answer(chunks[-2], deps))
        if chunks:
            sends.append(await _answer(chunks[-1], deps))
        await asyncio.gather(*sends)
    finally:  # after a failure: nothing left running unobserved
        pending = [c.outcomes for c in chunks] + sends
        await asyncio.gather(*pending, return_exceptions=True)


async def _prepare(records: Sequence[ConsumerRecord[bytes, bytes]], deps: UsageDeps) -> _Chunk:
    """Parse, authorise and start the HSM call of one chunk (refusals are answered with it)."""
    replies: list[tuple[str, CloudEvent]] = []
    letters: list[CloudEvent] = []
    inbound = await split_batch(records, deps.dead_letters)
    pending = [p for p in (_accept(i, deps, replies, letters) for i in inbound) if p]
    await deps.dead_letters.publish(letters)
    keys = await deps.store.load_keys([p.data.key_id for p in pending])
    denials: list[CloudEvent] = []
    granted: list[tuple[Pending, Grant, HsmOp]] = []
    for item in pending:
        try:
            if item.tenant is not None and item.data.owner != item.tenant:
                raise Forbidden(f"tenant {item.tenant!r} may use only its own keys, not "
                                f"those of {item.data.owner!r}", tenant=item.tenant)
            grant = authorise(item.data, item.operation, keys.get(item.data.key_id))
            granted.append((item, grant, hsm_op(item, grant)))
        except KlmError as exc:
            _refuse(item, exc, keys.get(item.data.key_id), replies, denials)
    await _evict_unusable(keys, deps)
    outcomes: asyncio.Future[list[Any]] = asyncio.ensure_future(
        deps.hsm.run(execute_batch, deps.handles, [g[2] for g in granted]) if granted
        else _nothing())
    return _Chunk(granted, outcomes, replies, denials)


async def _nothing() -> list[Any]:
    return []


async def _answer(chunk: _Chunk, deps: UsageDeps) -> asyncio.Future[None]:
    """Build the chunk's replies from its HSM outcomes, record its refusals, and start
    sending (the returned future is done once Kafka acknowledged them all)."""
    at = deps.clock()
    for (item, grant, _), outcome in zip(chunk.granted, await chunk.outcomes, strict=True):
        if isinstance(outcome, KlmError):
            _refuse(item, outcome, grant.key, chunk.replies, chunk.denials)
            continue
        deps.tally.record(grant, item.operation, at)
        chunk.replies.append((item.data.reply_to, success(item, grant, outcome)))
    if chunk.denials:  # committed before anyone sees the refusal
        await deps.store.record_denials(chunk.denials)
        deps.on_commit()
    return asyncio.ensure_future(deps.replies.send(chunk.replies))


def _accept(inbound: Inbound, deps: UsageDeps, replies: list[tuple[str, CloudEvent]],
            letters: list[CloudEvent]) -> Pending | None:
    """Parse one request. Without a reply topic keygen may write to, it cannot be
    answered: it goes to the DLQ. Otherwise a bad payload is answered with its code."""
    event = inbound.event
    reply_to = event.data.get("reply_to")
    tenant = tenant_of_topic(inbound.record.topic)
    # a tenant's answers go to its own reply topics only (the ones its login may read)
    allowed = deps.reply_prefix if tenant is None else f"{deps.reply_prefix}{tenant}-"
    if not isinstance(reply_to, str) or not reply_topic_allowed(reply_to, allowed):
        letters.append(deps.dead_letters.letter(
            inbound.record, f"reply_to {str(reply_to)[:100]!r} is not a topic under "
                            f"{allowed!r}"))
        return None
    operation = OPERATION_OF.get(event.type)
    try:
        if operation is None:
            raise UnknownRequestType(f"keygen serves no {event.type!r} on the crypto topic")
        data = parse_data(event)
    except KlmError as exc:
        replies.append((reply_to, refusal(event, event.type, exc, event.subject)))
        return None
    return Pending(event, data, operation, tenant)  # type: ignore[arg-type]


def _refuse(item: Pending, error: KlmError, key: UsageKey | None,
            replies: list[tuple[str, CloudEvent]], denials: list[CloudEvent]) -> None:
    replies.append((item.data.reply_to,
                    refusal(item.event, item.operation.value, error, item.data.key_id)))
    if error.code in DENIAL_CODES and key is not None:
        denials.append(denial_fact(item.event, item.data, item.operation, error, key))


async def _evict_unusable(keys: dict[str, UsageKey], deps: UsageDeps) -> None:
    """A destroyed key or version must not live on in the handle cache."""
    gone = [k.key_id for k in keys.values()
            if k.state in TERMINAL_STATES or any(v.state in TERMINAL_STATES
                                                  for v in k.versions.values())]
    if gone:
        await deps.hsm.run(evict_keys, deps.handles, gone)


def hsm_op(item: Pending, grant: Grant) -> HsmOp:
    """The HSM's view of a granted request: decoded inputs and the version to use."""
    data, key, version = item.data, grant.key, grant.version
    ref = KeyVersionRef(key.key_id, version.version, key.algorithm, key.size, key.curve,
                        key.usages, version.wrapped, version.hsm_object_id, version.public_der)
    scheme = getattr(data, "scheme", None)
    if scheme is not None and key.algorithm.value != "RSA":
        raise RequestInvalid("scheme applies to RSA keys only")
    return HsmOp(
        operation=item.operation, ref=ref,
        data=decode_b64(_input(data), "input") or b"",
        signature=decode_b64(getattr(data, "signature_b64", None)
                             or getattr(data, "mac_b64", None), "signature") or b"",
        aad=decode_b64(getattr(data, "aad_b64", None), "aad_b64"),
        nonce=decode_b64(getattr(data, "nonce_b64", None), "nonce_b64"),
        hash_name=getattr(data, "hash", None), scheme=scheme)


def _input(data: CryptoRequest) -> str | None:
    for name in ("data_b64", "plaintext_b64", "ciphertext_b64", "key_b64", "wrapped_b64"):
        value = getattr(data, name, None)
        if value is not None:
            return str(value)
    return None


_OUTPUT_FIELD = {Operation.SIGN: "signature_b64", Operation.ENCRYPT: "ciphertext_b64",
                 Operation.DECRYPT: "plaintext_b64", Operation.MAC: "mac_b64",
                 Operation.WRAP: "wrapped_b64", Operation.UNWRAP: "key_b64"}


def success(item: Pending, grant: Grant, outcome: HsmOutcome) -> CloudEvent:
    """The reply: the output plus the envelope (key id, version, algorithm)."""
    fields: dict[str, Any] = {}
    if item.operation in _OUTPUT_FIELD:
        fields[_OUTPUT_FIELD[item.operation]] = b64(outcome.output)
    if outcome.nonce is not None:
        fields["nonce_b64"] = b64(outcome.nonce)
    if outcome.valid is not None:
        fields["valid"] = outcome.valid
    reply = CryptoReply(operation=item.operation.value, ok=True, key_id=grant.key.key_id,
                        version=grant.version.version, algorithm=outcome.algorithm,
                        warning=grant.warning, **fields)
    return reply_event(item.event, item.operation.value, reply)


# ---- usage summaries ----------------------------------------------------------------------
async def flush_usage(deps: UsageDeps) -> int:
    """End the interval: one summary fact per used key + last-used times, one transaction.
    Summaries that could not be stored are kept and stored with the next flush."""
    summaries = deps.unsent + deps.tally.drain(deps.clock())
    if not summaries:
        return 0
    try:
        await deps.store.record_usage(summaries, [summary_event(s) for s in summaries])
    except InfrastructureError:
        deps.unsent = summaries
        raise
    deps.unsent = []
    deps.on_commit()
    return len(summaries)


async def flush_usage_forever(deps: UsageDeps, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await flush_usage(deps)
        except InfrastructureError as exc:
            log.warning("usage summaries kept for the next interval (%s)", exc)


class HandleEvictions:
    """Drops the unwrapped handles of keys whose state changed (a destroyed key's material
    must not outlive it in the HSM session), in one HSM call for all pending keys."""

    def __init__(self, hsm: HsmRunner, handles: KeyHandles) -> None:
        self._hsm = hsm
        self._handles = handles
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def note(self, key_id: str) -> None:
        self._pending.add(key_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            key_ids, self._pending = list(self._pending), set()
            try:
                dropped = await self._hsm.run(evict_keys, self._handles, key_ids)
                if dropped:
                    log.info("dropped %d unwrapped handle(s) of changed keys %s", dropped,
                             ", ".join(key_ids[:5]))
            except KlmError as exc:  # a lost session takes its handles with it anyway
                log.warning("handle eviction skipped (%s)", exc.code)


def usage_deps(keygen: Keygen, settings: UsageSettings) -> UsageDeps:
    prefix = settings.reply_prefix or f"{keygen.settings.topic_prefix}{REPLY_TOPIC_BASE}"
    handles = KeyHandles(settings.cache_size)
    evictions = HandleEvictions(keygen.hsm, handles)
    cache = KeyCache(keygen.settings.service_dsn("keygen"), settings.key_cache_seconds,
                     on_change=evictions.note)
    cache.start()
    return UsageDeps(
        hsm=keygen.hsm, store=PgUsageStore(keygen.pool, keygen.topics.lifecycle, cache),
        replies=KafkaReplies(keygen.producer),
        dead_letters=DeadLetters(keygen.broker, keygen.topics, "keygen-usage"),
        reply_prefix=prefix, handles=handles, on_commit=keygen.relay.wake)


def register(keygen: Keygen) -> None:
    """Consume ``klm.crypto.requests`` and every tenant's ``klm.crypto.requests.<tenant>``
    (by pattern) with a :class:`PipelinedConsumer` each — batch *n+1* is served while batch
    *n*'s replies wait for their acks; offsets are committed once the replies of every batch
    up to them are acknowledged — and start the summary timer."""
    settings = UsageSettings()
    deps = usage_deps(keygen, settings)

    def serve(records: Sequence[ConsumerRecord[bytes, bytes]]) -> Serve:
        return lambda _: _handle(records, deps)

    keygen.consumers += [
        PipelinedConsumer("usage", keygen.settings, GROUP_ID, serve,
                          topic=keygen.topics.crypto_requests, depth=settings.pipeline_depth,
                          retry_delay=deps.retry_delay),
        PipelinedConsumer("tenant-usage", keygen.settings, TENANT_GROUP_ID, serve,
                          pattern=tenant_request_topics(keygen.topics, CRYPTO_REQUESTS),
                          depth=settings.pipeline_depth, retry_delay=deps.retry_delay)]
    timer = asyncio.get_running_loop().create_task(
        flush_usage_forever(deps, settings.summary_seconds), name="usage-summaries")
    deps.tasks.add(timer)
    timer.add_done_callback(deps.tasks.discard)

    async def last_summary() -> None:
        """The interval in progress is summarised at stop, not lost."""
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer
        try:
            await flush_usage(deps)
        except InfrastructureError as exc:
            log.warning("last usage summaries not stored at stop (%s)", exc)

    keygen.on_stop.append(last_summary)
