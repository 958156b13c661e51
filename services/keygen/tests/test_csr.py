"""CSR building (pure): request info signed by a software key standing in for the HSM."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from klm_common.algorithms import KeySpec, key_spec
from klm_common.errors import AlgorithmNotApproved, KeySizeInvalid
from klm_common.events import GenerateKey
from klm_common.profiles import ProfileMismatch, ProfileUnknown, default_profiles, get_profile
from klm_keygen.domain import csr
from klm_keygen.domain.profiles import profile_key


def spki(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def build(profile: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
          spec: KeySpec, sans: list[str]) -> x509.CertificateSigningRequest:
    template = csr.csr_template(get_profile(profile), {"CN": "svc.example", "O": "Acme",
                                                      "C": "DE"}, sans)
    info = csr.request_info(template, spki(key))
    choice = csr.signature_choice(spec)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(info, ec.ECDSA(hashes.SHA384() if key.curve.key_size == 384
                                            else hashes.SHA256()))
    else:
        signature = key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    return x509.load_der_x509_csr(csr.assemble(info, choice, signature))


def test_tls_server_csr_carries_profile_extensions() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    request = build("tls-server", key, key_spec("EC", 256, "P-256"),
                    ["DNS:svc.example", "10.0.0.1", "*.svc.example"])
    assert request.is_signature_valid
    ku = request.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = request.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["svc.example", "*.svc.example"]
    assert request.subject.rfc4514_string() in ("CN=svc.example,O=Acme,C=DE",
                                                "C=DE,O=Acme,CN=svc.example")


def test_ca_csr_is_a_ca_and_rotation_template_round_trips() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    request = build("ca", key, key_spec("RSA", 3072), [])
    bc = request.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert request.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    again = csr.template_from_csr(request.public_bytes(serialization.Encoding.DER))
    first = csr.csr_template(get_profile("ca"), {"CN": "svc.example", "O": "Acme", "C": "DE"},
                             [])
    assert (again.sans, again.ca) == (first.sans, True)
    assert set(again.key_usage) == set(first.key_usage)
    assert dict(again.subject) == dict(first.subject)


def request(**fields: object) -> GenerateKey:
    return GenerateKey.model_validate({"owner": "acme", "name": "k", "algorithm": "EC",
                                       "sans": ["svc.example"], **fields})


def test_profile_rules_refuse_before_the_hsm() -> None:
    assert set(default_profiles()) == {"tls-server", "tls-client", "code-signing",
                                       "device-identity", "ca"}
    spec, protection = profile_key(request(profile="tls-server", curve="P-256"))
    assert spec.label == "EC-P-256" and protection.value == "hsm-wrapped"
    _, ca_protection = profile_key(request(profile="ca", curve="P-384"))
    assert ca_protection.value == "hsm-resident"
    with pytest.raises(KeySizeInvalid):
        profile_key(request(profile="code-signing", curve="P-256"))
    with pytest.raises(AlgorithmNotApproved):
        profile_key(request(profile="device-identity", algorithm="RSA-2048"))
    with pytest.raises(ProfileMismatch):
        profile_key(request(profile="tls-server", sans=None, subject={"CN": "x"}))
    _, upgraded = profile_key(request(profile="ca", curve="P-384", protection="hsm-wrapped"))
    assert upgraded.value == "hsm-resident"
    with pytest.raises(ProfileUnknown):
        profile_key(request(profile="smime"))
