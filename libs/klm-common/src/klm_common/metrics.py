"""The KLM metrics catalogue: every instrument a KLM service exports, defined once.

Names follow the OpenTelemetry semantic-convention style (dotted, lower case, unit in
``unit`` and not in the name); the Prometheus exporter turns ``klm.request.duration`` with
unit ``s`` into ``klm_request_duration_seconds`` and a counter ``klm.requests`` into
``klm_requests_total`` — :func:`prometheus_names` gives the exposed names, which is what
the Grafana dashboard (``deploy/grafana/klm.json``) queries and a test checks.

How services report:

* counters and histograms: the ``record_*``/``count_*`` functions below (cheap; safe to call
  before :func:`klm_common.telemetry.setup_telemetry` — the API's proxy meter binds later);
* gauges: :func:`set_gauge` stores the latest reading(s), :func:`observe` registers a
  callback, and :func:`poll` refreshes readings from an async source (a database count) on
  an interval. Exporters read gauges at collection time only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger(__name__)

METER_NAME = "klm"
Attributes = Mapping[str, str | int | bool]
Reading = tuple[float, Attributes]


class Kind(StrEnum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


#: latency buckets in seconds: 1 ms … 60 s (the SDK default is tuned for milliseconds)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: HSM calls are batches of sub-millisecond operations
HSM_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
               0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: Kind
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    #: None: created here (klm-common); else the service that creates and reports it
    owner: str | None = None


# ---- the catalogue ---------------------------------------------------------------------------
REQUESTS = MetricSpec(
    "klm.requests", Kind.COUNTER, "{request}",
    "Requests answered (durably: the answer is committed), by request type and outcome "
    "(ok, rejected, dead_letter)", ("klm.request.type", "klm.outcome", "klm.error.code"))
REQUEST_DURATION = MetricSpec(
    "klm.request.duration", Kind.HISTOGRAM, "s",
    "End-to-end request latency: from the request record's Kafka timestamp to its answer "
    "being committed", ("klm.request.type", "klm.outcome"), LATENCY_BUCKETS)
# the three below are reported by the rotation service, which owns the inventory (created
# here, fed by klm_rotation.metrics from one read of its inventory per gauge refresh)
KEYS = MetricSpec(
    "klm.keys", Kind.GAUGE, "{key}",
    "Keys in the inventory (KLM's and observed ones) by state, algorithm with its size or "
    "curve (e.g. AES-256, EC-P-256) and protection (hsm-wrapped, hsm-resident, observed)",
    ("klm.key.state", "klm.key.algorithm", "klm.key.protection"))
OLDEST_ACTIVE_KEY_AGE = MetricSpec(
    "klm.key.oldest_active.age", Kind.GAUGE, "s",
    "Age of the oldest primary version of an active key (since it became primary); no "
    "reading when no key is active")
ROTATIONS_DUE = MetricSpec(
    "klm.rotation.due", Kind.GAUGE, "{key}",
    "Keys whose rotation (automatic or notify) is due within the notice window: "
    "KLM_ROTATION_NOTICE_DAYS policy days from now (default 1), including those already "
    "due and not yet done")
# the three below are created and reported by the rotation service (klm_rotation/metrics.py);
# the catalogue names them so that dashboards and tests know them
ROTATIONS_OVERDUE = MetricSpec(
    "klm.rotation.overdue", Kind.GAUGE, "{key}", "Keys whose automatic rotation is overdue",
    owner="rotation")
POLICY_VIOLATIONS = MetricSpec(
    "klm.policy.violations", Kind.GAUGE, "{finding}",
    "Open policy findings in the inventory, by code and severity", ("code", "severity"),
    owner="rotation")
POLICY_VIOLATIONS_RAISED = MetricSpec(
    "klm.policy.violations.raised", Kind.COUNTER, "{finding}", "Policy findings raised",
    ("code", "severity"), owner="rotation")
HSM_OPERATION_DURATION = MetricSpec(
    "klm.hsm.operation.duration", Kind.HISTOGRAM, "s",
    "Time of one call on the HSM thread (a call may be a batch of operations)",
    ("klm.hsm.operation",), HSM_BUCKETS)
HSM_OPERATION_ERRORS = MetricSpec(
    "klm.hsm.operation.errors", Kind.COUNTER, "{error}", "HSM calls that raised",
    ("klm.hsm.operation", "error.type"))
DLQ_RECORDS = MetricSpec(
    "klm.dlq.records", Kind.COUNTER, "{record}", "Records sent to the dead-letter topic",
    ("klm.consumer",))
CONSUMER_LAG = MetricSpec(
    "klm.consumer.lag", Kind.GAUGE, "{record}",
    "Records behind the partition's high watermark after the last handled batch",
    ("messaging.consumer.group.name", "messaging.destination.name",
     "messaging.destination.partition.id"))
OUTBOX_BACKLOG = MetricSpec(
    "klm.outbox.backlog", Kind.GAUGE, "{event}",
    "Committed outbox rows not yet published to Kafka", ("klm.service",))
OUTBOX_PUBLISHED = MetricSpec(
    "klm.outbox.published", Kind.COUNTER, "{event}", "Outbox rows published to Kafka",
    ("klm.service",))
OUTBOX_PUBLISH_DURATION = MetricSpec(
    "klm.outbox.publish.duration", Kind.HISTOGRAM, "s",
    "Time to publish one outbox batch (send, acks=all, delete)", ("klm.service",),
    LATENCY_BUCKETS)
AUDIT_CHAIN_HEAD = MetricSpec(
    "klm.audit.chain.head", Kind.GAUGE, "{event}", "Sequence number of the audit chain head")
AUDIT_VERIFICATION_RESULT = MetricSpec(
    "klm.audit.verification.result", Kind.GAUGE, "1",
    "Last audit chain verification: 1 intact, 0 broken")

CATALOGUE: tuple[MetricSpec, ...] = (
    REQUESTS, REQUEST_DURATION, KEYS, OLDEST_ACTIVE_KEY_AGE, ROTATIONS_DUE, ROTATIONS_OVERDUE,
    POLICY_VIOLATIONS, POLICY_VIOLATIONS_RAISED, HSM_OPERATION_DURATION, HSM_OPERATION_ERRORS,
    DLQ_RECORDS, CONSUMER_LAG, OUTBOX_BACKLOG, OUTBOX_PUBLISHED, OUTBOX_PUBLISH_DURATION,
    AUDIT_CHAIN_HEAD, AUDIT_VERIFICATION_RESULT)
BY_NAME = {spec.name: spec for spec in CATALOGUE}

_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": ""}


def prometheus_base_name(spec: MetricSpec) -> str:
    """The family name the Prometheus exporter gives ``spec`` (without _bucket/_count/...)."""
    base = spec.name.replace(".", "_")
    suffix = _UNIT_SUFFIX.get(spec.unit, "")
    if suffix and not base.endswith(f"_{suffix}"):
        base = f"{base}_{suffix}"
    return f"{base}_total" if spec.kind is Kind.COUNTER else base


def prometheus_names() -> set[str]:
    """Every series name the catalogue can expose (histograms: _bucket, _count, _sum)."""
    names: set[str] = set()
    for spec in CATALOGUE:
        base = prometheus_base_name(spec)
        if spec.kind is Kind.HISTOGRAM:
            names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
        else:
            names.add(base)
    return names


# ---- gauges: latest readings, read by the exporters' callbacks -------------------------------
class _Gauges:
    """Readings per gauge (thread-safe: exporters collect on their own threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readings: dict[str, dict[frozenset[tuple[str, Any]], float]] = {}
        self._callbacks: dict[str, list[Callable[[], Iterable[Reading]]]] = {}

    def set(self, name: str, value: float, attributes: Attributes | None) -> None:
        with self._lock:
            self._readings.setdefault(name, {})[frozenset((attributes or {}).items())] = value

    def replace(self, name: str, readings: Iterable[Reading]) -> None:
        fresh = {frozenset(attrs.items()): value for value, attrs in readings}
        with self._lock:
            self._readings[name] = fresh

    def add_callback(self, name: str, callback: Callable[[], Iterable[Reading]]) -> None:
        with self._lock:
            self._callbacks.setdefault(name, []).append(callback)

    def observations(self, name: str) -> list[Observation]:
        with self._lock:
            stored = list(self._readings.get(name, {}).items())
            callbacks = list(self._callbacks.get(name, ()))
        out = [Observation(value, dict(attrs)) for attrs, value in stored]
        for callback in callbacks:
            try:
                out.extend(Observation(value, dict(attrs)) for value, attrs in callback())
            except Exception:  # a failing callback must not break the whole scrape
                log.exception("gauge callback for %s failed", name)
        return out


_gauges = _Gauges()


class _Instruments:
    """Created on first use, against the global meter provider."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[str, Any] = {}

    def get(self, spec: MetricSpec) -> Any:
        made = self._made.get(spec.name)
        if made is not None:
            return made
        if spec.owner is not None:
            raise ValueError(f"{spec.name} is created and reported by {spec.owner}")
        with self._lock:
            if spec.name not in self._made:
                self._made[spec.name] = _create(metrics.get_meter(METER_NAME), spec)
            return self._made[spec.name]

    def create_all(self) -> None:
        for spec in CATALOGUE:
            if spec.owner is None:
                self.get(spec)


def _create(meter: metrics.Meter, spec: MetricSpec) -> Any:
    if spec.kind is Kind.COUNTER:
        return meter.create_counter(spec.name, unit=spec.unit, description=spec.description)
    if spec.kind is Kind.HISTOGRAM:
        return meter.create_histogram(
            spec.name, unit=spec.unit, description=spec.description,
            explicit_bucket_boundaries_advisory=list(spec.buckets or LATENCY_BUCKETS))

    def callback(_: CallbackOptions) -> Iterable[Observation]:
        return _gauges.observations(spec.name)

    return meter.create_observable_gauge(spec.name, [callback], unit=spec.unit,
                                         description=spec.description)


_instruments = _Instruments()


def create_all() -> None:
    """Register every catalogue instrument now (so gauges exist before their first value)."""
    _instruments.create_all()


def add(spec: MetricSpec, amount: float = 1, attributes: Attributes | None = None) -> None:
    """Add to a counter of the catalogue."""
    if amount:
        _instruments.get(spec).add(amount, dict(attributes or {}))


def record(spec: MetricSpec, value: float, attributes: Attributes | None = None) -> None:
    """Record one value on a histogram of the catalogue."""
    _instruments.get(spec).record(value, dict(attributes or {}))


def set_gauge(spec: MetricSpec, value: float, attributes: Attributes | None = None) -> None:
    """Set the latest reading of a gauge (for one attribute set)."""
    _instruments.get(spec)
    _gauges.set(spec.name, value, attributes)


def replace_gauge(spec: MetricSpec, readings: Iterable[Reading]) -> None:
    """Replace all readings of a gauge (attribute sets that vanished stop being reported)."""
    _instruments.get(spec)
    _gauges.replace(spec.name, readings)


def observe(spec: MetricSpec, callback: Callable[[], Iterable[Reading]]) -> None:
    """Report a gauge by calling ``callback`` at each collection (keep it cheap and sync)."""
    _instruments.get(spec)
    _gauges.add_callback(spec.name, callback)


def poll(spec: MetricSpec, fetch: Callable[[], Awaitable[Iterable[Reading]]],
         interval: float = 15.0) -> asyncio.Task[None]:
    """Refresh a gauge from an async source (e.g. a ``SELECT count(*) ... GROUP BY``) every
    ``interval`` seconds; cancel the returned task at shutdown."""

    async def loop() -> None:
        while True:
            try:
                replace_gauge(spec, await fetch())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("refreshing gauge %s failed", spec.name, exc_info=True)
            await asyncio.sleep(interval)

    _instruments.get(spec)
    return asyncio.create_task(loop(), name=f"gauge:{spec.name}")


@contextlib.contextmanager
def hsm_operation(operation: str) -> Iterator[None]:
    """Time one HSM call; count it as an error if it raises."""
    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        add(HSM_OPERATION_ERRORS, 1, {"klm.hsm.operation": operation,
                                      "error.type": type(exc).__name__})
        raise
    finally:
        record(HSM_OPERATION_DURATION, time.perf_counter() - start,
               {"klm.hsm.operation": operation})
