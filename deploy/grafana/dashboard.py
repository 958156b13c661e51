"""Builds deploy/grafana/klm.json, the KLM ops dashboard, over the metrics catalogue
(klm_common.metrics). Edit the panels here and run:

    .venv/bin/python deploy/grafana/dashboard.py

A unit test (libs/klm-common/tests/test_dashboard.py) checks that every query names metrics
and labels that the catalogue defines, and that every catalogue metric is on a panel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("klm.json")
DS = {"type": "prometheus", "uid": "klm-prometheus"}
RATE = "$__rate_interval"
#: one reading per series of the inventory gauges, however many rotation instances report it
INVENTORY = "max without (instance) "

#: (row title, [(panel title, kind, unit, [(legend, expr)], description)])
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]], str]]]] = [
    ("Requests", [
        ("Requests answered /s by type and outcome", "timeseries", "reqps", [
            ("{{klm_request_type}} {{klm_outcome}}",
             f"sum by (klm_request_type, klm_outcome) (rate(klm_requests_total[{RATE}]))")],
         "Answers committed (ok, rejected) and records dead-lettered, per request type."),
        ("Request latency (request timestamp → answer committed)", "timeseries", "s", [
            ("p50", "histogram_quantile(0.5, sum by (le) "
                    f"(rate(klm_request_duration_seconds_bucket[{RATE}])))"),
            ("p99", "histogram_quantile(0.99, sum by (le) "
                    f"(rate(klm_request_duration_seconds_bucket[{RATE}])))")],
         "End-to-end: from the request record's Kafka timestamp to its answer being durable."),
        ("Rejections /s by code", "timeseries", "reqps", [
            ("{{klm_error_code}}", 'sum by (klm_error_code) '
                                   f'(rate(klm_requests_total{{klm_outcome="rejected"}}[{RATE}]))')],
         "Requests KLM refused, by the stable error code they carried."),
        ("Dead-lettered records /s", "timeseries", "rps", [
            ("{{klm_consumer}}", f"sum by (klm_consumer) (rate(klm_dlq_records_total[{RATE}]))")],
         "Records that could not be parsed or validated, sent to klm.dlq."),
    ]),
    # inventory gauges: every rotation instance reports the whole inventory, so instances
    # are collapsed with max before summing (INVENTORY)
    ("Keys", [
        ("Keys by state", "timeseries", "short", [
            ("{{klm_key_state}}", f"sum by (klm_key_state) ({INVENTORY}(klm_keys))")], ""),
        ("Keys by algorithm and protection", "table", "short", [
            ("{{klm_key_algorithm}} {{klm_key_protection}}",
             f"sum by (klm_key_algorithm, klm_key_protection) ({INVENTORY}(klm_keys))")], ""),
        ("Oldest active key", "stat", "s", [
            ("age", "max(klm_key_oldest_active_age_seconds)")], ""),
        ("Rotations due / overdue", "stat", "short", [
            ("due", f"sum({INVENTORY}(klm_rotation_due))"),
            ("overdue", f"sum({INVENTORY}(klm_rotation_overdue))")],
         "Due: cryptoperiod ends within the notice window. Overdue: past it, not rotated."),
        ("Open policy findings by severity", "timeseries", "short", [
            ("{{severity}}", f"sum by (severity) ({INVENTORY}(klm_policy_violations))")],
         "Findings of the crypto policy still open in the inventory (rotation)."),
        ("Policy findings raised (1h) by code", "timeseries", "short", [
            ("{{code}} {{severity}}",
             "sum by (code, severity) (increase(klm_policy_violations_raised_total[1h]))")], ""),
    ]),
    ("HSM", [
        ("HSM call latency p99 by operation", "timeseries", "s", [
            ("{{klm_hsm_operation}}", "histogram_quantile(0.99, sum by (le, klm_hsm_operation) "
                                      f"(rate(klm_hsm_operation_duration_seconds_bucket[{RATE}])))")],
         "One call on the HSM thread; generate is a batch of keys."),
        ("HSM calls /s by operation", "timeseries", "ops", [
            ("{{klm_hsm_operation}}", "sum by (klm_hsm_operation) "
                                      f"(rate(klm_hsm_operation_duration_seconds_count[{RATE}]))")],
         ""),
        ("HSM errors /s", "timeseries", "ops", [
            ("{{klm_hsm_operation}} {{error_type}}",
             "sum by (klm_hsm_operation, error_type) "
             f"(rate(klm_hsm_operation_errors_total[{RATE}]))")], ""),
    ]),
    ("Pipeline", [
        ("Consumer lag", "timeseries", "short", [
            ("{{messaging_consumer_group_name}} {{messaging_destination_name}}",
             "sum by (messaging_consumer_group_name, messaging_destination_name) "
             "(klm_consumer_lag)")], "Records behind the high watermark, per group and topic."),
        ("Outbox backlog", "timeseries", "short", [
            ("{{klm_service}}", "sum by (klm_service) (klm_outbox_backlog)")],
         "Committed events not yet on Kafka."),
        ("Outbox events published /s", "timeseries", "ops", [
            ("{{klm_service}}",
             f"sum by (klm_service) (rate(klm_outbox_published_total[{RATE}]))")], ""),
        ("Outbox batch publish p99", "timeseries", "s", [
            ("{{klm_service}}", "histogram_quantile(0.99, sum by (le, klm_service) "
                                f"(rate(klm_outbox_publish_duration_seconds_bucket[{RATE}])))")],
         ""),
    ]),
    ("Audit", [
        ("Audit chain head", "stat", "short", [("sequence", "max(klm_audit_chain_head)")], ""),
        ("Last chain verification", "stat", "short", [
            ("result", "min(klm_audit_verification_result)")], "1 = intact, 0 = BROKEN."),
    ]),
]


def panel(pid: int, x: int, y: int, title: str, kind: str, unit: str,
          targets: list[tuple[str, str]], description: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": pid, "type": kind, "title": title, "description": description,
        "datasource": DS, "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": expr,
                     "legendFormat": legend} for i, (legend, expr) in enumerate(targets)],
    }
    if title == "Last chain verification":
        out["fieldConfig"]["defaults"]["mappings"] = [{"type": "value", "options": {
            "1": {"text": "intact", "color": "green"}, "0": {"text": "BROKEN", "color": "red"}}}]
    return out


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, spec in enumerate(row_panels):
            x = (i % 3) * 8
            if i and i % 3 == 0:
                y += 8
            panels.append(panel(pid, x, y, *spec))
            pid += 1
        y += 8
    return {
        "uid": "klm-ops", "title": "KLM — key lifecycle operations", "tags": ["klm"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "utc",
        "templating": {"list": []}, "annotations": {"list": []}, "panels": panels,
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
