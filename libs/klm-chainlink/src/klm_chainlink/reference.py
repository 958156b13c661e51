"""The hot loops of the audit hash chain in Python, verification (:func:`verify_rows`) and
sealing (:func:`link_hashes`): the specification of :mod:`klm_chainlink._native` (the same
functions in C) and its fallback where that module is not built.
``tests/test_chainlink.py`` holds both to the same answers.

A binary ``COPY`` row as the audit store streams it::

    int16 field count | int32 n | prev_hash(32) || uint64_be(sequence) || canonical
                      | int32 32 | hash(32)

and the link holds when ``prev_hash`` is the hash the row before ended on, ``sequence`` the
next one, and ``hash = SHA-256(prev_hash || uint64_be(sequence) || canonical)``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

#: no whole row is left before ``end`` (the next one goes on in the next piece)
END = 0
#: the row of sequence ``last`` was verified
REACHED = 1
#: the row at the returned offset does not hold (or is not a link at all)
BAD = 2

#: the signatures both implementations share
VerifyRows = Callable[[bytes, int, int, int, bytes, int], tuple[int, int, bytes, int]]
LinkHashes = Callable[[bytes, int, list[bytes]], list[bytes]]

_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_HASH_FIELD = _I32.pack(32)
#: prev_hash and uint64 sequence in front of the canonical bytes
_PREFIX = 40


def verify_rows(data: bytes, offset: int, end: int, expected: int, prev: bytes,
                last: int) -> tuple[int, int, bytes, int]:
    """Check the rows of ``data[offset:end]``, the first of which must be sequence
    ``expected`` linked to ``prev``; return ``(offset, expected, prev, status)`` where the
    walk stopped: past the row of sequence ``last`` (:data:`REACHED`), before a row not
    wholly in the range (:data:`END`), or at a row that does not hold (:data:`BAD`)."""
    if len(prev) != 32 or not 0 <= offset <= end <= len(data):
        raise ValueError("prev must be 32 bytes and 0 <= offset <= end <= len(data)")
    # copying a fresh SHA-256 context skips OpenSSL's per-call digest look-up
    view, fresh, size_at, pack = memoryview(data), hashlib.sha256().copy, \
        _I32.unpack_from, _U64.pack
    starts_with = data.startswith
    while (body := offset + 6) <= end:
        size = size_at(data, offset + 2)[0]
        stop = body + size
        if stop + 36 > end:
            return offset, expected, prev, END
        if size < _PREFIX or not starts_with(prev + pack(expected), body):
            return offset, expected, prev, BAD
        link = fresh()
        link.update(view[body:stop])
        digest = link.digest()
        if not starts_with(_HASH_FIELD + digest, stop):
            return offset, expected, prev, BAD
        expected, prev, offset = expected + 1, digest, stop + 36
        if expected > last:
            return offset, expected, prev, REACHED
    return offset, expected, prev, END


def link_hashes(prev: bytes, sequence: int, canonicals: list[bytes]) -> list[bytes]:
    """The hashes of the links after ``prev``, the first numbered ``sequence``, chained:
    ``SHA-256(prev || uint64_be(sequence) || canonical)``, each the next one's ``prev``."""
    if len(prev) != 32:
        raise ValueError("prev must be 32 bytes")
    out = []
    fresh, pack = hashlib.sha256().copy, _U64.pack
    for canonical in canonicals:
        if not isinstance(canonical, bytes):
            raise TypeError("canonicals must be a sequence of bytes")
        if sequence <= 0:
            raise ValueError("sequence must be a positive 64-bit integer")
        link = fresh()
        link.update(prev)
        link.update(pack(sequence))
        link.update(canonical)
        prev = link.digest()
        out.append(prev)
        sequence += 1
    return out
