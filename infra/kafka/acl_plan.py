#!/usr/bin/env python3
"""The Kafka ACLs of the secured stack (KLM_KAFKA_SECURITY=sasl), as lines for
``KlmKafkaAdmin.java acls``: ``<principal> <operation> <resource> <pattern> <name>``.

Least privilege, one principal per KLM service and one per requesting tenant:

* every service: DESCRIBE on the KLM topics of its namespace (metadata, ``ensure_topics``
  listing), WRITE on ``klm.dlq``, READ on its own consumer groups (``klm-<service>*``);
* ``keygen`` READs the request topics (``klm.requests`` and ``klm.requests.<tenant>``),
  crypto requests (``klm.crypto.requests`` and ``klm.crypto.requests.<tenant>``), commands
  and backup commands; WRITEs lifecycle facts, backup material
  and crypto replies (``klm.crypto.replies.*``);
* ``rotation`` READs lifecycle and inventory requests; WRITEs commands and lifecycle
  (policy findings, observed keys);
* ``backup`` READs lifecycle, the request topics (backup_key/restore_key) and
  ``klm.backup``; WRITEs backup commands, ``klm.backup`` and lifecycle;
* ``audit`` READs every topic it stores (never ``klm.crypto.requests``, whose payloads may
  hold plaintext); WRITEs commands (checkpoint signing by keygen);
* a tenant ``<t>`` WRITEs ``klm.requests.<t>`` and ``klm.crypto.requests.<t>`` ONLY, READs
  ``klm.lifecycle`` (its answers)
  and its own crypto reply topics ``klm.crypto.replies.<t>-*`` (the SDK creates and deletes
  them, see klm_common/crypto_channel.py); no consumer group (it reads by assignment).

``admin`` (and the KRaft ``controller``) are super users: no ACL needed. The topic
*prefix* (``KLM_TOPIC_PREFIX``, a namespace per test run) is prepended to every topic name,
so one plan serves production (empty prefix) and each test namespace. Keep the topic names
in step with ``klm_common/topics.py`` (tests/integration/test_security_kafka.py checks it).

usage: acl_plan.py [--prefix P] [--tenant T ...]
"""

from __future__ import annotations

import argparse
import re
import sys

SERVICES = ("keygen", "rotation", "backup", "audit")
#: principal names KLM reserves; a tenant may not take one
RESERVED = frozenset({*SERVICES, "admin", "controller", "ANONYMOUS"})
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

REQUESTS = "klm.requests"
LIFECYCLE = "klm.lifecycle"
DLQ = "klm.dlq"
CRYPTO_REQUESTS = "klm.crypto.requests"
CRYPTO_REPLIES = "klm.crypto.replies."
COMMANDS = "klm.commands"
INVENTORY_REQUESTS = "klm.inventory.requests"
BACKUP_COMMANDS = "klm.backup.commands"
BACKUP = "klm.backup"
#: the shared topics of which each tenant has its own, <base>.<tenant> (authorization.py)
TENANT_TOPIC_BASES = (REQUESTS, CRYPTO_REQUESTS)

# (operation, topic, pattern) per service, beyond what every service gets
SERVICE_TOPICS: dict[str, list[tuple[str, str, str]]] = {
    "keygen": [("READ", REQUESTS, "literal"), ("READ", REQUESTS + ".", "prefixed"),
               ("READ", CRYPTO_REQUESTS, "literal"), ("READ", CRYPTO_REQUESTS + ".", "prefixed"),
               ("READ", COMMANDS, "literal"),
               ("READ", BACKUP_COMMANDS, "literal"), ("WRITE", LIFECYCLE, "literal"),
               ("WRITE", BACKUP, "literal"), ("WRITE", CRYPTO_REPLIES, "prefixed")],
    # rotation asks for rotations as an operator would: klm.request.rotate_key on the shared
    # klm.requests (a tenant's topic stays its own); deactivate/destroy go to klm.commands
    "rotation": [("READ", LIFECYCLE, "literal"), ("READ", INVENTORY_REQUESTS, "literal"),
                 ("WRITE", REQUESTS, "literal"), ("WRITE", COMMANDS, "literal"),
                 ("WRITE", LIFECYCLE, "literal")],
    "backup": [("READ", LIFECYCLE, "literal"), ("READ", REQUESTS, "literal"),
               ("READ", REQUESTS + ".", "prefixed"), ("READ", BACKUP, "literal"),
               ("WRITE", BACKUP_COMMANDS, "literal"), ("WRITE", BACKUP, "literal"),
               ("WRITE", LIFECYCLE, "literal")],
    "audit": [("READ", LIFECYCLE, "literal"), ("READ", REQUESTS, "literal"),
              ("READ", REQUESTS + ".", "prefixed"), ("READ", COMMANDS, "literal"),
              ("READ", DLQ, "literal"), ("READ", BACKUP, "literal"),
              ("READ", BACKUP_COMMANDS, "literal"), ("READ", INVENTORY_REQUESTS, "literal"),
              ("WRITE", COMMANDS, "literal")],
}


def check_tenant(name: str) -> str:
    if not TENANT_NAME.fullmatch(name) or name in RESERVED:
        raise ValueError(f"invalid tenant name {name!r} (lower-case [a-z0-9_-], not reserved)")
    return name


def service_acls(service: str, prefix: str) -> list[str]:
    user = f"User:{service}"
    lines = [f"{user} DESCRIBE topic prefixed {prefix}klm.",
             f"{user} WRITE topic literal {prefix}{DLQ}",
             f"{user} READ group prefixed {prefix}klm-{service}"]
    lines += [f"{user} {op} topic {pattern} {prefix}{topic}"
              for op, topic, pattern in SERVICE_TOPICS[service]]
    return lines


def tenant_acls(tenant: str, prefix: str) -> list[str]:
    user = f"User:{check_tenant(tenant)}"
    return [*(f"{user} {op} topic literal {prefix}{base}.{tenant}"
              for base in TENANT_TOPIC_BASES for op in ("WRITE", "DESCRIBE")),
            f"{user} READ topic literal {prefix}{LIFECYCLE}",
            f"{user} DESCRIBE topic literal {prefix}{LIFECYCLE}",
            *(f"{user} {op} topic prefixed {prefix}{CRYPTO_REPLIES}{tenant}-"
              for op in ("CREATE", "DELETE", "READ", "DESCRIBE"))]


def plan(prefix: str, tenants: list[str]) -> list[str]:
    lines: list[str] = []
    for service in SERVICES:
        lines += service_acls(service, prefix)
    for tenant in tenants:
        lines += tenant_acls(tenant, prefix)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="")
    parser.add_argument("--tenant", action="append", default=[])
    parser.add_argument("--tenant-topics", action="store_true",
                        help="print the tenants' request topics (name partitions) instead")
    args = parser.parse_args()
    try:
        if args.tenant_topics:
            print("\n".join(f"{args.prefix}{base}.{check_tenant(t)} 6"
                             for t in args.tenant for base in TENANT_TOPIC_BASES))
        else:
            print("\n".join(plan(args.prefix, args.tenant)))
    except ValueError as exc:
        print(f"acl_plan: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
