"""The backup service's pure rules: what is backed up, how a backup is sealed and checked,
how a drill judges what the HSM saw."""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import UTC, datetime

import pytest

from klm_backup.domain.drills import judge
from klm_backup.domain.eligibility import skip_reason
from klm_backup.domain.integrity import StoredBackup, backup_id, canonical
from klm_common.errors import IntegrityError
from klm_common.events import BackupMaterial, BlobCheck

TAG_KEY = bytes(range(32))
T0 = datetime(2026, 11, 28, tzinfo=UTC)
KEY_ID = "klm:key:6f1c1c2e-0c1a-4f39-9f55-7a1d8b1e2f30"


def material(**fields: object) -> BackupMaterial:
    data: dict[str, object] = {
        "key_id": KEY_ID, "version": 1, "owner": "acme", "name": "k", "algorithm": "AES",
        "size": 256, "usages": ["encrypt", "decrypt"], "protection": "hsm-wrapped",
        "key_created_at": T0, "version_state": "active", "version_created_at": T0,
        "kcv": "abcdef", "blob_b64": base64.b64encode(os.urandom(40)).decode(),
        "backup_kek_kcv": "123456", **fields}
    return BackupMaterial.model_validate(data)


# ---- eligibility (SP 800-57 Pt 1 §8.2.2.1) ---------------------------------------------------
@pytest.mark.parametrize(("algorithm", "usages", "labels", "skipped"), [
    ("AES", ["encrypt", "decrypt"], {}, False),
    ("HMAC-SHA256", ["mac"], {}, False),
    ("RSA", ["encrypt", "decrypt"], {}, False),          # key transport: backed up
    ("EC", ["derive"], {}, False),                       # key agreement: backed up
    ("EC", ["sign", "verify"], {}, True),                # private signature key
    ("Ed25519", ["sign", "verify"], {}, True),
    ("RSA", ["sign", "verify"], {}, True),
    ("EC", ["sign", "verify"], {"klm.backup": "required"}, False),  # e.g. a CA key
    ("AES", ["encrypt"], {"klm.backup": "forbidden"}, True),
])
def test_which_versions_are_backed_up(algorithm: str, usages: list[str],
                                      labels: dict[str, str], skipped: bool) -> None:
    assert (skip_reason(algorithm, usages, labels) is not None) is skipped


# ---- sealing and checking ---------------------------------------------------------------------
def test_a_sealed_backup_verifies_and_gives_its_material_back() -> None:
    m = material()
    stored = StoredBackup.seal(TAG_KEY, m, None)
    assert stored.backup_id == backup_id(KEY_ID, 1)
    assert stored.blob_sha256 == hashlib.sha256(base64.b64decode(m.blob_b64 or "")).hexdigest()
    assert stored.verified(TAG_KEY) == m


def test_the_backup_id_is_deterministic() -> None:
    assert backup_id(KEY_ID, 1) == backup_id(KEY_ID, 1) != backup_id(KEY_ID, 2)


@pytest.mark.parametrize("tamper", ["blob", "metadata", "swap", "tag_key"])
def test_any_change_fails_the_integrity_check(tamper: str) -> None:
    stored = StoredBackup.seal(TAG_KEY, material(), None)
    other = StoredBackup.seal(TAG_KEY, material(key_id=KEY_ID[:-1] + "1"), None)
    key = TAG_KEY
    if tamper == "blob":
        blob = stored.blob or b""
        stored = StoredBackup(**{**_fields(stored), "blob": bytes([blob[0] ^ 1]) + blob[1:]})
    elif tamper == "metadata":
        stored = StoredBackup(**{**_fields(stored),
                                 "metadata": stored.metadata.replace("abcdef", "000000")})
    elif tamper == "swap":  # another key's blob and tag moved into this row
        stored = StoredBackup(**{**_fields(stored), "blob": other.blob, "tag": other.tag})
    else:
        key = bytes(32)
    with pytest.raises(IntegrityError):
        stored.verified(key)


def _fields(stored: StoredBackup) -> dict[str, object]:
    return {name: getattr(stored, name) for name in StoredBackup.__slots__}


def test_a_skipped_version_keeps_only_public_facts() -> None:
    m = material(algorithm="EC", curve="P-256", usages=["sign", "verify"], kcv=None,
                 public_der_b64=base64.b64encode(b"spki").decode())
    stored = StoredBackup.seal(TAG_KEY, m, "private signature key")
    assert stored.blob is None and stored.blob_sha256 is None
    assert "blob_b64" not in canonical(m) and stored.verified(TAG_KEY).blob_b64 is None


# ---- drills -----------------------------------------------------------------------------------
def test_drill_judges_what_the_hsm_observed() -> None:
    m = material()
    ok = BlobCheck(key_id=KEY_ID, version=1, kcv="abcdef")
    assert judge(m, ok) is None
    wrong = judge(m, BlobCheck(key_id=KEY_ID, version=1, kcv="000000"))
    assert wrong is not None and wrong.code == "kcv_mismatch"
    refused = judge(m, BlobCheck(key_id=KEY_ID, version=1, code="integrity_check_failed",
                                 message="blob did not unwrap"))
    assert refused is not None and refused.code == "integrity_check_failed"
    spki = b"spki"
    pub = material(kcv=None, public_der_b64=base64.b64encode(spki).decode())
    fp = hashlib.sha256(spki).hexdigest()
    assert judge(pub, BlobCheck(key_id=KEY_ID, version=1, fingerprint_sha256=fp)) is None
    bad = judge(pub, BlobCheck(key_id=KEY_ID, version=1, fingerprint_sha256="0" * 64))
    assert bad is not None and bad.code == "fingerprint_mismatch"
