"""One error hierarchy for KLM.

Every error has a stable machine-readable ``code``; that code is what a
``klm.request.rejected`` event (or a crypto reply) carries. Driver errors
(PKCS#11, asyncpg, aiokafka) are mapped to these classes at the adapter edge.
"""

from __future__ import annotations

from typing import Any, ClassVar


class KlmError(Exception):
    """Base of every KLM error. ``code`` is stable and part of the public contract."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- input the requester got wrong: answered with klm.request.rejected -----------------------
class RequestInvalid(KlmError):
    code = "invalid_request"


class UnknownRequestType(RequestInvalid):
    code = "unknown_request_type"


class UnsupportedSchemaVersion(RequestInvalid):
    code = "unsupported_schema_version"


class AlgorithmNotApproved(RequestInvalid):
    code = "algorithm_not_approved"


class KeySizeBelowMinimum(RequestInvalid):
    code = "key_size_below_minimum"


class KeySizeInvalid(RequestInvalid):
    code = "key_size_invalid"


class UsageNotPermitted(RequestInvalid):
    """A usage that the algorithm cannot have, or that the key was not made for."""

    code = "usage_not_permitted"


class PolicyUnknown(RequestInvalid):
    """The request names a crypto policy that is not loaded (KLM_POLICY_FILE, KLM_POLICY_DIR)."""

    code = "policy_unknown"


class MechanismUnavailable(RequestInvalid):
    """The HSM module lacks a mechanism this request needs."""

    code = "mechanism_unavailable"


class KeyNotFound(KlmError):
    code = "key_not_found"


class IllegalTransition(KlmError):
    code = "illegal_transition"


class KeyNotActive(KlmError):
    code = "key_not_active"


class Forbidden(KlmError):
    code = "forbidden"


class DuplicateRequest(KlmError):
    code = "duplicate_request"


# --- infrastructure: not the requester's fault; the work is retried, never rejected ----------
class InfrastructureError(KlmError):
    code = "infrastructure_unavailable"
    retryable = True


class HsmUnavailable(InfrastructureError):
    code = "hsm_unavailable"


class HsmError(KlmError):
    """The HSM refused an operation (e.g. a key without CKA_SIGN asked to sign)."""

    code = "hsm_error"


class StoreUnavailable(InfrastructureError):
    code = "store_unavailable"


class BrokerUnavailable(InfrastructureError):
    code = "broker_unavailable"


class IntegrityError(KlmError):
    """Stored data failed an integrity check (hash chain, backup tag, KCV)."""

    code = "integrity_check_failed"
