"""Crypto policies as data: which algorithms and sizes are approved per usage and per
certificate profile, cryptoperiods, rotation mode, destruction waiting period, who may
request what, and the algorithm transition calendar.

A policy is a YAML (or JSON) document validated by :class:`CryptoPolicy`; KLM ships
``klm_common/policies/default.yaml`` (NIST SP 800-57 Pt 1 Rev. 5, SP 800-131A Rev. 2,
NIST IR 8547 ipd — each figure cites its source in the file). Periods are in policy
*days*: a service multiplies them by ``KlmSettings.day_seconds`` (86400 in production).
Calendar dates of the transition table are real dates and are never scaled.

Several policies can be in force at once (:class:`PolicySet`): the default one
(``KLM_POLICY_FILE`` or the shipped file) and further named ones, one document per file of
a directory (``KLM_POLICY_DIR``). A key names the policy that governs it (``policy``);
a key naming none follows the default.

Pure rules, no I/O beyond :func:`load_policy` and :func:`load_policy_set` reading files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from klm_common.envelope import validation_message
from klm_common.errors import PolicyUnknown, RequestInvalid

Severity = Literal["info", "low", "medium", "high", "critical"]
RotationMode = Literal["automatic", "notify"]


class PolicyInvalid(RequestInvalid):
    """A policy document that does not validate (the previous policy stays in force)."""

    code = "policy_invalid"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def algorithm_family(algorithm: str) -> str:
    """``RSA``, ``AES``, ``EC``, ``Ed25519``, ``HMAC``, … — what a minimum size applies to."""
    name = algorithm.strip().upper()
    if name.startswith("HMAC"):
        return "HMAC"
    if name.startswith(("EC-", "ECDSA")) or name == "EC":
        return "EC"
    if name in ("ED25519", "EDDSA"):
        return "Ed25519"
    for family in ("RSA", "AES"):
        if name == family or name.startswith(f"{family}-"):
            return family
    return algorithm.strip()


def normalise_algorithm(algorithm: str) -> str:
    """Upper-case, no separators: ``hmac-sha-1`` and ``HMAC-SHA1`` compare equal."""
    return algorithm.strip().upper().replace("-", "").replace("_", "")


class ApprovedAlgorithm(_Model):
    """An algorithm family allowed for a usage or profile, with its minimum size."""

    name: str = Field(description="algorithm family: AES, RSA, EC, Ed25519, HMAC")
    min_size: int = Field(default=0, ge=0)
    curves: list[str] | None = Field(default=None, description="EC curves allowed (EC only)")

    def admits(self, algorithm: str, size: int, curve: str | None) -> bool:
        if algorithm_family(algorithm).upper() != self.name.upper():
            return False
        if self.curves is not None and curve is not None and curve not in self.curves:
            return False
        return size >= self.min_size


class Rule(_Model):
    """What applies to a key: per usage, or per certificate profile (which wins)."""

    algorithms: list[ApprovedAlgorithm] = Field(min_length=1)
    cryptoperiod_days: float = Field(gt=0, description="originator-usage period of a version")
    process_only_days: float = Field(
        ge=0, description="how long a superseded version may still process (decrypt/verify)")
    rotation: RotationMode = "automatic"
    destruction_wait_days: int = Field(default=30, ge=7, le=30)
    usages: list[str] | None = Field(default=None, description="usages a profile allows")
    source: str = Field(min_length=1, description="where the figures come from")


class Minimum(_Model):
    bits: int = Field(gt=0)
    source: str


class Forbidden(_Model):
    reason: str
    severity: Severity = "high"
    source: str


class Transition(_Model):
    """One row of the transition calendar: a family and size range, and its dates."""

    family: str
    max_size: int | None = Field(default=None, description="applies to sizes up to this")
    curves: list[str] | None = None
    deprecated_after: date | None = Field(default=None, description="deprecated from next day")
    disallowed_after: date
    use: str = Field(default="all", description="what the date applies to, as in the source")
    source: str

    def matches(self, algorithm: str, size: int, curve: str | None) -> bool:
        if algorithm_family(algorithm).upper() != self.family.upper():
            return False
        if self.curves is not None:
            return curve in self.curves
        return self.max_size is None or size <= self.max_size


class Permission(_Model):
    """Requesters (CloudEvent ``source`` glob patterns) allowed to send a request type."""

    request: str = Field(description="request type without prefix, e.g. import_observed_key")
    requesters: list[str] = Field(min_length=1)


class Defaults(_Model):
    #: how long past its due time an automatic rotation may lag before it is a finding
    overdue_grace_days: float = Field(default=7, ge=0)
    #: a dispatched command is re-sent (same id, so never executed twice) after this long
    #: (the scheduler reads it from the default policy only; a refused command's retry
    #: follows its key's policy)
    redispatch_days: float = Field(default=1, gt=0)
    #: a key used within this many days needs an override to be destroyed
    recent_use_days: float = Field(default=30, ge=0)
    #: calendar days before a transition date that a finding warns ahead (real days)
    transition_warn_ahead_days: int = Field(default=730, ge=0)


class CryptoPolicy(_Model):
    name: str = Field(min_length=1, max_length=100)
    version: int = Field(ge=1)
    description: str = ""
    sources: dict[str, str] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    minimum_sizes: dict[str, Minimum] = Field(default_factory=dict)
    forbidden_algorithms: dict[str, Forbidden] = Field(default_factory=dict)
    usages: dict[str, Rule] = Field(min_length=1)
    profiles: dict[str, Rule] = Field(default_factory=dict)
    transitions: list[Transition] = Field(default_factory=list)
    permissions: list[Permission] = Field(default_factory=list)

    @model_validator(mode="after")
    def _profiles_name_usages(self) -> CryptoPolicy:
        for name, rule in self.profiles.items():
            if not rule.usages:
                raise ValueError(f"profile {name!r} must list the usages it allows")
        return self

    # ---------------------------------------------------------------- lookups
    def rule_for(self, usages: list[str] | tuple[str, ...], profile: str | None) -> Rule | None:
        """The profile's rule if the key has a known profile, else the strictest rule among
        its usages (shortest cryptoperiod); None if no usage of the key has a rule."""
        if profile is not None and profile in self.profiles:
            return self.profiles[profile]
        rules = [self.usages[u] for u in usages if u in self.usages]
        if not rules:
            return None
        return min(rules, key=lambda r: (r.cryptoperiod_days, r.process_only_days))

    def forbidden(self, algorithm: str) -> tuple[str, Forbidden] | None:
        wanted = normalise_algorithm(algorithm)
        for name, entry in self.forbidden_algorithms.items():
            if normalise_algorithm(name) == wanted:
                return name, entry
        return None

    def minimum_for(self, algorithm: str) -> Minimum | None:
        family = algorithm_family(algorithm).upper()
        for name, entry in self.minimum_sizes.items():
            if name.upper() == family:
                return entry
        return None

    def may_request(self, requester: str, request: str) -> bool:
        """Allowed if a permission for ``request`` names a matching requester pattern; a
        request type no permission mentions is open to every requester."""
        entries = [p for p in self.permissions if p.request == request]
        if not entries:
            return True
        return any(fnmatch.fnmatchcase(requester, pat) for p in entries for pat in p.requesters)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the policy: what a change event names."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def changed_sections(old: CryptoPolicy | None, new: CryptoPolicy) -> list[str]:
    """Top-level sections that differ (``usages.encrypt``, ``profiles.tls-server``, …)."""
    if old is None:
        return sorted(new.model_dump(mode="json"))
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    changed: list[str] = []
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section), after.get(section)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and section in ("usages", "profiles"):
            changed += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            changed.append(section)
    return changed


def parse_policy(text: str, origin: str = "<policy>") -> CryptoPolicy:
    """Validate a YAML/JSON policy document; raise :class:`PolicyInvalid` with the reason."""
    try:
        document: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyInvalid(f"{origin}: not YAML: {exc}") from None
    if not isinstance(document, dict):
        raise PolicyInvalid(f"{origin}: a policy is a mapping, got {type(document).__name__}")
    try:
        return CryptoPolicy.model_validate(document)
    except ValidationError as exc:
        raise PolicyInvalid(f"{origin}: {validation_message(exc)}") from None


#: how the shipped default policy is named where a path would be
SHIPPED_DEFAULT = "klm_common/policies/default.yaml"
#: the files of a policy directory that are policies (others are ignored)
POLICY_SUFFIXES = (".yaml", ".yml", ".json")


def default_policy_text() -> str:
    return resources.files("klm_common").joinpath("policies/default.yaml").read_text()


def load_policy(path: Path | None = None) -> CryptoPolicy:
    """The policy at ``path``, or the shipped default policy."""
    if path is None:
        return parse_policy(default_policy_text(), SHIPPED_DEFAULT)
    return parse_policy(path.read_text(), str(path))


class PolicySet:
    """The policies in force, by name: the default one and the named ones.

    Names are unique (a second document with a name already taken is refused, so a key's
    ``policy`` always means one document). ``origins`` says which file each came from."""

    def __init__(self, default: CryptoPolicy, others: Iterable[CryptoPolicy] = (),
                 origins: Mapping[str, str] | None = None) -> None:
        self.default = default
        self.origins = dict(origins or {default.name: SHIPPED_DEFAULT})
        self._by_name: dict[str, CryptoPolicy] = {default.name: default}
        for policy in others:
            if policy.name in self._by_name:
                raise PolicyInvalid(
                    f"two policies are named {policy.name!r}: "
                    f"{self.origins.get(policy.name, '?')} and another one; names must be "
                    "unique", name=policy.name)
            self._by_name[policy.name] = policy

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self) -> Iterator[CryptoPolicy]:
        """Every policy, the default first, then by name."""
        yield self.default
        yield from (self._by_name[n] for n in self.names if n != self.default.name)

    def __len__(self) -> int:
        return len(self._by_name)

    def knows(self, name: str | None) -> bool:
        return name is None or name in self._by_name

    def get(self, name: str | None) -> CryptoPolicy | None:
        """The policy a key naming ``name`` follows (None names the default); None if
        no policy has that name."""
        return self.default if name is None else self._by_name.get(name)

    def for_key(self, name: str | None) -> CryptoPolicy:
        """Like :meth:`get`, for a request: an unknown name raises :class:`PolicyUnknown`."""
        policy = self.get(name)
        if policy is None:
            raise PolicyUnknown(f"no policy named {name!r} is loaded (known: "
                                f"{', '.join(self.names)})", policy=name or "")
        return policy

    def applied(self, name: str | None) -> CryptoPolicy:
        """The policy applied to a key naming ``name``: the default one while the name is
        unknown (the inventory raises a ``policy_unknown`` finding meanwhile)."""
        return self.get(name) or self.default

    def origin(self, policy: CryptoPolicy) -> str:
        return self.origins.get(policy.name, SHIPPED_DEFAULT)


def policy_files(directory: Path) -> list[Path]:
    """The policy documents of a directory (not recursive; hidden files skipped), by name."""
    if not directory.is_dir():
        raise PolicyInvalid(f"policy directory {directory} does not exist")
    return sorted(p for p in directory.iterdir()
                  if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file())


def load_policy_set(default: Path | None = None, directory: Path | None = None) -> PolicySet:
    """The default policy (``default``, or the shipped one) and every policy document of
    ``directory``; raises :class:`PolicyInvalid` if one does not validate or two share a
    name (the default file may itself be in the directory: it is read once)."""
    first = load_policy(default)
    origins = {first.name: str(default) if default else SHIPPED_DEFAULT}
    others: list[CryptoPolicy] = []
    skip = default.resolve() if default else None
    for path in policy_files(directory) if directory else []:
        if path.resolve() == skip:
            continue
        policy = load_policy(path)
        if policy.name in origins:
            raise PolicyInvalid(f"{path}: policy name {policy.name!r} is already used by "
                                f"{origins[policy.name]}; names must be unique",
                                name=policy.name)
        origins[policy.name] = str(path)
        others.append(policy)
    return PolicySet(first, others, origins)
