"""The canonical encoding and the chain are the public contract: pin them with vectors."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klm_audit.domain.hash_chain import (
    GENESIS,
    ChainVerifier,
    Link,
    NotCanonicalisable,
    SegmentStream,
    canonical_json,
    canonicalise_received,
    copy_rows,
    link_hash,
    verify_segment,
)


@pytest.mark.parametrize(("value", "expected"), [
    ({"b": 1, "a": [1, 2, {"d": None, "c": True}]}, b'{"a":[1,2,{"c":true,"d":null}],"b":1}'),
    ({"s": "\u00e9\u20ac\U0001f511"}, '{"s":"\u00e9\u20ac\U0001f511"}'.encode()),
    ({"s": 'q"b\\\n\t\x01'}, b'{"s":"q\\"b\\\\\\n\\t\\u0001"}'),
    ({"f": 1.0, "g": 2.5, "h": -0.0, "i": 1e300}, b'{"f":1,"g":2.5,"h":0,"i":1e+300}'),
    ({"n": 2**70}, b'{"n":1180591620717411303424}'),
    ({"\u00e9": 1, "z": 2, "A": 3}, '{"A":3,"z":2,"\u00e9":1}'.encode()),
])
def test_canonical_json_vectors(value: Any, expected: bytes) -> None:
    assert canonical_json(value) == expected


def test_received_whitespace_and_key_order_do_not_matter() -> None:
    a = canonicalise_received(b'{ "b" : 1,\n "a" : "x" }')
    b = canonicalise_received(b'{"a":"x","b":1}')
    assert a == b == b'{"a":"x","b":1}'


@pytest.mark.parametrize("raw", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": "\\ud800"}',
                                 b"\xff", b"{"])
def test_values_without_canonical_form_are_refused(raw: bytes) -> None:
    with pytest.raises(NotCanonicalisable):
        canonicalise_received(raw)


def test_link_hash_is_sha256_of_prev_sequence_and_canonical() -> None:
    canonical = b'{"id":"e1"}'
    expected = hashlib.sha256(bytes(32) + struct.pack(">Q", 1) + canonical).hexdigest()
    assert link_hash(GENESIS, 1, canonical).hex() == expected
    # a fixed vector, so an accidental change of the encoding cannot pass unnoticed
    assert expected == hashlib.sha256(
        bytes(32) + b"\x00\x00\x00\x00\x00\x00\x00\x01" + b'{"id":"e1"}').hexdigest()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20)


@given(json_values)
def test_canonical_form_is_a_fixed_point(value: Any) -> None:
    once = canonical_json(value)
    assert canonicalise_received(once) == once
    assert canonical_json(json.loads(once)) == once


def chain(n: int) -> list[Link]:
    links, prev = [], GENESIS
    for seq in range(1, n + 1):
        canonical = canonical_json({"id": f"e{seq}", "n": seq})
        digest = link_hash(prev, seq, canonical)
        links.append(Link(seq, prev, digest, canonical))
        prev = digest
    return links


def rows(links: list[Link]) -> list[tuple[int, bytes, bytes, bytes]]:
    return [(k.sequence, k.prev_hash, k.hash, k.canonical) for k in links]


def joined(links: list[Link], size: int) -> ChainVerifier:
    """Ranges of ``size`` sequences verified on their own (as the worker processes do),
    then joined in order."""
    verifier, upto = ChainVerifier(), max((k.sequence for k in links), default=0)
    for after in range(0, upto, size):
        part = [k for k in links if after < k.sequence <= after + size]
        if not verifier.join(verify_segment(after, copy_rows(rows(part)))):
            break
    return verifier


def streamed(links: list[Link], size: int, piece: int) -> ChainVerifier:
    """Ranges of ``size`` sequences, each fed to a :class:`SegmentStream` in pieces of
    ``piece`` bytes (rows cut anywhere, as socket reads cut them), then joined."""
    verifier, upto = ChainVerifier(), max((k.sequence for k in links), default=0)
    for after in range(0, upto, size):
        copied = copy_rows(rows([k for k in links if after < k.sequence <= after + size]))
        stream = SegmentStream(after)
        for start in range(0, len(copied), piece):
            stream.feed(copied[start:start + piece])
        if not verifier.join(stream.finish()):
            break
    return verifier


def verify(links: list[Link]) -> ChainVerifier:
    """Through every entry point: links, the binary COPY the Postgres store sends, that
    COPY split into ranges verified apart and joined, and those ranges streamed in pieces;
    all must give the same answer."""
    verifier, copied = ChainVerifier(), ChainVerifier()
    verifier.feed(links)
    copied.join(verify_segment(0, copy_rows(rows(links))))
    for result in (copied, *(joined(links, size) for size in (1, 2, 3, 4, 7)),
                   *(streamed(links, size, piece) for size in (3, 10)
                     for piece in (1, 5, 19, 64, 10_000))):
        assert (result.head_sequence, result.head_hash, result.checked) == \
            (verifier.head_sequence, verifier.head_hash, verifier.checked)
        assert _named(result) == _named(verifier)
    return verifier


def _named(verifier: ChainVerifier) -> tuple[int, str] | None:
    """The sequence and reason of a break; a range holding no row at all cannot tell the
    next stored sequence, so the parenthesised detail may differ."""
    broken = verifier.broken
    return (broken.sequence, broken.reason.split(" (")[0]) if broken else None


def test_an_intact_chain_verifies() -> None:
    verifier = verify(chain(10))
    assert verifier.broken is None and verifier.checked == 10 and verifier.head_sequence == 10


def test_modified_content_is_named() -> None:
    links = chain(10)
    links[4] = Link(5, links[4].prev_hash, links[4].hash, b'{"id":"e5","n":555}')
    broken = verify(links).broken
    assert broken is not None and broken.sequence == 5 and "modified" in broken.reason


def test_rewritten_row_with_recomputed_hash_breaks_the_next_link() -> None:
    links = chain(10)
    forged = b'{"id":"e5","n":555}'
    links[4] = Link(5, links[4].prev_hash, link_hash(links[4].prev_hash, 5, forged), forged)
    broken = verify(links).broken
    assert broken is not None and broken.sequence == 6 and "prev_hash" in broken.reason


def test_deleted_row_is_a_gap() -> None:
    links = chain(10)
    del links[6]
    broken = verify(links).broken
    assert broken is not None and broken.sequence == 7 and "missing" in broken.reason


def test_swapped_rows_are_named() -> None:
    links = chain(10)
    a, b = links[2], links[5]
    links[2] = Link(3, b.prev_hash, b.hash, b.canonical)
    links[5] = Link(6, a.prev_hash, a.hash, a.canonical)
    broken = verify(links).broken
    assert broken is not None and broken.sequence == 3


def test_feeding_in_chunks_equals_feeding_at_once() -> None:
    links = chain(25)
    verifier = ChainVerifier()
    for start in range(0, 25, 7):
        assert verifier.feed(links[start:start + 7])
    assert verifier.head_hash == links[-1].hash


def test_a_range_starting_with_a_foreign_prev_hash_breaks_at_its_first_sequence() -> None:
    links = chain(10)
    forged = Link(5, bytes(range(32)), link_hash(bytes(range(32)), 5, links[4].canonical),
                  links[4].canonical)
    later = [forged] + [Link(k.sequence, k.prev_hash, k.hash, k.canonical) for k in links[5:]]
    # from 6 on the stored links hold among themselves; 5 names a predecessor that is not 4
    for size in (2, 4, 5):
        broken = joined(links[:4] + later, size).broken
        assert broken is not None and broken.sequence == 5 and "prev_hash" in broken.reason


def test_an_empty_range_is_a_gap_named_with_the_next_stored_sequence() -> None:
    links = [k for k in chain(12) if not 4 <= k.sequence <= 8]
    broken = joined(links, 4).broken
    assert broken is not None and broken.sequence == 4 and "missing" in broken.reason


def test_watched_hashes_are_kept_across_ranges() -> None:
    links = chain(20)
    verifier = ChainVerifier(watch=frozenset({3, 11, 20}))
    for after in range(0, 20, 6):
        part = rows([k for k in links if after < k.sequence <= after + 6])
        verifier.join(verify_segment(after, copy_rows(part),
                                     frozenset(s for s in verifier.watch
                                               if after < s <= after + 6)))
    assert verifier.hashes_at == {s: links[s - 1].hash for s in (3, 11, 20)}


def test_a_hash_field_of_the_wrong_length_does_not_hold() -> None:
    links = chain(5)
    links[4] = Link(5, links[4].prev_hash, links[4].hash + b"\x00", links[4].canonical)
    broken = verify(links).broken
    assert broken is not None and broken.sequence == 5


def test_a_short_hash_field_does_not_hold_anywhere_in_the_chain() -> None:
    for at in (2, 6):
        links = chain(6)
        links[at - 1] = Link(at, links[at - 1].prev_hash, links[at - 1].hash[:31],
                             links[at - 1].canonical)
        broken = verify(links).broken
        assert broken is not None and broken.sequence == at


def test_a_stream_cut_short_is_refused() -> None:
    copied = copy_rows(rows(chain(3)))
    for cut in (5, 30, len(copied) - 1):
        stream = SegmentStream(0)
        stream.feed(copied[:cut])
        with pytest.raises(ValueError, match="not a complete"):
            stream.finish()
