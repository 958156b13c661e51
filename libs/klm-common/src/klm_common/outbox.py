"""Transactional outbox: events are saved with the state change, then relayed to Kafka.

A handler calls :func:`add_to_outbox` inside its transaction; :class:`OutboxRelay` publishes
committed rows in ``seq`` order with an idempotent producer and deletes them once Kafka has
acknowledged them (acks=all). A crash between the two republishes — consumers dedupe by
event ``id`` — so nothing is lost and nothing is applied twice.

A service on a hot path may also publish its committed rows straight from memory
(:meth:`OutboxRelay.claim` in the transaction, :meth:`OutboxRelay.publish_committed` after
its commit): the rows are still written in the transaction — that is the durability
guarantee — but the relay need not read them back (one transaction and one query fewer per
batch). Nothing is published before its transaction committed; once Kafka acknowledged
them, their rows are deleted in one statement. What the direct path could not publish (Kafka
or Postgres failed, a crash between produce and delete) is left in the table, and the relay
publishes it again with the SAME event ids, which consumers dedupe.

Every service's migrations create the same table::

    CREATE TABLE outbox (seq bigserial PRIMARY KEY, topic text NOT NULL, key bytea,
                         value bytea NOT NULL, headers jsonb NOT NULL DEFAULT '{}',
                         created_at timestamptz NOT NULL DEFAULT now());
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from klm_common import inbound_telemetry, metrics, telemetry
from klm_common.background import BackgroundTask, Wakeup
from klm_common.envelope import CloudEvent

log = logging.getLogger(__name__)

#: only one relay per schema publishes at a time (keeps per-key order across instances)
RELAY_LOCK_ID = 7243100
#: the relay's transaction only deletes rows Kafka already has: if a crash loses that commit
#: the rows are published again and consumers drop the duplicates by event id — so it need
#: not wait for the WAL flush (synchronous_commit off, this transaction only)
_LOCKED_BATCH = """
    WITH relay_lock AS MATERIALIZED (
        SELECT pg_try_advisory_xact_lock($1) AS held,
               set_config('synchronous_commit', 'off', true) AS no_flush_wait)
    SELECT relay_lock.held, o.* FROM relay_lock LEFT JOIN LATERAL (
        SELECT seq, topic, key, value, headers FROM outbox
        WHERE relay_lock.held AND seq <> ALL($3::bigint[]) ORDER BY seq LIMIT $2) o ON true"""
#: rows published from memory (see OutboxRelay.publish_committed): like the relay's delete,
#: a lost commit only means a republish, so no wait for the WAL flush
_DELETE_PUBLISHED = """
    WITH no_flush_wait AS MATERIALIZED (
        SELECT set_config('synchronous_commit', 'off', true) AS setting)
    DELETE FROM outbox WHERE seq = ANY($1::bigint[])
      AND EXISTS (SELECT FROM no_flush_wait)"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox row as written: what the relay would read back, kept in memory."""

    seq: int
    topic: str
    key: bytes | None
    value: bytes
    #: the row's ``headers`` (JSON): content type and the trace context to continue
    headers: str


@dataclass(frozen=True, slots=True)
class OutboxBatch:
    """Events serialised for the outbox, one list per column, before they are inserted (by
    :func:`add_to_outbox`, or inside a larger statement: keygen's
    ``adapters/keystore.py`` ``_SAVE_NEW``)."""

    topic: str
    events: Sequence[CloudEvent]
    keys: list[bytes | None]
    values: list[bytes]
    #: per event: content type and the trace context to continue — that of the inbound
    #: record the event answers when a batch consumer is handling one (see
    #: :mod:`klm_common.inbound_telemetry`), else the current one
    headers: list[str]

    @classmethod
    def of(cls, topic: str, events: Sequence[CloudEvent]) -> OutboxBatch:
        batch = inbound_telemetry.current_batch()
        current = _headers_json(None)
        headers = []
        for ev in events:
            context = batch.context_for(ev) if batch is not None else None
            headers.append(current if context is None else _headers_json(context))
        return cls(topic, events, [ev.partition_key for ev in events],
                   [ev.to_bytes() for ev in events], headers)

    def written(self, seqs: Sequence[int], kept: Sequence[int] | None = None
                ) -> list[OutboxRow]:
        """The rows as written: the events at positions ``kept`` (all by default), in order,
        got ``seqs`` (drawn in insertion order). Their requests are answered (telemetry)."""
        kept = range(len(self.events)) if kept is None else kept
        if len(seqs) != len(kept):
            raise AssertionError(f"{len(seqs)} outbox rows written for {len(kept)} events")
        inbound_telemetry.note_answers(self.events[i] for i in kept)
        return [OutboxRow(seq, self.topic, self.keys[i], self.values[i], self.headers[i])
                for seq, i in zip(sorted(seqs), kept, strict=True)]


async def add_to_outbox(conn: asyncpg.Connection, topic: str,
                        events: Sequence[CloudEvent]) -> list[OutboxRow]:
    """Queue ``events`` for ``topic`` in the caller's transaction, with the trace context
    (:class:`OutboxBatch`). Returns the rows written, in the events' order (for
    :meth:`OutboxRelay.claim`)."""
    if not events:
        return []
    batch = OutboxBatch.of(topic, events)
    # one statement for the batch (unnest keeps the order, so seq follows the events' order)
    seqs = await conn.fetch(
        "INSERT INTO outbox (topic, key, value, headers) "
        "SELECT $1, k, v, h::jsonb FROM unnest($2::bytea[], $3::bytea[], $4::text[]) "
        "WITH ORDINALITY AS e(k, v, h, n) ORDER BY n RETURNING seq",
        topic, batch.keys, batch.values, batch.headers)
    return batch.written([r["seq"] for r in seqs])


def _headers_json(context: Context | None) -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return json.dumps({"content-type": "application/cloudevents+json", **carrier})


class _LeftBehind(Exception):
    """Rows queued for a direct publish after an earlier one failed: left to the relay."""


@dataclass(slots=True)
class _InFlight:
    """Rows published from memory, waiting for Kafka's acknowledgements."""

    rows: Sequence[OutboxRow]
    acks: list[asyncio.Future[Any]]
    spans: list[Any]
    started: float


class OutboxRelay(BackgroundTask):
    """Background task publishing the outbox; :meth:`wake` after a commit for low latency,
    or hand it the committed rows (:meth:`claim`, :meth:`publish_committed`) to publish
    them from memory.

    Order: rows published from memory go out in commit order (one sender task). While rows
    are *left behind* in the table (at start, after a crash; after a failed direct publish)
    new rows are not published directly but left to the relay, which reads in ``seq``
    order, until a relay round (holding the relay lock) finds nothing left: so a backlog
    goes out before what followed it, as with the relay alone. Under a sustained load that
    may take until the load pauses; meanwhile it is the relay's pace, as before. Rows this
    process claimed are skipped by its relay; another instance's relay may still publish
    them in the moment before their delete — a duplicate with the same event id, which
    consumers drop."""

    task_name = "outbox-relay"

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, *, batch: int = 1000,
                 idle_poll: float = 0.5, delete_interval: float = 0.02) -> None:
        self._pool = pool
        self._producer = producer
        self._batch = batch
        self._idle_poll = idle_poll
        #: rows published from memory are deleted at most once per interval (all that were
        #: acknowledged meanwhile in one statement): with one-request batches a delete per
        #: batch was one Postgres round trip in seven
        self._delete_interval = delete_interval
        self._acknowledged: list[OutboxRow] = []
        self._delete_wanted = asyncio.Event()
        #: per relay round in progress: the seqs the direct path settled meanwhile
        self._settled_in_rounds: list[set[int]] = []
        self._wakeup = Wakeup()
        self.published = 0
        self.backlog = 0
        self.healthy = True
        #: seqs this process publishes from memory (written, in flight, or being deleted)
        self._claimed: set[int] = set()
        #: True while rows may be left in the table for the relay (start: a crash may have)
        self._behind = True
        #: bumped whenever rows are left to the relay (see _settle_behind)
        self._left_behind = 0
        self._outgoing: deque[Sequence[OutboxRow]] = deque()
        self._outgoing_ready = asyncio.Event()
        self._in_flight: deque[_InFlight] = deque()
        self._acks_ready = asyncio.Event()
        self._direct_tasks: list[asyncio.Task[None]] = []
        #: set whenever claimed rows are settled (deleted, left to the relay, rolled back)
        self._settled = asyncio.Event()
        #: stop(): the loop ends after a round that found nothing to publish
        self._stopping = False

    def wake(self) -> None:
        self._wakeup.set()

    # ---- publishing committed rows from memory ------------------------------------------
    def claim(self, rows: Sequence[OutboxRow]) -> bool:
        """Called in the transaction that wrote ``rows`` (:func:`add_to_outbox`): True if
        this process will publish them once it committed (:meth:`publish_committed`; or
        :meth:`unclaim` if it rolled back); False if they are left to the relay (rows are
        left behind, or the relay is not running) — then :meth:`left_committed` after the
        commit."""
        if not rows or self._behind or self._task is None:
            return False
        self._claimed.update(r.seq for r in rows)
        return True

    def left_committed(self) -> None:
        """Rows :meth:`claim` left to the relay are committed: the relay publishes them
        before anything is published from memory again (a later fact on the same key
        must not overtake them)."""
        self._behind = True
        self._left_behind += 1
        self.wake()

    def unclaim(self, rows: Sequence[OutboxRow]) -> None:
        """The transaction that wrote claimed ``rows`` did not commit: they do not exist."""
        self._claimed.difference_update(r.seq for r in rows)
        self._settled.set()

    def publish_committed(self, rows: Sequence[OutboxRow]) -> None:
        """Publish claimed ``rows`` whose transaction HAS committed (never before: a fact
        must not leave before the state it announces is durable). Returns at once; the rows
        are produced in the order of these calls and deleted once Kafka acknowledged them."""
        if not rows:
            return
        self._outgoing.append(rows)
        self._outgoing_ready.set()

    async def _send_direct(self) -> None:
        while True:
            self._outgoing_ready.clear()
            while self._outgoing:
                rows = self._outgoing[0]
                started = time.perf_counter()
                acks, spans = [], []
                parsed: dict[str, list[tuple[str, bytes]]] = {}
                try:
                    if self._behind:  # an earlier direct publish failed: keep the order
                        raise _LeftBehind
                    for row in rows:
                        headers, span = _direct_headers(row, parsed)
                        spans.append(span)
                        acks.append(await self._producer.send(row.topic, row.value,
                                                              key=row.key, headers=headers))
                except Exception as exc:
                    for span in spans:
                        span.end()
                    self._leave_to_relay(rows, exc)
                else:
                    self._in_flight.append(_InFlight(rows, acks, spans, started))
                    self._acks_ready.set()
                finally:
                    self._outgoing.popleft()
            await self._outgoing_ready.wait()

    async def _ack_direct(self) -> None:
        """Wait for the acknowledgements in order; hand the acknowledged rows to
        :meth:`_delete_acknowledged`."""
        while True:
            self._acks_ready.clear()
            while self._in_flight:
                flight = self._in_flight[0]
                try:
                    await asyncio.gather(*flight.acks)
                except Exception as exc:
                    self._leave_to_relay(flight.rows, exc)
                else:
                    self._acknowledged.extend(flight.rows)
                    self._delete_wanted.set()
                    try:  # metrics never stop the deletes (claimed rows would stay claimed)
                        self._observe(len(flight.rows), time.perf_counter() - flight.started)
                    except Exception:
                        log.exception("outbox: publish metrics failed")
                finally:
                    for span in flight.spans:
                        span.end()
                    self._in_flight.popleft()
            await self._acks_ready.wait()

    async def _delete_acknowledged(self) -> None:
        """Delete the acknowledged rows, all gathered since the last delete in one
        statement, at most once per ``delete_interval``."""
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self._delete_wanted.wait()
            if (wait := last + self._delete_interval - loop.time()) > 0:
                await asyncio.sleep(wait)
            self._delete_wanted.clear()
            rows, self._acknowledged = self._acknowledged, []
            last = loop.time()
            if rows:
                await self._delete_published(rows)

    async def _delete_published(self, rows: Sequence[OutboxRow]) -> None:
        seqs = [r.seq for r in rows]
        try:
            await self._pool.execute(_DELETE_PUBLISHED, seqs)
        except Exception as exc:  # published, but still in the table: the relay re-sends
            log.warning("outbox: %d published rows not deleted (%s); the relay publishes "
                        "them again (same event ids)", len(seqs), type(exc).__name__)
            self._left_behind += 1
            self.wake()
        finally:
            self._claimed.difference_update(seqs)
            for round_settled in self._settled_in_rounds:
                round_settled.update(seqs)
            self._settled.set()
        self.published += len(rows)

    def _leave_to_relay(self, rows: Sequence[OutboxRow], exc: BaseException) -> None:
        """A direct publish failed: the rows stay in the table for the relay, and new rows
        go through the relay too until it has published what was left (order)."""
        if not isinstance(exc, _LeftBehind):
            log.warning("outbox: %d rows not published from memory (%s); the relay "
                        "publishes them", len(rows), type(exc).__name__)
        self._behind = True
        self._left_behind += 1
        self._claimed.difference_update(r.seq for r in rows)
        self._settled.set()
        self.wake()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until the rows handed to :meth:`publish_committed` are acknowledged and
        deleted (or left to the relay)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._claimed:
                    self._settled.clear()
                    await self._settled.wait()

    def start(self) -> None:
        super().start()
        loop = asyncio.get_running_loop()
        self._direct_tasks = [
            loop.create_task(self._send_direct(), name="outbox-direct-send"),
            loop.create_task(self._ack_direct(), name="outbox-direct-ack"),
            loop.create_task(self._delete_acknowledged(), name="outbox-direct-delete")]

    async def stop(self, timeout: float = 10.0) -> None:
        """Publish what was committed, then stop: the rows handed over, then whatever the
        table still holds — the last words of a stopping service (a usage summary written
        at stop) go out now, not at its next start. The relay's loop is not cancelled in a
        round (its rows would go out twice): it ends after a round that found nothing.
        Within ``timeout`` each; what Kafka or Postgres refuses stays for the next start."""
        await self.drain(timeout)
        for task in self._direct_tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._direct_tasks = []
        self._stopping = True
        self.wake()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
        await super().stop()

    # ---- the relay ----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                moved = await self.relay_once()
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except Exception:
                self.healthy = False
                if self._stopping:  # the rows stay for the next start
                    log.warning("outbox relay failed while stopping; rows left in the table")
                    return
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(1.0)
                continue
            if self._stopping:  # no waiting: rounds until one finds nothing
                if not moved:
                    return
                continue
            # a wake during the round runs the next one at once; so does a round that
            # published rows left behind (the next, finding none, ends the relay's turn)
            if moved < self._batch and not (moved and self._behind):
                await self._wakeup.wait(self._idle_poll)

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows were moved."""
        left_behind = self._left_behind
        settled: set[int] = set()
        self._settled_in_rounds.append(settled)
        try:
            return await self._relay_round(left_behind, settled)
        finally:
            self._settled_in_rounds.remove(settled)

    async def _relay_round(self, left_behind: int, settled: set[int]) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            # one round trip: take the relay lock, and read a batch only if we got it
            # (without the rows this process publishes from memory)
            read = await conn.fetch(_LOCKED_BATCH, RELAY_LOCK_ID, self._batch,
                                    list(self._claimed))
            # a unit may have claimed rows after that list was sent and committed them
            # before the read's snapshot: they are still claimed now, or already published
            # and deleted (settled) meanwhile — either way not the relay's (else twice)
            rows = [r for r in read if r["seq"] is not None and r["seq"] not in self._claimed
                    and r["seq"] not in settled]
            if not rows:
                if self.backlog:
                    self.backlog = 0
                    self._observe(0, 0.0)
                if read and read[0]["held"]:
                    self._settle_behind(left_behind)
                return 0
            started = time.perf_counter()
            spans = []
            futures = []
            for row in rows:
                headers, span = _publish_span(row["topic"], json.loads(row["headers"]))
                spans.append(span)
                futures.append(await self._producer.send(
                    row["topic"], row["value"], key=row["key"], headers=headers))
            try:
                await asyncio.gather(*futures)
            finally:
                for span in spans:
                    span.end()
            await conn.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])",
                               [r["seq"] for r in rows])
            # a full batch means more may wait: count them (cheap, the table stays small)
            self.backlog = (await conn.fetchval("SELECT count(*) FROM outbox")
                            if len(rows) >= self._batch else 0)
        self.published += len(rows)
        self._observe(len(rows), time.perf_counter() - started)
        return len(rows)

    def _settle_behind(self, left_behind: int) -> None:
        """The relay (holding the relay lock) read nothing, and nothing was left behind
        since the read began: new rows may be published from memory again."""
        if self._left_behind == left_behind:
            self._behind = False

    def _observe(self, published: int, seconds: float) -> None:
        attrs = {"klm.service": telemetry.service_name()}
        if published:
            metrics.add(metrics.OUTBOX_PUBLISHED, published, attrs)
            metrics.record(metrics.OUTBOX_PUBLISH_DURATION, seconds, attrs)
        metrics.set_gauge(metrics.OUTBOX_BACKLOG, self.backlog, attrs)


def _direct_headers(row: OutboxRow, parsed: dict[str, list[tuple[str, bytes]]]
                    ) -> tuple[list[tuple[str, bytes]], Any]:
    """The record headers of a row published from memory, as the relay makes them; without
    a span exporter, rows with the same stored headers (most of a batch) share them."""
    if telemetry.exports_spans():
        return _publish_span(row.topic, json.loads(row.headers))
    headers = parsed.get(row.headers)
    if headers is None:
        headers = parsed[row.headers] = _publish_span(row.topic, json.loads(row.headers))[0]
    return headers, trace.INVALID_SPAN


def _publish_span(topic: str, stored: dict[str, str]) -> tuple[list[tuple[str, bytes]], Any]:
    """A PRODUCER span per relayed row, child of the context saved with the row; the record
    carries the span's own context onwards (consumers continue from the publish). Without a
    span exporter the saved headers go out as they are (see telemetry.exports_spans)."""
    if not telemetry.exports_spans():
        return [(k, v.encode()) for k, v in stored.items()], trace.INVALID_SPAN
    parent = propagate.extract(stored)
    span = trace.get_tracer("klm.outbox").start_span(
        f"klm.outbox.publish {topic}", context=parent, kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                    "messaging.operation.type": "send"})
    carrier = {k: v for k, v in stored.items() if k not in ("traceparent", "tracestate")}
    propagate.inject(carrier, context=trace.set_span_in_context(span, parent))
    return [(k, v.encode()) for k, v in carrier.items()], span
