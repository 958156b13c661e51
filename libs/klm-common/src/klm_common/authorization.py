"""Who may ask KLM for what: the requester's tenant follows from the Kafka topic it could
write, never from a field anyone can write.

On the secured stack (docs/security.md) a requesting system logs in to Kafka as its tenant
``<t>`` and holds WRITE on ``klm.requests.<t>`` only (Kafka ACLs, infra/kafka/acl_plan.py).
So a request read from ``klm.requests.<t>`` comes from tenant ``<t>``; a request read from
the shared ``klm.requests`` comes from a KLM operator (admin, the ``klm`` CLI), whom the
ACLs let write there. On top of the ACLs, keygen checks each request with
:func:`authorize`: a tenant acts only on keys it owns (``owner`` of a new key, the stored
owner of an existing one), and only with the request types the crypto policy grants it
(:meth:`klm_common.policy.CryptoPolicy.may_request`, requester = the tenant name).
A refusal is :class:`klm_common.errors.Forbidden` (code ``forbidden``), which keygen answers
with ``klm.request.rejected`` — recorded like every answer on ``klm.lifecycle``.

Pure functions, no I/O.
"""

from __future__ import annotations

import re

from klm_common.errors import Forbidden
from klm_common.policy import CryptoPolicy
from klm_common.topics import CRYPTO_REQUESTS, REQUESTS, Topics

#: a tenant's name: also its Kafka principal and the suffix of its request topics
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: the shared topics of which each tenant has its own: ``<base>.<tenant>``
TENANT_TOPIC_BASES = (REQUESTS, CRYPTO_REQUESTS)
_REQUEST_PREFIX = "klm.request."


def tenant_request_topic(topics: Topics, tenant: str, base: str = REQUESTS) -> str:
    """``<prefix><base>.<tenant>``: the only request topic (of lifecycle requests, or of
    usage operations with ``base`` = ``klm.crypto.requests``) the tenant may write."""
    if not TENANT_NAME.fullmatch(tenant):
        raise ValueError(f"invalid tenant name {tenant!r}")
    return topics.name(f"{base}.{tenant}")


def tenant_request_topics(topics: Topics, base: str = REQUESTS) -> str:
    """The subscription pattern of every tenant's ``<prefix><base>.<t>`` (what keygen,
    backup and audit read besides the shared ``klm.requests``; keygen also reads the
    tenants' ``klm.crypto.requests.<t>``)."""
    return f"^{re.escape(topics.name(base))}\\.{TENANT_NAME.pattern}$"


def tenant_of_topic(topic: str) -> str | None:
    """The tenant a request topic belongs to; None for the shared ``klm.requests`` and
    ``klm.crypto.requests`` (and for any topic that is not a tenant's)."""
    for base in TENANT_TOPIC_BASES:
        head, mark, tenant = topic.rpartition(f"{base}.")
        if mark and (not head or head.endswith(".")) and TENANT_NAME.fullmatch(tenant):
            return tenant
    return None


def authorize(tenant: str | None, request_type: str, owner: str | None,
              policy: CryptoPolicy | None = None) -> None:
    """Raise :class:`Forbidden` unless ``tenant`` may send ``request_type`` for a key owned
    by ``owner`` (None: the key does not exist, which keygen answers on its own).

    ``tenant`` None = the shared topic, written only by KLM operators: not restricted here.
    """
    if tenant is None:
        return
    if owner is not None and owner != tenant:
        raise Forbidden(f"tenant {tenant!r} may not act on keys of {owner!r}",
                        tenant=tenant, owner=owner)
    short = request_type.removeprefix(_REQUEST_PREFIX)
    if policy is not None and not policy.may_request(tenant, short):
        raise Forbidden(f"the crypto policy does not grant {short!r} to tenant {tenant!r}",
                        tenant=tenant, request=short)
