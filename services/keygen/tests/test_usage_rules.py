"""Usage rules (pure): tenant, usage and version-state checks, summaries, OAEP padding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from klm_common.algorithms import Algorithm, Usage
from klm_common.errors import Forbidden, KeyNotActive, KeyNotFound, UsageNotPermitted
from klm_common.events import CryptoDecrypt, CryptoEncrypt, CryptoSign
from klm_common.states import KeyState
from klm_keygen.domain import oaep
from klm_keygen.domain.usage import (
    Operation,
    UsageKey,
    UsageTally,
    UsageVersion,
    authorise,
    reply_topic_allowed,
)

KEY_ID = "klm:key:00000000-0000-4000-8000-000000000001"
REPLY = "p.klm.crypto.replies.c1"


def key(state: KeyState = KeyState.ACTIVE, usages: frozenset[Usage] = frozenset(
        {Usage.ENCRYPT, Usage.DECRYPT}), versions: dict[int, KeyState] | None = None,
        primary: int = 1) -> UsageKey:
    versions = versions or {1: KeyState.ACTIVE}
    return UsageKey(KEY_ID, "acme", Algorithm.AES, 256, None, usages, state, primary,
                    {n: UsageVersion(n, s, b"w", None, None) for n, s in versions.items()})


def encrypt(owner: str = "acme") -> CryptoEncrypt:
    return CryptoEncrypt(key_id=KEY_ID, owner=owner, reply_to=REPLY, plaintext_b64="eA==")


def decrypt(version: int) -> CryptoDecrypt:
    return CryptoDecrypt(key_id=KEY_ID, owner="acme", reply_to=REPLY, version=version,
                         ciphertext_b64="eA==")


def test_checks_in_order_tenant_usage_state() -> None:
    with pytest.raises(KeyNotFound):
        authorise(encrypt(), Operation.ENCRYPT, None)
    with pytest.raises(Forbidden):  # before usage: another tenant learns nothing more
        authorise(CryptoSign(key_id=KEY_ID, owner="evil", reply_to=REPLY, data_b64=""),
                  Operation.SIGN, key(state=KeyState.SUSPENDED))
    with pytest.raises(UsageNotPermitted):
        authorise(CryptoSign(key_id=KEY_ID, owner="acme", reply_to=REPLY, data_b64=""),
                  Operation.SIGN, key(state=KeyState.SUSPENDED))
    with pytest.raises(KeyNotActive):
        authorise(encrypt(), Operation.ENCRYPT, key(state=KeyState.SUSPENDED))


def test_protect_uses_the_primary_and_process_any_live_version() -> None:
    rotated = key(versions={1: KeyState.ACTIVE, 2: KeyState.ACTIVE}, primary=2)
    assert authorise(encrypt(), Operation.ENCRYPT, rotated).version.version == 2
    assert authorise(decrypt(1), Operation.DECRYPT, rotated).version.version == 1
    old = key(versions={1: KeyState.DEACTIVATED, 2: KeyState.ACTIVE}, primary=2)
    assert authorise(decrypt(1), Operation.DECRYPT, old).warning is None
    with pytest.raises(KeyNotFound):
        authorise(decrypt(3), Operation.DECRYPT, old)


@pytest.mark.parametrize(("state", "protect", "process"), [
    (KeyState.ACTIVE, True, True),
    (KeyState.PRE_ACTIVE, False, False),
    (KeyState.SUSPENDED, False, False),
    (KeyState.DEACTIVATED, False, True),
    (KeyState.COMPROMISED, False, True),
    (KeyState.DESTROYED, False, False),
    (KeyState.DESTROYED_COMPROMISED, False, False),
])
def test_state_rules(state: KeyState, protect: bool, process: bool) -> None:
    k = key(state=state, versions={1: state})
    for op, request, allowed in ((Operation.ENCRYPT, encrypt(), protect),
                                 (Operation.DECRYPT, decrypt(1), process)):
        if allowed:
            grant = authorise(request, op, k)
            assert (grant.warning is not None) == (state is KeyState.COMPROMISED)
        else:
            with pytest.raises(KeyNotActive):
                authorise(request, op, k)


def test_reply_topic_must_be_under_the_prefix() -> None:
    assert reply_topic_allowed("p.klm.crypto.replies.c1", "p.klm.crypto.replies.")
    assert not reply_topic_allowed("p.klm.lifecycle", "p.klm.crypto.replies.")
    assert not reply_topic_allowed("p.klm.crypto.replies.", "p.klm.crypto.replies.")
    assert not reply_topic_allowed("p.klm.crypto.replies.a/b", "p.klm.crypto.replies.")


def test_tally_makes_one_summary_per_key_and_interval() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    tally = UsageTally(t0)
    grant = authorise(encrypt(), Operation.ENCRYPT, key())
    for i in range(1000):
        tally.record(grant, Operation.ENCRYPT, t0 + timedelta(seconds=i / 100))
    [summary] = tally.drain(t0 + timedelta(seconds=60))
    assert summary.total == 1000 and summary.operations == {"encrypt": 1000}
    assert summary.versions == {"1": 1000}
    assert summary.last_used_at == t0 + timedelta(seconds=9.99)
    assert tally.drain(t0 + timedelta(seconds=120)) == []


def test_oaep_round_trip_and_one_error_for_every_bad_encoding() -> None:
    k = 256
    encoded = oaep.encode(b"message", k, b"label")
    assert oaep.decode(encoded, k, b"label") == b"message"
    for bad in (b"\x01" + encoded[1:], encoded[:-1] + bytes([encoded[-1] ^ 1])):
        with pytest.raises(oaep.OaepError, match="decryption error"):
            oaep.decode(bad, k, b"label")
    with pytest.raises(oaep.OaepError):
        oaep.decode(encoded, k, b"other label")
