"""Pure rules of key generation: from a validated request to a plan, and from the HSM's
result to the facts KLM announces. No I/O here."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from klm_common.algorithms import KeySpec, Protection, key_spec
from klm_common.envelope import CloudEvent, make_event
from klm_common.errors import KlmError
from klm_common.events import GenerateKey, KeyGenerated, RequestRejected
from klm_common.kafka import KLM_NAMESPACE
from klm_common.policy import PolicySet
from klm_common.states import KeyState
from klm_keygen.adapters.hsm import object_id
from klm_keygen.domain.material import GeneratedVersion
from klm_keygen.domain.profiles import profile_key

SOURCE = "klm/keygen"


def key_id_for(request_id: str) -> str:
    """Deterministic, so a replayed request names the same key (and cannot make a second)."""
    return f"klm:key:{uuid.uuid5(KLM_NAMESPACE, 'generate/' + request_id)}"


def answer_id(request_id: str, what: str) -> str:
    """Deterministic id of the answer to a request: a re-sent answer dedupes downstream."""
    return str(uuid.uuid5(KLM_NAMESPACE, f"{request_id}/{what}"))


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    request: CloudEvent
    data: GenerateKey
    spec: KeySpec
    protection: Protection
    key_id: str

    @property
    def hsm_object_id(self) -> bytes:
        return object_id(self.key_id, 1)


@dataclass(frozen=True, slots=True)
class NewKey:
    """A generated key ready for the keystore (material is wrapped or HSM-resident)."""

    plan: GenerationPlan
    material: GeneratedVersion
    state: KeyState
    created_at: datetime


def plan_generation(request: CloudEvent, data: GenerateKey,
                    policies: PolicySet | None = None) -> GenerationPlan:
    """Validate the policy named (one of ``policies``), the algorithm, size and usages;
    raises a coded error before any HSM call."""
    if policies is not None:
        policies.for_key(data.policy)  # PolicyUnknown: rotation could not govern the key
    if data.profile is not None:  # a certificate profile decides spec and protection
        spec, protection = profile_key(data)
        return GenerationPlan(request, data, spec, protection, key_id_for(request.id))
    spec = key_spec(data.algorithm, data.size, data.curve, data.usages)
    return GenerationPlan(request, data, spec, Protection(data.protection),
                          key_id_for(request.id))


def initial_state(data: GenerateKey, now: datetime) -> KeyState:
    if data.activation_date is not None and data.activation_date > now:
        return KeyState.PRE_ACTIVE
    return KeyState.ACTIVE


def generated_fact(key: NewKey) -> CloudEvent:
    plan, material, data = key.plan, key.material, key.plan.data
    activation = data.activation_date or key.created_at
    fact = KeyGenerated(
        key_id=plan.key_id, owner=data.owner, state=key.state.value, name=data.name,
        algorithm=plan.spec.algorithm.value, size=plan.spec.size, curve=plan.spec.curve,
        usages=sorted(u.value for u in plan.spec.usages), protection=plan.protection.value,
        policy=data.policy, profile=data.profile, labels=data.labels, version=1,
        created_at=key.created_at, activation_date=activation,
        public_key_pem=material.public_key_pem, fingerprint_sha256=material.fingerprint_sha256,
        kcv=material.kcv)
    return make_event(KeyGenerated.event_type, fact, source=SOURCE, subject=plan.key_id,
                      cause=plan.request, event_id=answer_id(plan.request.id, "generated"),
                      time=key.created_at)


def rejection(request: CloudEvent, error: KlmError, key_id: str | None = None) -> CloudEvent:
    """The one ``klm.request.rejected`` answer to ``request``."""
    details = {k: v for k, v in error.details.items() if isinstance(v, str | int | bool | list)}
    data = RequestRejected(code=error.code, message=error.message, request_type=request.type,
                           key_id=key_id, details=details)
    return make_event(RequestRejected.event_type, data, source=SOURCE,
                      subject=key_id or request.subject, cause=request,
                      event_id=answer_id(request.id, "rejected"))
