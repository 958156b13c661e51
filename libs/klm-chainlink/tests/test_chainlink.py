"""The C verification loop gives the Python reference's answer on every input: valid
chains, chains cut anywhere, and rows corrupted anywhere."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import klm_chainlink
from klm_chainlink import BAD, END, REACHED, reference
from klm_chainlink.reference import LinkHashes, VerifyRows

NONE = 2**64 - 1  # no sequence to stop after


def rows(canonicals: list[bytes], first: int = 1, prev: bytes = bytes(32)) -> tuple[bytes, bytes]:
    """Binary COPY rows (no header or trailer) of a valid chain, and the hash it ends on."""
    out = []
    for sequence, canonical in enumerate(canonicals, first):
        body = prev + struct.pack(">Q", sequence) + canonical
        prev = hashlib.sha256(body).digest()
        out.append(struct.pack(">hi", 2, len(body)) + body + struct.pack(">i", 32) + prev)
    return b"".join(out), prev


IMPLEMENTATIONS = [pytest.param(reference.verify_rows, id="reference")]
if klm_chainlink.NATIVE:
    IMPLEMENTATIONS.append(pytest.param(klm_chainlink.verify_rows, id="native"))


def test_the_native_loop_is_built_where_the_suite_must_be_complete() -> None:
    if os.environ.get("CI") != "true" and not klm_chainlink.NATIVE:
        pytest.skip("the C extension is not built here (no compiler or OpenSSL headers)")
    assert klm_chainlink.NATIVE, "klm_chainlink._native did not build: uv sync --all-packages"


@pytest.mark.parametrize("verify", IMPLEMENTATIONS)
def test_a_valid_chain_is_walked_to_its_end(verify: VerifyRows) -> None:
    data, head = rows([b'{"n":%d}' % i * (i % 7) for i in range(50)])
    assert verify(data, 0, len(data), 1, bytes(32), NONE) == (len(data), 51, head, END)


@pytest.mark.parametrize("verify", IMPLEMENTATIONS)
def test_the_walk_stops_after_the_watched_sequence(verify: VerifyRows) -> None:
    data, _ = rows([b"a", b"b", b"c"])
    first, _ = rows([b"a", b"b"])
    offset, expected, prev, status = verify(data, 0, len(data), 1, bytes(32), 2)
    assert (offset, expected, status) == (len(first), 3, REACHED)
    assert verify(data, offset, len(data), expected, prev, NONE)[1:] == (4, rows(
        [b"a", b"b", b"c"])[1], END)


@pytest.mark.parametrize("verify", IMPLEMENTATIONS)
def test_a_modified_row_is_named_by_its_offset(verify: VerifyRows) -> None:
    data, _ = rows([b"one", b"two", b"three"])
    second = len(rows([b"one"])[0])
    tampered = bytearray(data)
    tampered[second + 6 + 41] ^= 1  # a byte of the second canonical
    offset, expected, _, status = verify(bytes(tampered), 0, len(data), 1, bytes(32), NONE)
    assert (offset, expected, status) == (second, 2, BAD)


@pytest.mark.parametrize("verify", IMPLEMENTATIONS)
def test_bad_arguments_are_refused(verify: VerifyRows) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        verify(b"", 0, 0, 1, b"short", NONE)
    with pytest.raises(ValueError, match="len"):
        verify(b"abc", 0, 4, 1, bytes(32), NONE)


@pytest.mark.skipif(not klm_chainlink.NATIVE, reason="the C extension is not built")
@settings(max_examples=400, deadline=None)
@given(canonicals=st.lists(st.binary(max_size=120), max_size=12),
       first=st.integers(1, 2**40), cut=st.integers(0, 10_000), start=st.integers(0, 64),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.integers(1, 255))),
       last=st.one_of(st.just(NONE), st.integers(0, 2**40 + 20)),
       prev=st.binary(min_size=32, max_size=32))
def test_native_and_reference_agree_on_any_stream(
        canonicals: list[bytes], first: int, cut: int, start: int,
        flip: tuple[int, int] | None, last: int, prev: bytes) -> None:
    data, _ = rows(canonicals, first, prev)
    stream = bytearray(data)
    if flip is not None and stream:
        stream[flip[0] % len(stream)] ^= flip[1]  # sizes, hashes, sequences, content
    end = min(cut, len(stream))
    offset = min(start, end)
    args = (bytes(stream), offset, end, first, prev, last)
    assert klm_chainlink.verify_rows(*args) == reference.verify_rows(*args)


@pytest.mark.parametrize("hashes", [pytest.param(reference.link_hashes, id="reference")] + (
    [pytest.param(klm_chainlink.link_hashes, id="native")] if klm_chainlink.NATIVE else []))
def test_sealing_chains_the_links_the_verifier_checks(hashes: LinkHashes) -> None:
    canonicals = [b"", b"x" * 300, b'{"a":1}']
    data, head = rows(canonicals, 7, b"\x01" * 32)
    sealed = hashes(b"\x01" * 32, 7, canonicals)
    assert sealed[-1] == head and len(sealed) == 3
    assert klm_chainlink.verify_rows(data, 0, len(data), 7, b"\x01" * 32, NONE) == (
        len(data), 10, head, END)
    assert hashes(bytes(32), 1, []) == []
    with pytest.raises(ValueError, match="32 bytes"):
        hashes(b"", 1, [])
    with pytest.raises(TypeError, match="bytes"):
        hashes(bytes(32), 1, ["text"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="positive"):
        hashes(bytes(32), 0, [b""])


@pytest.mark.skipif(not klm_chainlink.NATIVE, reason="the C extension is not built")
@settings(max_examples=200, deadline=None)
@given(prev=st.binary(min_size=32, max_size=32), first=st.integers(1, 2**63),
       canonicals=st.lists(st.binary(max_size=200), max_size=10))
def test_native_and_reference_seal_alike(prev: bytes, first: int, canonicals: list[bytes]
                                         ) -> None:
    assert klm_chainlink.link_hashes(prev, first, canonicals) == reference.link_hashes(
        prev, first, canonicals)


@pytest.mark.skipif(not klm_chainlink.NATIVE, reason="the C extension is not built")
def test_sequences_outside_64_bits_are_refused_not_wrapped() -> None:
    with pytest.raises(OverflowError):
        klm_chainlink.link_hashes(bytes(32), 2**64 + 1, [b""])
    with pytest.raises(OverflowError):
        klm_chainlink.verify_rows(b"", 0, 0, -1, bytes(32), NONE)
