"""Shamir's secret sharing over GF(2^8): any M of N recover, M-1 do not."""

from __future__ import annotations

import itertools
import secrets

import pytest

from klm_common.shamir import Share, ShareError, _div, _mul, combine, split


def test_field_multiplication_matches_aes_reference() -> None:
    # FIPS 197 §4.2: {57} • {83} = {c1}
    assert _mul(0x57, 0x83) == 0xC1
    for a in range(1, 256):
        assert _mul(a, _div(1, a)) == 1


def test_every_threshold_subset_recovers_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 5, 3)
    for subset in itertools.combinations(shares, 3):
        assert combine(subset) == secret
    assert combine(shares) == secret


def test_fewer_than_threshold_shares_do_not_recover() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 5, 3)
    for subset in itertools.combinations(shares, 2):
        assert combine(subset) != secret


def test_one_share_is_independent_of_the_secret() -> None:
    # with threshold 2, share 1 of a fixed secret takes every byte value equally often
    seen = {split(b"\x00", 2, 2)[0].y[0] for _ in range(4000)}
    assert len(seen) > 250


@pytest.mark.parametrize(("n", "m"), [(1, 1), (3, 1), (2, 3), (256, 3)])
def test_bad_parameters_are_refused(n: int, m: int) -> None:
    with pytest.raises(ShareError):
        split(b"k", n, m)


def test_inconsistent_shares_are_refused() -> None:
    a, b, _ = split(b"0123456789abcdef", 3, 2)
    with pytest.raises(ShareError):
        combine([a, a])
    with pytest.raises(ShareError):
        combine([a, Share(b.x, b.y[:-1])])
    with pytest.raises(ShareError):
        combine([a])
