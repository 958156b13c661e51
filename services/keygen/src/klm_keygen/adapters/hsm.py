"""The PKCS#11 session — the only one in KLM — behind a small async port.

python-pkcs11 calls ``C_Initialize(NULL)``, so SoftHSM runs without its own locking while
python-pkcs11 releases the GIL: every call of the session therefore runs on one dedicated
thread (a single-worker executor), in batches, so the event loop never blocks on the HSM.
PKCS#11 errors are mapped to :mod:`klm_common.errors` here, at the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from klm_common import metrics as klm_metrics
from klm_common.algorithms import CURVES, Algorithm, KeySpec, Protection, Usage
from klm_common.errors import HsmError, HsmUnavailable, KlmError, MechanismUnavailable
from klm_keygen.adapters import hsm_lifecycle
from klm_keygen.domain.material import GeneratedVersion

log = logging.getLogger(__name__)

T = TypeVar("T")
MASTER_KEK_LABEL = "klm-master-kek"

_HMAC_KEY_TYPE = KeyType.GENERIC_SECRET
_ED25519_OID = "1.3.101.112"


class Hsm(Protocol):
    """The port keygen's handlers depend on (a fake implements it in unit tests)."""

    async def generate(self, specs: Sequence[tuple[KeySpec, Protection, bytes]]
                       ) -> list[GeneratedVersion | KlmError]: ...

    async def healthy(self) -> bool: ...

    async def destroy_objects(self, object_ids: Sequence[bytes]) -> dict[str, list[str]]: ...

    @property
    def token_label(self) -> str: ...


def _usage_attributes(usages: frozenset[Usage]) -> dict[Attribute, bool]:
    """PKCS#11 capability attributes for the secret or private half of a key."""
    return {
        Attribute.ENCRYPT: Usage.ENCRYPT in usages,
        Attribute.DECRYPT: Usage.DECRYPT in usages,
        Attribute.WRAP: Usage.WRAP in usages,
        Attribute.UNWRAP: Usage.UNWRAP in usages,
        Attribute.SIGN: Usage.SIGN in usages or Usage.MAC in usages,
        Attribute.VERIFY: Usage.VERIFY in usages or Usage.MAC in usages,
        Attribute.DERIVE: Usage.DERIVE in usages,
    }


def _private_attributes(usages: frozenset[Usage]) -> dict[Attribute, bool]:
    return {Attribute.SIGN: Usage.SIGN in usages,
            Attribute.DECRYPT: Usage.DECRYPT in usages,
            Attribute.UNWRAP: Usage.UNWRAP in usages,
            Attribute.DERIVE: Usage.DERIVE in usages}


def _public_attributes(usages: frozenset[Usage]) -> dict[Attribute, bool]:
    return {Attribute.VERIFY: Usage.VERIFY in usages or Usage.SIGN in usages,
            Attribute.ENCRYPT: Usage.ENCRYPT in usages or Usage.DECRYPT in usages,
            Attribute.WRAP: Usage.WRAP in usages or Usage.UNWRAP in usages}


#: errors that mean the session or token is gone, not that one operation was refused
_LOST = (pkcs11.SessionHandleInvalid, pkcs11.SessionClosed, pkcs11.DeviceRemoved,
         pkcs11.TokenNotPresent, pkcs11.DeviceError, pkcs11.DeviceMemory,
         pkcs11.TokenNotRecognised, pkcs11.UserNotLoggedIn)


def object_id(key_id: str, version: int) -> bytes:
    """CKA_ID of an hsm-resident key version: derived from key id and version."""
    return hashlib.sha256(f"{key_id}#{version}".encode()).digest()[:16]


class Pkcs11Hsm:
    """One PKCS#11 session on one thread, with the master KEK found or created at open.

    The session heals itself: when a call fails and the token no longer answers (module
    missing, token absent, wrong PIN, session lost), the session is dropped and the next call
    (a batch, a health probe) re-initialises the library and opens a new one — no restart.
    """

    #: least time between two attempts to (re)open the session
    REOPEN_INTERVAL = 0.5

    def __init__(self, module: str, token_label: str, pin: str | Callable[[], str]) -> None:
        self._module = module
        self._token_label = token_label
        self._pin = pin if callable(pin) else (lambda: pin)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
        self._session: Any = None
        self._kek: Any = None
        self._mechanisms: frozenset[Mechanism] = frozenset()
        self._lib_loaded = False
        self._last_attempt = 0.0
        #: incremented at every (re)open: object handles from an older session are void
        self.generation = 0
        self._reopen_hooks: list[Callable[[], None]] = []

    @property
    def token_label(self) -> str:
        return self._token_label

    def on_reopen(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the HSM thread after every re-open (not the first open): the
        library was re-initialised, so every cached object handle (unwrapped keys, a
        resident signing key) is void and must be forgotten, not destroyed."""
        self._reopen_hooks.append(hook)

    # ---- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def healthy(self) -> bool:
        try:
            return bool(await self._run(self._healthy))
        except KlmError:
            return False

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        name = getattr(fn, "__name__", "call").strip("_")
        with klm_metrics.hsm_operation(name):  # latency and errors per operation (issue 8)
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(session, master_kek, *args)`` on the HSM thread — how other adapter
        modules (usage operations, backup wrapping) add operations to the one session.

        A PKCS#11 error is re-raised as is when the token still answers (the HSM refused this
        operation); when it does not, the session is dropped and :class:`HsmUnavailable`
        raised, so the caller retries later instead of answering."""
        def call() -> T:
            session = self._ensure_session()
            try:
                return fn(session, self._kek, *args)
            except pkcs11.PKCS11Error as exc:
                self._raise_if_lost(exc)
                raise

        call.__name__ = getattr(fn, "__name__", "call")  # the metric names the operation
        return await self._run(call)

    # the methods below run on the HSM thread only
    def _ensure_session(self) -> Any:
        if self._session is None:
            now = time.monotonic()
            if now - self._last_attempt < self.REOPEN_INTERVAL:
                raise HsmUnavailable("no HSM session (reconnecting)")
            self._last_attempt = now
            self._open()
        return self._session

    def _open(self) -> None:
        self._drop_session()
        try:
            lib = pkcs11.lib(self._module)
            if self._lib_loaded:
                # C_Finalize + C_Initialize: SoftHSM re-reads its token directory, so a
                # returned or newly initialised token becomes visible again
                lib.reinitialize()
            self._lib_loaded = True
            token = lib.get_token(token_label=self._token_label)
            self._session = token.open(rw=True, user_pin=self._pin())
            self._mechanisms = frozenset(token.slot.get_mechanisms())
            self._kek = _session_copy(self._find_or_create_master_kek())
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
            self._drop_session()
            raise HsmUnavailable(f"cannot open token {self._token_label!r}: "
                                 f"{type(exc).__name__} {exc}".strip()) from exc
        self.generation += 1
        log.info("HSM session open on token %r", self._token_label)
        if self.generation > 1:
            for hook in self._reopen_hooks:
                hook()

    def _drop_session(self) -> None:
        session, self._session, self._kek = self._session, None, None
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()

    def _close(self) -> None:
        self._drop_session()

    def _alive(self) -> bool:
        """Does the token still answer and hold the master KEK?"""
        if self._session is None:
            return False
        try:
            self._session.get_key(label=MASTER_KEK_LABEL, key_type=KeyType.AES,
                                  object_class=ObjectClass.SECRET_KEY)
            return True
        except (pkcs11.PKCS11Error, RuntimeError):
            return False

    def _raise_if_lost(self, exc: BaseException) -> None:
        if isinstance(exc, _LOST) or not self._alive():
            log.warning("HSM session lost (%s); will reconnect", type(exc).__name__)
            self._drop_session()
            raise HsmUnavailable(f"HSM session lost: {type(exc).__name__}") from exc

    def _healthy(self) -> bool:
        try:
            self._ensure_session()
        except HsmUnavailable:
            return False
        if self._alive():
            return True
        log.warning("HSM token does not answer; will reconnect")
        self._drop_session()
        return False

    def _find_or_create_master_kek(self) -> Any:
        try:
            return self._session.get_key(label=MASTER_KEK_LABEL, key_type=KeyType.AES,
                                         object_class=ObjectClass.SECRET_KEY)
        except pkcs11.NoSuchKey:
            log.info("creating master KEK %r on the token", MASTER_KEK_LABEL)
            return self._session.generate_key(
                KeyType.AES, 256, label=MASTER_KEK_LABEL, store=True,
                template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                          Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.WRAP: True, Attribute.UNWRAP: True,
                          Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
                          Attribute.SIGN: False, Attribute.VERIFY: False,
                          Attribute.DERIVE: False})

    # ---- end of life ----------------------------------------------------------------------
    async def destroy_objects(self, object_ids: Sequence[bytes]) -> dict[str, list[str]]:
        """Destroy the token objects of hsm-resident versions (see :mod:`.hsm_lifecycle`)."""
        return await self.run(hsm_lifecycle.destroy_objects, list(object_ids))

    async def resident_objects(self) -> list[hsm_lifecycle.ResidentObject]:
        return await self.run(hsm_lifecycle.resident_objects)

    # ---- generation -----------------------------------------------------------------------
    async def generate(self, specs: Sequence[tuple[KeySpec, Protection, bytes]]
                       ) -> list[GeneratedVersion | KlmError]:
        """Generate a batch on the HSM thread; one result (or coded error) per spec."""
        return await self._run(self._generate_batch, list(specs))

    def _generate_batch(self, specs: list[tuple[KeySpec, Protection, bytes]]
                        ) -> list[GeneratedVersion | KlmError]:
        self._ensure_session()
        results: list[GeneratedVersion | KlmError] = []
        for spec, protection, obj_id in specs:
            try:
                results.append(self._generate_one(spec, protection, obj_id))
            except KlmError as exc:
                results.append(exc)
            except pkcs11.PKCS11Error as exc:
                self._raise_if_lost(exc)  # the whole batch is retried when the HSM is back
                results.append(HsmError(f"HSM refused to generate {spec.label}: "
                                        f"{type(exc).__name__}"))
        return results

    def _require(self, mechanism: Mechanism, spec: KeySpec) -> None:
        if mechanism not in self._mechanisms:
            raise MechanismUnavailable(
                f"the HSM module lacks {mechanism.name} needed for {spec.label}")

    def _generate_one(self, spec: KeySpec, protection: Protection,
                      obj_id: bytes) -> GeneratedVersion:
        resident = protection is Protection.HSM_RESIDENT
        common: dict[Attribute, Any] = {Attribute.TOKEN: resident, Attribute.PRIVATE: True,
                  Attribute.SENSITIVE: True,
                  # a resident key is extractable only so that it can be wrapped for backup
                  Attribute.EXTRACTABLE: True}
        if resident:
            # objects under this CKA_ID can only be left from an attempt that never
            # committed (key ids are per request, versions per committed row): remove them,
            # or a retried request would leave a second object with the same id
            hsm_lifecycle.destroy_objects(self._session, self._kek, [obj_id])
            common[Attribute.ID] = obj_id
            common[Attribute.LABEL] = hsm_lifecycle.resident_label(obj_id)
        if spec.algorithm is Algorithm.AES or spec.algorithm.value.startswith("HMAC"):
            return self._secret(spec, common, resident, obj_id)
        return self._keypair(spec, common, resident, obj_id)

    def _secret(self, spec: KeySpec, common: dict[Attribute, Any], resident: bool,
                obj_id: bytes) -> GeneratedVersion:
        key_type = KeyType.AES if spec.algorithm is Algorithm.AES else _HMAC_KEY_TYPE
        mechanism = (Mechanism.AES_KEY_GEN if key_type is KeyType.AES
                     else Mechanism.GENERIC_SECRET_KEY_GEN)
        self._require(mechanism, spec)
        key = self._session.generate_key(
            key_type, spec.size, store=resident,
            template={**common, **_usage_attributes(spec.usages)})
        kcv = bytes(key[Attribute.CHECK_VALUE]).hex()
        return self._finish(key, None, kcv, resident, obj_id)

    def _keypair(self, spec: KeySpec, common: dict[Attribute, Any], resident: bool,
                 obj_id: bytes) -> GeneratedVersion:
        private = {**common, **_private_attributes(spec.usages)}
        public: dict[Attribute, Any] = {Attribute.TOKEN: resident,
                                        **_public_attributes(spec.usages)}
        if resident:
            public[Attribute.ID] = obj_id
            public[Attribute.LABEL] = common[Attribute.LABEL]
        if spec.algorithm is Algorithm.RSA:
            self._require(Mechanism.RSA_PKCS_KEY_PAIR_GEN, spec)
            pub, priv = self._session.generate_keypair(
                KeyType.RSA, spec.size, store=resident,
                public_template=public, private_template=private)
            der = _rsa_spki(pub)
        else:
            is_ed = spec.algorithm is Algorithm.ED25519
            mechanism = (Mechanism.EC_EDWARDS_KEY_PAIR_GEN if is_ed
                         else Mechanism.EC_KEY_PAIR_GEN)
            self._require(mechanism, spec)
            curve_oid = _ED25519_OID if is_ed else CURVES[str(spec.curve)][1]
            params = self._session.create_domain_parameters(
                KeyType.EC_EDWARDS if is_ed else KeyType.EC,
                {Attribute.EC_PARAMS: _named_curve(curve_oid)}, local=True)
            pub, priv = params.generate_keypair(
                store=resident, mechanism=mechanism,
                public_template=public, private_template=private)
            der = _ed25519_spki(pub) if is_ed else _ec_spki(pub, spec)
        if not resident:
            pub.destroy()  # the SPKI is all we keep of a session public key
        return self._finish(priv, der, None, resident, obj_id)

    def _finish(self, key: Any, public_der: bytes | None, kcv: str | None, resident: bool,
                obj_id: bytes) -> GeneratedVersion:
        if resident:
            return GeneratedVersion(None, public_der, kcv, hsm_object_id=obj_id)
        # session object: wrap under the master KEK, then let it go (it dies with the session
        # anyway; destroying it now keeps the session small)
        try:
            wrapped = self._kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        except pkcs11.KeyNotWrappable as exc:
            # SoftHSM 2.6 cannot PKCS#8-encode an Ed25519 private key for wrapping
            raise MechanismUnavailable(
                f"the HSM module cannot wrap this {key.key_type.name} private key under the "
                "master KEK; ask for protection hsm-resident") from exc
        finally:
            key.destroy()
        return GeneratedVersion(bytes(wrapped), public_der, kcv)


def _session_copy(kek: Any) -> Any:
    """The master KEK as this session uses it: a session-object copy of the token object.

    SoftHSM re-checks a token object's file at every use (an open, a stat and two ``fcntl``
    locks per wrap or unwrap: a wrap took 165 µs with the token object and 128 µs with the
    copy, an unwrap 225 and 164 µs, measured 2026-11-28); a session object is in memory.
    The copy has the same value and the same protection (sensitive, not extractable),
    another label (so look-ups by the master KEK's label still find the token object
    alone) and dies with the session. A module that refuses ``C_CopyObject`` gets the
    token object itself."""
    try:
        return kek.copy({Attribute.TOKEN: False, Attribute.LABEL: f"{MASTER_KEK_LABEL}-session"})
    except pkcs11.PKCS11Error as exc:
        log.info("master KEK used from the token (no session copy: %s)", type(exc).__name__)
        return kek


@functools.cache
def _named_curve(oid: str) -> bytes:
    """DER ECParameters of a named curve (encoded once: asn1crypto is slow per key)."""
    return bytes(encode_named_curve_parameters(oid))


def _rsa_spki(pub: Any) -> bytes:
    numbers = rsa.RSAPublicNumbers(int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                                   int.from_bytes(pub[Attribute.MODULUS], "big"))
    return numbers.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def _ec_point(pub: Any) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point."""
    raw = bytes(pub[Attribute.EC_POINT])
    if raw[0] == 0x04 and raw[1] == len(raw) - 2:  # short-form OCTET STRING
        return raw[2:]
    if raw[0] == 0x04 and raw[1] == 0x81:
        return raw[3:]
    return raw


def _ec_spki(pub: Any, spec: KeySpec) -> bytes:
    curve = ec.SECP256R1() if spec.curve == "P-256" else ec.SECP384R1()
    key = ec.EllipticCurvePublicKey.from_encoded_point(curve, _ec_point(pub))
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _ed25519_spki(pub: Any) -> bytes:
    key = ed25519.Ed25519PublicKey.from_public_bytes(_ec_point(pub))
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
