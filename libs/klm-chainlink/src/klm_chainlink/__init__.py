"""The hot loops of the audit hash chain (see :mod:`klm_chainlink.reference`).

:func:`verify_rows` (verification) and :func:`link_hashes` (sealing) are the C
implementations (:mod:`klm_chainlink._native`, OpenSSL's SHA-256, no Python call per link)
when the extension was built with the package, else the Python reference; :data:`NATIVE`
says which. Both give the same answer on every input."""

from __future__ import annotations

from klm_chainlink import reference
from klm_chainlink.reference import BAD, END, REACHED, LinkHashes, VerifyRows

try:
    from klm_chainlink import _native
except ImportError:  # not built (no C compiler or OpenSSL headers): same answers, slower
    NATIVE = False
    verify_rows: VerifyRows = reference.verify_rows
    link_hashes: LinkHashes = reference.link_hashes
else:
    NATIVE = True
    verify_rows = _native.verify_rows
    link_hashes = _native.link_hashes

__all__ = ["BAD", "END", "NATIVE", "REACHED", "LinkHashes", "VerifyRows", "link_hashes",
           "verify_rows"]
