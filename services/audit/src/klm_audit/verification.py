"""Verification of the whole store: the hash chain, the indexed columns against it, and
every signed checkpoint against both."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TypedDict

from klm_audit.domain.checkpoints import Checkpoint, check_checkpoints
from klm_audit.domain.hash_chain import ChainVerifier
from klm_audit.ports import AuditStore
from klm_common import metrics as klm_metrics

#: rows per fetch; the next chunk is fetched while this one is hashed
CHUNK = 50_000


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
                       trusted_keys: frozenset[str] = frozenset()) -> Verification:
    """Recompute every link from genesis; name the first sequence that does not hold.

    ``columns`` also checks the indexed columns against the hashed JSON (slower: Postgres
    parses every event); the chain alone proves the events themselves. Then every recorded
    checkpoint must carry a valid signature (by one of ``trusted_keys`` when given) over a
    (sequence, hash) the chain still has: a truncated tail or an older dump shows here.
    """
    checkpoints = await store.checkpoints()  # before the head: none may cover rows unseen
    head = await store.head()
    verifier = ChainVerifier(watch=frozenset(c.sequence for c in checkpoints))
    await _walk(store, verifier, head.sequence, chunk)
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


async def _walk(store: AuditStore, verifier: ChainVerifier, upto: int, chunk: int) -> None:
    """Stream the chain in ranges of ``chunk`` sequences: the next range is being fetched
    (Postgres works on its own core) while this one is hashed on a worker thread."""
    after = 0
    pending = asyncio.ensure_future(store.chain_packed(after, min(upto, after + chunk)))
    while True:
        packed = await pending
        after = min(upto, after + chunk)
        more = after < upto
        if more:
            pending = asyncio.ensure_future(store.chain_packed(after, min(upto, after + chunk)))
        holds = await asyncio.to_thread(verifier.feed_packed, packed) if packed else False
        if not (holds and more):
            if more:
                pending.cancel()
            return


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
