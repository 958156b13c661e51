"""The integrity of a stored backup: what is tagged, how, and how it is checked.

A backup row holds the version's metadata (canonical JSON), the blob (AES-KWP under the
backup KEK) and a tag = HMAC-SHA256(tag key, len(metadata) ‖ metadata ‖ blob). The tag
binds the blob to its key id and version, so a blob swapped between rows, truncated,
flipped, or metadata edited (a KCV, an owner) is refused before the HSM sees it. The KWP
integrity check inside the HSM and the KCV / public-key proof after unwrapping are the
second and third lines. The tag key lives with the backup service (``secrets/
backup-tag-key``), never in its database, so write access to the table is not enough to
forge a backup. The blob's SHA-256 is also published in ``klm.key.backed_up`` (and so in
the hash-chained audit log).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass

from klm_common.errors import IntegrityError
from klm_common.events import BackupMaterial
from klm_common.kafka import KLM_NAMESPACE


def backup_id(key_id: str, version: int) -> str:
    """Deterministic: a version has one backup, however often its wrap is replayed."""
    return str(uuid.uuid5(KLM_NAMESPACE, f"backup/{key_id}#{version}"))


def canonical(material: BackupMaterial) -> str:
    """The metadata as tagged: sorted keys, no blob, no whitespace."""
    data = material.model_dump(mode="json", exclude={"blob_b64"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def compute_tag(key: bytes, metadata: str, blob: bytes | None) -> bytes:
    encoded = metadata.encode()
    message = len(encoded).to_bytes(8, "big") + encoded + (blob or b"")
    return hmac.new(key, message, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class StoredBackup:
    backup_id: str
    key_id: str
    version: int
    metadata: str
    blob: bytes | None
    blob_sha256: str | None
    skip_reason: str | None
    backup_kek_kcv: str | None
    tag: bytes

    @classmethod
    def seal(cls, key: bytes, material: BackupMaterial, skip: str | None) -> StoredBackup:
        """A new backup row for ``material`` (its blob dropped if the version is skipped)."""
        blob = None if skip or material.blob_b64 is None else base64.b64decode(material.blob_b64)
        metadata = canonical(material.model_copy(update={
            "blob_b64": None, "backup_kek_kcv": material.backup_kek_kcv if blob else None}))
        return cls(backup_id(material.key_id, material.version), material.key_id,
                   material.version, metadata, blob,
                   hashlib.sha256(blob).hexdigest() if blob else None, skip,
                   material.backup_kek_kcv if blob else None, compute_tag(key, metadata, blob))

    def verified(self, key: bytes) -> BackupMaterial:
        """The material with its blob — after checking the tag and the row's identity."""
        if not hmac.compare_digest(self.tag, compute_tag(key, self.metadata, self.blob)):
            raise IntegrityError(f"backup {self.backup_id} of {self.key_id}#{self.version} "
                                 "failed its integrity check (tag mismatch): tampered",
                                 key_id=self.key_id, version=self.version)
        material = BackupMaterial.model_validate_json(self.metadata)
        if (material.key_id, material.version) != (self.key_id, self.version):
            raise IntegrityError(f"backup {self.backup_id} holds another key's metadata")
        blob_b64 = base64.b64encode(self.blob).decode() if self.blob else None
        return material.model_copy(update={"blob_b64": blob_b64})

    def recorded_fingerprint(self) -> str | None:
        material = BackupMaterial.model_validate_json(self.metadata)
        if not material.public_der_b64:
            return None
        return hashlib.sha256(base64.b64decode(material.public_der_b64)).hexdigest()
