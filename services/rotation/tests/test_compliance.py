"""Compliance findings of one key against the default policy (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.rotation.tests.factories import T0, inventory_key, later

from klm_common.policy import load_policy
from klm_rotation.domain.compliance import Changes, compare, evaluate

POLICY = load_policy()
DAY = 1.0


def codes(key, now=T0):  # type: ignore[no-untyped-def]
    return set(evaluate(key, POLICY, now, DAY))


def test_a_fresh_aes_key_is_compliant() -> None:
    assert codes(inventory_key()) == set()


def test_rsa_1024_is_below_the_minimum() -> None:
    key = inventory_key(algorithm="RSA", size=1024, usages=("sign", "verify"), origin="observed")
    found = evaluate(key, POLICY, T0, DAY)
    assert "key_size_below_minimum" in found
    assert found["key_size_below_minimum"].evidence["minimum"] == 2048
    assert found["key_size_below_minimum"].severity == "high"


def test_hmac_sha1_is_not_approved() -> None:
    key = inventory_key(algorithm="HMAC-SHA1", size=160, usages=("mac",), origin="observed")
    found = evaluate(key, POLICY, T0, DAY)
    assert found["algorithm_not_approved"].rule == "forbidden_algorithms.HMAC-SHA1"
    assert "algorithm_not_allowed" not in found  # one finding for one cause


def test_usage_outside_the_profile_and_algorithm_outside_the_profile() -> None:
    key = inventory_key(algorithm="RSA", size=2048, usages=("encrypt",), profile="tls-server")
    assert {"usage_not_permitted", "algorithm_not_allowed"} - codes(key) == {
        "algorithm_not_allowed"}
    ec = inventory_key(algorithm="EC", size=256, curve="P-256", usages=("sign",),
                       profile="code-signing")
    assert "algorithm_not_allowed" in codes(ec)


def test_age_past_the_cryptoperiod_then_overdue_after_the_grace() -> None:
    key = inventory_key()
    assert codes(key, later(729)) == set()
    assert codes(key, later(731)) == {"cryptoperiod_exceeded"}
    assert codes(key, later(738)) == {"cryptoperiod_exceeded", "rotation_overdue"}
    observed = replace(key, origin="observed")
    assert codes(observed, later(800)) == {"cryptoperiod_exceeded"}  # KLM cannot rotate it


def test_transition_calendar_warns_ahead_then_deprecates_then_disallows() -> None:
    rsa = inventory_key(algorithm="RSA", size=2048, usages=("sign", "verify"))
    p256 = inventory_key(algorithm="EC", size=256, curve="P-256", usages=("sign", "verify"))

    def at(year: int, month: int = 6) -> datetime:
        return datetime(year, month, 1, tzinfo=UTC)

    def transition(key, when):  # type: ignore[no-untyped-def]
        fresh = replace(key, primary_since=when)
        return {c for c in codes(fresh, when) if "transition" in c or c.startswith("algorithm")}

    assert transition(rsa, at(2027)) == set()
    assert transition(rsa, at(2029)) == {"transition_deadline_approaching"}
    assert transition(rsa, at(2031)) == {"algorithm_deprecated"}
    assert transition(rsa, at(2036)) == {"algorithm_disallowed"}
    assert transition(p256, at(2031)) == set()  # 128-bit strength: no deprecation stage
    assert transition(p256, at(2034)) == {"transition_deadline_approaching"}
    assert transition(p256, at(2036)) == {"algorithm_disallowed"}


def test_destruction_of_a_recently_used_key_is_blocked_without_override() -> None:
    key = inventory_key(state="deactivated", destroy_after=later(7), last_used_at=later(6))
    assert "destruction_blocked" not in codes(key, later(6.5))
    assert "destruction_blocked" in codes(key, later(8))
    assert "destruction_blocked" not in codes(replace(key, destruction_override=True), later(8))
    assert "destruction_blocked" not in codes(key, later(8) + timedelta(days=60))


def test_compare_raises_new_and_clears_gone_findings() -> None:
    key = inventory_key()
    before = evaluate(key, POLICY, later(731), DAY)
    changes = Changes()
    compare(key, before, evaluate(replace(key, primary_since=later(731)), POLICY, later(731),
                                  DAY), changes)
    assert changes.cleared == [(key.key_id, "cryptoperiod_exceeded")]
    [event] = changes.events
    assert event.type == "klm.key.policy_violation" and event.data["cleared"] is True
    again = Changes()
    compare(key, before, before, again)
    assert again.events == []
