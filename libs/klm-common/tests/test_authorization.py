"""The tenant follows from the request topic; a tenant acts only on its own keys, with the
request types its policy grants."""

from __future__ import annotations

import re

import pytest

from klm_common.authorization import (
    authorize,
    tenant_of_topic,
    tenant_request_topic,
    tenant_request_topics,
)
from klm_common.errors import Forbidden
from klm_common.policy import load_policy
from klm_common.topics import CRYPTO_REQUESTS, Topics


@pytest.mark.parametrize(("topic", "tenant"), [
    ("klm.requests.billing", "billing"),
    ("it0a1b.klm.requests.pay-ments_2", "pay-ments_2"),
    ("klm.requests", None),
    ("it0a1b.klm.requests", None),
    ("klm.requests.Billing", None),          # principals are lower-case
    ("klm.requests.billing.extra", None),    # no dots in a tenant name
    ("klm.requests.", None),
    ("klm.lifecycle", None),
    ("klm.crypto.requests", None),
])
def test_tenant_of_topic(topic: str, tenant: str | None) -> None:
    assert tenant_of_topic(topic) == tenant


def test_tenant_request_topic_round_trips() -> None:
    topics = Topics("it42.")
    assert tenant_request_topic(topics, "billing") == "it42.klm.requests.billing"
    assert tenant_of_topic(tenant_request_topic(topics, "billing")) == "billing"
    with pytest.raises(ValueError):
        tenant_request_topic(topics, "../etc")


def test_shared_topic_is_not_restricted() -> None:
    authorize(None, "klm.request.rotate_key", "anyone")


def test_tenant_may_act_on_its_own_keys() -> None:
    authorize("billing", "klm.request.generate_key", "billing")
    authorize("billing", "klm.request.rotate_key", "billing")
    authorize("billing", "klm.request.rotate_key", None)  # unknown key: key_not_found later


def test_tenant_may_not_act_on_another_tenants_keys() -> None:
    with pytest.raises(Forbidden) as caught:
        authorize("billing", "klm.request.revoke_key", "payments")
    assert caught.value.code == "forbidden"
    assert caught.value.details == {"tenant": "billing", "owner": "payments"}


def test_policy_grants_request_types_per_tenant() -> None:
    base = load_policy()
    policy = base.model_copy(update={"permissions": [
        *base.permissions,
        type(base.permissions[0])(request="schedule_destruction", requesters=["ops-*"])]})
    authorize("ops-eu", "klm.request.schedule_destruction", "ops-eu", policy)
    with pytest.raises(Forbidden, match="does not grant 'schedule_destruction'"):
        authorize("billing", "klm.request.schedule_destruction", "billing", policy)
    authorize("billing", "klm.request.rotate_key", "billing", policy)  # not restricted


def test_default_policy_grants_every_lifecycle_request() -> None:
    policy = load_policy()
    for kind in ("generate_key", "rotate_key", "suspend_key", "reactivate_key", "revoke_key",
                 "schedule_destruction", "cancel_destruction"):
        authorize("billing", f"klm.request.{kind}", "billing", policy)


def test_each_tenant_has_its_own_crypto_request_topic() -> None:
    topics = Topics("it42.")
    topic = tenant_request_topic(topics, "billing", CRYPTO_REQUESTS)
    assert topic == "it42.klm.crypto.requests.billing"
    assert tenant_of_topic(topic) == "billing"
    assert tenant_of_topic(topics.crypto_requests) is None  # the operators' shared topic
    pattern = re.compile(tenant_request_topics(topics, CRYPTO_REQUESTS))
    assert pattern.fullmatch(topic) and not pattern.fullmatch(topics.crypto_requests)
    assert not pattern.fullmatch(tenant_request_topic(topics, "billing"))
    assert not re.compile(tenant_request_topics(topics)).fullmatch(topic)
