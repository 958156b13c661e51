"""Generation rules for a key made for a certificate profile. Pure: no I/O.

The profile (``klm_common.profiles``) decides the admitted algorithms, usages and
protection; the request's subject and SANs are checked here too, so that a request whose
CSR could not be built is refused before the HSM makes a key.
"""

from __future__ import annotations

from klm_common.algorithms import KeySpec, Protection
from klm_common.events import GenerateKey
from klm_common.profiles import get_profile, profile_key_spec
from klm_keygen.domain.csr import csr_template


def profile_key(data: GenerateKey) -> tuple[KeySpec, Protection]:
    """The key spec and protection of a profile key; coded errors for what it refuses.

    A profile that fixes the protection (``ca`` → hsm-resident) applies it: the request's
    ``protection`` has a default, so "asked for hsm-wrapped" cannot be told from "did not
    say", and the profile's choice is never the weaker one."""
    assert data.profile is not None
    profile = get_profile(data.profile)
    protection = profile.protection or data.protection
    spec = profile_key_spec(profile, data.algorithm, data.size, data.curve, data.usages,
                            protection)
    csr_template(profile, data.subject, data.sans)
    return spec, Protection(protection)
