"""The Grafana dashboard queries only metrics (and labels) the metrics catalogue defines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from klm_common import metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "klm.json"
#: PromQL words that are not metric names
_KEYWORDS = {"sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile",
             "by", "without", "on", "ignoring", "le"}
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row"
            for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers, grouping
    clauses and range brackets, that are not functions or keywords."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\"[^\"]*\"", "", bare)
    return {word for word in _IDENT.findall(bare)
            if word not in _KEYWORDS and not re.fullmatch(r"\d+", word)}


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    for matcher in re.findall(r"\{([^}]*)\}", expr):
        labels |= {m.split("=")[0].strip().rstrip("!~") for m in matcher.split(",") if "=" in m}
    return labels


def catalogue_labels() -> set[str]:
    """The catalogue's attributes, the histogram bucket label and the target labels
    Prometheus adds to every series (``instance``, ``job``)."""
    return {a.replace(".", "_") for spec in metrics.CATALOGUE for a in spec.attributes} | {
        "le", "instance", "job"}


def test_every_panel_query_references_catalogue_metrics() -> None:
    known = metrics.prometheus_names()
    found = queries()
    assert len(found) >= 15
    for title, expr in found:
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        assert names <= known, f"{title!r}: unknown {names - known} in {expr!r}"


def test_every_grouping_label_is_a_catalogue_attribute() -> None:
    known = catalogue_labels()
    for title, expr in queries():
        assert grouping_labels(expr) <= known, (title, grouping_labels(expr) - known)


def test_every_catalogue_metric_is_on_the_dashboard() -> None:
    used = {name for _, expr in queries() for name in metric_names(expr)}
    bases = {metrics.prometheus_base_name(spec): spec.name for spec in metrics.CATALOGUE}
    missing = [name for base, name in bases.items()
               if not any(u == base or u.startswith(f"{base}_") for u in used)]
    assert not missing, f"catalogue metrics without a panel: {missing}"


def test_dashboard_is_what_the_generator_builds() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", DASHBOARD.with_name(
        "dashboard.py"))
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(DASHBOARD.read_text()) == module.build()


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, klm_service) '
            '(rate(klm_outbox_publish_duration_seconds_bucket{klm_service="x"}[5m])))')
    assert metric_names(expr) == {"klm_outbox_publish_duration_seconds_bucket"}
    assert grouping_labels(expr) == {"le", "klm_service"}
