"""Shamir's secret sharing over GF(2^8), byte by byte (the construction of SSSS/Vault).

A secret of ``n`` bytes is split into shares of ``n`` bytes: for every byte a random
polynomial of degree ``threshold - 1`` whose constant term is that byte is evaluated at
the share's x coordinate (1..255). Any ``threshold`` shares give the polynomial back by
Lagrange interpolation at x = 0; fewer give a value that is uniformly distributed and says
nothing about the secret — which is why a combine with too few shares cannot *detect*
itself: callers check the result against a key check value (see ``cli_ceremony``).

Field: GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1 (0x11b), generator 3.
Randomness: :func:`secrets.token_bytes` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from klm_common.errors import KlmError


class ShareError(KlmError):
    """Shares that cannot be split or combined (too few, duplicated, inconsistent)."""

    code = "shares_invalid"


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 510
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        # multiply by the generator 3 = x * 2 xor x, reduced by 0x11b
        x ^= (x << 1) ^ (0x11B if x & 0x80 else 0)
    for i in range(255, 510):
        exp[i] = exp[i - 255]
    return exp, log


_EXP, _LOG = _tables()


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    if a == 0:
        return 0
    return _EXP[_LOG[a] + 255 - _LOG[b]]


@dataclass(frozen=True, slots=True)
class Share:
    x: int
    """x coordinate, 1..255 (never 0: f(0) is the secret)"""
    y: bytes


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner's rule; ``coefficients[0]`` is the constant term."""
    result = 0
    for c in reversed(coefficients):
        result = _mul(result, x) ^ c
    return result


def split(secret: bytes, shares: int, threshold: int) -> list[Share]:
    """Split ``secret`` into ``shares`` shares, any ``threshold`` of which recover it."""
    if not secret:
        raise ShareError("nothing to split: the secret is empty")
    if not 2 <= threshold <= shares <= 255:
        raise ShareError(f"need 2 <= threshold ({threshold}) <= shares ({shares}) <= 255")
    ys = [bytearray(len(secret)) for _ in range(shares)]
    for i, byte in enumerate(secret):
        coefficients = [byte, *secrets.token_bytes(threshold - 1)]
        for j in range(shares):
            ys[j][i] = _evaluate(coefficients, j + 1)
        coefficients[0] = 0  # best effort: do not leave the byte in this list
    return [Share(j + 1, bytes(y)) for j, y in enumerate(ys)]


def combine(shares: Sequence[Share]) -> bytes:
    """Interpolate at 0. With fewer than the threshold this returns garbage, not an error."""
    if len(shares) < 2:
        raise ShareError(f"{len(shares)} share(s) given; at least 2 are needed")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs) or any(not 1 <= x <= 255 for x in xs):
        raise ShareError("shares must have distinct x coordinates in 1..255")
    length = len(shares[0].y)
    if any(len(s.y) != length for s in shares):
        raise ShareError("shares have different lengths: they are not from one split")
    weights = [_lagrange_at_zero(xs, i) for i in range(len(xs))]
    out = bytearray(length)
    for i in range(length):
        acc = 0
        for weight, share in zip(weights, shares, strict=True):
            acc ^= _mul(weight, share.y[i])
        out[i] = acc
    return bytes(out)


def _lagrange_at_zero(xs: Sequence[int], i: int) -> int:
    """l_i(0) = prod_{j != i} x_j / (x_j - x_i); subtraction is xor in GF(2^8)."""
    weight = 1
    for j, xj in enumerate(xs):
        if j != i:
            weight = _mul(weight, _div(xj, xj ^ xs[i]))
    return weight
