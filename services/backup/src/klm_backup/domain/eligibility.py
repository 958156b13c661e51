"""Which key versions are backed up (pure rules).

NIST SP 800-57 Pt 1 Rev. 5 §8.2.2.1 (Table 8): a *private signature key* should not be
backed up — a copy weakens non-repudiation, and a lost signing key is replaced, not
restored; its *public* verification key is backed up so that old signatures still verify.
Every other key class (symmetric keys, key-transport/agreement private keys, MAC keys) is
backed up: losing it loses the data it protects.

A key's labels can say otherwise (``klm.backup``): ``required`` backs up even a private
signature key (e.g. a CA key whose loss is worse than a copy), ``forbidden`` backs up
nothing but the public half.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

BACKUP_LABEL = "klm.backup"
ASYMMETRIC = ("EC", "Ed25519", "RSA")
#: usages that make a private key more than a signature key
_NON_SIGNING = {"decrypt", "unwrap", "derive", "encrypt", "wrap"}


def skip_reason(algorithm: str, usages: Iterable[str], labels: Mapping[str, str]) -> str | None:
    """Why this version's secret/private half is NOT backed up, or None to back it up."""
    choice = labels.get(BACKUP_LABEL)
    if choice == "forbidden":
        return f"label {BACKUP_LABEL}=forbidden"
    if choice == "required":
        return None
    uses = set(usages)
    if algorithm in ASYMMETRIC and "sign" in uses and not uses & _NON_SIGNING:
        return ("private signature key: not backed up (NIST SP 800-57 Pt 1 §8.2.2.1); "
                "the public key is")
    return None
