"""Rotation's OpenTelemetry instruments: open findings by code and severity (a gauge read
from the findings table), findings raised/cleared, commands dispatched, refusals — and the
inventory gauges of the klm-common catalogue it feeds (``klm.keys``,
``klm.key.oldest_active.age``, ``klm.rotation.due``): rotation owns the inventory."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from klm_common import metrics as catalogue
from klm_rotation.domain.compliance import Changes
from klm_rotation.domain.inventory import InventoryFigures


def inventory_readings(figures: InventoryFigures, now: datetime
                       ) -> dict[catalogue.MetricSpec, list[catalogue.Reading]]:
    """The catalogue gauges' readings for one read of the inventory."""
    keys: list[catalogue.Reading] = [
        (float(n), {"klm.key.state": state, "klm.key.algorithm": algorithm,
                    "klm.key.protection": protection})
        for (state, algorithm, protection), n in sorted(figures.keys.items())]
    since = figures.oldest_active_since
    age: list[catalogue.Reading] = []  # no active key: no reading (not an age of 0)
    if since is not None:
        age.append((max(0.0, (now - since).total_seconds()), {}))
    return {catalogue.KEYS: keys, catalogue.OLDEST_ACTIVE_KEY_AGE: age,
            catalogue.ROTATIONS_DUE: [(float(figures.rotations_due), {})]}


class RotationMetrics:
    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("klm.rotation")
        self.open_findings: dict[tuple[str, str], int] = {}
        self._raised = meter.create_counter(
            "klm.policy.violations.raised", description="policy findings raised")
        self._cleared = meter.create_counter(
            "klm.policy.violations.cleared", description="policy findings cleared")
        self._dispatched = meter.create_counter(
            "klm.rotation.commands", description="rotate/deactivate/destroy commands sent")
        self._refused = meter.create_counter(
            "klm.rotation.commands.refused", description="commands keygen rejected")
        meter.create_observable_gauge(
            "klm.policy.violations", callbacks=[self._observe_open],
            description="open policy findings in the inventory")
        meter.create_observable_gauge(
            "klm.rotation.overdue", callbacks=[self._observe_overdue],
            description="keys whose automatic rotation is overdue")

    def findings(self, changes: Changes) -> None:
        for _, finding in changes.raised:
            self._raised.add(1, {"code": finding.code, "severity": finding.severity})
        for _, code in changes.cleared:
            self._cleared.add(1, {"code": code})

    def dispatched(self, kind: str, reason: str) -> None:
        self._dispatched.add(1, {"kind": kind, "reason": reason})

    def rejected(self, kind: str, code: str) -> None:
        self._refused.add(1, {"kind": kind, "code": code})

    def inventory(self, figures: InventoryFigures, now: datetime) -> None:
        """Replace the inventory gauges' readings (a vanished state/algorithm/protection
        combination stops being reported)."""
        for spec, readings in inventory_readings(figures, now).items():
            catalogue.replace_gauge(spec, readings)

    def _observe_open(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"code": code, "severity": severity})
                for (code, severity), n in self.open_findings.items()]

    def _observe_overdue(self, _: CallbackOptions) -> Iterable[Observation]:
        total = sum(n for (code, _), n in self.open_findings.items()
                    if code == "rotation_overdue")
        return [Observation(total)]
