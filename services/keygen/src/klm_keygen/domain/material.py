"""What keygen knows about a generated key version — never the clear material itself."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


@dataclass(frozen=True, slots=True)
class GeneratedVersion:
    """The HSM's output for one key version: wrapped material plus public facts."""

    wrapped: bytes | None
    """private/secret material wrapped under the master KEK (AES-KWP); None if hsm-resident"""
    public_der: bytes | None
    """SubjectPublicKeyInfo DER of an asymmetric key"""
    kcv: str | None
    """key check value (CKA_CHECK_VALUE, hex) of a secret key"""
    hsm_object_id: bytes | None = None
    """CKA_ID of the persistent object of an hsm-resident key"""

    @property
    def fingerprint_sha256(self) -> str | None:
        return hashlib.sha256(self.public_der).hexdigest() if self.public_der else None

    @property
    def public_key_pem(self) -> str | None:
        if self.public_der is None:
            return None
        key: PublicKeyTypes = serialization.load_der_public_key(self.public_der)
        return key.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
