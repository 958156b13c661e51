"""Wycheproof vectors against KLM's HSM usage paths (verify, decrypt, MAC-verify, unwrap).

Keys are imported into a scratch SoftHSM token of this module's own (session objects only)
and every case goes through the same functions keygen's usage handler calls
(:mod:`klm_keygen.adapters.hsm_usage`). Every ``valid`` case must be accepted and every
``invalid`` one refused; the files read here have no ``acceptable`` cases (docs/usage.md).
The vectors are read in place from ``../shared/vectors/wycheproof`` (never copied).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, ObjectClass

from klm_common.algorithms import Algorithm, Usage
from klm_keygen.adapters import hsm_usage
from klm_keygen.domain.usage import DecryptionFailed
from tests.integration.conftest import unavailable
from tests.integration.harness import wycheproof_dir

REPO = Path(__file__).resolve().parents[2]
VECTORS = wycheproof_dir(REPO)
VERIFY = frozenset({Usage.VERIFY})


def load(name: str) -> dict[str, Any]:
    path = VECTORS / f"{name}_test.json"
    if not path.is_file():
        unavailable(f"Wycheproof vectors not found at {path}")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def cases(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for group in doc["testGroups"]:
        for test in group["tests"]:
            yield group, test


@pytest.fixture(scope="module")
def session(endpoints: dict[str, str]) -> Iterator[Any]:
    """A scratch token of this module's own; its objects are session objects."""
    label = f"vec{secrets.token_hex(4)}"
    pin = secrets.token_hex(8)
    env = {**os.environ, "SOFTHSM2_CONF": endpoints["SOFTHSM2_CONF"]}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", secrets.token_hex(8)], capture_output=True, env=env, check=True)
    os.environ.setdefault("SOFTHSM2_CONF", endpoints["SOFTHSM2_CONF"])
    lib = pkcs11.lib(endpoints["KLM_HSM_MODULE"])
    lib.reinitialize()  # the library may have been loaded before this token existed
    token = lib.get_token(token_label=label)
    with token.open(rw=True, user_pin=pin) as opened:
        yield opened
    subprocess.run(["softhsm2-util", "--delete-token", "--token", label],
                   capture_output=True, env=env, check=False)


def check(doc: dict[str, Any], accepts: Callable[[dict[str, Any], dict[str, Any]], bool],
          module_refuses: Callable[[dict[str, Any]], bool] = lambda group: False) -> None:
    """Run every case; fail listing each valid case refused or invalid case accepted.

    ``module_refuses(group)`` names the documented cases the HSM module refuses whatever
    KLM does (docs/usage.md): they must be refused, and nothing else may be."""
    wrong, counts = [], {"valid": 0, "invalid": 0, "acceptable": 0}
    for group, test in cases(doc):
        counts[test["result"]] += 1
        accepted = accepts(group, test)
        expected = test["result"] == "valid" and not module_refuses(group)
        if accepted != expected:
            wrong.append(f"tc{test['tcId']} {test['result']} {test['comment']!r}")
    assert counts["acceptable"] == 0, "acceptable cases need a documented decision"
    assert not wrong, f"{len(wrong)} of {sum(counts.values())} wrong: " + "; ".join(wrong[:20])


def refused(fn: Callable[[], bool]) -> bool:
    """True when ``fn`` accepted; a coded refusal or HSM error counts as refused."""
    try:
        return fn()
    except (DecryptionFailed, hsm_usage.RequestInvalid, pkcs11.PKCS11Error, ValueError):
        return False


def test_ecdsa_p256_sha256(session: Any) -> None:
    doc = load("ecdsa_secp256r1_sha256")
    keys: dict[str, Any] = {}

    def accepts(group: dict[str, Any], test: dict[str, Any]) -> bool:
        der = group["publicKeyDer"]
        if der not in keys:
            keys[der] = hsm_usage.import_public_key(session, bytes.fromhex(der), VERIFY)
        return refused(lambda: hsm_usage.ecdsa_verify(
            keys[der], bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"]), "SHA-256", 256))

    check(doc, accepts)


def test_ed25519(session: Any) -> None:
    doc = load("ed25519")
    keys: dict[str, Any] = {}

    def accepts(group: dict[str, Any], test: dict[str, Any]) -> bool:
        der = group["publicKeyDer"]
        if der not in keys:
            keys[der] = hsm_usage.import_public_key(session, bytes.fromhex(der), VERIFY)
        return refused(lambda: hsm_usage.eddsa_verify(
            keys[der], bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"])))

    check(doc, accepts)


def test_rsa_pss_2048_sha256(session: Any) -> None:
    doc = load("rsa_pss_2048_sha256_mgf1_32")
    keys: dict[str, Any] = {}

    def accepts(group: dict[str, Any], test: dict[str, Any]) -> bool:
        der = group["publicKeyDer"]
        if der not in keys:
            keys[der] = hsm_usage.import_public_key(session, bytes.fromhex(der), VERIFY)
        return refused(lambda: hsm_usage.rsa_verify(
            keys[der], bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"]), "pss",
            "SHA-256", group["keySize"]))

    check(doc, accepts)


def import_rsa_private(session: Any, pkcs8_der: bytes) -> Any:
    key = serialization.load_der_private_key(pkcs8_der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    n = key.private_numbers()

    def big(v: int) -> bytes:
        return v.to_bytes((v.bit_length() + 7) // 8, "big")

    return session.create_object({
        Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.DECRYPT: True,
        Attribute.MODULUS: big(n.public_numbers.n),
        Attribute.PUBLIC_EXPONENT: big(n.public_numbers.e),
        Attribute.PRIVATE_EXPONENT: big(n.d), Attribute.PRIME_1: big(n.p),
        Attribute.PRIME_2: big(n.q), Attribute.EXPONENT_1: big(n.dmp1),
        Attribute.EXPONENT_2: big(n.dmq1), Attribute.COEFFICIENT: big(n.iqmp)})


def test_rsa_oaep_2048_sha256(session: Any) -> None:
    doc = load("rsa_oaep_2048_sha256_mgf1sha256")
    keys: dict[str, Any] = {}

    def accepts(group: dict[str, Any], test: dict[str, Any]) -> bool:
        der = group["privateKeyPkcs8"]
        if der not in keys:
            keys[der] = import_rsa_private(session, bytes.fromhex(der))
        label = bytes.fromhex(test["label"]) or None
        return refused(lambda: hsm_usage.oaep_decrypt(
            keys[der], bytes.fromhex(test["ct"]), label) == bytes.fromhex(test["msg"]))

    check(doc, accepts)


def import_secret(session: Any, key_type: KeyType, value: bytes,
                  attributes: dict[Attribute, bool]) -> Any:
    return session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: key_type,
        Attribute.VALUE: value, Attribute.TOKEN: False, Attribute.SENSITIVE: True,
        **attributes})


def test_aes_gcm(session: Any) -> None:
    doc = load("aes_gcm")

    def accepts(group: dict[str, Any], test: dict[str, Any]) -> bool:
        key = import_secret(session, KeyType.AES, bytes.fromhex(test["key"]),
                            {Attribute.DECRYPT: True})
        try:
            return refused(lambda: hsm_usage.gcm_decrypt(
                key, bytes.fromhex(test["iv"]), bytes.fromhex(test["ct"] + test["tag"]),
                bytes.fromhex(test["aad"]), group["tagSize"]) == bytes.fromhex(test["msg"]))
        finally:
            key.destroy()

    # 3 "long IV size" cases (2056-bit nonces): SoftHSM fails GCM with nonces over 256 bytes,
    # so KLM refuses them up front (MAX_GCM_NONCE_BYTES); KLM itself makes 96-bit nonces
    check(doc, accepts, module_refuses=lambda group: group["ivSize"] > 8 * 256)


def test_hmac_sha256(session: Any) -> None:
    doc = load("hmac_sha256")

    def accepts(group: dict[str, Any], test: dict[str, Any]) -> bool:
        key = import_secret(session, KeyType.GENERIC_SECRET, bytes.fromhex(test["key"]),
                            {Attribute.SIGN: True, Attribute.VERIFY: True})
        try:
            return refused(lambda: hsm_usage.hmac_verify(
                key, bytes.fromhex(test["msg"]), bytes.fromhex(test["tag"]),
                Algorithm.HMAC_SHA256))
        finally:
            key.destroy()

    # SoftHSM refuses HMAC-SHA256 keys shorter than the 256-bit output (CKR_KEY_SIZE_RANGE);
    # KLM only makes full-length HMAC keys (klm_common.algorithms), so 6 "short key" cases
    # of the 128-bit-key groups are refused by the module: documented in docs/usage.md
    check(doc, accepts, module_refuses=lambda group: group["keySize"] < 256)


def test_aes_kwp_unwrap(session: Any) -> None:
    doc = load("aes_kwp")

    def accepts(group: dict[str, Any], test: dict[str, Any]) -> bool:
        key = import_secret(session, KeyType.AES, bytes.fromhex(test["key"]),
                            {Attribute.UNWRAP: True, Attribute.WRAP: True})
        try:
            return refused(lambda: hsm_usage.kwp_unwrap(key, bytes.fromhex(test["ct"]))
                           == bytes.fromhex(test["msg"]))
        finally:
            key.destroy()

    check(doc, accepts)
