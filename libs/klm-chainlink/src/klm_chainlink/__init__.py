"""The hot loop of audit hash-chain verification (see :mod:`klm_chainlink.reference`).

:func:`verify_rows` is the C implementation (:mod:`klm_chainlink._native`, OpenSSL's
SHA-256, no Python object per row) when it was built with the package, else the Python
reference; :data:`NATIVE` says which. Both give the same answer on every input."""

from __future__ import annotations

from klm_chainlink import reference
from klm_chainlink.reference import BAD, END, REACHED, VerifyRows

try:
    from klm_chainlink import _native
except ImportError:  # not built (no C compiler or OpenSSL headers): same answers, slower
    NATIVE = False
    verify_rows: VerifyRows = reference.verify_rows
else:
    NATIVE = True
    verify_rows = _native.verify_rows

__all__ = ["BAD", "END", "NATIVE", "REACHED", "VerifyRows", "verify_rows"]
