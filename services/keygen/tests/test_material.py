"""The public facts of a generated version, computed from the SPKI keygen encoded."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from klm_keygen.domain.material import GeneratedVersion


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key", [
    ec.generate_private_key(ec.SECP256R1()).public_key(),
    ec.generate_private_key(ec.SECP384R1()).public_key(),
    rsa.generate_private_key(65537, 2048).public_key(),
    rsa.generate_private_key(65537, 4096).public_key(),
    ed25519.Ed25519PrivateKey.generate().public_key(),
], ids=["P-256", "P-384", "RSA-2048", "RSA-4096", "Ed25519"])
def test_pem_is_what_cryptography_writes_and_loads_back(key: PublicKeyTypes) -> None:
    version = GeneratedVersion(wrapped=b"w", public_der=_spki(key), kcv=None)
    expected = key.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert version.public_key_pem == expected
    assert version.public_key_pem is not None
    assert _spki(serialization.load_pem_public_key(version.public_key_pem.encode())) \
        == version.public_der
    assert version.fingerprint_sha256 == hashlib.sha256(_spki(key)).hexdigest()


def test_secret_key_has_no_pem_nor_fingerprint() -> None:
    version = GeneratedVersion(wrapped=b"w", public_der=None, kcv="a1b2c3")
    assert version.public_key_pem is None
    assert version.fingerprint_sha256 is None
