"""Restore drills: what a sample is checked against (pure rules)."""

from __future__ import annotations

import base64
import hashlib

from klm_common.events import BackupFailure, BackupMaterial, BlobCheck


def judge(material: BackupMaterial, seen: BlobCheck) -> BackupFailure | None:
    """None if the HSM unwrapped the blob to the key recorded at backup time."""
    ref = {"key_id": material.key_id, "version": material.version}
    if seen.code is not None:
        return BackupFailure(**ref, code=seen.code, message=seen.message or seen.code)
    if material.kcv is not None and seen.kcv != material.kcv:
        return BackupFailure(**ref, code="kcv_mismatch",
                             message=f"unwrapped KCV {seen.kcv} != recorded {material.kcv}")
    if material.public_der_b64:
        recorded = hashlib.sha256(base64.b64decode(material.public_der_b64)).hexdigest()
        if seen.fingerprint_sha256 != recorded:
            return BackupFailure(**ref, code="fingerprint_mismatch",
                                 message="unwrapped key does not match the recorded public key")
    elif material.kcv is None:
        return BackupFailure(**ref, code="nothing_to_check",
                             message="no KCV or public key recorded")
    return None
