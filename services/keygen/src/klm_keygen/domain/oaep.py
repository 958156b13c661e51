"""RSAES-OAEP encoding with SHA-256 and MGF1-SHA-256 (RFC 8017 §7.1), around a raw RSA
operation done in the HSM.

Why here and not in the HSM: SoftHSM 2.6 implements CKM_RSA_PKCS_OAEP with SHA-1 and an
empty label only (SHA-256 parameters or a label → CKR_ARGUMENTS_BAD), so keygen performs the
private-key operation inside the HSM with CKM_RSA_X_509 and applies the OAEP padding here.
The private key never leaves the HSM. Decoding reports every failure the same way (one
error, no early return on the first mismatch) so that a caller cannot tell the causes
apart (Manger's attack relies on telling "first byte non-zero" from the rest).
"""

from __future__ import annotations

import hashlib
import hmac
import os

_H = hashlib.sha256
H_LEN = 32


class OaepError(ValueError):
    """The encoded message is not a valid OAEP encoding (one reason for every failure)."""


def mgf1(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += _H(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def encode(message: bytes, k: int, label: bytes = b"", seed: bytes | None = None) -> bytes:
    """EME-OAEP encoding of ``message`` for a modulus of ``k`` bytes."""
    if len(message) > k - 2 * H_LEN - 2:
        raise OaepError(f"message too long for RSA-OAEP-SHA256 with a {8 * k}-bit key")
    l_hash = _H(label).digest()
    db = l_hash + b"\x00" * (k - len(message) - 2 * H_LEN - 2) + b"\x01" + message
    seed = seed if seed is not None else os.urandom(H_LEN)
    masked_db = _xor(db, mgf1(seed, k - H_LEN - 1))
    masked_seed = _xor(seed, mgf1(masked_db, H_LEN))
    return b"\x00" + masked_seed + masked_db


def decode(encoded: bytes, k: int, label: bytes = b"") -> bytes:
    """EME-OAEP decoding; :class:`OaepError` for any invalid encoding."""
    if k < 2 * H_LEN + 2 or len(encoded) != k:
        raise OaepError("decryption error")
    y, masked_seed, masked_db = encoded[0], encoded[1:1 + H_LEN], encoded[1 + H_LEN:]
    seed = _xor(masked_seed, mgf1(masked_db, H_LEN))
    db = _xor(masked_db, mgf1(seed, k - H_LEN - 1))
    good = hmac.compare_digest(db[:H_LEN], _H(label).digest()) & (y == 0)
    # find the 0x01 separator without stopping early at the first non-zero byte
    index, looking, bad_padding = 0, True, False
    for i in range(H_LEN, len(db)):
        byte = db[i]
        found = looking and byte == 1
        bad_padding |= looking and byte not in (0, 1)
        index = i if found else index
        looking = looking and not found
    if not good or looking or bad_padding:
        raise OaepError("decryption error")
    return db[index + 1:]
