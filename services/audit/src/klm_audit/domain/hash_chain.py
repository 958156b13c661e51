"""The audit hash chain: canonical encoding of an event and the link hash (pure, no I/O).

The exact encoding is the public contract a third party recomputes (``docs/audit.md``)::

    canonical = JSON of the received envelope with
                  object keys sorted by Unicode code point, at every depth,
                  no insignificant whitespace (separators "," and ":"),
                  strings as UTF-8 (not \\u-escaped), except '"', '\\\\' and the control
                  characters U+0000..U+001F, which are escaped as in RFC 8259
                  (\\b \\f \\n \\r \\t, else \\u00xx lower-case hex),
                  integers in decimal; a float with an integral value below 2**53 is written
                  as that integer, any other float as its shortest round-trip repr;
                  NaN and Infinity are refused
    hash_n    = SHA-256( hash_{n-1} || uint64_be(n) || canonical_n )
    hash_0    = 32 zero bytes (genesis), the first sequence is 1

Binding the sequence number into each link makes a swap or a renumbering visible even
when two events have identical content.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

GENESIS = bytes(32)
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_MAX_EXACT_INT = 2**53


class NotCanonicalisable(ValueError):
    """The value has no canonical form (NaN, Infinity, a lone surrogate, a non-JSON type)."""


def _normalise(value: Any) -> Any:
    """Integral floats become ints; everything else is checked and passed through."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotCanonicalisable("NaN and Infinity have no JSON form")
        if value.is_integer() and abs(value) < _MAX_EXACT_INT:
            return int(value)
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotCanonicalisable(f"object key {key!r} is not a string")
            out[key] = _normalise(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    raise NotCanonicalisable(f"{type(value).__name__} is not a JSON value")


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 bytes of a JSON value (see the module docstring)."""
    text = json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotCanonicalisable("string contains a lone surrogate") from exc


def _reject_constant(name: str) -> Any:
    raise NotCanonicalisable(f"{name} is not JSON")


def canonicalise_received(raw: bytes) -> bytes:
    """Canonical bytes of a received record value (strict JSON: no NaN/Infinity)."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise NotCanonicalisable(f"not JSON: {exc}") from None
    return canonical_json(value)


def link_hash(prev_hash: bytes, sequence: int, canonical: bytes) -> bytes:
    """``SHA-256(prev_hash || uint64_be(sequence) || canonical)``."""
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    if not 0 < sequence < 2**64:
        raise ValueError("sequence must be a positive 64-bit integer")
    digest = hashlib.sha256(prev_hash)
    digest.update(struct.pack(">Q", sequence))
    digest.update(canonical)
    return digest.digest()


#: ``(sequence, prev_hash, hash, canonical)`` as the verifier streams it
ChainRow = tuple[int, bytes, bytes, bytes]


@dataclass(frozen=True, slots=True)
class Link:
    """One stored chain entry as the verifier sees it."""

    sequence: int
    prev_hash: bytes
    hash: bytes
    canonical: bytes


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first sequence at which the chain stops being valid, and why."""

    sequence: int
    reason: str


@dataclass(slots=True)
class ChainVerifier:
    """Checks links fed in sequence order; stops at the first break.

    Feed it with :meth:`feed` (chunks of a streamed table, or an API page); read
    :attr:`broken`, :attr:`head_sequence` and :attr:`head_hash` at the end.
    """

    head_sequence: int = 0
    head_hash: bytes = GENESIS
    broken: ChainBreak | None = None
    checked: int = 0
    #: sequences whose recomputed hash is kept in :attr:`hashes_at` (signed checkpoints)
    watch: frozenset[int] = frozenset()
    hashes_at: dict[int, bytes] = field(default_factory=dict)

    def feed(self, links: Iterable[Link]) -> bool:
        """Check ``links``; return False once the chain is broken."""
        return self.feed_rows((k.sequence, k.prev_hash, k.hash, k.canonical) for k in links)

    def feed_packed(self, packed: bytes) -> bool:
        """Check rows packed back to back as ``uint32_be(len(canonical)) || prev_hash ||
        uint64_be(sequence) || canonical || hash`` (:func:`pack_rows`; the Postgres store
        builds this server-side): the hash input is one zero-copy slice, so a row costs one
        SHA-256 and a few slices — no per-row objects from the driver."""
        if self.broken is not None:
            return False
        view, sha256, length_at = memoryview(packed), hashlib.sha256, _U32.unpack_from
        expected, prev, checked, watch = self.head_sequence + 1, self.head_hash, self.checked, \
            self.watch
        offset, end = 0, len(packed)
        try:
            while offset < end:
                (size,) = length_at(packed, offset)
                body_end = offset + 44 + size
                digest = packed[body_end:body_end + 32]
                sequence = int.from_bytes(packed[offset + 36:offset + 44], "big")
                if (sequence != expected or packed[offset + 4:offset + 36] != prev
                        or sha256(view[offset + 4:body_end]).digest() != digest):
                    self.head_sequence, self.head_hash, self.checked = expected - 1, prev, checked
                    return self.feed_rows([(sequence, packed[offset + 4:offset + 36], digest,
                                            packed[offset + 44:body_end])])
                if sequence in watch:
                    self.hashes_at[sequence] = digest
                expected, prev, checked, offset = expected + 1, digest, checked + 1, \
                    body_end + 32
        finally:
            if self.broken is None:
                self.head_sequence, self.head_hash, self.checked = expected - 1, prev, checked
        return True

    def feed_rows(self, rows: Iterable[ChainRow]) -> bool:
        """Check ``(sequence, prev_hash, hash, canonical)`` rows; False once broken.

        The hot loop of whole-chain verification: one SHA-256 per row and nothing else;
        the first row that does not hold goes through :meth:`_check` for its reason."""
        if self.broken is not None:
            return False
        sha256, pack, watch = hashlib.sha256, _U64.pack, self.watch
        expected, prev, checked = self.head_sequence + 1, self.head_hash, self.checked
        try:
            for sequence, prev_hash, digest, canonical in rows:
                if (sequence != expected or prev_hash != prev
                        or sha256(prev + pack(sequence) + canonical).digest() != digest):
                    self.head_sequence, self.head_hash = expected - 1, prev
                    link = Link(sequence, bytes(prev_hash), bytes(digest), bytes(canonical))
                    self.broken = ChainBreak(self._break_sequence(link),
                                             self._check(link) or "link does not hold")
                    return False
                if sequence in watch:
                    self.hashes_at[sequence] = digest
                expected, prev, checked = expected + 1, digest, checked + 1
        finally:
            self.checked = checked
            if self.broken is None:
                self.head_sequence, self.head_hash = expected - 1, prev
        return True

    def _break_sequence(self, link: Link) -> int:
        expected = self.head_sequence + 1
        return expected if link.sequence != expected else link.sequence

    def _check(self, link: Link) -> str | None:
        expected = self.head_sequence + 1
        if link.sequence != expected:
            return (f"sequence {expected} is missing (next stored is {link.sequence})"
                    if link.sequence > expected
                    else f"sequence {link.sequence} appears out of order after "
                         f"{self.head_sequence}")
        if link.prev_hash != self.head_hash:
            return (f"prev_hash does not equal the hash of sequence {self.head_sequence}: "
                    "a row was rewritten, removed or reordered")
        if link_hash(link.prev_hash, link.sequence, link.canonical) != link.hash:
            return "hash does not match the event content: the row was modified"
        return None


def pack_rows(rows: Iterable[ChainRow]) -> bytes:
    """The layout :meth:`ChainVerifier.feed_packed` reads (what the Postgres store's
    ``chain_packed`` query builds with ``int4send``/``int8send``)."""
    return b"".join(_U32.pack(len(canonical)) + prev + _U64.pack(sequence) + canonical + digest
                    for sequence, prev, digest, canonical in rows)
