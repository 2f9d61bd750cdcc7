"""The metrics module: names and labels stay bounded, known series exist at zero, the bulk histogram agrees
with prometheus_client's own, and the worker's observations of a real batch use seconds and bounded labels."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
from faust.sensors.prometheus import FaustMetrics
from faust.types.tuples import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetstream.codecs import REASONS
from fleetstream.config import Settings
from fleetstream.domain.geofences import parse_geofence
from fleetstream.domain.geoindex import GeofenceIndex
from fleetstream.domain.models import FilterReason
from fleetstream.domain.transitions import GeofenceEventType
from fleetstream.observability.metrics import (
    DEADLETTER_REASONS,
    LAG_BUCKETS_S,
    PREFIX,
    SEVERITIES,
    BulkHistogram,
    Metrics,
)
from fleetstream.streaming.pipeline import InRecord, PositionPipeline
from tests.deploy_support import REPO_ROOT, exported_labels

# label names whose values come from closed sets (codes, enums, topic and rule names an operator configures)
BOUNDED_LABELS = {"topic", "reason", "type", "rule", "severity", "state", "partition", "role", "version",
                  "aggregate"}


def samples(registry: CollectorRegistry) -> Iterator[tuple[str, dict[str, str], float]]:
    """Every sample as the text format exposes it (what Prometheus scrapes)."""
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def values(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(labels.items())): value for n, labels, value in samples(registry) if n == name}


def test_every_metric_is_namespaced_documented_and_bounded():
    metrics = Metrics(CollectorRegistry())
    families = list(metrics.registry.collect())
    assert len(families) >= 20
    for family in families:
        assert family.name.startswith(PREFIX + "_"), family.name
        assert len(family.documentation) > 10, family.name
    for family, labels in exported_labels(metrics).items():
        assert labels - {"le"} <= BOUNDED_LABELS, (family, labels)


def test_known_label_values_exist_at_zero():
    metrics = Metrics(CollectorRegistry())
    metrics.prime_inputs(["fleet.positions", "fleet.telemetry"])
    metrics.prime_outputs(["fleet.positions.enriched"])
    r = metrics.registry
    assert {dict(k)["reason"] for k in values(r, "fleetstream_filtered_records_total")} == {
        f.value for f in FilterReason}
    assert {dict(k)["type"] for k in values(r, "fleetstream_geofence_transitions_total")} == {
        t.value for t in GeofenceEventType}
    assert {dict(k)["severity"] for k in values(r, "fleetstream_active_alerts")} == set(SEVERITIES)
    dead = values(r, "fleetstream_deadlettered_records_total")
    assert {(dict(k)["topic"], dict(k)["reason"]) for k in dead} == {
        (topic, reason) for topic in ("fleet.positions", "fleet.telemetry") for reason in DEADLETTER_REASONS}
    assert values(r, "fleetstream_output_records_total") == {(("topic", "fleet.positions.enriched"),): 0.0}
    assert values(r, "fleetstream_input_records_total")[(("topic", "fleet.telemetry"),)] == 0.0
    assert all(v == 0 for v in dead.values())
    assert values(r, "fleetstream_build_info") == {(("version", __import__("fleetstream").__version__),): 1.0}


def test_deadletter_reasons_are_the_documented_ones():
    """The reason label's values are the contract's reason codes (schemas/deadletter.json), all of them."""
    schema = json.loads((REPO_ROOT / "fleetstream" / "schemas" / "deadletter.json").read_text())
    documented = schema["properties"]["error"]["properties"]["reason"]["description"]
    assert set(REASONS) < set(DEADLETTER_REASONS)
    for reason in DEADLETTER_REASONS:
        assert reason in documented


def test_severities_match_the_rules_engine():
    rules = pytest.importorskip("fleetstream.domain.rules")
    assert set(SEVERITIES) == {s.value for s in rules.Severity}


def _bucket_counts(registry: CollectorRegistry, name: str) -> tuple[dict[str, float], float, float]:
    buckets, total, count = {}, 0.0, 0.0
    for sample_name, labels, value in samples(registry):
        if sample_name == name + "_bucket":
            buckets[labels["le"]] = value
        elif sample_name == name + "_sum":
            total = value
        elif sample_name == name + "_count":
            count = value
    return buckets, total, count


finite = st.floats(min_value=-10.0, max_value=10_000.0, allow_nan=False)
observations = st.lists(st.one_of(finite, st.sampled_from(LAG_BUCKETS_S)), max_size=60)


@settings(max_examples=80, deadline=None)
@given(batches=st.lists(observations, max_size=4))
def test_bulk_histogram_equals_prometheus_histogram(batches: list[list[float]]):
    """Fed whole batches with numpy, it exposes what prometheus_client's Histogram exposes when fed one value at
    a time (bounds are inclusive: a value equal to a bound counts in that bucket)."""
    bulk_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("x_seconds", "doc", LAG_BUCKETS_S, bulk_registry)
    reference = Histogram("x_seconds", "doc", buckets=LAG_BUCKETS_S, registry=reference_registry)
    for batch in batches:
        bulk.observe_many(np.asarray(batch, dtype=np.float64))
        for value in batch:
            reference.observe(value)
    got, got_sum, got_count = _bucket_counts(bulk_registry, "x_seconds")
    want, want_sum, want_count = _bucket_counts(reference_registry, "x_seconds")
    assert got == want
    assert got_count == want_count
    assert got_sum == pytest.approx(want_sum, rel=1e-9, abs=1e-9)


def test_consumer_lag_forgets_partitions_no_longer_held():
    metrics = Metrics(CollectorRegistry())
    metrics.set_consumer_lag({("fleet.positions", 0): 5, ("fleet.positions", 1): 7})
    metrics.set_consumer_lag({("fleet.positions", 1): 3})  # partition 0 moved to another worker
    assert values(metrics.registry, "fleetstream_consumer_lag_records") == {
        (("partition", "1"), ("topic", "fleet.positions")): 3.0}


def test_recovery_progress():
    metrics = Metrics(CollectorRegistry())
    metrics.observe_recovery(active_remaining=1200, standby_remaining=30)
    assert values(metrics.registry, "fleetstream_table_recovery_remaining_records") == {
        (("role", "active"),): 1200.0, (("role", "standby"),): 30.0}


@pytest.mark.parametrize("faust_prefix", ["faust", "fleetstream"])
def test_faust_sensor_fits_in_the_same_registry(faust_prefix: str):
    """Faust's own Prometheus sensor may share the registry: no name clashes, whatever its prefix."""
    registry = CollectorRegistry()
    Metrics(registry)
    FaustMetrics.create(registry, faust_prefix)  # raises ValueError on a duplicated time series
    names = [family.name for family in registry.collect()]
    assert len(names) == len(set(names))


def test_each_registry_is_independent():
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.input_records.labels("fleet.positions").inc(5)
    assert values(second.registry, "fleetstream_input_records_total") == {}


# --- the worker's observations of a real batch ----------------------------------------------------------------

class _Store:
    def get(self, partition: int, key: bytes) -> bytes | None:
        return None


def _fences(count: int) -> GeofenceIndex:
    out = []
    for i in range(count):
        lat, lon = 53.30 + 0.004 * (i % 25), -3.05 + 0.006 * (i // 25)
        out.append(parse_geofence({"type": "Feature", "id": f"zone-{i:04d}", "properties": {}, "geometry": {
            "type": "Polygon", "coordinates": [[[lon, lat], [lon + 0.004, lat], [lon + 0.004, lat + 0.003],
                                                [lon, lat + 0.003], [lon, lat]]]}}))
    return GeofenceIndex.build(out)


def _observe_batch(devices: int, registry: CollectorRegistry, sent_s_ago: float) -> set[str]:
    """Run ``devices`` devices' fixes (plus bad records) through the worker's own batch and observation code."""
    settings_ = Settings.load(env={})
    app = __import__("fleetstream.streaming.app", fromlist=["create_app"]).create_app(settings_, registry)
    worker = app.fleetstream_worker
    index = _fences(100)
    worker.pipeline = PositionPipeline(settings_, _Store(), changelog_topic="fleetstream-device-state-changelog",
                                       geofences=lambda: index)
    now_s = time.time()
    records, messages = [], []
    for i in range(devices):
        device = f"veh-{i:05d}"
        fixes = [{"device_id": device, "ts": int((now_s - 30 + k) * 1000), "lat": 53.30 + 0.0007 * (i % 140) + k * 1e-4,
                  "lon": -3.05 + 0.001 * (i // 140) + k * 1e-4} for k in range(3)]
        records.append(InRecord(settings_.positions_topic, i % 8, i, device.encode(), orjson.dumps(fixes)))
    records.append(InRecord(settings_.positions_topic, 0, devices, b"veh-x", b"{broken"))
    for record in records:
        messages.append(Message(record.topic, record.partition, record.offset, now_s - sent_s_ago, 0, [],
                                record.key, record.value, None))
    output = worker._process(records)
    offsets: dict[tuple[str, int], list[int]] = {}
    for n, out in enumerate(output.records):
        offsets.setdefault((out.topic, out.partition if out.partition is not None else 0), []).append(n)
    worker._observe(output, offsets, messages, time.perf_counter())
    assert output.transitions["enter"] > 0  # the fixes do cross geofences
    return {device for device in (f"veh-{i:05d}" for i in range(devices))} | {f.id for f in index.fences}


def _label_sets(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(name, tuple(sorted((k, v) for k, v in labels.items() if k != "le"))) for name, labels, _ in
            samples(registry) if not name.endswith("_created")}


def test_worker_observations_use_bounded_labels_and_seconds():
    small, large = CollectorRegistry(), CollectorRegistry()
    _observe_batch(20, small, sent_s_ago=2.0)
    ids = _observe_batch(400, large, sent_s_ago=2.0)
    # 20x the devices (and transitions into many geofences) add no series
    assert _label_sets(small) == _label_sets(large)
    for _, labels in _label_sets(large):
        assert not {value for _, value in labels} & ids
    # fixes are ~30 s old: event lag counts them between 10 and 60 s
    buckets, _, count = _bucket_counts(large, "fleetstream_event_lag_seconds")
    assert count == 1200 and buckets["10.0"] == 0 and buckets["60.0"] == 1200
    # messages were written to Kafka 2 s before the batch: processing latency counts them between 1 and 2.5 s
    buckets, _, count = _bucket_counts(large, "fleetstream_processing_latency_seconds")
    assert count == 401 and buckets["1.0"] == 0 and buckets["2.5"] == 401
    assert values(large, "fleetstream_input_records_total")[(("topic", "fleet.positions"),)] == 1201.0
    dead = {k: v for k, v in values(large, "fleetstream_deadlettered_records_total").items() if v}
    assert dead == {(("reason", "malformed_json"), ("topic", "fleet.positions")): 1.0}
