"""What keygen knows about a generated key version — never the clear material itself."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

#: PEM lines carry 64 base64 characters (RFC 7468), as cryptography writes them
_PEM_LINE = 64


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
        """The SPKI as PEM (RFC 7468 ``PUBLIC KEY``): the DER base64-encoded in lines, not
        parsed again — it is the SPKI keygen itself encoded from the HSM's public key
        (parsing it back per key was ~3 % of keygen's event loop; the text is the same)."""
        if self.public_der is None:
            return None
        text = base64.b64encode(self.public_der).decode()
        lines = "".join(text[i:i + _PEM_LINE] + "\n" for i in range(0, len(text), _PEM_LINE))
        return f"-----BEGIN PUBLIC KEY-----\n{lines}-----END PUBLIC KEY-----\n"
