"""The audit store on Postgres: the append transaction, the projection and the reads.

Appends are serialised by a transaction-level advisory lock (the audit role cannot take
table locks stronger than ROW EXCLUSIVE, and needs none): the chain head is read, the batch
sealed after it, rows (and any checkpoints) COPied in — one transaction, so sequences are
gap-free and a crash leaves either the whole batch or nothing. The optimistic path (the
head this process wrote last) takes no lock: its batch is one COPY statement, atomic on
its own, and the unique sequence and event_id refuse it if another writer got there first.
The key inventory follows the log in its own transactions
(:meth:`PostgresAuditStore.project`), from its tracking position, under its own lock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from klm_audit.domain.checkpoints import Checkpoint
from klm_audit.domain.entries import StoredEntry
from klm_audit.domain.hash_chain import GENESIS, Link
from klm_audit.domain.ingest import AppendPlan, ChainHead
from klm_audit.domain.inventory import Fact, KeyView, fold
from klm_audit.domain.queries import EventFilter, KeyFilter, Scope
from klm_audit.ports import AppendConflict

#: pg_advisory_xact_lock key held by whoever appends to audit_log
APPEND_LOCK = 7243200
#: … and by whoever moves the key inventory's position
PROJECTION_LOCK = 7243201
#: most log rows one projection transaction reads
PROJECTION_CHUNK = 20_000

_COLUMNS = ("sequence", "event_id", "type", "subject", "key_version", "source", "tenant",
            "correlation_id", "occurred_at", "topic", "kafka_partition", "kafka_offset",
            "canonical", "prev_hash", "hash")
_CHECKPOINT_COLUMNS = ("log_sequence", "event_id", "sequence", "head_hash", "signed_at",
                       "algorithm", "signature", "public_key", "signing_key_id")
_ROW = """sequence, event_id, type, subject, key_version, source, tenant, correlation_id,
       occurred_at, recorded_at, canonical, prev_hash, hash"""
# the key's rows (event_keys projection, subject index), then the requests they answer
# (event_id index) that are not the key's rows already; UNION ALL: no whole-row sort
_HISTORY = f"""
WITH k AS (SELECT sequence FROM event_keys WHERE subject = $1)
SELECT {_ROW} FROM audit_log WHERE sequence IN (SELECT sequence FROM k)
UNION ALL
SELECT {_ROW} FROM audit_log
 WHERE event_id IN (SELECT correlation_id FROM audit_log
                     WHERE sequence IN (SELECT sequence FROM k)
                       AND correlation_id IS NOT NULL)
   AND subject IS DISTINCT FROM $1
ORDER BY sequence"""  # noqa: S608 - composed of constants

_FILTERS = """
   AND ($2::text IS NULL OR a.type = $2)
   AND ($4::text IS NULL OR a.source = $4)
   AND ($5::timestamptz IS NULL OR a.occurred_at >= $5)
   AND ($6::timestamptz IS NULL OR a.occurred_at < $6)"""
# no subject or tenant: the primary key in sequence order
_EVENTS = f"""
SELECT {_ROW} FROM audit_log a WHERE sequence > $1 {_FILTERS}
   AND $3::text IS NULL AND $7::text IS NULL
 ORDER BY sequence LIMIT $8"""  # noqa: S608 - composed of constants
# by subject and/or tenant: through the event_keys projection's indexes
_EVENTS_KEYED = f"""
SELECT a.sequence, a.event_id, a.type, a.subject, a.key_version, a.source, a.tenant,
       a.correlation_id, a.occurred_at, a.recorded_at, a.canonical, a.prev_hash, a.hash
  FROM event_keys k JOIN audit_log a ON a.sequence = k.sequence
 WHERE k.sequence > $1 {_FILTERS}
   AND ($3::text IS NULL OR k.subject = $3)
   AND ($7::text IS NULL OR k.tenant = $7)
 ORDER BY k.sequence LIMIT $8"""  # noqa: S608 - composed of constants

# the rows verify_segment / SegmentStream read (binary COPY), in sequence order: the hash input
# of each row is one field, so the client hashes one slice of what it received
_CHAIN_COPY = """
SELECT prev_hash || int8send(sequence) || textsend(canonical), hash
  FROM audit_log WHERE sequence > $1 AND sequence <= $2 ORDER BY sequence"""

# the tenant last recorded for each key: projected rows, plus the tail not projected yet
_OWNERS = """
SELECT DISTINCT ON (subject) subject, tenant FROM (
    SELECT subject, tenant, sequence FROM event_keys
     WHERE subject = ANY($1::text[]) AND tenant IS NOT NULL
    UNION ALL
    SELECT subject, tenant, sequence FROM audit_log
     WHERE sequence > (SELECT position FROM projection_position
                        WHERE name = 'key_inventory')
       AND subject = ANY($1::text[]) AND tenant IS NOT NULL) o
ORDER BY subject, sequence DESC"""


class PostgresAppendTx:
    """The reads and the write of one append: inside the append transaction (checked path)
    or each its own statement (optimistic path: the write is the commit point)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        #: the head after :meth:`write`
        self.written: ChainHead | None = None

    async def stored_ids(self, event_ids: Sequence[str]) -> set[str]:
        rows = await self._conn.fetch(
            "SELECT event_id FROM audit_log WHERE event_id = ANY($1::text[])", list(event_ids))
        return {r["event_id"] for r in rows}

    async def head(self) -> ChainHead:
        row = await self._conn.fetchrow(
            "SELECT sequence, hash FROM audit_log ORDER BY sequence DESC LIMIT 1")
        return ChainHead(row["sequence"], bytes(row["hash"])) if row else ChainHead(0, GENESIS)

    async def owners(self, key_ids: Iterable[str]) -> dict[str, str | None]:
        """The tenant last recorded for each key (its owner), from the log itself."""
        keys = list(key_ids)
        if not keys:
            return {}
        rows = await self._conn.fetch(_OWNERS, keys)
        return {r["subject"]: r["tenant"] for r in rows}

    async def tenants_of(self, event_ids: Iterable[str]) -> dict[str, str | None]:
        event_ids = list(event_ids)
        if not event_ids:
            return {}
        rows = await self._conn.fetch(
            "SELECT event_id, tenant FROM audit_log WHERE event_id = ANY($1::text[])",
            list(event_ids))
        return {r["event_id"]: r["tenant"] for r in rows}

    async def write(self, plans: Iterable[AppendPlan], *, parts: int) -> None:
        """COPY the sealed rows (and any checkpoints). Outside a transaction (the optimistic
        path) a batch of one part without checkpoints is one COPY statement: atomic and
        durable when it returns, without BEGIN and COMMIT round trips; two tables or several
        parts take a transaction, in which the parts are pipelined (:meth:`_pipelined`)."""
        if parts <= 1:
            plan = next(iter(plans))
            self.written = plan.head
            if plan.checkpoints and not self._conn.is_in_transaction():
                async with self._conn.transaction():
                    await self._copy(plan)
            else:
                await self._copy(plan)
        elif self._conn.is_in_transaction():
            await self._pipelined(plans)
        else:
            async with self._conn.transaction():
                await self._pipelined(plans)

    async def _pipelined(self, plans: Iterable[AppendPlan]) -> None:
        """Each part's COPY is sent, then the next part is sealed (taken from ``plans``)
        while the server inserts it and maintains the indexes; then that COPY is awaited
        and the next one sent. One COPY at a time on the connection, in order."""
        copying: asyncio.Future[None] | None = None
        try:
            for plan in plans:
                if copying is not None:
                    await copying
                copying = asyncio.ensure_future(self._copy(plan))
                self.written = plan.head or self.written
                await asyncio.sleep(0)  # the COPY encodes and sends its rows
            if copying is not None:
                await copying
        finally:  # never leave a COPY running on the connection (sealing failed)
            if copying is not None and not copying.done():
                await asyncio.gather(copying, return_exceptions=True)

    async def _copy(self, plan: AppendPlan) -> None:
        if plan.rows:
            await self._conn.copy_records_to_table("audit_log", records=plan.rows,
                                                   columns=_COLUMNS)
        if plan.checkpoints:
            await self._conn.copy_records_to_table(
                "checkpoints", columns=_CHECKPOINT_COLUMNS,
                records=[(c.log_sequence, c.event_id, c.sequence, c.head_hash, c.signed_at,
                          c.algorithm, c.signature, c.public_key, c.signing_key_id)
                         for c in plan.checkpoints])


async def save_views(conn: asyncpg.Connection, views: Iterable[KeyView]) -> None:
    rows = [(v.key_id, v.owner, v.state, v.algorithm, v.model_dump_json(), v.last_sequence)
            for v in views]
    if rows:
        await conn.executemany(
            "INSERT INTO key_inventory (key_id, tenant, state, algorithm, view, last_sequence) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT (key_id) DO UPDATE SET "
            "tenant = EXCLUDED.tenant, state = EXCLUDED.state, algorithm = EXCLUDED.algorithm, "
            "view = EXCLUDED.view, last_sequence = EXCLUDED.last_sequence", rows)


def _entry(row: asyncpg.Record) -> StoredEntry:
    return StoredEntry(
        sequence=row["sequence"], event_id=row["event_id"], type=row["type"],
        subject=row["subject"], key_version=row["key_version"], source=row["source"],
        tenant=row["tenant"], correlation_id=row["correlation_id"],
        occurred_at=row["occurred_at"], recorded_at=row["recorded_at"],
        canonical=row["canonical"].encode("utf-8"), prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]))


@dataclass(frozen=True, slots=True)
class PgChainSource:
    """Chain ranges over a connection of the worker process's own (``read`` blocks: a worker
    runs one range at a time). Picklable: the DSN travels to the forked worker, never to a
    log (``repr`` leaves it out)."""

    dsn: str = field(repr=False)
    schema: str = "audit"

    def stream(self, after: int, upto: int, sink: Callable[[bytes], None]) -> None:
        """Each piece goes to ``sink`` as the driver receives it (hashed there, while the
        server sends the next): read whole first, a range came in ~30 KiB socket reads."""
        loop, conn = _worker_connection(self)

        async def received(piece: bytes) -> None:
            sink(piece)

        loop.run_until_complete(conn.copy_from_query(_CHAIN_COPY, after, upto,
                                                     output=received, format="binary"))


#: per worker process: its event loop and connection, per source
_WORKER_CONNECTIONS: dict[PgChainSource, tuple[asyncio.AbstractEventLoop,
                                               asyncpg.Connection]] = {}


def _worker_connection(source: PgChainSource
                       ) -> tuple[asyncio.AbstractEventLoop, asyncpg.Connection]:
    if source not in _WORKER_CONNECTIONS:
        loop = asyncio.new_event_loop()
        conn = loop.run_until_complete(asyncpg.connect(
            source.dsn, server_settings={"search_path": source.schema,
                                         "application_name": "klm-audit-verify"}))
        _WORKER_CONNECTIONS[source] = loop, conn
    return _WORKER_CONNECTIONS[source]


async def _copy_chain(conn: asyncpg.Connection, after: int, upto: int) -> bytes:
    chunks: list[bytes] = []

    async def received(chunk: bytes) -> None:
        chunks.append(chunk)

    await conn.copy_from_query(_CHAIN_COPY, after, upto, output=received, format="binary")
    return b"".join(chunks)


class PostgresAuditStore:
    def __init__(self, pool: asyncpg.Pool, chain_source: PgChainSource | None = None) -> None:
        """``chain_source`` lets verification read ranges in worker processes (each with
        its own connection); without it the ranges come through ``pool``."""
        self._pool = pool
        self._chain_source = chain_source
        self._head: ChainHead | None = None
        #: appends of this process one at a time (consumers and the denial recorder), so
        #: the known head stays valid; other processes are arbitrated by the database
        self._appending = asyncio.Lock()

    def known_head(self) -> ChainHead | None:
        """The head this process committed last (None: read it under the lock)."""
        return self._head

    @asynccontextmanager
    async def appending(self, *, locked: bool = True) -> AsyncIterator[PostgresAppendTx]:
        """One append transaction; ``locked`` takes the append lock (the checked path).
        A unique violation (sequence or event id) surfaces as :class:`AppendConflict`."""
        async with self._appending, self._transaction(locked=locked) as tx:
            yield tx

    @asynccontextmanager
    async def _transaction(self, *, locked: bool) -> AsyncIterator[PostgresAppendTx]:
        self._head = None  # unknown until this append commits
        try:
            async with self._pool.acquire() as conn:
                tx = PostgresAppendTx(conn)
                if locked:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
                        yield tx
                else:  # unique sequence and event_id arbitrate the one COPY of the batch
                    yield tx
        except asyncpg.UniqueViolationError as exc:
            raise AppendConflict(str(exc)) from exc
        if tx.written is not None:
            self._head = tx.written

    async def ping(self) -> bool:
        return bool(await self._pool.fetchval("SELECT 1"))

    # ---------------------------------------------------------------- history and events
    async def history(self, key_id: str, scope: Scope) -> list[StoredEntry]:
        """The key's events plus the requests that caused them, in sequence order."""
        rows = await self._pool.fetch(
            _HISTORY, key_id)
        return [_entry(r) for r in rows if scope.allows(r["tenant"])]

    async def events(self, filters: EventFilter, scope: Scope) -> list[StoredEntry]:
        keyed = filters.subject is not None or scope.tenant is not None
        rows = await self._pool.fetch(
            _EVENTS_KEYED if keyed else _EVENTS,
            filters.after_sequence, filters.type, filters.subject, filters.source,
            filters.since, filters.until, scope.tenant, filters.limit)
        return [_entry(r) for r in rows]

    async def facts_of(self, key_id: str) -> list[Fact]:
        rows = await self._pool.fetch(
            "SELECT sequence, type, canonical FROM audit_log WHERE sequence IN "
            "(SELECT sequence FROM event_keys WHERE subject = $1) "
            "AND type LIKE 'klm.key.%' ORDER BY sequence", key_id)
        return [_fact(r) for r in rows]

    # ---------------------------------------------------------------- inventory
    async def key(self, key_id: str, scope: Scope) -> KeyView | None:
        row = await self._pool.fetchrow(
            "SELECT view FROM key_inventory WHERE key_id = $1 "
            "AND ($2::text IS NULL OR tenant = $2)", key_id, scope.tenant)
        return KeyView.model_validate_json(row["view"]) if row else None

    async def keys(self, filters: KeyFilter, scope: Scope) -> list[KeyView]:
        rows = await self._pool.fetch(
            """SELECT view FROM key_inventory
               WHERE ($1::text IS NULL OR key_id > $1)
                 AND ($2::text IS NULL OR state = $2)
                 AND ($3::text IS NULL OR algorithm = $3)
                 AND ($4::text IS NULL OR tenant = $4)
                 AND ($5::text IS NULL OR tenant = $5)
               ORDER BY key_id LIMIT $6""",
            filters.after_key_id, filters.state, filters.algorithm, filters.owner,
            scope.tenant, filters.limit)
        return [KeyView.model_validate_json(r["view"]) for r in rows]

    # ---------------------------------------------------------------- verification
    async def head(self) -> ChainHead:
        async with self._pool.acquire() as conn:
            return await PostgresAppendTx(conn).head()

    async def links(self, after: int, upto: int, limit: int) -> list[Link]:
        rows = await self._pool.fetch(
            "SELECT sequence, prev_hash, hash, canonical FROM audit_log "
            "WHERE sequence > $1 AND sequence <= $2 ORDER BY sequence LIMIT $3",
            after, upto, limit)
        return [Link(r["sequence"], bytes(r["prev_hash"]), bytes(r["hash"]),
                     r["canonical"].encode("utf-8")) for r in rows]

    async def chain_copy(self, after: int, upto: int) -> bytes:
        """The rows after < sequence <= upto as one binary ``COPY`` stream for
        :func:`~klm_audit.domain.hash_chain.verify_segment`: no per-row driver objects."""
        async with self._pool.acquire() as conn:
            return await _copy_chain(conn, after, upto)

    def chain_source(self) -> PgChainSource | None:
        return self._chain_source

    async def first_inconsistent_row(self, upto: int) -> int | None:
        """First sequence whose indexed columns disagree with its hashed canonical JSON."""
        return await self._pool.fetchval(  # type: ignore[no-any-return]
            _INCONSISTENT_ROWS, upto)

    async def checkpoints(self) -> list[Checkpoint]:
        rows = await self._pool.fetch(
            "SELECT log_sequence, event_id, sequence, head_hash, signed_at, algorithm, "
            "signature, public_key, signing_key_id FROM checkpoints ORDER BY log_sequence")
        return [Checkpoint(r["log_sequence"], r["event_id"], r["sequence"],
                           bytes(r["head_hash"]), r["signed_at"], r["algorithm"],
                           bytes(r["signature"]), bytes(r["public_key"]),
                           r["signing_key_id"]) for r in rows]

    # ---------------------------------------------------------------- projections
    async def project(self, chunk: int = PROJECTION_CHUNK) -> int:
        """Fold the log rows after the inventory's position (at most ``chunk`` of them) into
        it, and move the position, in one transaction. Returns how many rows were passed."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PROJECTION_LOCK)
            return await _project_chunk(conn, chunk)

    async def projection_lag(self) -> int:
        return await self._pool.fetchval(  # type: ignore[no-any-return]
            "SELECT COALESCE((SELECT max(sequence) FROM audit_log), 0) - position "
            "FROM projection_position WHERE name = 'key_inventory'")

    async def rebuild_projections(self) -> int:
        """Drop the inventory and replay every event into it, under the projection lock."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PROJECTION_LOCK)
            await conn.execute("DELETE FROM key_inventory")
            await conn.execute("DELETE FROM event_keys")
            await conn.execute(
                "UPDATE projection_position SET position = 0 WHERE name = 'key_inventory'")
            while await _project_chunk(conn, PROJECTION_CHUNK * 5):
                pass
            return await conn.fetchval("SELECT count(*) FROM key_inventory")  # type: ignore[no-any-return]


async def _project_chunk(conn: asyncpg.Connection, chunk: int) -> int:
    position = await conn.fetchval(
        "SELECT position FROM projection_position WHERE name = 'key_inventory'")
    head = await conn.fetchval("SELECT COALESCE(max(sequence), 0) FROM audit_log")
    upto = min(head, position + chunk)
    if upto <= position:
        return 0
    await conn.execute(
        "INSERT INTO event_keys (sequence, subject, tenant) SELECT sequence, subject, tenant "
        "FROM audit_log WHERE sequence > $1 AND sequence <= $2 "
        "AND (subject IS NOT NULL OR tenant IS NOT NULL)", position, upto)
    rows = await conn.fetch(
        "SELECT sequence, type, subject, canonical FROM audit_log "
        "WHERE sequence > $1 AND sequence <= $2 AND type LIKE 'klm.key.%' "
        "AND subject IS NOT NULL ORDER BY sequence", position, upto)
    if rows:
        keys = list({r["subject"] for r in rows})
        stored = await conn.fetch(
            "SELECT view FROM key_inventory WHERE key_id = ANY($1::text[])", keys)
        views = {v.key_id: v for v in (KeyView.model_validate_json(r["view"]) for r in stored)}
        await save_views(conn, fold(views, ((r["subject"], _fact(r)) for r in rows)).values())
    await conn.execute(
        "UPDATE projection_position SET position = $1 WHERE name = 'key_inventory'", upto)
    return int(upto - position)


def _fact(row: asyncpg.Record) -> Fact:
    event = json.loads(row["canonical"])
    return Fact(sequence=row["sequence"], type=row["type"], time=event["time"],
                data=event.get("data") or {})


# the subject column is the envelope's subject, else data.key_id when it is a string;
# the tenant column must be data.owner whenever the event names an owner
_INCONSISTENT_ROWS = """
WITH r AS (SELECT sequence, event_id, type, subject, source, tenant,
                  canonical::jsonb AS c FROM audit_log WHERE sequence <= $1)
SELECT min(sequence) FROM r WHERE
       event_id IS DISTINCT FROM c->>'id'
    OR type IS DISTINCT FROM c->>'type'
    OR source IS DISTINCT FROM c->>'source'
    OR subject IS DISTINCT FROM COALESCE(
           NULLIF(c->>'subject', ''),
           CASE WHEN jsonb_typeof(c->'data'->'key_id') = 'string'
                THEN c->'data'->>'key_id' END)
    OR (jsonb_typeof(c->'data'->'owner') = 'string' AND c->'data'->>'owner' <> ''
        AND tenant IS DISTINCT FROM c->'data'->>'owner')
"""
