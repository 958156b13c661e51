"""Usage operations inside the HSM: sign, verify, encrypt, decrypt, MAC, wrap and unwrap.

Every function here runs on the HSM thread, through ``Pkcs11Hsm.run`` (the one session):
:func:`execute_batch` serves a whole Kafka batch in one hop. Keys are stored wrapped, so a
version is unwrapped under the master KEK into a *session* object carrying only the
capability attributes of its usages (the HSM itself then refuses any other use), used, and
kept in :class:`KeyHandles` — an LRU of unwrapped handles per (key, version), destroyed on
eviction. HSM-resident versions are found by their CKA_ID instead.

The single-operation functions (:func:`ecdsa_verify`, :func:`gcm_decrypt`, …) are the
ones the Wycheproof tests drive with imported keys, so the vectors check exactly this code.
PKCS#11 errors are mapped to coded :mod:`klm_common.errors` here, at the edge.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pkcs11
from asn1crypto.core import OctetString  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from klm_common.algorithms import CURVES, Algorithm, Usage
from klm_common.errors import HsmError, KlmError, RequestInvalid, UsageNotPermitted
from klm_keygen.domain import oaep
from klm_keygen.domain.usage import DecryptionFailed, Operation

ED25519_OID = "1.3.101.112"
GCM_NONCE_BYTES = 12
GCM_TAG_BITS = 128
#: longer nonces are refused: SoftHSM fails GCM with a nonce over 256 bytes (GeneralError)
MAX_GCM_NONCE_BYTES = 256
#: a MAC shorter than this is refused (SP 800-107 / RFC 2104: at least half the output)
MIN_MAC_BYTES = 16

_HASHES: dict[str, tuple[str, Mechanism, Mechanism, MGF, Mechanism]] = {
    # name: (hashlib name, digest mechanism, PSS mechanism, MGF, PKCS#1 v1.5 mechanism)
    "SHA-256": ("sha256", Mechanism.SHA256, Mechanism.SHA256_RSA_PKCS_PSS, MGF.SHA256,
                Mechanism.SHA256_RSA_PKCS),
    "SHA-384": ("sha384", Mechanism.SHA384, Mechanism.SHA384_RSA_PKCS_PSS, MGF.SHA384,
                Mechanism.SHA384_RSA_PKCS),
    "SHA-512": ("sha512", Mechanism.SHA512, Mechanism.SHA512_RSA_PKCS_PSS, MGF.SHA512,
                Mechanism.SHA512_RSA_PKCS),
}
_HMAC = {Algorithm.HMAC_SHA256: Mechanism.SHA256_HMAC,
         Algorithm.HMAC_SHA384: Mechanism.SHA384_HMAC,
         Algorithm.HMAC_SHA512: Mechanism.SHA512_HMAC}
_LOST_SESSION = (pkcs11.SessionHandleInvalid, pkcs11.SessionClosed, pkcs11.DeviceRemoved,
                 pkcs11.TokenNotPresent, pkcs11.DeviceError)


class Role(StrEnum):
    """Which half of a key version an operation needs."""

    SECRET = "secret"  # noqa: S105 - a role name, not a password
    PRIVATE = "private"
    PUBLIC = "public"


@dataclass(frozen=True, slots=True)
class KeyVersionRef:
    """What the HSM needs to find or rebuild one key version (material only wrapped)."""

    key_id: str
    version: int
    algorithm: Algorithm
    size: int
    curve: str | None
    usages: frozenset[Usage]
    wrapped: bytes | None
    hsm_object_id: bytes | None
    public_der: bytes | None


@dataclass(frozen=True, slots=True)
class HsmOp:
    """One usage operation for :func:`execute_batch`."""

    operation: Operation
    ref: KeyVersionRef
    data: bytes = b""
    signature: bytes = b""
    aad: bytes | None = None
    nonce: bytes | None = None
    hash_name: str | None = None
    scheme: str | None = None


@dataclass(frozen=True, slots=True)
class HsmOutcome:
    algorithm: str
    output: bytes | None = None
    nonce: bytes | None = None
    valid: bool | None = None


# ---- key handles --------------------------------------------------------------------------
class KeyHandles:
    """LRU of usable HSM objects per (key id, version, role). HSM thread only.

    Unwrapping per operation would cost an unwrap (and, for a private key, a key-object
    creation) each time; the cache makes a hot key cost one unwrap per eviction cycle.
    Evicted unwrapped objects are destroyed; resident token objects are only forgotten.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._objects: OrderedDict[tuple[str, int, Role], tuple[Any, bool]] = OrderedDict()
        self._session: Any = None
        self.loads = 0

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, session: Any, kek: Any, ref: KeyVersionRef, role: Role) -> Any:
        if session is not self._session:  # a reopened session: old handles are gone
            self._objects.clear()
            self._session = session
        slot = (ref.key_id, ref.version, role)
        found = self._objects.get(slot)
        if found is not None:
            self._objects.move_to_end(slot)
            return found[0]
        obj, owned = _load(session, kek, ref, role)
        self.loads += 1
        self._objects[slot] = (obj, owned)
        while len(self._objects) > self.capacity:
            _, (old, old_owned) = self._objects.popitem(last=False)
            _discard(old, old_owned)
        return obj

    def evict(self, key_ids: Sequence[str]) -> int:
        """Forget (and destroy) every cached version of ``key_ids``; after a state change."""
        wanted = set(key_ids)
        gone = [slot for slot in self._objects if slot[0] in wanted]
        for slot in gone:
            obj, owned = self._objects.pop(slot)
            _discard(obj, owned)
        return len(gone)


def evict_keys(_session: Any, _kek: Any, handles: KeyHandles, key_ids: Sequence[str]) -> int:
    """``hsm.run(evict_keys, handles, key_ids)``: drop cached handles of ``key_ids``."""
    return handles.evict(key_ids)


def _discard(obj: Any, owned: bool) -> None:
    if owned:
        with contextlib.suppress(pkcs11.PKCS11Error):  # it dies with the session anyway
            obj.destroy()


def _load(session: Any, kek: Any, ref: KeyVersionRef, role: Role) -> tuple[Any, bool]:
    """(object, whether we own it): unwrap, import the public half, or find by CKA_ID."""
    if ref.hsm_object_id is not None:
        cls = {Role.SECRET: ObjectClass.SECRET_KEY, Role.PRIVATE: ObjectClass.PRIVATE_KEY,
               Role.PUBLIC: ObjectClass.PUBLIC_KEY}[role]
        try:
            return session.get_key(object_class=cls, id=ref.hsm_object_id), False
        except pkcs11.NoSuchKey:
            raise HsmError(f"{ref.key_id} v{ref.version}: resident object not found") \
                from None
    if role is Role.PUBLIC:
        if ref.public_der is None:
            raise HsmError(f"{ref.key_id} v{ref.version}: no public key stored")
        return import_public_key(session, ref.public_der, ref.usages), True
    if ref.wrapped is None:
        raise HsmError(f"{ref.key_id} v{ref.version}: no wrapped material (destroyed?)")
    if role is Role.SECRET:
        return _unwrap_secret(kek, ref), True
    return _unwrap_private(kek, ref), True


def _key_type(algorithm: Algorithm) -> KeyType:
    return {Algorithm.AES: KeyType.AES, Algorithm.EC: KeyType.EC,
            Algorithm.ED25519: KeyType.EC_EDWARDS, Algorithm.RSA: KeyType.RSA}.get(
        algorithm, KeyType.GENERIC_SECRET)


def secret_template(usages: frozenset[Usage]) -> dict[Attribute, Any]:
    """A usable session copy of a secret key: only its usages, never extractable again."""
    return {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: Usage.ENCRYPT in usages,
            Attribute.DECRYPT: Usage.DECRYPT in usages,
            Attribute.WRAP: Usage.WRAP in usages,
            Attribute.UNWRAP: Usage.UNWRAP in usages,
            Attribute.SIGN: Usage.MAC in usages,
            Attribute.VERIFY: Usage.MAC in usages,
            Attribute.DERIVE: Usage.DERIVE in usages}


def private_template(usages: frozenset[Usage]) -> dict[Attribute, Any]:
    """Session copy of a private key. SoftHSM refuses the public-key capability attributes
    on a private key, which python-pkcs11 would fill in: set them to DEFAULT (NOTES.md)."""
    return {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.SIGN: Usage.SIGN in usages,
            Attribute.DECRYPT: Usage.DECRYPT in usages,
            Attribute.UNWRAP: Usage.UNWRAP in usages,
            Attribute.DERIVE: Usage.DERIVE in usages,
            Attribute.ENCRYPT: pkcs11.DEFAULT, Attribute.WRAP: pkcs11.DEFAULT,
            Attribute.VERIFY: pkcs11.DEFAULT}


def _unwrap_secret(kek: Any, ref: KeyVersionRef) -> Any:
    return kek.unwrap_key(ObjectClass.SECRET_KEY, _key_type(ref.algorithm), ref.wrapped,
                          mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
                          template=secret_template(ref.usages))


def _unwrap_private(kek: Any, ref: KeyVersionRef) -> Any:
    return kek.unwrap_key(ObjectClass.PRIVATE_KEY, _key_type(ref.algorithm), ref.wrapped,
                          mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
                          template=private_template(ref.usages))


def _octet_string(raw: bytes) -> bytes:
    return bytes(OctetString(raw).dump())


def import_public_key(session: Any, spki_der: bytes, usages: frozenset[Usage]) -> Any:
    """A session public-key object from a SubjectPublicKeyInfo (verify / OAEP-encrypt)."""
    public = serialization.load_der_public_key(spki_der)
    verify = Usage.VERIFY in usages or Usage.SIGN in usages
    encrypt = Usage.ENCRYPT in usages or Usage.DECRYPT in usages
    attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                   Attribute.TOKEN: False, Attribute.VERIFY: verify}
    if isinstance(public, ec.EllipticCurvePublicKey):
        oid = {"secp256r1": CURVES["P-256"][1], "secp384r1": CURVES["P-384"][1]}.get(
            public.curve.name)
        if oid is None:
            raise RequestInvalid(f"curve {public.curve.name} is not supported")
        point = public.public_bytes(serialization.Encoding.X962,
                                    serialization.PublicFormat.UncompressedPoint)
        attrs |= {Attribute.KEY_TYPE: KeyType.EC,
                  Attribute.EC_PARAMS: encode_named_curve_parameters(oid),
                  Attribute.EC_POINT: _octet_string(point)}
    elif isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        attrs |= {Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                  Attribute.EC_PARAMS: encode_named_curve_parameters(ED25519_OID),
                  Attribute.EC_POINT: _octet_string(raw)}
    elif isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        attrs |= {Attribute.KEY_TYPE: KeyType.RSA,
                  Attribute.MODULUS: _int_bytes(numbers.n),
                  Attribute.PUBLIC_EXPONENT: _int_bytes(numbers.e),
                  Attribute.ENCRYPT: encrypt,
                  Attribute.WRAP: Usage.WRAP in usages or Usage.UNWRAP in usages}
    else:
        raise RequestInvalid(f"unsupported public key type {type(public).__name__}")
    return session.create_object(attrs)


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


# ---- single operations (also what the Wycheproof vectors drive) ---------------------------
def _hash(hash_name: str) -> tuple[str, Mechanism, Mechanism, MGF, Mechanism]:
    try:
        return _HASHES[hash_name]
    except KeyError:
        raise RequestInvalid(f"unsupported hash {hash_name!r}") from None


def ecdsa_sign(key: Any, data: bytes, hash_name: str, size_bits: int) -> bytes:
    """SoftHSM has raw ECDSA only: hash here, sign the digest in the HSM, DER-encode r‖s."""
    digest = hashlib.new(_hash(hash_name)[0], data).digest()
    raw = bytes(key.sign(digest, mechanism=Mechanism.ECDSA))
    n = (size_bits + 7) // 8
    return encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))


def ecdsa_verify(public: Any, data: bytes, signature_der: bytes, hash_name: str,
                 size_bits: int) -> bool:
    """Strict DER (r, s); anything that is not exactly one well-formed signature is invalid."""
    try:
        r, s = decode_dss_signature(signature_der)
    except ValueError:
        return False
    n = (size_bits + 7) // 8
    if r <= 0 or s <= 0 or r.bit_length() > 8 * n or s.bit_length() > 8 * n:
        return False
    digest = hashlib.new(_hash(hash_name)[0], data).digest()
    raw = r.to_bytes(n, "big") + s.to_bytes(n, "big")
    return bool(public.verify(digest, raw, mechanism=Mechanism.ECDSA))


def eddsa_sign(key: Any, data: bytes) -> bytes:
    return bytes(key.sign(data, mechanism=Mechanism.EDDSA))


def eddsa_verify(public: Any, data: bytes, signature: bytes) -> bool:
    if len(signature) != 64:
        return False
    return bool(public.verify(data, signature, mechanism=Mechanism.EDDSA))


def _rsa_mechanism(scheme: str, hash_name: str) -> tuple[Mechanism, Any]:
    _, digest, pss, mgf, pkcs1 = _hash(hash_name)
    if scheme == "pss":
        salt = hashlib.new(_hash(hash_name)[0]).digest_size
        return pss, (digest, mgf, salt)
    if scheme == "pkcs1v15":
        return pkcs1, None
    raise RequestInvalid(f"unknown RSA signature scheme {scheme!r}")


def rsa_sign(key: Any, data: bytes, scheme: str, hash_name: str) -> bytes:
    mechanism, param = _rsa_mechanism(scheme, hash_name)
    return bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))


def rsa_verify(public: Any, data: bytes, signature: bytes, scheme: str, hash_name: str,
               size_bits: int) -> bool:
    if len(signature) != (size_bits + 7) // 8:
        return False
    mechanism, param = _rsa_mechanism(scheme, hash_name)
    return bool(public.verify(data, signature, mechanism=mechanism, mechanism_param=param))


class _GcmParams(pkcs11.GCMParams):
    """GCM parameters for any nonce length. python-pkcs11 refuses nonces over 12 bytes,
    though PKCS#11 (and SoftHSM) accept them; KLM makes 96-bit nonces, but decrypts data
    sealed elsewhere with other lengths (SP 800-38D allows them)."""

    def __init__(self, nonce: bytes, aad: bytes, tag_bits: int) -> None:
        self.nonce = nonce
        self.aad = aad
        self.tag_bits = tag_bits


def gcm_encrypt(key: Any, nonce: bytes, plaintext: bytes, aad: bytes | None) -> bytes:
    """AES-GCM; returns ciphertext ‖ 128-bit tag."""
    params = _GcmParams(nonce, aad or b"", GCM_TAG_BITS)
    return bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params))


def gcm_decrypt(key: Any, nonce: bytes, ciphertext: bytes, aad: bytes | None,
                tag_bits: int = GCM_TAG_BITS) -> bytes:
    """AES-GCM open; a wrong key, nonce, AAD or tag raises :class:`DecryptionFailed`
    (SoftHSM reports a failed tag check as CKR_GENERAL_ERROR)."""
    if not nonce or len(nonce) > MAX_GCM_NONCE_BYTES or len(ciphertext) < tag_bits // 8:
        raise DecryptionFailed("ciphertext or nonce of an invalid length")
    params = _GcmParams(nonce, aad or b"", tag_bits)
    try:
        return bytes(key.decrypt(ciphertext, mechanism=Mechanism.AES_GCM,
                                 mechanism_param=params))
    except (pkcs11.EncryptedDataInvalid, pkcs11.EncryptedDataLenRange, pkcs11.GeneralError,
            pkcs11.MechanismParamInvalid, pkcs11.ArgumentsBad) as exc:
        raise DecryptionFailed(f"AES-GCM authentication failed ({type(exc).__name__})") \
            from None


def _modulus_bytes(key: Any) -> int:
    return len(bytes(key[Attribute.MODULUS]).lstrip(b"\x00")) or 1


def oaep_encrypt(public: Any, plaintext: bytes, label: bytes | None) -> bytes:
    """RSA-OAEP (SHA-256, MGF1-SHA-256): padding in :mod:`klm_keygen.domain.oaep`, the RSA
    operation in the HSM (CKM_RSA_X_509) — SoftHSM's own OAEP is SHA-1 only."""
    k = _modulus_bytes(public)
    try:
        encoded = oaep.encode(plaintext, k, label or b"")
    except oaep.OaepError as exc:
        raise RequestInvalid(str(exc)) from None
    return bytes(public.encrypt(encoded, mechanism=Mechanism.RSA_X_509))


def oaep_decrypt(key: Any, ciphertext: bytes, label: bytes | None) -> bytes:
    """The private-key operation in the HSM, OAEP decoding outside; one error for all."""
    k = _modulus_bytes(key)
    if len(ciphertext) != k:
        raise DecryptionFailed("RSA-OAEP decryption failed")
    try:
        raw = bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
        return oaep.decode(raw.rjust(k, b"\x00"), k, label or b"")
    except (oaep.OaepError, pkcs11.EncryptedDataInvalid, pkcs11.EncryptedDataLenRange,
            pkcs11.DataInvalid, pkcs11.DataLenRange):
        raise DecryptionFailed("RSA-OAEP decryption failed") from None


def hmac_sign(key: Any, data: bytes, algorithm: Algorithm) -> bytes:
    return bytes(key.sign(data, mechanism=_hmac_mechanism(algorithm)))


def hmac_verify(key: Any, data: bytes, tag: bytes, algorithm: Algorithm) -> bool:
    """Full-length tags are verified by the HSM (C_Verify). SoftHSM has no *_HMAC_GENERAL,
    so a truncated tag (≥ 16 bytes) is compared, in constant time, with the HSM's MAC."""
    mechanism = _hmac_mechanism(algorithm)
    full = hashlib.new(algorithm.value.split("-")[1].lower()).digest_size
    if len(tag) == full:
        return bool(key.verify(data, tag, mechanism=mechanism))
    if not MIN_MAC_BYTES <= len(tag) < full:
        return False
    return hmac.compare_digest(bytes(key.sign(data, mechanism=mechanism))[:len(tag)], tag)


def _hmac_mechanism(algorithm: Algorithm) -> Mechanism:
    try:
        return _HMAC[algorithm]
    except KeyError:
        raise UsageNotPermitted(f"{algorithm.value} keys cannot MAC") from None


def kwp_wrap(session: Any, key: Any, material: bytes) -> bytes:
    """Wrap caller key material with AES-KWP: it enters the HSM as a short-lived session
    object (SoftHSM has no KWP *encrypt*), is wrapped, and the object is destroyed."""
    if not 1 <= len(material) <= 1024:
        raise RequestInvalid("key material to wrap must be 1..1024 bytes")
    obj = session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.VALUE: material, Attribute.TOKEN: False, Attribute.EXTRACTABLE: True,
        Attribute.SENSITIVE: False})
    try:
        return bytes(key.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    finally:
        obj.destroy()


def kwp_unwrap(key: Any, wrapped: bytes) -> bytes:
    """AES-KWP unwrap (the HSM checks the RFC 5649 integrity check value and padding)."""
    if len(wrapped) < 16 or len(wrapped) % 8:
        raise DecryptionFailed("AES-KWP blob length is not a multiple of 8 of at least 16")
    try:
        obj = key.unwrap_key(ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, wrapped,
                             mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
                             template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                                       Attribute.EXTRACTABLE: True})
    except (pkcs11.WrappedKeyInvalid, pkcs11.WrappedKeyLenRange, pkcs11.EncryptedDataInvalid,
            pkcs11.TemplateInconsistent, pkcs11.ArgumentsBad) as exc:
        raise DecryptionFailed(f"AES-KWP unwrap failed ({type(exc).__name__})") from None
    try:
        return bytes(obj[Attribute.VALUE])
    finally:
        obj.destroy()


# ---- a batch ------------------------------------------------------------------------------
def execute_batch(session: Any, kek: Any, handles: KeyHandles, ops: Sequence[HsmOp]
                  ) -> list[HsmOutcome | KlmError]:
    """``hsm.run(execute_batch, handles, ops)``: one result or coded error per operation.

    A lost session fails the whole batch (``run`` raises :class:`HsmUnavailable`; the batch
    is redelivered)."""
    nonces = _nonces(session, ops)
    results: list[HsmOutcome | KlmError] = []
    for op in ops:
        try:
            results.append(_execute(session, kek, handles, op, nonces))
        except KlmError as exc:
            results.append(exc)
        except _LOST_SESSION:
            raise  # Pkcs11Hsm.run drops the session and raises HsmUnavailable
        except pkcs11.PKCS11Error as exc:
            results.append(_map_error(op, exc))
        except AttributeError:
            # python-pkcs11 exposes sign/decrypt/... only on objects whose CKA_SIGN/
            # CKA_DECRYPT/... is true: the unwrapped object was not made for this use
            results.append(UsageNotPermitted(
                f"the HSM object of {op.ref.key_id} v{op.ref.version} cannot "
                f"{op.operation.value}"))
    return results


def _nonces(session: Any, ops: Sequence[HsmOp]) -> list[bytes]:
    """One HSM RNG call for every GCM nonce the batch needs."""
    count = sum(1 for op in ops if op.operation is Operation.ENCRYPT
                and op.ref.algorithm is Algorithm.AES)
    if not count:
        return []
    pool = bytes(session.generate_random(8 * GCM_NONCE_BYTES * count))
    return [pool[i:i + GCM_NONCE_BYTES] for i in range(0, len(pool), GCM_NONCE_BYTES)]


def _map_error(op: HsmOp, exc: pkcs11.PKCS11Error) -> KlmError:
    name = type(exc).__name__
    if isinstance(exc, pkcs11.KeyTypeInconsistent | pkcs11.KeyHandleInvalid):
        return UsageNotPermitted(f"the HSM refused {op.operation.value} with this key ({name})")
    if isinstance(exc, pkcs11.DataLenRange | pkcs11.DataInvalid):
        return RequestInvalid(f"{op.operation.value}: input refused by the HSM ({name})")
    return HsmError(f"HSM refused {op.operation.value}: {name}")


def _execute(session: Any, kek: Any, handles: KeyHandles, op: HsmOp,
             nonces: list[bytes]) -> HsmOutcome:
    alg = op.ref.algorithm
    if alg is Algorithm.AES:
        return _aes(session, kek, handles, op, nonces)
    if alg in _HMAC:
        return _mac(handles.get(session, kek, op.ref, Role.SECRET), op)
    if op.operation in (Operation.SIGN, Operation.VERIFY):
        return _signature(session, kek, handles, op)
    if alg is Algorithm.RSA and op.operation in (Operation.ENCRYPT, Operation.DECRYPT):
        return _oaep(session, kek, handles, op)
    raise UsageNotPermitted(f"{alg.value} keys cannot {op.operation.value}")


def _signature(session: Any, kek: Any, handles: KeyHandles, op: HsmOp) -> HsmOutcome:
    ref = op.ref
    signing = op.operation is Operation.SIGN
    key = handles.get(session, kek, ref, Role.PRIVATE if signing else Role.PUBLIC)
    if ref.algorithm is Algorithm.ED25519:
        if signing:
            return HsmOutcome("Ed25519", output=eddsa_sign(key, op.data))
        return HsmOutcome("Ed25519", valid=eddsa_verify(key, op.data, op.signature))
    hash_name = op.hash_name or default_hash(ref)
    tag = hash_name.replace("-", "")
    if ref.algorithm is Algorithm.EC:
        name = f"ECDSA-{tag}"
        if signing:
            return HsmOutcome(name, output=ecdsa_sign(key, op.data, hash_name, ref.size))
        return HsmOutcome(name, valid=ecdsa_verify(key, op.data, op.signature, hash_name,
                                                   ref.size))
    scheme = op.scheme or "pss"
    name = f"RSA-{'PSS' if scheme == 'pss' else 'PKCS1'}-{tag}"
    if signing:
        return HsmOutcome(name, output=rsa_sign(key, op.data, scheme, hash_name))
    return HsmOutcome(name, valid=rsa_verify(key, op.data, op.signature, scheme, hash_name,
                                             ref.size))


def default_hash(ref: KeyVersionRef) -> str:
    """SHA-384 for P-384 (matched strength), SHA-256 otherwise."""
    return "SHA-384" if ref.algorithm is Algorithm.EC and ref.size == 384 else "SHA-256"


def _aes(session: Any, kek: Any, handles: KeyHandles, op: HsmOp,
         nonces: list[bytes]) -> HsmOutcome:
    key = handles.get(session, kek, op.ref, Role.SECRET)
    if op.operation is Operation.ENCRYPT:
        nonce = nonces.pop()
        return HsmOutcome("AES-GCM", output=gcm_encrypt(key, nonce, op.data, op.aad),
                          nonce=nonce)
    if op.operation is Operation.DECRYPT:
        return HsmOutcome("AES-GCM", output=gcm_decrypt(key, op.nonce or b"", op.data, op.aad))
    if op.operation is Operation.WRAP:
        return HsmOutcome("AES-KWP", output=kwp_wrap(session, key, op.data))
    if op.operation is Operation.UNWRAP:
        return HsmOutcome("AES-KWP", output=kwp_unwrap(key, op.data))
    raise UsageNotPermitted(f"AES keys cannot {op.operation.value}")


def _mac(key: Any, op: HsmOp) -> HsmOutcome:
    name = op.ref.algorithm.value
    if op.operation is Operation.MAC:
        return HsmOutcome(name, output=hmac_sign(key, op.data, op.ref.algorithm))
    if op.operation is Operation.MAC_VERIFY:
        return HsmOutcome(name, valid=hmac_verify(key, op.data, op.signature, op.ref.algorithm))
    raise UsageNotPermitted(f"{name} keys cannot {op.operation.value}")


def _oaep(session: Any, kek: Any, handles: KeyHandles, op: HsmOp) -> HsmOutcome:
    if op.operation is Operation.ENCRYPT:
        public = handles.get(session, kek, op.ref, Role.PUBLIC)
        return HsmOutcome("RSA-OAEP-SHA256", output=oaep_encrypt(public, op.data, op.aad))
    private = handles.get(session, kek, op.ref, Role.PRIVATE)
    return HsmOutcome("RSA-OAEP-SHA256", output=oaep_decrypt(private, op.data, op.aad))
