"""Pipelined batch consumption: a subscriber hands each batch to a :class:`BatchPipeline`
and returns at once, so its consumer fetches batch *n+1* while batch *n*'s answers are made
durable (replies acknowledged by Kafka, or the keystore transaction committed) and its
offsets committed. Measured before (docs/benchmarks.md): a batch of one request spent
~10-25 ms waiting in turn for the HSM thread, the reply acks and the offset commit, so at a
steady load requests queued behind those waits.

What keeps "nothing accepted is lost, nothing is doubled" (the subscriber uses
``AckPolicy.MANUAL``: FastStream commits nothing itself):

* offsets are committed explicitly, per partition, up to the longest prefix of batches whose
  work is durable — never the consumer's position, which runs ahead — at most once per
  ``commit_interval`` (and at once when partitions are revoked and at shutdown);
* a batch whose work failed (an infrastructure error: HSM, Postgres, Kafka) is not
  committed, and neither is any batch after it: those are *abandoned* (their serving stops
  at its ordered step, :meth:`Turn.wait`). Once every batch in flight has finished and
  ``retry_delay`` passed, the consumer is rewound to the earliest record of the failed and
  abandoned batches in each partition, and they are delivered again. Work an abandoned batch
  had already done is repeated harmlessly: replies have deterministic ids (clients drop what
  they no longer wait for), requests are deduplicated by the inbox;
* a batch the consumer had already fetched from before a rewind is recognised (its first
  offset is not where the partition was rewound to), dropped, and its partitions rewound;
* when partitions are revoked (rebalance) and at shutdown the pipeline is drained first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from klm_common import inbound_telemetry, telemetry
from klm_common.errors import KlmError
from klm_common.kafka import kafka_security, principal_for
from klm_common.settings import KlmSettings

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """An earlier batch failed: this one is delivered again, not finished."""


@dataclass(eq=False)
class _Batch:
    first: dict[TopicPartition, int]
    after: dict[TopicPartition, int]
    #: True once the batch's work is durable; False if it failed or was abandoned
    served: asyncio.Future[bool]
    #: done once it left the pipeline: durable (its offsets go with the next commit) or
    #: discarded
    settled: asyncio.Future[None]
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Turn:
    """Handed to a batch's serving coroutine: :meth:`wait` returns once every earlier batch
    is durable (for steps that must follow them, e.g. transactions on the same keys), or
    raises :class:`Abandoned` if one of them failed."""

    def __init__(self, previous: asyncio.Future[bool] | None) -> None:
        self._previous = previous

    async def wait(self) -> None:
        if self._previous is not None and not await asyncio.shield(self._previous):
            raise Abandoned


Serve = Callable[[Turn], Awaitable[None]]


def _span(records: Iterable[ConsumerRecord[bytes, bytes]]
          ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    first: dict[TopicPartition, int] = {}
    after: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        first[tp] = min(first.get(tp, record.offset), record.offset)
        after[tp] = max(after.get(tp, 0), record.offset + 1)
    return first, after


class BatchPipeline(ConsumerRebalanceListener):  # type: ignore[misc]
    """Serves the batches of ONE consumer with up to ``depth`` of them in flight; also its
    rebalance listener (pass it as the subscriber's ``listener``)."""

    def __init__(self, name: str, *, depth: int = 4, retry_delay: float = 1.0,
                 commit_interval: float = 0.05) -> None:
        self.name = name
        self.depth = depth
        self.retry_delay = retry_delay
        self.commit_interval = commit_interval
        #: offsets of settled batches not committed yet, and when the last commit went out
        self._unflushed: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        self._commit_lock = asyncio.Lock()
        self._consumer: Any = None
        self._batches: deque[_Batch] = deque()
        self._rewind: dict[TopicPartition, int] = {}
        #: partition → offset it was rewound to, until a batch starting there arrives
        self._expect: dict[TopicPartition, int] = {}
        self._recovery: asyncio.Task[None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._commit_wanted = asyncio.Event()
        self._closing = False
        self.settled_batches = 0
        self.rewinds = 0

    # ---- the subscriber's side ----------------------------------------------------------
    async def submit(self, consumer: Any, records: Sequence[ConsumerRecord[bytes, bytes]],
                     serve: Serve) -> None:
        """Start serving ``records`` and return as soon as the pipeline has room."""
        self._consumer = consumer
        if self._closing or not records:
            return
        while True:
            if self._recovery is not None:  # the back-off; then this batch is stale
                await asyncio.shield(self._recovery)
            if self._stale(records):
                return
            if len(self._batches) < self.depth:
                break
            await asyncio.wait([self._batches[0].settled])
        self._start_committer()
        loop = asyncio.get_running_loop()
        first, after = _span(records)
        previous = self._batches[-1].served if self._batches else None
        batch = _Batch(first, after, loop.create_future(), loop.create_future())
        self._batches.append(batch)
        # the batch's spans end, and its requests are counted, once its work is durable
        inbound_telemetry.defer_close(batch.served)
        batch.task = loop.create_task(self._serve(batch, serve, Turn(previous)),
                                      name=f"{self.name}-batch")

    async def _serve(self, batch: _Batch, serve: Serve, turn: Turn) -> None:
        ok = False
        try:
            await serve(turn)
            await turn.wait()  # durable only once every earlier batch is
            ok = True
        except Abandoned:
            pass
        except Exception as exc:
            log.warning("%s: batch not served (%s); it will be redelivered", self.name,
                        exc if isinstance(exc, KlmError) else repr(exc))
        finally:
            batch.served.set_result(ok)
            if not ok:
                self._fail(batch)
            self._settle_durable()
            self._commit_wanted.set()

    # ---- failure and rewind -------------------------------------------------------------
    def _fail(self, batch: _Batch) -> None:
        for tp, offset in batch.first.items():
            self._rewind[tp] = min(self._rewind.get(tp, offset), offset)
        if self._recovery is None and not self._closing:
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(), name=f"{self.name}-rewind")

    async def _recover(self) -> None:
        """Once every batch in flight has finished (the later ones abandon), wait
        ``retry_delay`` and rewind the consumer to the first record not served."""
        try:
            while pending := [b.served for b in self._batches if not b.served.done()]:
                await asyncio.wait(pending)
            await asyncio.sleep(self.retry_delay)
            for batch in [b for b in self._batches if not b.served.result()]:
                self._batches.remove(batch)
                batch.settled.set_result(None)
            rewind, self._rewind = self._rewind, {}
            self._seek(rewind)
            self.rewinds += 1
        finally:
            self._recovery = None

    def _stale(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> bool:
        """True (and its partitions rewound) for a batch fetched before a rewind."""
        first, _ = _span(records)
        if all(self._expect.get(tp, offset) == offset for tp, offset in first.items()):
            for tp in first:
                self._expect.pop(tp, None)
            return False
        self._seek({tp: min(self._expect.get(tp, offset), offset)
                    for tp, offset in first.items()})
        return True

    def _seek(self, offsets: dict[TopicPartition, int]) -> None:
        assigned = self._consumer.assignment() if self._consumer is not None else set()
        for tp, offset in offsets.items():
            if tp in assigned:  # a revoked partition restarts from its committed offset
                self._consumer.seek(tp, offset)
                self._expect[tp] = offset
        if offsets:
            log.warning("%s: rewound %s", self.name,
                        ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in offsets.items()))

    # ---- offsets ----------------------------------------------------------------------
    def _start_committer(self) -> None:
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(
                self._commit_forever(), name=f"{self.name}-commits")

    async def _commit_forever(self) -> None:
        """Settle durable batches at once (room in the pipeline), but commit their offsets
        at most once per ``commit_interval``: at a steady load of one-request batches an
        offset commit per batch was one Kafka request in five. A commit that waits costs
        nothing but a longer redelivery after a crash (answers are idempotent)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            if not self._unflushed:
                continue
            if (wait := self._last_commit + self.commit_interval - loop.time()) > 0:
                await asyncio.sleep(wait)
            await self._flush()

    def _settle_durable(self) -> None:
        """Take the longest prefix of durable batches out of the pipeline (room for the
        next); their offsets (later batches' are higher) wait for the next commit."""
        while self._batches and self._batches[0].served.done() \
                and self._batches[0].served.result():
            batch = self._batches.popleft()
            self._unflushed.update(batch.after)
            self.settled_batches += 1
            batch.settled.set_result(None)

    async def _flush(self) -> None:
        async with self._commit_lock:  # one at a time: a later commit never lands first
            offsets, self._unflushed = self._unflushed, {}
            if not offsets:
                return
            self._last_commit = asyncio.get_running_loop().time()
            try:
                await self._consumer.commit(offsets)
            except Exception as exc:
                log.warning("%s: offsets not committed (%s); a later commit or a redelivery "
                            "covers them", self.name, type(exc).__name__)
                for tp, offset in offsets.items():  # retried with the next commit
                    self._unflushed.setdefault(tp, offset)

    # ---- rebalance and shutdown ---------------------------------------------------------
    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every batch in flight is committed or discarded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._batches or self._recovery is not None:
                    waits: list[asyncio.Future[Any]] = [b.settled for b in self._batches]
                    if self._recovery is not None:
                        waits.append(self._recovery)
                    await asyncio.wait(waits)
                await self._flush()

    async def close(self) -> None:
        """At shutdown: serve nothing new, finish what is in flight, stop committing."""
        self._closing = True
        await self.drain()
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.drain()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._expect.clear()  # positions now come from the committed offsets


class PipelinedConsumer:
    """A pipelined subscriber on a plain aiokafka consumer, for keygen's hot topics
    (``klm.requests`` and ``klm.crypto.requests``, each also per tenant by pattern).

    FastStream's consume path and middlewares were ~27 % of keygen's CPU serving small
    batches (py-spy, docs/benchmarks.md). Here ``getmany`` waits until records arrive, and
    a batch goes straight to its :class:`BatchPipeline` (also the rebalance listener) under
    KLM's inbound telemetry (per-record spans continuing each record's trace, request
    metrics, lag). Offsets are committed by the pipeline only (no auto-commit), so the
    delivery rules above hold."""

    def __init__(self, name: str, settings: KlmSettings, group_id: str,
                 serve: Callable[[Sequence[ConsumerRecord[bytes, bytes]]], Serve], *,
                 topic: str | None = None, pattern: str | None = None, depth: int = 4,
                 retry_delay: float = 1.0, client_id: str = "klm-keygen") -> None:
        if (topic is None) == (pattern is None):
            raise ValueError("a PipelinedConsumer reads one topic or one pattern")
        self.name = name
        self.pipeline = BatchPipeline(name, depth=depth, retry_delay=retry_delay)
        self._serve = serve
        self._topic, self._pattern = topic, pattern
        self._max_records = settings.batch_max_records
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, client_id=client_id,
            group_id=f"{settings.topic_prefix}{group_id}",  # per namespace: see kafka.py
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=30000, heartbeat_interval_ms=3000,
            max_poll_interval_ms=300000,
            **kafka_security(settings, principal_for(client_id)))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._topic is not None:
            self._consumer.subscribe([self._topic], listener=self.pipeline)
        else:
            self._consumer.subscribe(pattern=self._pattern, listener=self.pipeline)
        await self._consumer.start()
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                           name=f"{self.name}-consumer")

    async def stop(self) -> None:
        """Serve nothing new, send and commit what is in flight, then leave the group."""
        await self.pipeline.close()
        if self._task is None:  # never started (the HSM never opened)
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        tracer = trace.get_tracer("klm.inbound")
        while True:
            try:
                fetched = await self._consumer.getmany(timeout_ms=1000,
                                                       max_records=self._max_records)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:  # aiokafka reconnects by itself; try again shortly
                log.warning("%s: fetch failed (%s); retrying", self.name, exc)
                await asyncio.sleep(1.0)
                continue
            records = [record for batch in fetched.values() for record in batch]
            if not records:
                continue
            if not telemetry.exports_spans():
                await self._submit(records)
                continue
            # named and shaped like FastStream's batch span, which the other services keep
            with tracer.start_as_current_span(
                    f"{records[0].topic} process", kind=SpanKind.CONSUMER,
                    attributes={"messaging.system": "kafka",
                                "messaging.operation": "process",
                                "messaging.destination.name": records[0].topic,
                                "messaging.batch.message_count": len(records)}):
                await self._submit(records)

    async def _submit(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        await inbound_telemetry.observed(
            records, self._consumer,
            lambda: self.pipeline.submit(self._consumer, records, self._serve(records)))
