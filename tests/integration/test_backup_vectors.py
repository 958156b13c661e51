"""The backup unwrap path against external vectors, inside the real HSM (SoftHSM).

NIST CAVP SP 800-38F KW and KWP (from the ``cryptography-vectors`` package, the AD files
with their FAIL cases and the AE files) and Wycheproof ``aes_wrap_test.json`` /
``aes_kwp_test.json`` (read in place from the shared vectors folder). Every case goes
through :func:`klm_keygen.adapters.hsm_backup.unwrap_blob` — the function keygen uses to
restore and drill backups — on a scratch token of its own: a valid case must unwrap to the
expected key; an invalid one must be refused and leave no object behind.

Not run: the ``*_inv`` files (KW/KWP with the inverse cipher function, which PKCS#11 has no
mechanism for) and ``TKW_*`` (Triple-DES).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from klm_common.errors import IntegrityError
from klm_keygen.adapters.hsm_backup import unwrap_blob
from tests.integration.conftest import unavailable
from tests.integration.harness import wycheproof_dir

WYCHEPROOF = wycheproof_dir(Path(__file__).resolve().parents[2])
NIST_FILES = [f"{kind}_{mode}_{bits}.txt" for kind in ("KW", "KWP") for mode in ("AD", "AE")
              for bits in (128, 192, 256)]


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    kek: bytes
    wrapped: bytes
    expected: bytes | None  # None: must be refused
    acceptable: bool = False  # Wycheproof "acceptable": either outcome is legal


def nist_cases(filename: str) -> list[Case]:
    """CAVP response files: blocks of ``COUNT``, ``K``, ``P``/``C`` (either order) and, in
    the AD files, ``FAIL`` instead of ``P`` for a ciphertext that must be refused."""
    folder = resources.files("cryptography_vectors").joinpath("keywrap", "kwtestvectors")
    blocks: list[dict[str, str]] = []
    for raw in folder.joinpath(filename).read_text().splitlines():
        line = raw.strip()
        if line.startswith("COUNT = "):
            blocks.append({"COUNT": line.split(" = ")[1]})
        elif blocks and line == "FAIL":
            blocks[-1]["FAIL"] = "1"
        elif blocks and " = " in line:
            name, value = line.split(" = ", 1)
            blocks[-1][name] = value
    return [Case(f"{filename}#{b['COUNT']}", bytes.fromhex(b["K"]), bytes.fromhex(b["C"]),
                 None if "FAIL" in b else bytes.fromhex(b["P"])) for b in blocks]


def wycheproof_cases(filename: str) -> list[Case]:
    path = WYCHEPROOF / filename
    if not path.exists():
        unavailable(f"Wycheproof vectors not found at {path}")
    data = json.loads(path.read_text())
    return [Case(f"{filename}#{t['tcId']}", bytes.fromhex(t["key"]), bytes.fromhex(t["ct"]),
                 bytes.fromhex(t["msg"]) if t["result"] != "invalid" else None,
                 acceptable=t["result"] == "acceptable")
            for group in data["testGroups"] for t in group["tests"]]


@pytest.fixture(scope="module")
def scratch_session(endpoints: dict[str, str]) -> Iterator[Any]:
    """A token of this module's own (never the service's), deleted afterwards."""
    label = f"vec{uuid.uuid4().hex[:8]}"
    pin = secrets.token_hex(8)
    env = {**os.environ, "SOFTHSM2_CONF": endpoints["SOFTHSM2_CONF"]}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", secrets.token_hex(8)], env=env, check=True, capture_output=True)
    os.environ.setdefault("SOFTHSM2_CONF", endpoints["SOFTHSM2_CONF"])
    lib = pkcs11.lib(endpoints["KLM_HSM_MODULE"])
    lib.reinitialize()  # the library may have been loaded before this token existed
    session = lib.get_token(token_label=label).open(rw=True, user_pin=pin)
    yield session
    session.close()
    subprocess.run(["softhsm2-util", "--delete-token", "--token", label], env=env,
                   check=False, capture_output=True)


def run_case(session: Any, case: Case, mechanism: Mechanism) -> str | None:
    """None if the HSM did what the vector says; else what went wrong."""
    kek = session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: case.kek, Attribute.TOKEN: False, Attribute.UNWRAP: True,
        Attribute.WRAP: False})
    before = len(list(session.get_objects({Attribute.TOKEN: False})))
    try:
        try:
            # test vectors only: the unwrapped value is made readable to compare it
            key = unwrap_blob(kek, case.wrapped, ObjectClass.SECRET_KEY,
                              KeyType.GENERIC_SECRET, mechanism=mechanism,
                              template={Attribute.SENSITIVE: False,
                                        Attribute.EXTRACTABLE: True, Attribute.TOKEN: False})
        except IntegrityError:
            left = len(list(session.get_objects({Attribute.TOKEN: False})))
            if left != before:
                return f"{case.name}: refused but left {left - before} object(s)"
            if case.expected is not None and not case.acceptable:
                return f"{case.name}: valid case refused"
            return None
        value = bytes(key[Attribute.VALUE])
        key.destroy()
        if case.expected is None:
            return f"{case.name}: invalid case unwrapped ({len(value)} bytes)"
        if value != case.expected:
            return f"{case.name}: unwrapped {value.hex()} != expected {case.expected.hex()}"
        return None
    finally:
        kek.destroy()


def _mechanism(filename: str) -> Mechanism:
    return Mechanism.AES_KEY_WRAP_PAD if filename.startswith(("KWP", "aes_kwp")) \
        else Mechanism.AES_KEY_WRAP


@pytest.mark.parametrize("filename", NIST_FILES)
def test_nist_cavp_vectors_unwrap_in_the_hsm(scratch_session: Any, filename: str) -> None:
    cases = nist_cases(filename)
    assert len(cases) >= 100, f"parsed only {len(cases)} cases from {filename}"
    problems = [p for c in cases if (p := run_case(scratch_session, c, _mechanism(filename)))]
    fails = sum(c.expected is None for c in cases)
    assert not problems, f"{len(problems)} of {len(cases)} cases ({fails} FAIL): " \
                         + "; ".join(problems[:5])


@pytest.mark.parametrize("filename", ["aes_kwp_test.json", "aes_wrap_test.json"])
def test_wycheproof_vectors_unwrap_in_the_hsm(scratch_session: Any, filename: str) -> None:
    cases = wycheproof_cases(filename)
    assert any(c.expected is None for c in cases) and any(c.expected for c in cases)
    problems = [p for c in cases if (p := run_case(scratch_session, c, _mechanism(filename)))]
    assert not problems, f"{len(problems)} of {len(cases)} cases: " + "; ".join(problems[:5])
