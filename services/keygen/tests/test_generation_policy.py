"""A generate request must name a loaded crypto policy (or none): rotation could not govern a
key whose policy it does not know."""

from __future__ import annotations

from typing import Any

from aiokafka import ConsumerRecord

from klm_common.envelope import CloudEvent, make_event
from klm_common.events import GenerateKey
from klm_common.policy import CryptoPolicy, PolicySet, load_policy
from klm_keygen.handlers.requests import Deps, handle_request_batch

DEFAULT = load_policy()
SHORT = CryptoPolicy.model_validate({**DEFAULT.model_dump(mode="json"), "name": "short"})


def record(value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("klm.requests", 0, offset, 0, 0, b"k", value, None, 1, len(value), [])


def request(**fields: Any) -> CloudEvent:
    return make_event(GenerateKey.event_type,
                      {"owner": "acme", "name": "n", "algorithm": "AES-256", **fields},
                      source="test")


async def test_a_generate_naming_an_unknown_policy_is_rejected(deps: Deps) -> None:
    deps.policies = PolicySet(DEFAULT, [SHORT])
    named, default, unknown = request(policy="short"), request(), request(policy="nope")
    await handle_request_batch([record(r.to_bytes(), i)
                                for i, r in enumerate((named, default, unknown))], deps)
    answers = {a.correlationid: a for a in deps.keystore.outbox}  # type: ignore[attr-defined]
    assert answers[named.id].type == answers[default.id].type == "klm.key.generated"
    assert answers[named.id].data["policy"] == "short"
    rejected = answers[unknown.id]
    assert rejected.type == "klm.request.rejected"
    assert rejected.data["code"] == "policy_unknown"
    assert deps.hsm.calls == [2]  # type: ignore[attr-defined]  # refused before the HSM


async def test_a_profile_key_naming_an_unknown_policy_is_rejected_too(deps: Deps) -> None:
    deps.policies = PolicySet(DEFAULT)
    r = request(algorithm="EC", curve="P-256", profile="tls-server", policy="nope",
                subject={"CN": "example.org"})
    await handle_request_batch([record(r.to_bytes())], deps)
    [answer] = deps.keystore.outbox  # type: ignore[attr-defined]
    assert answer.data["code"] == "policy_unknown"
