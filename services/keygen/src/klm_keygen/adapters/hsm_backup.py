"""Backup operations inside the HSM: wrap a key version under the backup KEK, unwrap a
backup blob and prove it is the key it claims to be, restore it under the master KEK.

The backup KEK (label ``klm-backup-kek``) is a persistent, non-extractable AES-256 token
object that ``klm ceremony init``/``recover`` put there from custodian shares; it is
separate from the master KEK, so a keystore dump and a backup dump are never readable with
the same key. Every function here runs on the HSM thread through ``Pkcs11Hsm.run`` (its
signature starts with ``session, master_kek``) and never returns clear material.

:func:`unwrap_blob` is THE unwrap of KLM's backup path: keygen's restore and drills use it,
and the CAVP/Wycheproof vector tests run it on a scratch token.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from klm_common.algorithms import Usage
from klm_common.errors import (
    HsmError,
    HsmUnavailable,
    InfrastructureError,
    IntegrityError,
    KlmError,
)
from klm_common.events import BackupMaterial, BlobCheck
from klm_keygen.adapters.hsm import _private_attributes, _usage_attributes
from klm_keygen.adapters.hsm_usage import import_public_key

BACKUP_KEK_LABEL = "klm-backup-kek"
WRAP_MECHANISM = Mechanism.AES_KEY_WRAP_PAD

#: the session or token is gone: the whole batch is retried, never answered
_LOST = (pkcs11.SessionHandleInvalid, pkcs11.SessionClosed, pkcs11.DeviceRemoved,
         pkcs11.TokenNotPresent, pkcs11.DeviceError, pkcs11.UserNotLoggedIn)
#: python-pkcs11 fills every capability attribute on unwrap; SoftHSM refuses the public
#: ones on a private key (see NOTES.md)
_PRIVATE_DEFAULTS = {Attribute.ENCRYPT: pkcs11.DEFAULT, Attribute.WRAP: pkcs11.DEFAULT,
                     Attribute.VERIFY: pkcs11.DEFAULT}


class BackupKekMissing(InfrastructureError):
    """No backup KEK on the token yet: backups wait for the custody ceremony."""

    code = "backup_kek_missing"


@dataclass(frozen=True, slots=True)
class VersionRow:
    """What keygen's keystore holds for one version (material wrapped under the master KEK
    or, for an hsm-resident version, the CKA_ID of its token object)."""

    material: BackupMaterial
    wrapped: bytes | None


@dataclass(frozen=True, slots=True)
class RestoredVersion:
    material: BackupMaterial
    wrapped: bytes | None
    """under the master KEK (None: public-only, or hsm-resident)"""


def key_types(algorithm: str) -> tuple[ObjectClass, KeyType]:
    """PKCS#11 class and type of the secret or private half of ``algorithm``."""
    if algorithm == "AES":
        return ObjectClass.SECRET_KEY, KeyType.AES
    if algorithm.startswith("HMAC"):
        return ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET
    if algorithm == "RSA":
        return ObjectClass.PRIVATE_KEY, KeyType.RSA
    if algorithm == "Ed25519":
        return ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS
    if algorithm == "EC":
        return ObjectClass.PRIVATE_KEY, KeyType.EC
    raise HsmError(f"no PKCS#11 key type for algorithm {algorithm!r}")


def find_backup_kek(session: Any) -> Any:
    try:
        return session.get_key(label=BACKUP_KEK_LABEL, key_type=KeyType.AES,
                               object_class=ObjectClass.SECRET_KEY)
    except pkcs11.NoSuchKey:
        raise BackupKekMissing(f"no {BACKUP_KEK_LABEL!r} on the token: run "
                               "`klm ceremony init` (or `recover`)") from None


def kek_check_value(kek: Any) -> str:
    return bytes(kek[Attribute.CHECK_VALUE]).hex()


def backup_kek_kcv(session: Any, _master_kek: Any) -> str:
    """Key check value of the backup KEK: recorded with every blob, so a restore knows
    which custody ceremony's KEK it needs."""
    return kek_check_value(find_backup_kek(session))


def _map(exc: pkcs11.PKCS11Error, what: str) -> KlmError:
    if isinstance(exc, _LOST):
        return HsmUnavailable(f"HSM session lost: {type(exc).__name__}")
    return HsmError(f"HSM refused to {what}: {type(exc).__name__}")


def unwrap_blob(kek: Any, blob: bytes, object_class: ObjectClass, key_type: KeyType, *,
                mechanism: Mechanism = WRAP_MECHANISM,
                template: dict[Attribute, Any] | None = None, store: bool = False,
                id_: bytes | None = None, label: str | None = None) -> Any:
    """Unwrap ``blob`` under ``kek`` into a new object; a blob that fails the KW/KWP
    integrity check (or is malformed) raises :class:`IntegrityError` and leaves no object."""
    base = dict(_PRIVATE_DEFAULTS) if object_class is ObjectClass.PRIVATE_KEY else {}
    try:
        return kek.unwrap_key(object_class, key_type, blob, mechanism=mechanism, store=store,
                              id=id_, label=label, template={**base, **(template or {})})
    except _LOST as exc:
        raise HsmUnavailable(f"HSM session lost: {type(exc).__name__}") from exc
    except pkcs11.PKCS11Error as exc:
        raise IntegrityError(f"blob did not unwrap ({type(exc).__name__}): corrupted, "
                             "truncated or wrapped under another key") from exc


# ---- proving what an unwrapped object is -------------------------------------------------
def _scratch_template(object_class: ObjectClass, key_type: KeyType) -> dict[Attribute, Any]:
    """A session object that may be re-wrapped and can prove itself (KCV or a signature)."""
    attrs: dict[Attribute, Any] = {Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                                   Attribute.EXTRACTABLE: True}
    if key_type is KeyType.AES:
        attrs[Attribute.ENCRYPT] = True
    elif object_class is ObjectClass.PRIVATE_KEY and key_type is not KeyType.RSA:
        attrs[Attribute.SIGN] = True
    return attrs


def observe(session: Any, obj: Any, material: BackupMaterial) -> BlobCheck:
    """The key check value (secret key) or SPKI fingerprint (private key) of ``obj``.

    Unwrapped objects carry no CKA_CHECK_VALUE in SoftHSM, so the KCV is computed the way
    the token computes it at generation: AES-ECB of a zero block (AES), SHA-1 of the value
    by C_DigestKey (generic secret). A private key proves itself against the recorded public
    key: RSA by its modulus, EC/Ed25519 by a signature over a fresh challenge.
    """
    _, key_type = key_types(material.algorithm)
    ref = {"key_id": material.key_id, "version": material.version}
    if key_type is KeyType.AES:
        return BlobCheck(**ref, kcv=bytes(obj.encrypt(bytes(16),
                                                     mechanism=Mechanism.AES_ECB))[:3].hex())
    if key_type is KeyType.GENERIC_SECRET:
        return BlobCheck(**ref, kcv=bytes(session.digest(obj, mechanism=Mechanism.SHA_1))[:3].hex())
    if key_type is KeyType.RSA:
        public = rsa.RSAPublicNumbers(int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big"),
                                      int.from_bytes(obj[Attribute.MODULUS], "big"))
        der = public.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return BlobCheck(**ref, fingerprint_sha256=hashlib.sha256(der).hexdigest())
    return BlobCheck(**ref, fingerprint_sha256=_signature_proof(obj, key_type, material))


def _signature_proof(obj: Any, key_type: KeyType, material: BackupMaterial) -> str:
    """Sign a random challenge in the HSM and verify it with the recorded public key."""
    if not material.public_der_b64:
        raise IntegrityError("no recorded public key to check the private key against")
    der = base64.b64decode(material.public_der_b64)
    public = serialization.load_der_public_key(der)
    challenge = os.urandom(32)
    try:
        if key_type is KeyType.EC_EDWARDS:
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(bytes(obj.sign(challenge, mechanism=Mechanism.EDDSA)), challenge)
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            raw = bytes(obj.sign(challenge, mechanism=Mechanism.ECDSA))
            half = len(raw) // 2
            signature = utils.encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                                   int.from_bytes(raw[half:], "big"))
            public.verify(signature, challenge,
                          ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature:
        raise IntegrityError("the restored private key does not match the recorded public "
                             "key") from None
    return hashlib.sha256(der).hexdigest()


def expect(material: BackupMaterial, seen: BlobCheck) -> None:
    """Raise unless what the HSM observed is what was recorded at backup time."""
    recorded_fp = (hashlib.sha256(base64.b64decode(material.public_der_b64)).hexdigest()
                   if material.public_der_b64 else None)
    if material.kcv is not None and seen.kcv != material.kcv:
        raise IntegrityError(f"key check value {seen.kcv} != recorded {material.kcv}")
    if recorded_fp is not None and seen.fingerprint_sha256 != recorded_fp:
        raise IntegrityError("public key fingerprint differs from the recorded one")
    if material.kcv is None and recorded_fp is None:
        raise IntegrityError("nothing recorded to check the restored key against")


# ---- operations run through Pkcs11Hsm.run -------------------------------------------------
def wrap_for_backup(session: Any, master_kek: Any, rows: Sequence[VersionRow]
                    ) -> list[bytes | KlmError]:
    """Each version's material wrapped under the backup KEK (one result per row)."""
    backup_kek = find_backup_kek(session)
    out: list[bytes | KlmError] = []
    for row in rows:
        try:
            out.append(_wrap_one(session, master_kek, backup_kek, row))
        except KlmError as exc:
            if isinstance(exc, HsmUnavailable):
                raise
            out.append(exc)
        except pkcs11.PKCS11Error as exc:
            mapped = _map(exc, f"wrap {row.material.key_id}#{row.material.version}")
            if isinstance(mapped, HsmUnavailable):
                raise mapped from exc
            out.append(mapped)
    return out


def _wrap_one(session: Any, master_kek: Any, backup_kek: Any, row: VersionRow) -> bytes:
    object_class, key_type = key_types(row.material.algorithm)
    if row.wrapped is not None:
        obj = unwrap_blob(master_kek, row.wrapped, object_class, key_type,
                          template={Attribute.TOKEN: False, Attribute.EXTRACTABLE: True,
                                    Attribute.SENSITIVE: True})
        try:
            return bytes(backup_kek.wrap_key(obj, mechanism=WRAP_MECHANISM))
        finally:
            obj.destroy()
    if row.material.hsm_object_id_hex is None:
        raise HsmError("version has neither wrapped material nor an HSM object (destroyed?)")
    obj = session.get_key(id=bytes.fromhex(row.material.hsm_object_id_hex),
                          object_class=object_class)
    return bytes(backup_kek.wrap_key(obj, mechanism=WRAP_MECHANISM))


def check_blobs(session: Any, _master_kek: Any, materials: Sequence[BackupMaterial]
                ) -> list[BlobCheck]:
    """Restore drill: unwrap each blob into a scratch session object, observe, destroy."""
    backup_kek = find_backup_kek(session)
    results = []
    for material in materials:
        try:
            obj = _unwrap_backup(backup_kek, material)
            try:
                results.append(observe(session, obj, material))
            finally:
                obj.destroy()
        except (IntegrityError, HsmError) as exc:
            results.append(BlobCheck(key_id=material.key_id, version=material.version,
                                     code=exc.code, message=exc.message))
        except pkcs11.PKCS11Error as exc:
            mapped = _map(exc, "check a backup blob")
            if isinstance(mapped, HsmUnavailable):
                raise mapped from exc
            results.append(BlobCheck(key_id=material.key_id, version=material.version,
                                     code=mapped.code, message=mapped.message))
    return results


def _unwrap_backup(backup_kek: Any, material: BackupMaterial) -> Any:
    if material.blob_b64 is None:
        raise IntegrityError("public-only backup: there is no blob to unwrap")
    object_class, key_type = key_types(material.algorithm)
    return unwrap_blob(backup_kek, base64.b64decode(material.blob_b64), object_class, key_type,
                       template=_scratch_template(object_class, key_type))


def restore_versions(session: Any, master_kek: Any, materials: Sequence[BackupMaterial],
                     backup_kek: Any = None) -> list[RestoredVersion]:
    """Unwrap every version of one key, prove each, re-wrap under the (new) master KEK or
    re-create the token object; all or nothing: the first failure raises. Pass
    ``backup_kek`` when restoring many keys (finding it is a token search)."""
    if backup_kek is None and any(m.blob_b64 for m in materials):
        backup_kek = find_backup_kek(session)
    restored = []
    for material in materials:
        if material.blob_b64 is None:
            restored.append(RestoredVersion(material, None))
            continue
        try:
            restored.append(_restore_one(session, master_kek, backup_kek, material))
        except pkcs11.PKCS11Error as exc:
            raise _map(exc, f"restore {material.key_id}#{material.version}") from exc
    return restored


def _restore_one(session: Any, master_kek: Any, backup_kek: Any,
                 material: BackupMaterial) -> RestoredVersion:
    obj = _unwrap_backup(backup_kek, material)
    try:
        expect(material, observe(session, obj, material))
        if material.protection != "hsm-resident":
            return RestoredVersion(material, bytes(master_kek.wrap_key(
                obj, mechanism=WRAP_MECHANISM)))
    finally:
        obj.destroy()
    _recreate_resident(session, backup_kek, material)
    return RestoredVersion(material, None)


def _recreate_resident(session: Any, backup_kek: Any, material: BackupMaterial) -> None:
    """Put an hsm-resident version back as a token object with its CKA_ID, label and usages
    (an existing object with that id is replaced: it is the lost or corrupted one)."""
    object_class, key_type = key_types(material.algorithm)
    obj_id = bytes.fromhex(material.hsm_object_id_hex or "")
    for old in session.get_objects({Attribute.ID: obj_id, Attribute.CLASS: object_class}):
        old.destroy()
    usages = frozenset(Usage(u) for u in material.usages)
    usage_attrs = (_usage_attributes(usages) if object_class is ObjectClass.SECRET_KEY
                   else _private_attributes(usages))
    unwrap_blob(backup_kek, base64.b64decode(material.blob_b64 or ""), object_class, key_type,
                store=True, id_=obj_id, label=f"klm:{obj_id.hex()}",
                template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                          Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                          **usage_attrs})
    if object_class is ObjectClass.PRIVATE_KEY and material.public_der_b64:
        _recreate_public(session, material, obj_id, usages)


def _recreate_public(session: Any, material: BackupMaterial, obj_id: bytes,
                     usages: frozenset[Usage]) -> None:
    """The public half of a resident key pair, back on the token from the recorded SPKI."""
    for old in session.get_objects({Attribute.ID: obj_id,
                                    Attribute.CLASS: ObjectClass.PUBLIC_KEY}):
        old.destroy()
    scratch = import_public_key(session, base64.b64decode(material.public_der_b64 or ""),
                                usages)
    try:
        scratch.copy({Attribute.TOKEN: True, Attribute.ID: obj_id,
                      Attribute.LABEL: f"klm:{obj_id.hex()}"})
    finally:
        scratch.destroy()

