"""Certificate profiles on the real stack: a generate request with a profile yields a key
that matches it and a PKCS#10 CSR signed inside the HSM (checked with ``cryptography`` and
``openssl req -verify``); a rotation of a profile key yields a new CSR."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from klm_common.client import KlmClient, RequestRejectedError
from klm_common.events import RotateKey
from klm_common.profiles import get_profile
from klm_common.settings import KlmSettings
from tests.integration.conftest import unavailable
from tests.integration.harness import ServiceProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")
OWNER = "csr-tests"
SUBJECT = {"CN": "api.example.test", "O": "Example", "C": "DE"}
#: profile → (algorithm fields, SANs)
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "tls-server": ({"algorithm": "EC", "curve": "P-256"},
                   ["DNS:api.example.test", "IP:10.1.2.3"]),
    "tls-client": ({"algorithm": "RSA-2048"}, ["URI:spiffe://example.test/billing"]),
    "code-signing": ({"algorithm": "EC", "curve": "P-384"}, []),
    "device-identity": ({"algorithm": "EC", "curve": "P-256"}, []),
    "ca": ({"algorithm": "RSA-3072"}, []),
}
EKU = {"server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
       "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
       "code_signing": ExtendedKeyUsageOID.CODE_SIGNING}


@pytest.fixture(scope="module")
def keygen(start_service: Any) -> Iterator[ServiceProcess]:
    proc: ServiceProcess = start_service("keygen")
    yield proc
    proc.terminate()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def klm(keygen: ServiceProcess, settings: KlmSettings) -> AsyncIterator[KlmClient]:
    async with KlmClient(settings, source="tests/csr", timeout=90) as client:
        yield client


def openssl_verify(pem: str, folder: Path) -> str:
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed")
    path = folder / "request.csr"
    path.write_text(pem)
    done = subprocess.run(["openssl", "req", "-verify", "-noout", "-in", str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def check_csr(pem: str, public_key_pem: str, profile_name: str, sans: list[str],
              folder: Path) -> x509.CertificateSigningRequest:
    request = x509.load_pem_x509_csr(pem.encode())
    assert request.is_signature_valid
    assert request.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode() == public_key_pem
    profile = get_profile(profile_name)
    ku = request.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    for bit in ("digital_signature", "key_cert_sign", "crl_sign", "key_encipherment"):
        assert getattr(ku.value, bit) == (bit in profile.key_usage), bit
    bc = request.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca == profile.ca
    if profile.extended_key_usage:
        eku = request.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {EKU[name] for name in profile.extended_key_usage}
    if sans:
        alt = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert len(list(alt)) == len(sans)
    assert request.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == \
        SUBJECT["CN"]
    assert "verify OK" in openssl_verify(pem, folder)
    return request


@pytest.mark.parametrize("profile", sorted(CASES))
async def test_profile_key_comes_with_a_csr_signed_in_the_hsm(
        klm: KlmClient, profile: str, tmp_path: Path) -> None:
    fields, sans = CASES[profile]
    fact = await klm.generate_key(owner=OWNER, name=f"cert-{profile}", profile=profile,
                                  subject=SUBJECT, sans=sans or None, **fields)
    data = fact.data
    assert data["profile"] == profile and data["usages"] == ["sign", "verify"]
    if profile == "ca":
        assert data["protection"] == "hsm-resident"
    check_csr(data["csr_pem"], data["public_key_pem"], profile, sans, tmp_path)


async def test_a_request_outside_the_profile_is_rejected(klm: KlmClient) -> None:
    with pytest.raises(RequestRejectedError) as rejected:
        await klm.generate_key(owner=OWNER, name="weak", profile="code-signing",
                               algorithm="RSA-2048", subject=SUBJECT)
    assert rejected.value.code == "key_size_invalid"
    with pytest.raises(RequestRejectedError) as no_san:
        await klm.generate_key(owner=OWNER, name="nosan", profile="tls-server",
                               algorithm="EC", subject=SUBJECT)
    assert no_san.value.code == "profile_mismatch"


async def test_rotating_a_profile_key_makes_a_new_csr(klm: KlmClient, tmp_path: Path) -> None:
    sans = ["DNS:api.example.test"]
    fact = await klm.generate_key(owner=OWNER, name="rotating-cert", profile="tls-server",
                                  algorithm="EC", curve="P-256", subject=SUBJECT, sans=sans)
    key_id = fact.data["key_id"]
    rotated = await klm.request(RotateKey(key_id=key_id), subject=key_id)
    assert rotated.type == "klm.key.rotated" and rotated.data["version"] == 2
    pem = rotated.data["csr_pem"]
    assert pem != fact.data["csr_pem"]
    request = check_csr(pem, rotated.data["public_key_pem"], "tls-server", sans, tmp_path)
    first = x509.load_pem_x509_csr(fact.data["csr_pem"].encode())
    assert request.subject == first.subject
    assert request.extensions.get_extension_for_class(x509.SubjectAlternativeName) == \
        first.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # the new version signs; a signature checks out with the rotated public key
    sig = await klm.sign(key_id, b"hello", owner=OWNER)
    assert sig.version == 2
