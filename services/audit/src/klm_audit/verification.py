"""Verification of the whole store: the hash chain, then the indexed columns against it."""

from __future__ import annotations

from dataclasses import dataclass

from klm_audit.domain.hash_chain import ChainVerifier
from klm_audit.ports import AuditStore

CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    checked: int
    head_sequence: int
    head_hash: bytes
    first_broken_sequence: int | None = None
    reason: str | None = None


async def verify_store(store: AuditStore, chunk: int = CHUNK, *,
                       columns: bool = True) -> Verification:
    """Recompute every link from genesis; name the first sequence that does not hold.

    ``columns`` also checks the indexed columns against the hashed JSON (slower: Postgres
    parses every event); the chain alone proves the events themselves.
    """
    head = await store.head()
    verifier = ChainVerifier()
    after = 0
    while after < head.sequence:
        links = await store.links(after, head.sequence, chunk)
        if not links or not verifier.feed(links):
            break
        after = links[-1].sequence
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
    return Verification(True, verifier.checked, verifier.head_sequence, verifier.head_hash)


def _failed(verifier: ChainVerifier, sequence: int, reason: str) -> Verification:
    return Verification(False, verifier.checked, verifier.head_sequence, verifier.head_hash,
                        sequence, reason)
