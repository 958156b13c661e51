"""keygen's batch handler, through fakes: no Kafka, Postgres or HSM needed."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import ConsumerRecord

from klm_common.envelope import CloudEvent, make_event
from klm_common.errors import HsmUnavailable
from klm_common.events import GenerateKey
from klm_common.policy import CryptoPolicy, PolicySet, load_policy
from klm_keygen.handlers.requests import Deps, handle_request_batch


def record(value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("klm.requests", 0, offset, 0, 0, b"k", value, None, 1, len(value), [])


def request(**fields: Any) -> CloudEvent:
    return make_event(GenerateKey.event_type,
                      {"owner": "acme", "name": "n", "algorithm": "AES-256", **fields},
                      source="test")


async def test_one_hsm_call_per_batch_and_one_answer_per_request(deps: Deps) -> None:
    requests = [request(name=f"k{i}") for i in range(5)]
    await handle_request_batch([record(r.to_bytes(), i) for i, r in enumerate(requests)], deps)
    assert deps.hsm.calls == [5]  # type: ignore[attr-defined]
    answers = deps.keystore.outbox  # type: ignore[attr-defined]
    assert sorted(a.correlationid for a in answers) == sorted(r.id for r in requests)
    assert {a.type for a in answers} == {"klm.key.generated"}


async def test_replay_is_a_no_op(deps: Deps) -> None:
    r = request()
    await handle_request_batch([record(r.to_bytes()), record(r.to_bytes(), 1)], deps)
    await handle_request_batch([record(r.to_bytes(), 2)], deps)
    assert await deps.keystore.count_keys() == 1
    assert len(deps.keystore.outbox) == 1  # type: ignore[attr-defined]


async def test_invalid_request_is_rejected_without_hsm_call(deps: Deps) -> None:
    r = request(algorithm="RSA", size=1024)
    await handle_request_batch([record(r.to_bytes())], deps)
    [answer] = deps.keystore.outbox  # type: ignore[attr-defined]
    assert answer.type == "klm.request.rejected"
    assert answer.data["code"] == "key_size_below_minimum"
    assert deps.hsm.calls == []  # type: ignore[attr-defined]


async def test_garbage_goes_to_dlq_and_the_rest_is_served(deps: Deps) -> None:
    good = request()
    await handle_request_batch([record(b"\x00garbage", 0), record(good.to_bytes(), 1)], deps)
    [(topic, _)] = deps.dead_letters._broker.published  # type: ignore[attr-defined]
    assert topic == "klm.dlq"
    assert [a.correlationid for a in deps.keystore.outbox] == [good.id]  # type: ignore[attr-defined]


async def test_hsm_down_leaves_batch_uncommitted(deps: Deps) -> None:
    deps.hsm.available = False  # type: ignore[attr-defined]
    r = request()
    with pytest.raises(HsmUnavailable):
        await handle_request_batch([record(r.to_bytes())], deps)
    assert deps.keystore.outbox == []  # type: ignore[attr-defined]
    deps.hsm.available = True  # type: ignore[attr-defined]
    await handle_request_batch([record(r.to_bytes())], deps)
    assert len(deps.keystore.outbox) == 1  # type: ignore[attr-defined]


async def test_large_batch_is_pipelined_in_chunks_each_answered_once(deps: Deps) -> None:
    deps.chunk_size = 4
    requests = [request(name=f"c{i}") for i in range(10)]
    await handle_request_batch([record(r.to_bytes(), i) for i, r in enumerate(requests)], deps)
    assert deps.hsm.calls == [4, 4, 2]  # type: ignore[attr-defined]
    answers = deps.keystore.outbox  # type: ignore[attr-defined]
    assert [a.correlationid for a in answers] == [r.id for r in requests]


async def test_request_in_flight_in_another_batch_is_left_to_it(deps: Deps) -> None:
    r = request()
    deps.in_flight.add(r.id)  # another subscriber's batch is serving it right now
    await handle_request_batch([record(r.to_bytes())], deps)
    assert deps.hsm.calls == []  # type: ignore[attr-defined]
    deps.in_flight.clear()
    await handle_request_batch([record(r.to_bytes())], deps)
    assert len(deps.keystore.outbox) == 1  # type: ignore[attr-defined]


async def test_request_whose_key_came_back_by_recovery_is_a_replay(deps: Deps) -> None:
    """After a disaster recovery the inbox is empty but the keys are back: a re-sent
    generate request must neither make a second key nor stall its partition."""
    r = request()
    await handle_request_batch([record(r.to_bytes())], deps)
    deps.keystore.inbox.clear()  # type: ignore[attr-defined]  # the recovered keystore
    deps.keystore.outbox.clear()  # type: ignore[attr-defined]
    await handle_request_batch([record(r.to_bytes(), 1)], deps)
    assert await deps.keystore.count_keys() == 1
    assert deps.keystore.outbox == []  # type: ignore[attr-defined]


# ---- a generate request must name a loaded crypto policy (or none): rotation could not
# govern a key whose policy it does not know
DEFAULT = load_policy()
SHORT = CryptoPolicy.model_validate({**DEFAULT.model_dump(mode="json"), "name": "short"})


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
