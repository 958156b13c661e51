"""Certificate profiles (``tls-server``, ``tls-client``, ``code-signing``,
``device-identity``, ``ca``): which keys a profile admits and what its CSR asks for.

The profiles are data (``klm_common/profiles.yaml``, each with its source), validated
here. :func:`profile_key_spec` turns a generate request naming a profile into a
:class:`~klm_common.algorithms.KeySpec`, or raises a coded error: an algorithm, size,
curve, usage or protection the profile does not admit is refused before any HSM call.
Pure rules; the only I/O is :func:`load_profiles` reading one file.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klm_common.algorithms import KeySpec, Usage, key_spec
from klm_common.envelope import validation_message
from klm_common.errors import (
    AlgorithmNotApproved,
    KeySizeInvalid,
    RequestInvalid,
    UsageNotPermitted,
)

KeyUsageName = Literal["digital_signature", "non_repudiation", "key_encipherment",
                       "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign"]
ExtendedKeyUsageName = Literal["server_auth", "client_auth", "code_signing",
                               "email_protection", "time_stamping", "ocsp_signing"]


class ProfileUnknown(RequestInvalid):
    code = "unknown_profile"


class ProfileMismatch(RequestInvalid):
    """The request asks for something the profile does not admit (protection, subject)."""

    code = "profile_mismatch"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AllowedKey(_Model):
    algorithm: Literal["EC", "RSA", "Ed25519"]
    curves: list[str] | None = None
    sizes: list[int] | None = None

    def admits(self, spec: KeySpec) -> bool:
        if spec.algorithm.value != self.algorithm:
            return False
        if self.curves is not None and spec.curve not in self.curves:
            return False
        return self.sizes is None or spec.size in self.sizes

    def describe(self) -> str:
        options = self.curves or [str(s) for s in self.sizes or []]
        return f"{self.algorithm} {'/'.join(options)}".strip()


class CertificateProfile(_Model):
    name: str = ""
    description: str
    algorithms: list[AllowedKey] = Field(min_length=1)
    usages: list[Usage] = Field(min_length=1, description="KLM usages of the key")
    key_usage: list[KeyUsageName] = Field(min_length=1, description="X.509 KeyUsage bits")
    extended_key_usage: list[ExtendedKeyUsageName] = Field(default_factory=list)
    ca: bool = False
    path_length: int | None = Field(default=None, ge=0)
    requires_san: bool = False
    protection: Literal["hsm-wrapped", "hsm-resident"] | None = None
    cryptoperiod_days: float = Field(gt=0)
    source: str = Field(min_length=1)


DEFAULT_FILE = "profiles.yaml"


def load_profiles(path: Path | None = None) -> dict[str, CertificateProfile]:
    """The profiles of ``path`` (default: the ones KLM ships), validated."""
    text = path.read_text() if path is not None else \
        resources.files("klm_common").joinpath(DEFAULT_FILE).read_text()
    raw = yaml.safe_load(text) or {}
    try:
        return {name: CertificateProfile.model_validate({**body, "name": name})
                for name, body in raw.items()}
    except ValidationError as exc:
        raise RequestInvalid(f"certificate profiles: {validation_message(exc)}") from None


@cache
def default_profiles() -> dict[str, CertificateProfile]:
    return load_profiles()


def get_profile(name: str, profiles: dict[str, CertificateProfile] | None = None
                ) -> CertificateProfile:
    profiles = profiles if profiles is not None else default_profiles()
    try:
        return profiles[name]
    except KeyError:
        raise ProfileUnknown(f"unknown certificate profile {name!r}; known: "
                             f"{', '.join(sorted(profiles))}", profile=name) from None


def profile_key_spec(profile: CertificateProfile, algorithm: str, size: int | None = None,
                     curve: str | None = None, usages: list[str] | None = None,
                     protection: str | None = None) -> KeySpec:
    """Validate a requested key against ``profile`` (its usages are the default)."""
    spec = key_spec(algorithm, size, curve, usages or [u.value for u in profile.usages])
    if not any(allowed.admits(spec) for allowed in profile.algorithms):
        admitted = ", ".join(a.describe() for a in profile.algorithms)
        error = AlgorithmNotApproved if not any(
            a.algorithm == spec.algorithm.value for a in profile.algorithms) else KeySizeInvalid
        raise error(f"profile {profile.name} admits {admitted}, not {spec.label}",
                    profile=profile.name)
    extra = spec.usages - frozenset(profile.usages)
    if extra:
        raise UsageNotPermitted(f"profile {profile.name} keys cannot be used to "
                                f"{', '.join(sorted(u.value for u in extra))}",
                                profile=profile.name)
    if Usage.SIGN not in spec.usages:
        raise UsageNotPermitted(f"a {profile.name} key must sign (its CSR is signed with it)")
    if profile.protection is not None and protection not in (None, profile.protection):
        raise ProfileMismatch(f"profile {profile.name} keys are {profile.protection}, "
                              f"not {protection}", profile=profile.name)
    return spec

