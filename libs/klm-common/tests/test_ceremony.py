"""Custodian share files of the backup KEK ceremony (the parts without an HSM; the
ceremony against SoftHSM runs in tests/integration/test_backup.py)."""

from __future__ import annotations

import secrets

import pytest

from klm_common.cli_ceremony import CeremonyError, ShareFile, aes_kcv, rebuild
from klm_common.shamir import split


def share_files(key: bytes, n: int = 5, m: int = 3, ceremony: str = "c-1") -> list[ShareFile]:
    return [ShareFile(ceremony, aes_kcv(key), m, n, s) for s in split(key, n, m)]


def test_kcv_is_what_the_token_computes() -> None:
    # AES-256, zero key, zero block → dc95c078a2408989ad48a21492842087 (the classic known
    # answer); SoftHSM reports CKA_CHECK_VALUE dc95c0 for that key
    assert aes_kcv(bytes(32)) == "dc95c0"


def test_a_share_file_round_trips_through_its_text() -> None:
    [f, *_] = share_files(secrets.token_bytes(32))
    text = f.render()
    assert "checksum: " in text and f"kek-kcv: {f.kek_kcv}" in text
    assert ShareFile.parse(text, "f") == f


def test_an_altered_share_is_named_by_its_checksum() -> None:
    text = share_files(secrets.token_bytes(32))[0].render()
    line = next(x for x in text.splitlines() if x.startswith("share: "))
    digit = "1" if line[7] != "1" else "2"
    with pytest.raises(CeremonyError, match="checksum"):
        ShareFile.parse(text.replace(line, line[:7] + digit + line[8:]), "custodian-1")


def test_threshold_shares_rebuild_and_fewer_are_refused() -> None:
    key = secrets.token_bytes(32)
    files = share_files(key)
    assert bytes(rebuild(files[1:4])) == key
    with pytest.raises(CeremonyError, match="needs 3 of 5"):
        rebuild(files[:2])
    with pytest.raises(CeremonyError, match="needs 3 of 5"):
        rebuild([files[0], files[0], files[1]])  # the same custodian twice


def test_shares_of_different_ceremonies_or_a_wrong_share_are_refused() -> None:
    key = secrets.token_bytes(32)
    a = share_files(key, ceremony="a")
    b = share_files(secrets.token_bytes(32), ceremony="b")
    with pytest.raises(CeremonyError, match="different ceremonies"):
        rebuild([a[0], a[1], b[2]])
    forged = ShareFile("a", a[0].kek_kcv, 3, 5, b[2].share)  # checksum recomputed
    with pytest.raises(CeremonyError, match="check value"):
        rebuild([a[0], a[1], forged])
