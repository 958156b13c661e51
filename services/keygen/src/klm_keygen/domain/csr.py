"""PKCS#10 certificate requests (RFC 2986) for certificate-profile keys. Pure: no I/O.

``cryptography`` cannot sign with a key that lives in an HSM, so the
CertificationRequestInfo is built here with ``asn1crypto`` (:func:`request_info`), its DER
is signed inside the HSM by keygen, and :func:`assemble` wraps info, algorithm and
signature into the final request. The extensionRequest attribute carries the profile's
keyUsage (critical), extendedKeyUsage, basicConstraints (critical) and the SANs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asn1crypto import csr, keys, pem, x509  # type: ignore[import-untyped]

from klm_common.algorithms import Algorithm, KeySpec
from klm_common.profiles import CertificateProfile, ProfileMismatch

#: subject attribute names accepted in a request → asn1crypto's names
SUBJECT_ATTRIBUTES = {
    "CN": "common_name", "O": "organization_name", "OU": "organizational_unit_name",
    "C": "country_name", "ST": "state_or_province_name", "L": "locality_name",
    "serialNumber": "serial_number", "emailAddress": "email_address",
}
_LONG_NAMES = {v: v for v in SUBJECT_ATTRIBUTES.values()}
_HOSTNAME = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SAN_KINDS = {"DNS": "dns_name", "IP": "ip_address", "URI": "uniform_resource_identifier",
              "EMAIL": "rfc822_name"}


@dataclass(frozen=True, slots=True)
class CsrTemplate:
    """Everything of a CSR except the key: what a rotation re-uses for the next version."""

    profile: str
    subject: tuple[tuple[str, str], ...]
    sans: tuple[tuple[str, str], ...]
    key_usage: tuple[str, ...]
    extended_key_usage: tuple[str, ...]
    ca: bool
    path_length: int | None


def csr_template(profile: CertificateProfile, subject: Mapping[str, str] | None,
                 sans: Sequence[str] | None) -> CsrTemplate:
    """Validate the request's subject and SANs against ``profile``; coded errors."""
    names = tuple(_subject_attribute(k, v) for k, v in (subject or {}).items())
    alt = tuple(_san(s) for s in sans or [])
    if profile.requires_san and not alt:
        raise ProfileMismatch(f"profile {profile.name} needs at least one SAN "
                              "(e.g. DNS:www.example.com)", profile=profile.name)
    if not names and not alt:
        raise ProfileMismatch("a CSR needs a subject or SANs", profile=profile.name)
    return CsrTemplate(profile.name, names, alt, tuple(profile.key_usage),
                       tuple(profile.extended_key_usage), profile.ca, profile.path_length)


def _subject_attribute(name: str, value: str) -> tuple[str, str]:
    key = SUBJECT_ATTRIBUTES.get(name) or _LONG_NAMES.get(name)
    if key is None:
        raise ProfileMismatch(f"subject attribute {name!r} is not supported; use "
                              f"{', '.join(SUBJECT_ATTRIBUTES)}")
    if not value or len(value) > 64 or (key == "country_name" and len(value) != 2):
        raise ProfileMismatch(f"subject {name}={value!r} has an invalid length")
    return key, value


def _san(entry: str) -> tuple[str, str]:
    """``DNS:host``, ``IP:addr``, ``URI:uri``, ``email:addr``; a bare value is an IP
    address if it parses as one, else a DNS name."""
    kind, sep, value = entry.partition(":")
    if not sep or kind.upper() not in _SAN_KINDS or (kind.upper() == "URI" and not value):
        kind, value = ("IP", entry) if _is_ip(entry) else ("DNS", entry)
    kind = _SAN_KINDS[kind.upper()]
    if kind == "dns_name" and not _HOSTNAME.match(value):
        raise ProfileMismatch(f"SAN {entry!r} is not a valid DNS name")
    if kind == "ip_address" and not _is_ip(value):
        raise ProfileMismatch(f"SAN {entry!r} is not a valid IP address")
    if kind == "rfc822_name" and "@" not in value:
        raise ProfileMismatch(f"SAN {entry!r} is not an e-mail address")
    return kind, value


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _extensions(template: CsrTemplate) -> list[dict[str, Any]]:
    exts: list[dict[str, Any]] = [
        {"extn_id": "key_usage", "critical": True,
         "extn_value": x509.KeyUsage(set(template.key_usage))},
        {"extn_id": "basic_constraints", "critical": True,
         "extn_value": x509.BasicConstraints(
             {"ca": template.ca, "path_len_constraint": template.path_length}
             if template.ca else {"ca": False})},
    ]
    if template.extended_key_usage:
        exts.append({"extn_id": "extended_key_usage", "critical": False,
                     "extn_value": x509.ExtKeyUsageSyntax(list(template.extended_key_usage))})
    if template.sans:
        exts.append({"extn_id": "subject_alt_name",
                     # RFC 5280 §4.2.1.6: critical when the subject is empty
                     "critical": not template.subject,
                     "extn_value": x509.GeneralNames(
                         [x509.GeneralName(name=k, value=v) for k, v in template.sans])})
    return exts


def request_info(template: CsrTemplate, spki_der: bytes) -> bytes:
    """DER of the CertificationRequestInfo: what the HSM signs."""
    info = csr.CertificationRequestInfo({
        "version": "v1",
        "subject": x509.Name.build(dict(template.subject)),
        "subject_pk_info": keys.PublicKeyInfo.load(spki_der),
        "attributes": [{"type": "extension_request",
                        "values": [x509.Extensions(_extensions(template))]}],
    })
    return bytes(info.dump())


@dataclass(frozen=True, slots=True)
class SignatureChoice:
    """How the HSM signs the request, and how the request names that algorithm."""

    asn1_name: str
    hash_name: str | None
    scheme: str | None


def signature_choice(spec: KeySpec) -> SignatureChoice:
    if spec.algorithm is Algorithm.EC:
        return (SignatureChoice("sha384_ecdsa", "SHA-384", None) if spec.size == 384
                else SignatureChoice("sha256_ecdsa", "SHA-256", None))
    if spec.algorithm is Algorithm.ED25519:
        return SignatureChoice("ed25519", None, None)
    if spec.algorithm is Algorithm.RSA:
        # PKCS#1 v1.5 with SHA-256: what every CA accepts in a CSR
        return SignatureChoice("sha256_rsa", "SHA-256", "pkcs1v15")
    raise ProfileMismatch(f"{spec.label} keys cannot sign a certificate request")


def assemble(info_der: bytes, choice: SignatureChoice, signature: bytes) -> bytes:
    """DER of the complete CertificationRequest."""
    request = csr.CertificationRequest({
        "certification_request_info": csr.CertificationRequestInfo.load(info_der),
        "signature_algorithm": {"algorithm": choice.asn1_name},
        "signature": signature,
    })
    return bytes(request.dump())


def to_pem(der: bytes) -> str:
    return str(pem.armor("CERTIFICATE REQUEST", der).decode())


def template_from_csr(der: bytes) -> CsrTemplate:
    """The template of an earlier CSR: a rotation asks for the same subject and extensions."""
    info = csr.CertificationRequest.load(der)["certification_request_info"]
    subject = tuple((str(attr["type"].native), str(attr["value"].native))
                    for rdn in info["subject"].chosen for attr in rdn)
    exts: dict[str, Any] = {}
    for attribute in info["attributes"]:
        if attribute["type"].native == "extension_request":
            for ext in attribute["values"][0]:
                exts[ext["extn_id"].native] = ext["extn_value"].parsed
    sans = tuple((name.name, str(name.native)) for name in exts.get("subject_alt_name") or [])
    constraints = exts.get("basic_constraints")
    ku = exts.get("key_usage")
    eku = exts.get("extended_key_usage")
    return CsrTemplate(
        profile="", subject=subject, sans=sans,
        key_usage=tuple(sorted(ku.native)) if ku is not None else (),
        extended_key_usage=tuple(eku.native) if eku is not None else (),
        ca=bool(constraints["ca"].native) if constraints is not None else False,
        path_length=constraints["path_len_constraint"].native if constraints else None)
