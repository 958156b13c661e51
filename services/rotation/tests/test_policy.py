"""The policy model and the shipped default policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from klm_common.policy import (
    PolicyInvalid,
    algorithm_family,
    changed_sections,
    load_policy,
    parse_policy,
)


def test_default_policy_loads_and_cites_its_sources() -> None:
    policy = load_policy()
    assert policy.minimum_sizes["RSA"].bits == 2048
    assert policy.usages["encrypt"].cryptoperiod_days == 730
    assert all(rule.source for rule in [*policy.usages.values(), *policy.profiles.values()])
    assert all(t.source.startswith("8547") for t in policy.transitions)
    assert {"57", "131A", "8547"} <= set(policy.sources)


def test_profile_rule_wins_and_usages_take_the_strictest() -> None:
    policy = load_policy()
    assert policy.rule_for(["sign"], "tls-server") is policy.profiles["tls-server"]
    assert policy.rule_for(["encrypt", "derive"], None) is policy.usages["derive"]
    assert policy.rule_for(["teleport"], None) is None


def test_forbidden_names_compare_loosely() -> None:
    policy = load_policy()
    assert policy.forbidden("hmac-sha-1") is not None
    assert policy.forbidden("HMAC-SHA256") is None
    assert algorithm_family("HMAC-SHA1") == "HMAC"
    assert algorithm_family("EC-P-256") == "EC"


@pytest.mark.parametrize("wait", [6, 31])
def test_destruction_wait_outside_7_to_30_days_is_refused(wait: int) -> None:
    text = load_policy().model_dump_json()
    bad = text.replace('"destruction_wait_days":30', f'"destruction_wait_days":{wait}', 1)
    with pytest.raises(PolicyInvalid, match="destruction_wait_days"):
        parse_policy(bad)


def test_permissions_by_requester_pattern() -> None:
    policy = parse_policy(load_policy().model_dump_json().replace(
        '"requesters":["*"]', '"requesters":["klm/scanner*"]'))
    assert policy.may_request("klm/scanner-1", "import_observed_key")
    assert not policy.may_request("someone", "import_observed_key")
    assert policy.may_request("someone", "rotate_key")  # not listed: open


def test_changed_sections_name_what_differs(tmp_path: Path) -> None:
    old = load_policy()
    path = tmp_path / "p.yaml"
    path.write_text(old.model_dump_json().replace('"cryptoperiod_days":365.0',
                                                  '"cryptoperiod_days":90.0', 1))
    new = load_policy(path)
    assert new.digest() != old.digest()
    assert changed_sections(old, new) == ["usages.derive"]


def test_not_yaml_is_refused() -> None:
    with pytest.raises(PolicyInvalid):
        parse_policy("- just\n- a list")
