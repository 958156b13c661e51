"""Signed checkpoints: a chain head (sequence, hash, time) signed by keygen's HSM key.

A checkpoint is recorded twice: as an event in the chain (``klm.audit.checkpoint``) and as
a row of ``audit.checkpoints``, a second append-only table. Verification checks every
recorded checkpoint: its signature (ECDSA P-256 / SHA-256 over
:func:`klm_common.events.checkpoint_message`, with the public key it carries), its key
(pinned by the caller, else reported), and that the chain still has ``head_hash`` at
``sequence``. A truncated tail or an older dump of ``audit_log`` then shows as a signed
checkpoint beyond the head, or a different hash at its sequence.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from klm_common.envelope import CloudEvent
from klm_common.events import AuditCheckpoint, SignCheckpoint, checkpoint_message

ALGORITHM = "ECDSA-P256-SHA256"
#: the checkpoint traffic: stored, but not counted towards the next checkpoint
CHECKPOINT_TYPES = frozenset({SignCheckpoint.event_type, AuditCheckpoint.event_type})


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One recorded checkpoint; ``log_sequence`` is where its own event sits in the chain."""

    log_sequence: int
    event_id: str
    sequence: int
    head_hash: bytes
    signed_at: datetime
    algorithm: str
    signature: bytes
    public_key: bytes
    signing_key_id: str


@dataclass(frozen=True, slots=True)
class CheckpointFailure:
    sequence: int
    reason: str


def checkpoint_of(event: CloudEvent, log_sequence: int) -> Checkpoint | None:
    """The checkpoint a ``klm.audit.checkpoint`` event records; None if it is not one, or
    is not signed (stored in the chain all the same, like any malformed fact)."""
    if event.type != AuditCheckpoint.event_type:
        return None
    try:
        data = AuditCheckpoint.model_validate(event.data)
        if not (data.signature and data.public_key and data.time and data.algorithm
                and data.signing_key_id):
            return None
        return Checkpoint(
            log_sequence=log_sequence, event_id=event.id, sequence=data.sequence,
            head_hash=bytes.fromhex(data.head_hash), signed_at=data.time,
            algorithm=data.algorithm, signature=base64.b64decode(data.signature, validate=True),
            public_key=base64.b64decode(data.public_key, validate=True),
            signing_key_id=data.signing_key_id)
    except (ValidationError, ValueError, binascii.Error):
        return None


def signature_valid(cp: Checkpoint) -> bool:
    """The signature verifies with the carried public key, which ``signing_key_id`` names."""
    if cp.algorithm != ALGORITHM or len(cp.head_hash) != 32 or not 0 < cp.sequence < 2**63:
        return False
    if hashlib.sha256(cp.public_key).hexdigest() != cp.signing_key_id:
        return False
    try:
        key = serialization.load_der_public_key(cp.public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            return False
        key.verify(cp.signature, checkpoint_message(cp.sequence, cp.head_hash.hex(),
                                                    cp.signed_at), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_checkpoints(checkpoints: Iterable[Checkpoint], head_sequence: int,
                      hashes_at: Mapping[int, bytes],
                      trusted_keys: frozenset[str] = frozenset()) -> CheckpointFailure | None:
    """The first checkpoint (in checkpointed-sequence order) that the stored chain
    contradicts, or None. ``hashes_at`` maps each checkpointed sequence ≤ the head to the
    hash the verifier recomputed there."""
    for cp in sorted(checkpoints, key=lambda c: (c.sequence, c.log_sequence)):
        where = f"checkpoint of #{cp.sequence} signed {cp.signed_at.isoformat()}"
        if not signature_valid(cp):
            return CheckpointFailure(cp.log_sequence,
                                     f"{where} (event #{cp.log_sequence}): the signature "
                                     "does not verify — forged or altered checkpoint")
        if trusted_keys and cp.signing_key_id not in trusted_keys:
            return CheckpointFailure(cp.log_sequence,
                                     f"{where} (event #{cp.log_sequence}) is signed by key "
                                     f"{cp.signing_key_id}, not a trusted checkpoint key")
        if cp.sequence > head_sequence:
            return CheckpointFailure(head_sequence + 1,
                                     f"the log ends at #{head_sequence} but the {where} "
                                     "covers more: the tail was truncated or an older state "
                                     "restored (rollback)")
        if hashes_at.get(cp.sequence) != cp.head_hash:
            return CheckpointFailure(cp.sequence,
                                     f"the chain hash at #{cp.sequence} differs from the "
                                     f"{where}: rows up to it were rewritten")
    return None
