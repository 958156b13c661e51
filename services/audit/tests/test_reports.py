"""Compliance and CBOM reports from inventory views."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

from klm_audit.domain import reports
from klm_audit.domain.inventory import Fact, KeyView, replay

from .factories import Events


def view(events: Events, **fields: object) -> KeyView:
    key = events.generated(**fields)
    result = replay([Fact(sequence=1, type=key.type, time=key.time, data=key.data)])
    assert result is not None
    return result


def test_compliance_names_each_issue(events: Events) -> None:
    fresh = view(events)
    old = view(events, name="=cmd|' /C calc'!A0")
    weak = view(events, algorithm="RSA", size=1024, usages=["sign", "verify"])
    compromised = view(events).model_copy(update={"state": "compromised"})
    now = events.clock + timedelta(days=400)
    fresh = fresh.model_copy(update={"created_at": now - timedelta(days=1)})
    report = reports.compliance([fresh, old, weak, compromised], now)
    issues = {k["key_id"]: {i["code"] for i in k["issues"]} for k in report["keys"]}
    assert issues[fresh.key_id] == set()
    assert issues[old.key_id] == {"cryptoperiod_exceeded"}
    assert "key_size_below_minimum" in issues[weak.key_id]
    assert "compromised_not_destroyed" in issues[compromised.key_id]
    assert report["summary"]["non_compliant"] == 3

    rows = list(csv.DictReader(io.StringIO(reports.compliance_csv(report))))
    assert [r["key_id"] for r in rows] == [fresh.key_id, old.key_id, weak.key_id,
                                           compromised.key_id]
    assert rows[1]["name"].startswith("'=")  # no formula injection into spreadsheets


def test_cbom_is_cyclonedx_1_6_with_keys_and_algorithms(events: Events) -> None:
    keys = [view(events), view(events, algorithm="EC", size=256, curve="P-256",
                               usages=["sign", "verify"])]
    bom = reports.cbom(keys, events.clock, "1.0.0")
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")
    assets = [c for c in bom["components"]
              if c["cryptoProperties"]["assetType"] == "related-crypto-material"]
    algorithms = {c["bom-ref"]: c for c in bom["components"]
                  if c["cryptoProperties"]["assetType"] == "algorithm"}
    assert {a["bom-ref"] for a in assets} == {k.key_id for k in keys}
    for asset in assets:
        material = asset["cryptoProperties"]["relatedCryptoMaterialProperties"]
        assert material["state"] == "active" and material["algorithmRef"] in algorithms
    ec = algorithms["crypto/algorithm/EC-P-256"]["cryptoProperties"]["algorithmProperties"]
    assert ec["primitive"] == "signature" and ec["curve"] == "P-256"
    assert {"sign", "verify"} <= set(ec["cryptoFunctions"])
