"""The metrics catalogue: names are well-formed and prometheus_names() matches what the
Prometheus exporter really exposes for each instrument."""

from __future__ import annotations

import re

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import generate_latest

from klm_common import metrics


def test_names_follow_semantic_convention_style() -> None:
    for spec in metrics.CATALOGUE:
        assert re.fullmatch(r"klm(\.[a-z][a-z0-9_]*)+", spec.name), spec.name
        assert spec.description and spec.unit
        for attr in spec.attributes:
            assert re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*", attr), attr
    assert len({s.name for s in metrics.CATALOGUE}) == len(metrics.CATALOGUE)


def test_prometheus_names_match_the_exporter() -> None:
    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("test")
    saved = metrics._gauges
    metrics._gauges = metrics._Gauges()  # the gauge callbacks read the module's registry
    try:
        for spec in metrics.CATALOGUE:  # owned ones too: the service makes the same kind
            instrument = metrics._create(meter, spec)
            if spec.kind is metrics.Kind.COUNTER:
                instrument.add(1)
            elif spec.kind is metrics.Kind.HISTOGRAM:
                instrument.record(0.01)
        metrics._gauges.set("klm.keys", 1, {"klm.key.state": "active"})
        for spec in metrics.CATALOGUE:
            if spec.kind is metrics.Kind.GAUGE:
                metrics._gauges.set(spec.name, 1, None)
        text = generate_latest().decode()
    finally:
        provider.shutdown()
        metrics._gauges = saved
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line.startswith("klm_")}
    assert exposed == metrics.prometheus_names()


def test_gauges_keep_the_latest_reading_per_attribute_set() -> None:
    gauges = metrics._Gauges()
    gauges.set("g", 1, {"a": "x"})
    gauges.set("g", 2, {"a": "x"})
    gauges.set("g", 5, {"a": "y"})
    assert sorted(o.value for o in gauges.observations("g")) == [2, 5]
    gauges.replace("g", [(7, {"a": "z"})])
    assert [(o.value, o.attributes) for o in gauges.observations("g")] == [(7, {"a": "z"})]
    gauges.add_callback("g", lambda: [(9, {})])
    assert sorted(o.value for o in gauges.observations("g")) == [7, 9]


def test_a_failing_callback_does_not_break_collection() -> None:
    gauges = metrics._Gauges()

    def broken() -> list[metrics.Reading]:
        raise RuntimeError("db down")

    gauges.add_callback("g", broken)
    gauges.set("g", 3, None)
    assert [o.value for o in gauges.observations("g")] == [3]


def test_hsm_operation_times_and_counts_errors() -> None:
    recorded: list[tuple[str, float, dict[str, str]]] = []

    class Fake:
        def add(self, amount: float, attrs: dict[str, str]) -> None:
            recorded.append(("add", amount, attrs))

        def record(self, value: float, attrs: dict[str, str]) -> None:
            recorded.append(("record", value, attrs))

    saved = dict(metrics._instruments._made)
    metrics._instruments._made.update({metrics.HSM_OPERATION_ERRORS.name: Fake(),
                                       metrics.HSM_OPERATION_DURATION.name: Fake()})
    try:
        try:
            with metrics.hsm_operation("generate"):
                raise ValueError("refused")
        except ValueError:
            pass
    finally:
        metrics._instruments._made = saved
    assert recorded[0] == ("add", 1, {"klm.hsm.operation": "generate",
                                      "error.type": "ValueError"})
    assert recorded[1][0] == "record" and recorded[1][2] == {"klm.hsm.operation": "generate"}


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def add(self, amount: float, attrs: dict[str, str]) -> None:
        self.calls.append(("add", amount, attrs))

    def record(self, value: float, attrs: dict[str, str]) -> None:
        self.calls.append(("record", value, attrs))


def _recording(*specs: metrics.MetricSpec) -> tuple[dict[str, object], dict[str, _Recorder]]:
    saved = dict(metrics._instruments._made)
    fakes = {spec.name: _Recorder() for spec in specs}
    metrics._instruments._made.update(fakes)
    return saved, fakes


def test_request_outcomes_are_counted_when_the_batch_handler_returns() -> None:
    from aiokafka import ConsumerRecord

    from klm_common import inbound_telemetry as it
    from klm_common.envelope import make_event

    requests = [make_event("klm.request.generate_key", {"owner": "a"}, source="t")
                for _ in range(3)]
    records = [ConsumerRecord("t.klm.requests", 0, i, 1_000, 0, ev.id.encode(), ev.to_bytes(),
                              None, 0, 0, [])
               for i, ev in enumerate(requests)]
    ok = make_event("klm.key.generated", {}, source="keygen", cause=requests[0])
    rejected = make_event("klm.request.rejected", {"code": "algorithm_invalid"},
                          source="keygen", cause=requests[1])
    saved, fakes = _recording(metrics.REQUESTS, metrics.REQUEST_DURATION)
    try:
        batch = it._open(records)
        token = it._current.set(batch)
        it.note_parsed(zip(requests, records, strict=True))
        it.note_answers([ok, rejected])
        it._current.reset(token)
        it._close(batch, None)
    finally:
        metrics._instruments._made = saved
    counted = [c[2] for c in fakes[metrics.REQUESTS.name].calls]
    assert counted == [
        {"klm.request.type": "klm.request.generate_key", "klm.outcome": "ok",
         "klm.error.code": ""},
        {"klm.request.type": "klm.request.generate_key", "klm.outcome": "rejected",
         "klm.error.code": "algorithm_invalid"}]  # the third got no answer: not counted
    assert len(fakes[metrics.REQUEST_DURATION.name].calls) == 2
