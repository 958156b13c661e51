"""Verification of the whole store: the hash chain, the indexed columns against it, and
every signed checkpoint against both."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypedDict

from klm_audit.domain.checkpoints import Checkpoint, check_checkpoints
from klm_audit.domain.hash_chain import (
    ChainSegment,
    ChainVerifier,
    SegmentStream,
    verify_segment,
)
from klm_audit.ports import AuditStore, ChainSource
from klm_common import metrics as klm_metrics

#: sequences per range: one COPY, hashed as one task
CHUNK = 25_000
#: worker processes reading and hashing ranges (the GIL keeps threads from hashing in
#: parallel: hashlib releases it only for inputs of 2 KiB and more); one more than the cores,
#: so a core hashes while a worker waits for its range; 0 hashes on a thread of this process
WORKERS = min((os.cpu_count() or 1) + 1, 8) if (os.cpu_count() or 1) > 1 else 0


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    checked: int
    head_sequence: int
    head_hash: bytes
    first_broken_sequence: int | None = None
    reason: str | None = None
    checkpoints_checked: int = 0
    last_checkpoint: Checkpoint | None = None
    checkpoint_keys: tuple[str, ...] = field(default_factory=tuple)


async def verify_store(store: AuditStore, chunk: int = CHUNK, *, columns: bool = True,
                       trusted_keys: frozenset[str] = frozenset(),
                       workers: int = WORKERS) -> Verification:
    """Recompute every link from genesis; name the first sequence that does not hold.

    ``columns`` also checks the indexed columns against the hashed JSON (slower: Postgres
    parses every event); the chain alone proves the events themselves. Then every recorded
    checkpoint must carry a valid signature (by one of ``trusted_keys`` when given) over a
    (sequence, hash) the chain still has: a truncated tail or an older dump shows here.

    The chain is read in ranges of ``chunk`` sequences, hashed in parallel by ``workers``
    processes, and the ranges joined end to end (:meth:`ChainVerifier.join`): the answer
    is the one a single pass from genesis gives.
    """
    checkpoints = await store.checkpoints()  # before the head: none may cover rows unseen
    head = await store.head()
    verifier = ChainVerifier(watch=frozenset(c.sequence for c in checkpoints))
    await _walk(store, verifier, head.sequence, chunk, workers)
    broken = verifier.broken
    if broken is None and verifier.head_sequence != head.sequence:
        broken_at = verifier.head_sequence + 1
        return _failed(verifier, broken_at, f"sequence {broken_at} is missing")
    inconsistent = await store.first_inconsistent_row(
        broken.sequence - 1 if broken else head.sequence) if columns else None
    if inconsistent is not None:
        return _failed(verifier, inconsistent,
                       "indexed columns (id, type, subject, source or tenant) disagree with "
                       "the hashed event: the row was modified")
    if broken is not None:
        return _failed(verifier, broken.sequence, broken.reason)
    failure = check_checkpoints(checkpoints, verifier.head_sequence, verifier.hashes_at,
                                trusted_keys)
    if failure is not None:
        return _failed(verifier, failure.sequence, failure.reason, checkpoints)
    klm_metrics.set_gauge(klm_metrics.AUDIT_VERIFICATION_RESULT, 1)  # ops dashboard
    return Verification(True, verifier.checked, verifier.head_sequence, verifier.head_hash,
                        **_checkpoint_summary(checkpoints))


async def _walk(store: AuditStore, verifier: ChainVerifier, upto: int, chunk: int,
                workers: int) -> None:
    """Verify the ranges of ``(0, upto]`` and join them in order, stopping at the first
    break. A window of ranges is in flight, so the server streams while every core hashes:
    with a :class:`ChainSource`, worker processes read (their own connections) and hash;
    without one, this process reads and a thread hashes."""
    bounds = [(after, min(upto, after + chunk)) for after in range(0, upto, chunk)]
    source = store.chain_source() if workers > 0 and len(bounds) > 1 else None
    async with _hashers(workers if source is not None else 0) as hashers:
        loop = asyncio.get_running_loop()

        async def segment(after: int, last: int) -> ChainSegment:
            watch = frozenset(s for s in verifier.watch if after < s <= last)
            if source is not None:
                return await loop.run_in_executor(hashers, _verify_range, source, after, last,
                                                  watch)
            copied = await store.chain_copy(after, last)
            return await loop.run_in_executor(None, verify_segment, after, copied, watch)

        window = workers + 1 if source is not None else 2
        pending = [asyncio.ensure_future(segment(*b)) for b in bounds[:window]]
        following = iter(bounds[window:])
        try:
            while pending:
                if not verifier.join(await pending.pop(0)):
                    return
                if (bound := next(following, None)) is not None:
                    pending.append(asyncio.ensure_future(segment(*bound)))
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _verify_range(source: ChainSource, after: int, upto: int, watch: frozenset[int]
                  ) -> ChainSegment:
    """In a worker process: verify one range on its own, hashing it as it arrives."""
    stream = SegmentStream(after, watch)
    source.stream(after, upto, stream.feed)
    return stream.finish()


@asynccontextmanager
async def _hashers(workers: int) -> AsyncIterator[Executor | None]:
    """``workers`` forked processes (None: the loop's default thread pool). Forked, not
    spawned: a worker starts in milliseconds without re-importing the service; it only
    reads ranges over its own connection and runs :func:`verify_segment` (hashlib,
    struct) on them, and exits with the pool at the end of the verification (waited for
    on a thread: the event loop keeps serving meanwhile)."""
    if workers <= 0:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        yield pool
    finally:
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


class _CheckpointSummary(TypedDict):
    checkpoints_checked: int
    last_checkpoint: Checkpoint | None
    checkpoint_keys: tuple[str, ...]


def _checkpoint_summary(checkpoints: list[Checkpoint]) -> _CheckpointSummary:
    last = max(checkpoints, key=lambda c: c.sequence) if checkpoints else None
    return {"checkpoints_checked": len(checkpoints), "last_checkpoint": last,
            "checkpoint_keys": tuple(sorted({c.signing_key_id for c in checkpoints}))}


def _failed(verifier: ChainVerifier, sequence: int, reason: str,
            checkpoints: list[Checkpoint] | None = None) -> Verification:
    klm_metrics.set_gauge(klm_metrics.AUDIT_VERIFICATION_RESULT, 0)  # ops dashboard
    return Verification(False, verifier.checked, verifier.head_sequence, verifier.head_hash,
                        sequence, reason, **_checkpoint_summary(checkpoints or []))
