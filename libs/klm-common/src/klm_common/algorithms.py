"""The key specification model: which algorithms, sizes, curves and usages KLM approves.

Pure rules, no I/O. A generate request is turned into a :class:`KeySpec` by
:func:`key_spec`, which raises a coded :mod:`klm_common.errors` error for anything
weak, unknown or self-contradictory, before any HSM call is made.

Sources: NIST SP 800-131A Rev. 2 (112-bit minimum security strength: RSA ≥ 2048,
no 1024-bit keys, no SHA-1 HMAC for new keys, no 3DES), SP 800-57 Pt 1 Rev. 5 §5.2
(one key, one purpose: an RSA key signs *or* encrypts, never both).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from klm_common.errors import (
    AlgorithmNotApproved,
    KeySizeBelowMinimum,
    KeySizeInvalid,
    UsageNotPermitted,
)


class Algorithm(StrEnum):
    AES = "AES"
    HMAC_SHA256 = "HMAC-SHA256"
    HMAC_SHA384 = "HMAC-SHA384"
    HMAC_SHA512 = "HMAC-SHA512"
    EC = "EC"
    ED25519 = "Ed25519"
    RSA = "RSA"


class Usage(StrEnum):
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    WRAP = "wrap"
    UNWRAP = "unwrap"
    SIGN = "sign"
    VERIFY = "verify"
    MAC = "mac"
    DERIVE = "derive"


class Protection(StrEnum):
    HSM_WRAPPED = "hsm-wrapped"
    HSM_RESIDENT = "hsm-resident"


class KeyClass(StrEnum):
    SECRET = "secret"  # noqa: S105 - a key class, not a password
    ASYMMETRIC = "asymmetric"


U = Usage
#: usages each algorithm can have at all
_ALLOWED_USAGES: dict[Algorithm, frozenset[Usage]] = {
    Algorithm.AES: frozenset({U.ENCRYPT, U.DECRYPT, U.WRAP, U.UNWRAP, U.DERIVE}),
    Algorithm.HMAC_SHA256: frozenset({U.MAC, U.DERIVE}),
    Algorithm.HMAC_SHA384: frozenset({U.MAC, U.DERIVE}),
    Algorithm.HMAC_SHA512: frozenset({U.MAC, U.DERIVE}),
    Algorithm.EC: frozenset({U.SIGN, U.VERIFY, U.DERIVE}),
    Algorithm.ED25519: frozenset({U.SIGN, U.VERIFY}),
    Algorithm.RSA: frozenset({U.SIGN, U.VERIFY, U.ENCRYPT, U.DECRYPT, U.WRAP, U.UNWRAP}),
}

_DEFAULT_USAGES: dict[Algorithm, frozenset[Usage]] = {
    Algorithm.AES: frozenset({U.ENCRYPT, U.DECRYPT}),
    Algorithm.HMAC_SHA256: frozenset({U.MAC}),
    Algorithm.HMAC_SHA384: frozenset({U.MAC}),
    Algorithm.HMAC_SHA512: frozenset({U.MAC}),
    Algorithm.EC: frozenset({U.SIGN, U.VERIFY}),
    Algorithm.ED25519: frozenset({U.SIGN, U.VERIFY}),
    Algorithm.RSA: frozenset({U.SIGN, U.VERIFY}),
}

_SIZES: dict[Algorithm, tuple[int, ...]] = {
    Algorithm.AES: (128, 256),
    Algorithm.HMAC_SHA256: (256,),
    Algorithm.HMAC_SHA384: (384,),
    Algorithm.HMAC_SHA512: (512,),
    Algorithm.RSA: (2048, 3072, 4096),
}
_MIN_SIZE: dict[Algorithm, int] = {Algorithm.AES: 128, Algorithm.RSA: 2048}

#: curve name → (size in bits, OID)
CURVES: dict[str, tuple[int, str]] = {
    "P-256": (256, "1.2.840.10045.3.1.7"),
    "P-384": (384, "1.3.132.0.34"),
}
_CURVE_ALIASES = {"P256": "P-256", "SECP256R1": "P-256", "PRIME256V1": "P-256",
                  "P384": "P-384", "SECP384R1": "P-384"}

#: names people use for algorithms that are not approved, with the reason
_NOT_APPROVED = {
    "DES": "single DES is broken",
    "3DES": "TDEA is disallowed for new keys (SP 800-131A Rev. 2)",
    "TDEA": "TDEA is disallowed for new keys (SP 800-131A Rev. 2)",
    "DES3": "TDEA is disallowed for new keys (SP 800-131A Rev. 2)",
    "RC4": "RC4 is broken",
    "HMAC-SHA1": "SHA-1 is not approved for new HMAC keys in KLM (SP 800-131A Rev. 2 §9)",
    "HMAC-MD5": "MD5 is broken",
    "DSA": "DSA signature generation is disallowed (FIPS 186-5)",
    "SECP256K1": "secp256k1 is not a NIST-approved curve",
}

_SIGNING = frozenset({U.SIGN, U.VERIFY})
_ENCRYPTION = frozenset({U.ENCRYPT, U.DECRYPT, U.WRAP, U.UNWRAP})


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A validated, normalised key specification."""

    algorithm: Algorithm
    size: int
    curve: str | None
    usages: frozenset[Usage]

    @property
    def key_class(self) -> KeyClass:
        if self.algorithm in (Algorithm.EC, Algorithm.ED25519, Algorithm.RSA):
            return KeyClass.ASYMMETRIC
        return KeyClass.SECRET

    @property
    def label(self) -> str:
        """Short human name such as ``AES-256``, ``EC-P-256``, ``RSA-2048``, ``Ed25519``."""
        if self.algorithm is Algorithm.EC:
            return f"EC-{self.curve}"
        if self.algorithm in (Algorithm.AES, Algorithm.RSA):
            return f"{self.algorithm.value}-{self.size}"
        return self.algorithm.value


def _split_algorithm(name: str) -> tuple[str, str | None]:
    """Accept ``AES`` + size, or the short forms ``AES-256``, ``RSA-2048``, ``EC-P-256``."""
    upper = name.strip().upper()
    for prefix in ("AES-", "RSA-"):
        if upper.startswith(prefix) and upper[len(prefix):].isdigit():
            return prefix[:-1], upper[len(prefix):]
    if upper.startswith("EC-") or upper.startswith("ECDSA-"):
        return "EC", upper.split("-", 1)[1]
    return upper, None


def parse_algorithm(name: str) -> tuple[Algorithm, str | None]:
    base, suffix = _split_algorithm(name)
    if base in _NOT_APPROVED:
        raise AlgorithmNotApproved(f"{name}: {_NOT_APPROVED[base]}", algorithm=name)
    aliases = {"ECDSA": "EC", "ED25519": "Ed25519", "EDDSA": "Ed25519",
               "HMAC-SHA-256": "HMAC-SHA256", "HMAC-SHA-384": "HMAC-SHA384",
               "HMAC-SHA-512": "HMAC-SHA512"}
    canonical = aliases.get(base, base)
    for alg in Algorithm:
        if alg.value.upper() == canonical.upper():
            return alg, suffix
    approved = ", ".join(a.value for a in Algorithm)
    raise AlgorithmNotApproved(f"unknown algorithm {name!r}; approved: {approved}",
                               algorithm=name)


def _curve(alg: Algorithm, curve: str | None, suffix: str | None) -> tuple[int, str | None]:
    if alg is Algorithm.ED25519:
        return 256, "Ed25519"
    name = (curve or suffix or "P-256").strip().upper()
    name = _CURVE_ALIASES.get(name.replace("-", ""), name)
    if name.replace("-", "") in ("SECP256K1",):
        raise AlgorithmNotApproved(f"curve {curve}: {_NOT_APPROVED['SECP256K1']}", curve=curve)
    if name not in CURVES:
        if name in ("P-192", "P-224", "P192", "P224"):
            raise KeySizeBelowMinimum(f"curve {name} is below the 128-bit strength KLM requires",
                                      curve=name)
        raise KeySizeInvalid(f"unsupported curve {name!r}; supported: {', '.join(CURVES)}",
                             curve=name)
    return CURVES[name][0], name


def _size(alg: Algorithm, size: int | None, suffix: str | None) -> int:
    chosen = size if size is not None else (int(suffix) if suffix else max(_SIZES[alg]))
    if suffix and size is not None and int(suffix) != size:
        raise KeySizeInvalid(f"algorithm says {suffix} bits but size says {size}", size=size)
    minimum = _MIN_SIZE.get(alg)
    if minimum is not None and chosen < minimum:
        raise KeySizeBelowMinimum(
            f"{alg.value}-{chosen} is below the minimum of {minimum} bits (SP 800-131A Rev. 2)",
            size=chosen, minimum=minimum)
    if chosen not in _SIZES[alg]:
        allowed = ", ".join(str(s) for s in _SIZES[alg])
        raise KeySizeInvalid(f"{alg.value} size {chosen} is not supported; allowed: {allowed}",
                             size=chosen)
    return chosen


def _usages(alg: Algorithm, usages: list[str] | None) -> frozenset[Usage]:
    if not usages:
        return _DEFAULT_USAGES[alg]
    try:
        chosen = frozenset(Usage(u.strip().lower()) for u in usages)
    except ValueError as exc:
        raise UsageNotPermitted(f"unknown usage in {usages}: {exc}", usages=usages) from None
    extra = chosen - _ALLOWED_USAGES[alg]
    if extra:
        raise UsageNotPermitted(
            f"{alg.value} keys cannot be used to {', '.join(sorted(extra))}",
            algorithm=alg.value, usages=sorted(extra))
    if alg is Algorithm.RSA and chosen & _SIGNING and chosen & _ENCRYPTION:
        raise UsageNotPermitted(
            "an RSA key signs or encrypts, not both (SP 800-57 Pt 1 §5.2)",
            usages=sorted(chosen))
    return chosen


def key_spec(algorithm: str, size: int | None = None, curve: str | None = None,
             usages: list[str] | None = None) -> KeySpec:
    """Validate and normalise a requested key; raise a coded error if it is not approved."""
    alg, suffix = parse_algorithm(algorithm)
    if alg in (Algorithm.EC, Algorithm.ED25519):
        if size is not None and alg is Algorithm.EC and curve is None and suffix is None:
            suffix = {256: "P-256", 384: "P-384"}.get(size, f"P-{size}")
        bits, curve_name = _curve(alg, curve, suffix)
        if size is not None and size != bits:
            if size < 256:
                raise KeySizeBelowMinimum(f"EC size {size} is below 256 bits", size=size)
            raise KeySizeInvalid(f"size {size} does not match curve {curve_name}", size=size)
        return KeySpec(alg, bits, curve_name, _usages(alg, usages))
    if curve is not None:
        raise KeySizeInvalid(f"{alg.value} keys have no curve", curve=curve)
    return KeySpec(alg, _size(alg, size, suffix), None, _usages(alg, usages))
