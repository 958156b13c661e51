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

from klm_chainlink import BAD, END, REACHED, verify_rows

GENESIS = bytes(32)
_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
#: a binary COPY row starts with int16 field count, then int32 length of the first field
_ROW_HEAD = struct.Struct(">hi")
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_TRAILER = b"\xff\xff"
#: prev_hash and uint64 sequence in front of the canonical bytes
_PREFIX = 40
_PREV_HASH_REASON = ("prev_hash does not equal the hash of sequence {}: a row was rewritten, "
                     "removed or reordered")
_MAX_EXACT_INT = 2**53
#: ``last`` for :func:`verify_rows` when no sequence ahead is watched
_NOT_WATCHED = 2**64 - 1


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

    def feed_copied(self, data: bytes, offset: int, end: int) -> int:
        """Check the whole rows of a binary ``COPY`` stream in ``data[offset:end]`` (rows
        only: no header, no trailer) and return the offset of the first row not wholly in
        it, where the next piece of the stream continues (:class:`SegmentStream`). The hot
        loop of verification runs in :func:`klm_chainlink.verify_rows` (C, or the same loop
        in Python where the extension is not built), stopping after each watched sequence
        to keep its hash; a row that does not hold sets :attr:`broken` (the offset returned
        then means nothing)."""
        if self.broken is not None:
            return offset
        expected, prev, status = self.head_sequence + 1, self.head_hash, END
        for last in (*sorted(s for s in self.watch if s >= expected), _NOT_WATCHED):
            offset, expected, prev, status = verify_rows(data, offset, end, expected, prev,
                                                         last)
            if status != REACHED:
                break
            self.hashes_at[last] = prev
        self.checked += expected - 1 - self.head_sequence
        self.head_sequence, self.head_hash = expected - 1, prev
        # a hash field of another length: named when the row is whole
        if status == BAD and _whole_row(data, offset):
            self._break_at(data, offset)
        return offset

    def _break_at(self, data: bytes, offset: int) -> None:
        """The row at ``offset`` (after :attr:`head_sequence`) does not hold: name why."""
        self.feed_rows([_copied_row(data, offset)])
        if self.broken is None:
            self.broken = ChainBreak(self.head_sequence + 1, "row is not a well-formed link")

    def join(self, segment: ChainSegment) -> bool:
        """Put a range verified on its own (:func:`verify_segment`) after what was checked so
        far: it must start at the next sequence, with the hash this verifier ends on as its
        stored ``prev_hash``. Gives the answer feeding the range's rows would give."""
        if self.broken is not None:
            return False
        expected = self.head_sequence + 1
        if segment.first_sequence != expected:
            following = segment.first_sequence
            self.broken = ChainBreak(expected, f"sequence {expected} is missing" + (
                f" (next stored is {following})" if following is not None else ""))
            return False
        if segment.first_prev != self.head_hash:
            self.broken = ChainBreak(expected, _PREV_HASH_REASON.format(self.head_sequence))
            return False
        self.checked += segment.checked
        self.hashes_at.update(segment.hashes_at)
        self.head_sequence, self.head_hash = segment.head_sequence, segment.head_hash
        self.broken = segment.broken
        return self.broken is None

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
            return _PREV_HASH_REASON.format(self.head_sequence)
        if link_hash(link.prev_hash, link.sequence, link.canonical) != link.hash:
            return "hash does not match the event content: the row was modified"
        return None


@dataclass(frozen=True, slots=True)
class ChainSegment:
    """What one range ``after < sequence <= upto`` of the chain says on its own, verified from
    its first row's stored ``prev_hash``; :meth:`ChainVerifier.join` puts ranges end to end.

    Ranges are independent (each link names its predecessor's hash), so they can be hashed
    in parallel; joining checks each range starts where the previous one ends."""

    after: int
    #: the first stored row's sequence and prev_hash (None: no row in the range)
    first_sequence: int | None
    first_prev: bytes | None
    checked: int
    head_sequence: int
    head_hash: bytes
    broken: ChainBreak | None
    hashes_at: dict[int, bytes]


def verify_segment(after: int, copied: bytes, watch: frozenset[int] = frozenset()
                   ) -> ChainSegment:
    """Verify the rows of one range (binary ``COPY`` layout, :func:`copy_rows`) after
    sequence ``after``; a module-level function so a worker process can run it."""
    stream = SegmentStream(after, watch)
    stream.feed(copied)
    return stream.finish()


class SegmentStream:
    """:func:`verify_segment` on a binary ``COPY`` stream fed in pieces of any size, as they
    arrive: a worker hashes what it has while the server sends the rest, and reads in large
    pieces (a range read whole first came in ~30 KiB socket reads, each with the driver's
    per-read overhead). A row cut between two pieces is kept until the next one."""

    def __init__(self, after: int, watch: frozenset[int] = frozenset()) -> None:
        self._after, self._watch = after, watch
        self._pending = b""
        self._started = False  # the COPY header is consumed
        self._segment: ChainSegment | None = None  # decided without hashing (empty, gap)
        self._verifier: ChainVerifier | None = None
        self._first: tuple[int, bytes] | None = None

    def feed(self, piece: bytes) -> None:
        data = self._pending + piece if self._pending else piece
        offset = self._header(data) if not self._started else 0
        if offset < 0 or self._segment is not None:
            self._pending = data if offset < 0 else b""
            return
        if self._verifier is None:
            offset = self._first_row(data, offset)
            if self._verifier is None:
                return
        offset = self._verifier.feed_copied(data, offset, len(data))
        self._pending = data[offset:] if self._verifier.broken is None else b""

    def finish(self) -> ChainSegment:
        """The segment, once the whole stream was fed (its trailer last)."""
        if self._segment is not None:
            return self._segment
        rest, verifier, first = self._pending, self._verifier, self._first
        broken = verifier is not None and verifier.broken is not None  # the rest dropped
        if not self._started or not (broken or rest.endswith(_COPY_TRAILER)):
            raise ValueError("not a complete binary COPY stream")
        if verifier is None or first is None:
            return ChainSegment(self._after, None, None, 0, self._after, GENESIS, None, {})
        if verifier.broken is None and len(rest) > len(_COPY_TRAILER):
            verifier._break_at(rest, 0)  # a last row that is not a whole link
        return ChainSegment(self._after, first[0], first[1], verifier.checked,
                            verifier.head_sequence, verifier.head_hash, verifier.broken,
                            verifier.hashes_at)

    def _header(self, data: bytes) -> int:
        """Offset of the first row, -1 while the header is incomplete."""
        fixed = len(_COPY_SIGNATURE) + 8
        if len(data) < fixed:
            return -1
        if not data.startswith(_COPY_SIGNATURE):
            raise ValueError("not a complete binary COPY stream")
        extension: int = _I32.unpack_from(data, len(_COPY_SIGNATURE) + 4)[0]
        if len(data) < fixed + extension:
            return -1
        self._started = True
        return fixed + extension

    def _first_row(self, data: bytes, offset: int) -> int:
        """Start the verifier at the first row's stored prev_hash once the row is whole;
        a range without rows, or not starting right after ``after``, needs no hashing."""
        if data.startswith(_COPY_TRAILER, offset):
            self._segment = ChainSegment(self._after, None, None, 0, self._after, GENESIS,
                                         None, {})
            return offset
        if not _whole_row(data, offset):
            self._pending = data[offset:]
            return offset
        first_sequence, first_prev, _, _ = _copied_row(data, offset)
        self._first = first_sequence, first_prev
        if first_sequence != self._after + 1:  # the join names the gap
            self._segment = ChainSegment(self._after, first_sequence, first_prev, 0,
                                         self._after, first_prev, None, {})
            return offset
        self._verifier = ChainVerifier(head_sequence=self._after, head_hash=first_prev,
                                       watch=self._watch)
        return offset


def _whole_row(data: bytes, offset: int) -> bool:
    """Whether the two-field row at ``offset`` is wholly in ``data``."""
    if len(data) < offset + 6:
        return False
    size: int = _I32.unpack_from(data, offset + 2)[0]
    stop = offset + 6 + max(size, 0)
    if len(data) < stop + 4:
        return False
    hash_size: int = _I32.unpack_from(data, stop)[0]
    return len(data) >= stop + 4 + max(hash_size, 0)


def _copied_row(copied: bytes, offset: int) -> ChainRow:
    """``(sequence, prev_hash, hash, canonical)`` of the row at ``offset`` (slow path)."""
    (size,) = _I32.unpack_from(copied, offset + 2)
    body, stop = offset + 6, offset + 6 + max(size, 0)
    if size < _PREFIX:  # not a link at all: it cannot hold
        return 0, b"", b"", b""
    (hash_size,) = _I32.unpack_from(copied, stop)
    return (int.from_bytes(copied[body + 32:body + _PREFIX], "big"), copied[body:body + 32],
            copied[stop + 4:stop + 4 + max(hash_size, 0)], copied[body + _PREFIX:stop])


def copy_rows(rows: Iterable[ChainRow]) -> bytes:
    """The binary ``COPY`` stream :func:`verify_segment` reads: per row two fields,
    ``prev_hash || uint64_be(sequence) || canonical`` and ``hash`` (what the Postgres store's
    ``COPY (SELECT prev_hash || int8send(sequence) || textsend(canonical), hash …)`` sends)."""
    out = [_COPY_SIGNATURE, bytes(8)]
    for sequence, prev, digest, canonical in rows:
        body = prev + _U64.pack(sequence) + canonical
        out.append(_ROW_HEAD.pack(2, len(body)) + body + _I32.pack(len(digest)) + digest)
    out.append(_COPY_TRAILER)
    return b"".join(out)
