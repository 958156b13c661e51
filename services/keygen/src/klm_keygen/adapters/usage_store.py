"""Keygen's Postgres side of key usage: read keys for authorisation, record refusals and
usage summaries (each with its facts in the outbox, in one transaction).

Key records are cached (:class:`KeyCache`) only while a listener connection receives the
keystore's change notifications (migration ``003_usage_notify.sql``: a trigger on ``keys``
and ``key_versions`` sends ``klm_key_changed`` with the key id at commit). A notified key
is forgotten at once; every entry also expires after a short TTL; without a live listener
every batch reads Postgres. A state change therefore applies to usage as soon as its
transaction commits (plus the notification's delivery, well before its fact is published).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import asyncpg

from klm_common.algorithms import Algorithm, Usage
from klm_common.envelope import CloudEvent
from klm_common.errors import StoreUnavailable
from klm_common.events import UsageSummary
from klm_common.outbox import add_to_outbox
from klm_common.states import KeyState
from klm_keygen.domain.usage import UsageKey, UsageVersion

log = logging.getLogger(__name__)
CHANNEL = "klm_key_changed"
_DB_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.InterfaceError,
              asyncpg.exceptions.CannotConnectNowError)


class UsageStorePort(Protocol):
    async def load_keys(self, key_ids: Sequence[str]) -> dict[str, UsageKey]: ...

    async def record_denials(self, facts: Sequence[CloudEvent]) -> None: ...

    async def record_usage(self, summaries: Sequence[UsageSummary],
                           facts: Sequence[CloudEvent]) -> None: ...


class KeyCache:
    """Key records by id, valid while the change listener is connected (see module doc)."""

    def __init__(self, dsn: str, ttl: float,
                 on_change: Callable[[str], None] = lambda key_id: None) -> None:
        self._dsn = dsn
        self._ttl = ttl
        self._on_change = on_change
        self._keys: dict[str, tuple[UsageKey, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self.listening = False
        #: bumped by every notification: a read that overlapped one is not cached
        self.epoch = 0

    def start(self) -> None:
        if self._ttl > 0:
            self._task = asyncio.get_running_loop().create_task(self._listen_forever(),
                                                                name="usage-key-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def lookup(self, key_ids: Sequence[str]) -> tuple[dict[str, UsageKey], list[str]]:
        """(cached records, ids to read from Postgres)."""
        if not self.listening:
            return {}, list(dict.fromkeys(key_ids))
        now = time.monotonic()
        found: dict[str, UsageKey] = {}
        missing: list[str] = []
        for key_id in dict.fromkeys(key_ids):
            entry = self._keys.get(key_id)
            if entry is not None and entry[1] > now:
                found[key_id] = entry[0]
            else:
                missing.append(key_id)
        return found, missing

    def store(self, keys: dict[str, UsageKey], epoch: int) -> None:
        if self.listening and epoch == self.epoch:
            expires = time.monotonic() + self._ttl
            self._keys.update({k: (v, expires) for k, v in keys.items()})

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, key_id: str) -> None:
        self.epoch += 1
        self._keys.pop(key_id, None)
        self._on_change(key_id)

    async def _listen_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._listen_once()
                delay = 0.5
            except (*_DB_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("key change listener unavailable (%s); cache off",
                            type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _listen_once(self) -> None:
        """Listen until the connection is lost; the cache serves only meanwhile."""
        conn = await asyncpg.connect(self._dsn)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(CHANNEL, self._on_notify)
            self._reset(listening=True)
            log.info("key records cached for %.1fs, forgotten on %s", self._ttl, CHANNEL)
            await lost.wait()
            log.warning("key change listener lost its connection; cache off")
        finally:
            self._reset(listening=False)
            with contextlib.suppress(Exception):
                await conn.close()

    def _reset(self, *, listening: bool) -> None:
        self._keys.clear()
        self.epoch += 1
        self.listening = listening


class PgUsageStore:
    def __init__(self, pool: asyncpg.Pool, lifecycle_topic: str,
                 cache: KeyCache | None = None) -> None:
        self._pool = pool
        self._topic = lifecycle_topic
        self._cache = cache

    async def load_keys(self, key_ids: Sequence[str]) -> dict[str, UsageKey]:
        """The keys of a batch with every version: cached records (see :class:`KeyCache`)
        and one round trip for the rest; no lock, a usage reads the committed state."""
        if not key_ids:
            return {}
        if self._cache is None:
            return await self._read(key_ids)
        found, missing = self._cache.lookup(key_ids)
        if missing:
            epoch = self._cache.epoch
            fresh = await self._read(missing)
            self._cache.store(fresh, epoch)
            found.update(fresh)
        return found

    async def _read(self, key_ids: Sequence[str]) -> dict[str, UsageKey]:
        try:
            rows = await self._pool.fetch(
                """SELECT k.key_id, k.owner, k.algorithm, k.size, k.curve, k.usages, k.state,
                          k.primary_version, v.version, v.state AS version_state, v.wrapped,
                          v.hsm_object_id, v.public_der
                   FROM keys k JOIN key_versions v USING (key_id)
                   WHERE k.key_id = ANY($1::text[]) ORDER BY k.key_id, v.version""",
                sorted(set(key_ids)))
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc
        return _keys(rows)

    async def record_denials(self, facts: Sequence[CloudEvent]) -> None:
        if not facts:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await add_to_outbox(conn, self._topic, facts)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    async def record_usage(self, summaries: Sequence[UsageSummary],
                           facts: Sequence[CloudEvent]) -> None:
        """Last-used time and counts per key, with the summary facts, in one transaction."""
        if not summaries:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    """INSERT INTO key_usage AS u (key_id, last_used_at, use_count)
                       VALUES ($1, $2, $3)
                       ON CONFLICT (key_id) DO UPDATE
                       SET last_used_at = GREATEST(u.last_used_at, EXCLUDED.last_used_at),
                           use_count = u.use_count + EXCLUDED.use_count, updated_at = now()""",
                    [(s.key_id, s.last_used_at, s.total) for s in summaries])
                await add_to_outbox(conn, self._topic, facts)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc


def _keys(rows: Sequence[asyncpg.Record]) -> dict[str, UsageKey]:
    versions: dict[str, dict[int, UsageVersion]] = {}
    heads: dict[str, asyncpg.Record] = {}
    for row in rows:
        heads.setdefault(row["key_id"], row)
        versions.setdefault(row["key_id"], {})[row["version"]] = UsageVersion(
            version=row["version"], state=KeyState(row["version_state"]),
            wrapped=_bytes(row["wrapped"]), hsm_object_id=_bytes(row["hsm_object_id"]),
            public_der=_bytes(row["public_der"]))
    return {key_id: UsageKey(
        key_id=key_id, owner=row["owner"], algorithm=Algorithm(row["algorithm"]),
        size=row["size"], curve=row["curve"],
        usages=frozenset(Usage(u) for u in row["usages"]), state=KeyState(row["state"]),
        primary_version=row["primary_version"], versions=versions[key_id])
        for key_id, row in heads.items()}


def _bytes(value: bytes | None) -> bytes | None:
    return bytes(value) if value is not None else None
