"""CSRs for certificate-profile keys, signed inside the HSM, at generation and rotation.

The request info is built by :mod:`klm_keygen.domain.csr`; the new version's private key
(unwrapped into a short-lived session object, or the resident token object) signs it in
one HSM call per batch; each CSR is kept in ``key_csrs`` (public data), so that a rotation
asks for the same subject, SANs and extensions as the previous version's CSR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from klm_common.algorithms import KeySpec
from klm_common.envelope import CloudEvent
from klm_common.errors import KlmError, StoreUnavailable
from klm_common.events import KeyGenerated, KeyRotated
from klm_common.profiles import get_profile
from klm_keygen.adapters.hsm_usage import (
    HsmOp,
    HsmOutcome,
    KeyHandles,
    KeyVersionRef,
    execute_batch,
)
from klm_keygen.domain import csr
from klm_keygen.domain.generation import NewKey, rejection
from klm_keygen.domain.lifecycle import Outcome
from klm_keygen.domain.material import GeneratedVersion
from klm_keygen.domain.usage import Operation

_DB_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.InterfaceError)


@dataclass(frozen=True, slots=True)
class CsrJob:
    key_id: str
    version: int
    spec: KeySpec
    material: GeneratedVersion
    template: csr.CsrTemplate

    def op(self) -> tuple[HsmOp, bytes, csr.SignatureChoice]:
        assert self.material.public_der is not None
        info = csr.request_info(self.template, self.material.public_der)
        choice = csr.signature_choice(self.spec)
        ref = KeyVersionRef(self.key_id, self.version, self.spec.algorithm, self.spec.size,
                            self.spec.curve, self.spec.usages, self.material.wrapped,
                            self.material.hsm_object_id, self.material.public_der)
        return (HsmOp(Operation.SIGN, ref, data=info, hash_name=choice.hash_name,
                      scheme=choice.scheme), info, choice)


def sign_requests(session: Any, kek: Any, ops: Sequence[HsmOp]) -> list[HsmOutcome | KlmError]:
    """HSM thread: sign each request info; the unwrapped keys are destroyed right after."""
    handles = KeyHandles(capacity=len(ops) + 1)
    try:
        return execute_batch(session, kek, handles, ops)
    finally:
        handles.evict([op.ref.key_id for op in ops])


class CertificateRequests:
    def __init__(self, hsm: Any, pool: asyncpg.Pool) -> None:
        self._hsm = hsm
        self._pool = pool

    async def sign(self, jobs: Sequence[CsrJob]) -> list[bytes | KlmError]:
        """DER of each job's CSR (or the coded error), stored in ``key_csrs``."""
        if not jobs:
            return []
        try:
            built = [job.op() for job in jobs]
        except KlmError as exc:
            return [exc for _ in jobs]
        outcomes = await self._hsm.run(sign_requests, [b[0] for b in built])
        results: list[bytes | KlmError] = []
        for (_, info, choice), outcome in zip(built, outcomes, strict=True):
            if isinstance(outcome, KlmError):
                results.append(outcome)
            else:
                assert outcome.output is not None
                results.append(csr.assemble(info, choice, outcome.output))
        await self._store([(j, d) for j, d in zip(jobs, results, strict=True)
                           if isinstance(d, bytes)])
        return results

    async def _store(self, rows: Sequence[tuple[CsrJob, bytes]]) -> None:
        if not rows:
            return
        try:
            await self._pool.executemany(
                """INSERT INTO key_csrs (key_id, version, profile, csr_der) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (key_id, version) DO UPDATE
                   SET profile = EXCLUDED.profile, csr_der = EXCLUDED.csr_der,
                       created_at = now()""",
                [(j.key_id, j.version, j.template.profile, der) for j, der in rows])
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc

    async def latest(self, key_ids: Sequence[str]) -> dict[str, tuple[str, bytes]]:
        """(profile, CSR DER) of the newest CSR of each key that has one."""
        if not key_ids:
            return {}
        try:
            rows = await self._pool.fetch(
                """SELECT DISTINCT ON (key_id) key_id, profile, csr_der FROM key_csrs
                   WHERE key_id = ANY($1::text[]) ORDER BY key_id, version DESC""",
                list(set(key_ids)))
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"keystore unreachable: {type(exc).__name__}") from exc
        return {r["key_id"]: (r["profile"], bytes(r["csr_der"])) for r in rows}

    # ---- the two places a CSR is made ---------------------------------------------------
    async def attach_to_generated(self, keys: list[NewKey], answers: list[CloudEvent]) -> None:
        """Put a CSR into the ``klm.key.generated`` fact of each new profile key; a key whose
        CSR cannot be signed is not kept and its request is rejected with the code."""
        todo = [k for k in keys if k.plan.data.profile]
        jobs = [CsrJob(k.plan.key_id, 1, k.plan.spec, k.material, csr.csr_template(
            get_profile(str(k.plan.data.profile)), k.plan.data.subject, k.plan.data.sans))
            for k in todo]
        for key, der in zip(todo, await self.sign(jobs), strict=True):
            request_id = key.plan.request.id
            index = next(i for i, a in enumerate(answers) if a.correlationid == request_id
                         and a.type == KeyGenerated.event_type)
            if isinstance(der, KlmError):
                keys.remove(key)
                answers[index] = rejection(key.plan.request, der)
            else:
                answers[index] = with_csr(answers[index], csr.to_pem(der))

    async def attach_to_rotated(self, steps: Sequence[Any],
                                results: list[Outcome | KlmError]) -> list[Outcome | KlmError]:
        """Give the ``klm.key.rotated`` fact of each rotated profile key the new CSR."""
        rotated = [(i, s, r) for i, (s, r) in enumerate(zip(steps, results, strict=True))
                   if isinstance(r, Outcome) and _rotated_fact(r) is not None]
        previous = await self.latest([s.key.key_id for _, s, _ in rotated])
        jobs: list[tuple[int, Outcome, CsrJob]] = []
        for i, step, outcome in rotated:
            if step.key.key_id not in previous:
                continue  # not a profile key
            assert isinstance(outcome, Outcome)
            profile, der = previous[step.key.key_id]
            number = int(_rotated_fact(outcome).data["version"])  # type: ignore[union-attr]
            version = outcome.key.version(number)
            assert version is not None and version.material is not None
            template = dataclasses.replace(csr.template_from_csr(der), profile=profile)
            jobs.append((i, outcome, CsrJob(step.key.key_id, number, step.key.spec,
                                            version.material, template)))
        signed = await self.sign([j for _, _, j in jobs])
        out = list(results)
        for (i, outcome, _), signed_der in zip(jobs, signed, strict=True):
            out[i] = signed_der if isinstance(signed_der, KlmError) else dataclasses.replace(
                outcome, facts=tuple(with_csr(f, csr.to_pem(signed_der))
                                     if f.type == KeyRotated.event_type else f
                                     for f in outcome.facts))
        return out


def _rotated_fact(outcome: Outcome) -> CloudEvent | None:
    return next((f for f in outcome.facts if f.type == KeyRotated.event_type), None)


def with_csr(fact: CloudEvent, csr_pem: str) -> CloudEvent:
    return fact.model_copy(update={"data": {**fact.data, "csr_pem": csr_pem}})
