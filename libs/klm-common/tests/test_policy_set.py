"""Named policies: the default policy plus one document per file of a policy directory,
looked up by the name a key carries."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from klm_common.errors import PolicyUnknown
from klm_common.policy import (
    SHIPPED_DEFAULT,
    CryptoPolicy,
    PolicyInvalid,
    PolicySet,
    load_policy,
    load_policy_set,
)


def named(name: str, cryptoperiod: float = 30) -> CryptoPolicy:
    document = load_policy().model_dump(mode="json")
    document["name"] = name
    for rule in document["usages"].values():
        rule["cryptoperiod_days"] = cryptoperiod
    return CryptoPolicy.model_validate(document)


def write(path: Path, policy: CryptoPolicy) -> Path:
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json")))
    return path


def test_the_default_alone() -> None:
    policies = load_policy_set()
    assert policies.default.name == "klm-default" and policies.names == ["klm-default"]
    assert policies.origin(policies.default) == SHIPPED_DEFAULT
    assert policies.for_key(None) is policies.default
    assert policies.for_key("klm-default") is policies.default


def test_named_policies_from_a_directory(tmp_path: Path) -> None:
    write(tmp_path / "short.yaml", named("short", 4))
    write(tmp_path / "legacy.json", named("legacy", 90))
    (tmp_path / "README.txt").write_text("not a policy")
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    policies = load_policy_set(None, tmp_path)
    assert policies.names == ["klm-default", "legacy", "short"]
    assert [p.name for p in policies] == ["klm-default", "legacy", "short"]
    assert policies.for_key("short").usages["encrypt"].cryptoperiod_days == 4
    assert policies.origin(policies.for_key("legacy")) == str(tmp_path / "legacy.json")
    assert policies.for_key(None).name == "klm-default"


def test_an_unknown_name(tmp_path: Path) -> None:
    policies = load_policy_set(None, tmp_path)
    assert not policies.knows("nope") and policies.knows(None)
    assert policies.get("nope") is None
    assert policies.applied("nope") is policies.default  # what the inventory applies
    with pytest.raises(PolicyUnknown) as raised:  # what a request gets
        policies.for_key("nope")
    assert raised.value.code == "policy_unknown"
    assert "klm-default" in raised.value.message


def test_two_policies_of_one_name_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", named("short"))
    write(tmp_path / "b.yaml", named("short", 9))
    with pytest.raises(PolicyInvalid, match=r"'short' is already used by .*a\.yaml"):
        load_policy_set(None, tmp_path)


def test_a_named_policy_cannot_take_the_default_name(tmp_path: Path) -> None:
    write(tmp_path / "impostor.yaml", named("klm-default"))
    with pytest.raises(PolicyInvalid, match="klm-default"):
        load_policy_set(None, tmp_path)
    with pytest.raises(PolicyInvalid, match="two policies"):
        PolicySet(load_policy(), [named("klm-default")])


def test_the_default_file_inside_the_directory_is_read_once(tmp_path: Path) -> None:
    default = write(tmp_path / "default.yaml", named("house", 365))
    write(tmp_path / "short.yaml", named("short", 4))
    policies = load_policy_set(default, tmp_path)
    assert policies.default.name == "house" and policies.names == ["house", "short"]


def test_an_invalid_document_or_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid, match="does not exist"):
        load_policy_set(None, tmp_path / "missing")
    (tmp_path / "bad.yaml").write_text("usages: {}\n")
    with pytest.raises(PolicyInvalid, match=r"bad\.yaml"):
        load_policy_set(None, tmp_path)
