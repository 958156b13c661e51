"""The audit checkpoint signature inside the HSM (audit holds no HSM session).

The checkpoint signing key is a persistent EC P-256 key pair on the token, label
``klm-audit-checkpoint``, created on first need: the private half is sensitive and
non-extractable, so checkpoints can only be signed here. Its public key (DER SPKI) travels
in every ``klm.audit.checkpoint`` so verifiers check signatures offline, and its SHA-256 is
the ``signing_key_id`` an auditor pins.

Every function runs on the HSM thread through ``Pkcs11Hsm.run`` (``session, master_kek``
first). SoftHSM offers raw ECDSA only: the message is hashed here with SHA-256, the
digest signed in the HSM, and r‖s DER-encoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from klm_common.algorithms import CURVES

CHECKPOINT_KEY_LABEL = "klm-audit-checkpoint"
ALGORITHM = "ECDSA-P256-SHA256"
_P256_BYTES = 32


@dataclass(frozen=True, slots=True)
class CheckpointSignature:
    signature_der: bytes
    public_key_der: bytes

    @property
    def key_id(self) -> str:
        """SHA-256 (hex) of the signing key's SubjectPublicKeyInfo."""
        return hashlib.sha256(self.public_key_der).hexdigest()


def sign_checkpoints(session: Any, _master_kek: Any,
                     messages: Sequence[bytes]) -> list[CheckpointSignature]:
    """Sign each message with the token's checkpoint key (found, or created once)."""
    private, public_der = _checkpoint_key(session)
    return [CheckpointSignature(_ecdsa_p256(private, m), public_der) for m in messages]


def _checkpoint_key(session: Any) -> tuple[Any, bytes]:
    try:
        private = session.get_key(label=CHECKPOINT_KEY_LABEL, key_type=KeyType.EC,
                                  object_class=ObjectClass.PRIVATE_KEY)
        public = session.get_key(label=CHECKPOINT_KEY_LABEL, key_type=KeyType.EC,
                                 object_class=ObjectClass.PUBLIC_KEY)
    except pkcs11.NoSuchKey:
        public, private = _create_checkpoint_key(session)
    return private, _spki(public)


def _create_checkpoint_key(session: Any) -> tuple[Any, Any]:
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES["P-256"][1])},
        local=True)
    return params.generate_keypair(  # type: ignore[no-any-return]
        store=True, mechanism=Mechanism.EC_KEY_PAIR_GEN,
        public_template={Attribute.TOKEN: True, Attribute.LABEL: CHECKPOINT_KEY_LABEL,
                         Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                         Attribute.WRAP: False, Attribute.DERIVE: False},
        private_template={Attribute.TOKEN: True, Attribute.LABEL: CHECKPOINT_KEY_LABEL,
                          Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                          Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                          Attribute.DERIVE: False})


def _spki(public: Any) -> bytes:
    raw = bytes(public[Attribute.EC_POINT])
    point = raw[2:] if raw[0] == 0x04 and raw[1] == len(raw) - 2 else raw  # DER OCTET STRING
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _ecdsa_p256(private: Any, message: bytes) -> bytes:
    raw = bytes(private.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA))
    return encode_dss_signature(int.from_bytes(raw[:_P256_BYTES], "big"),
                                int.from_bytes(raw[_P256_BYTES:], "big"))
