"""Reports over the key inventory (pure): compliance findings and a CycloneDX 1.6 CBOM."""

from __future__ import annotations

import csv
import io
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from klm_audit.domain.inventory import KeyView
from klm_common.algorithms import KeyClass, key_spec
from klm_common.errors import KlmError

#: default cryptoperiod (originator-usage period) before a key must be rotated, in days;
#: SP 800-57 Pt 1 Table 1 suggests ≤ 1–2 years for most symmetric and signing keys
DEFAULT_CRYPTOPERIOD_DAYS = 365
_LIVE = {"pre-active", "active", "suspended"}


def issues_of(view: KeyView, now: datetime, cryptoperiod_days: int) -> list[dict[str, str]]:
    """Why a key is not compliant (empty when it is)."""
    issues: list[dict[str, str]] = []
    try:
        key_spec(view.algorithm or "", view.size, view.curve, view.usages or None)
    except KlmError as exc:
        issues.append({"code": exc.code, "severity": "high", "detail": exc.message})
    since = view.last_rotated_at or view.created_at
    if view.state in _LIVE and since and now - since > timedelta(days=cryptoperiod_days):
        issues.append({"code": "cryptoperiod_exceeded", "severity": "medium",
                       "detail": f"not rotated for more than {cryptoperiod_days} days"})
    if view.state == "compromised":
        issues.append({"code": "compromised_not_destroyed", "severity": "critical",
                       "detail": "a compromised key still exists"})
    if view.destroy_after and view.destroy_after < now and not view.state.startswith("destroyed"):
        issues.append({"code": "destruction_overdue", "severity": "high",
                       "detail": f"scheduled for destruction after {view.destroy_after}"})
    issues += [{"code": f.code, "severity": f.severity, "detail": f.rule} for f in view.findings]
    return issues


def compliance(views: Sequence[KeyView], now: datetime,
               cryptoperiod_days: int = DEFAULT_CRYPTOPERIOD_DAYS) -> dict[str, Any]:
    keys: list[dict[str, Any]] = []
    for v in views:
        issues = issues_of(v, now, cryptoperiod_days)
        keys.append({
            "key_id": v.key_id, "owner": v.owner, "name": v.name, "algorithm": v.algorithm,
            "size": v.size, "curve": v.curve, "state": v.state,
            "created_at": v.created_at, "last_rotated_at": v.last_rotated_at,
            "age_days": round((now - v.created_at).total_seconds() / 86400, 2)
            if v.created_at else None,
            "compliant": not issues, "issues": issues})
    return {
        "generated_at": now, "cryptoperiod_days": cryptoperiod_days,
        "summary": {
            "keys": len(keys), "non_compliant": sum(not k["compliant"] for k in keys),
            "by_state": dict(Counter(v.state for v in views)),
            "by_algorithm": dict(Counter(str(v.algorithm) for v in views)),
            "by_issue": dict(Counter(i["code"] for k in keys for i in k["issues"]))},
        "keys": keys}


CSV_COLUMNS = ("key_id", "owner", "name", "algorithm", "size", "curve", "state", "created_at",
               "last_rotated_at", "age_days", "compliant", "issues")


def compliance_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for k in report["keys"]:
        row = {**k, "issues": ";".join(i["code"] for i in k["issues"])}
        writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def _csv_cell(value: Any) -> str:
    """Text of a cell; a leading = + - @ is quoted so spreadsheets do not run it."""
    text = "" if value is None else value.isoformat() if isinstance(value, datetime) \
        else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ------------------------------------------------------------------ CycloneDX 1.6 CBOM
_CBOM_STATE = {"pre-active": "pre-activation", "active": "active", "suspended": "suspended",
               "deactivated": "deactivated", "compromised": "compromised",
               "destroyed": "destroyed", "destroyed-compromised": "destroyed"}
_PRIMITIVE = {"AES": "block-cipher", "HMAC-SHA256": "mac", "HMAC-SHA384": "mac",
              "HMAC-SHA512": "mac", "EC": "signature", "Ed25519": "signature",
              "RSA": "pke"}
_FUNCTIONS = {"encrypt": "encrypt", "decrypt": "decrypt", "wrap": "encrypt",
              "unwrap": "decrypt", "sign": "sign", "verify": "verify", "mac": "tag",
              "derive": "keyderive"}
_CLASSICAL_BITS = {("RSA", 2048): 112, ("RSA", 3072): 128, ("RSA", 4096): 152,
                   ("EC", 256): 128, ("EC", 384): 192, ("Ed25519", 256): 128}


def _algorithm_ref(v: KeyView) -> str:
    detail = v.curve or v.size
    name = f"{v.algorithm}-{detail}" if detail else str(v.algorithm)
    return f"crypto/algorithm/{name}"


def _algorithm_component(v: KeyView, usages: set[str]) -> dict[str, Any]:
    alg = str(v.algorithm)
    props: dict[str, Any] = {
        "primitive": _PRIMITIVE.get(alg, "unknown"),
        "executionEnvironment": "hardware",
        "implementationPlatform": "generic",
        "cryptoFunctions": sorted({_FUNCTIONS[u] for u in usages if u in _FUNCTIONS}
                                  | {"keygen"}),
        "classicalSecurityLevel": _CLASSICAL_BITS.get((alg, v.size or 0), v.size or 0)
        if alg in ("RSA", "EC", "Ed25519") else min(v.size or 0, 256),
        "nistQuantumSecurityLevel": 1 if alg == "AES" and (v.size or 0) >= 128 else 0,
    }
    if v.curve:
        props["curve"] = v.curve
    elif v.size:
        props["parameterSetIdentifier"] = str(v.size)
    return {"type": "cryptographic-asset", "bom-ref": _algorithm_ref(v),
            "name": f"{alg}-{v.curve or v.size}" if (v.curve or v.size) else alg,
            "cryptoProperties": {"assetType": "algorithm", "algorithmProperties": props}}


def _key_component(v: KeyView) -> dict[str, Any]:
    secret = True
    try:
        secret = key_spec(v.algorithm or "", v.size, v.curve).key_class is KeyClass.SECRET
    except KlmError:
        secret = v.algorithm not in ("RSA", "EC", "Ed25519")
    material: dict[str, Any] = {
        "type": "secret-key" if secret else "private-key", "id": v.key_id,
        "state": _CBOM_STATE.get(v.state, "deactivated"),
        "algorithmRef": _algorithm_ref(v), "size": v.size,
        "securedBy": {"mechanism": "HSM" if v.protection == "hsm-resident"
                      else "HSM-wrapped (AES-KWP under an HSM-resident KEK)"},
    }
    for field, value in (("creationDate", v.created_at), ("activationDate", v.activation_date),
                         ("updateDate", v.updated_at)):
        if value is not None:
            material[field] = value.isoformat()
    properties = [{"name": "klm:owner", "value": v.owner},
                  {"name": "klm:state", "value": v.state},
                  {"name": "klm:usages", "value": ",".join(v.usages)},
                  {"name": "klm:primaryVersion", "value": str(v.primary_version)}]
    return {"type": "cryptographic-asset", "bom-ref": v.key_id, "name": v.name or v.key_id,
            "cryptoProperties": {"assetType": "related-crypto-material",
                                 "relatedCryptoMaterialProperties": material},
            "properties": properties}


def cbom(views: Sequence[KeyView], now: datetime, version: str) -> dict[str, Any]:
    """A CycloneDX 1.6 BOM: one algorithm component per algorithm, one per key."""
    algorithms: dict[str, dict[str, Any]] = {}
    usages: dict[str, set[str]] = {}
    for v in views:
        usages.setdefault(_algorithm_ref(v), set()).update(v.usages)
    for v in views:
        ref = _algorithm_ref(v)
        if ref not in algorithms:
            algorithms[ref] = _algorithm_component(v, usages[ref])
    keys = [_key_component(v) for v in views]
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}", "version": 1,
        "metadata": {"timestamp": now.isoformat(),
                     "tools": {"components": [{"type": "application", "name": "klm-audit",
                                               "version": version}]},
                     "component": {"type": "application", "name": "KLM key inventory",
                                   "bom-ref": "klm"}},
        "components": [*algorithms.values(), *keys],
        "dependencies": [{"ref": k["bom-ref"],
                          "dependsOn": [k["cryptoProperties"]["relatedCryptoMaterialProperties"]
                                        ["algorithmRef"]]} for k in keys],
    }
