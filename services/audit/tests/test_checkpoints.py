"""Signed checkpoints: signature, key pinning, rollback and rewrite detection (pure)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from klm_audit.domain.checkpoints import (
    ALGORITHM,
    Checkpoint,
    check_checkpoints,
    checkpoint_of,
    signature_valid,
)
from klm_common.envelope import make_event
from klm_common.events import AuditCheckpoint, checkpoint_message

KEY = ec.generate_private_key(ec.SECP256R1())
SPKI = KEY.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
KEY_ID = hashlib.sha256(SPKI).hexdigest()
T = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)


def signed(sequence: int, head: bytes, log_sequence: int = 100) -> Checkpoint:
    signature = KEY.sign(checkpoint_message(sequence, head.hex(), T), ec.ECDSA(hashes.SHA256()))
    return Checkpoint(log_sequence, f"e{log_sequence}", sequence, head, T, ALGORITHM,
                      signature, SPKI, KEY_ID)


def test_a_checkpoint_event_round_trips_and_verifies() -> None:
    cp = signed(7, bytes(range(32)))
    data = AuditCheckpoint(sequence=7, head_hash=cp.head_hash.hex(), time=T,
                           signature=base64.b64encode(cp.signature).decode(),
                           signing_key_id=KEY_ID, algorithm=ALGORITHM,
                           public_key=base64.b64encode(SPKI).decode())
    event = make_event(AuditCheckpoint.event_type, data, source="klm/keygen")
    parsed = checkpoint_of(event.model_validate_json(event.to_bytes()), 9)
    assert parsed is not None and parsed.log_sequence == 9 and signature_valid(parsed)


def test_forged_or_foreign_signatures_fail() -> None:
    cp = signed(7, bytes(32))
    other = ec.generate_private_key(ec.SECP256R1())
    forged = Checkpoint(**{**_fields(cp), "signature": other.sign(
        checkpoint_message(7, bytes(32).hex(), T), ec.ECDSA(hashes.SHA256()))})
    moved = Checkpoint(**{**_fields(cp), "sequence": 8})
    assert not signature_valid(forged) and not signature_valid(moved)
    failure = check_checkpoints([forged], 10, {7: bytes(32)})
    assert failure is not None and failure.sequence == 100 and "signature" in failure.reason
    pinned = check_checkpoints([cp], 10, {7: bytes(32)}, frozenset({"ab" * 32}))
    assert pinned is not None and "trusted" in pinned.reason


def test_a_rollback_and_a_rewrite_are_caught() -> None:
    cp = signed(7, bytes(32))
    assert check_checkpoints([cp], 10, {7: bytes(32)}) is None
    rollback = check_checkpoints([cp], 5, {})
    assert rollback is not None and rollback.sequence == 6 and "rollback" in rollback.reason
    rewrite = check_checkpoints([cp], 10, {7: b"\x01" * 32})
    assert rewrite is not None and rewrite.sequence == 7 and "rewritten" in rewrite.reason


def _fields(cp: Checkpoint) -> dict[str, object]:
    return {name: getattr(cp, name) for name in Checkpoint.__slots__}  # type: ignore[attr-defined]
