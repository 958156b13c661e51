"""Keys KLM did not generate: an ``import_observed_key`` request becomes a
``klm.key.observed`` fact (metadata only), which the inventory projection applies."""

from __future__ import annotations

import uuid

from klm_common.envelope import CloudEvent, make_event
from klm_common.errors import Forbidden, KlmError
from klm_common.events import ImportObservedKey, KeyObserved, RequestRejected
from klm_common.kafka import KLM_NAMESPACE
from klm_common.policy import CryptoPolicy
from klm_rotation.domain.schedule import SOURCE

REQUEST = "import_observed_key"


def observed_key_id(request: CloudEvent) -> str:
    """A key id for an import that named none: derived from the request, so a replay maps
    to the same key."""
    return f"klm:key:{uuid.uuid5(KLM_NAMESPACE, f'observed/{request.id}')}"


def observed_fact(request: CloudEvent, data: ImportObservedKey, policy: CryptoPolicy
                  ) -> CloudEvent:
    """The answer to an import request; raises :class:`Forbidden` for a requester the policy
    does not allow."""
    if not policy.may_request(request.source, REQUEST):
        raise Forbidden(f"{request.source!r} may not {REQUEST} under policy {policy.name!r}")
    key_id = data.key_id or observed_key_id(request)
    fact = KeyObserved(
        key_id=key_id, owner=data.owner, state="active", name=data.name,
        algorithm=data.algorithm, size=data.size, curve=data.curve,
        usages=sorted({u.strip().lower() for u in data.usages}), profile=data.profile,
        policy=data.policy, location=data.location, created_at=data.created_at,
        fingerprint_sha256=data.fingerprint_sha256, labels=data.labels)
    return make_event(fact.event_type, fact, source=SOURCE, subject=key_id, cause=request)


def rejection(request: CloudEvent, error: KlmError) -> CloudEvent:
    data = RequestRejected(code=error.code, message=error.message, request_type=request.type,
                           key_id=request.subject, details=error.details)
    return make_event(data.event_type, data, source=SOURCE, subject=request.subject,
                      cause=request)
