"""Prometheus metrics, all defined once against a registry passed in (a fresh one per test).

Label sets are bounded: topics, reasons (codes), event types, severities, rule ids; never a device or geofence
id. Label values that are known in advance (filter reasons, geofence event types, severities, and with
:meth:`Metrics.prime_inputs` / :meth:`Metrics.prime_outputs` the per-topic series) are created at zero, so every series
exists from the first scrape: ``increase()`` then counts the first events too, and dashboards show 0 rather
than "no data".

Per-fix observations are bulk-added per batch with numpy (:class:`BulkHistogram`): calling
``Histogram.observe`` for every fix would cost ~1-2 µs each, a tenth of the whole per-fix budget.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from fleetstream import __version__
from fleetstream.codecs import REASONS
from fleetstream.domain.models import FilterReason
from fleetstream.domain.transitions import GeofenceEventType

PREFIX = "fleetstream"

# milliseconds to hours: event-time lag and end-to-end latency of fixes
LAG_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# every dead-letter reason the worker writes: the codecs' reasons plus the pipelines' own
DEADLETTER_REASONS = (*REASONS, "internal_error", "unknown_reader")  # unknown_reader: RFID reads (rfid_pipeline)
# alert severities (the rules' Severity enum); kept here so this module does not depend on the rules engine
SEVERITIES = ("critical", "major", "minor", "warning", "info")
RECOVERY_ROLES = ("active", "standby")


class BulkHistogram(Collector):
    """A histogram fed whole arrays at once (``observe_many``), exposed in Prometheus' histogram format."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above the largest bound
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        slots = np.searchsorted(self.bounds, values, side="left")
        counts = np.bincount(slots, minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total_sum = self._sum
        buckets = [(_fmt(b), int(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", int(cumulative[-1])))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, total_sum)
        yield family

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)


def _fmt(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    """Every metric the worker exports. Build one per worker (or per test) with ``Metrics(registry)``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        self.input_messages = Counter(f"{p}_input_messages", "Kafka messages consumed", ["topic"], registry=r)
        self.input_records = Counter(
            f"{p}_input_records", "Input records (fixes, reads, readings) consumed; an array message counts each item",
            ["topic"], registry=r,
        )
        self.output_records = Counter(f"{p}_output_records", "Records produced, acknowledged", ["topic"], registry=r)
        self.deadlettered = Counter(
            f"{p}_deadlettered_records", "Input records sent to the dead-letter topic", ["topic", "reason"], registry=r
        )
        self.filtered = Counter(
            f"{p}_filtered_records", "Fixes published flagged 'filtered' without changing state", ["reason"],
            registry=r,
        )
        self.geofence_transitions = Counter(
            f"{p}_geofence_transitions", "Geofence events emitted", ["type"], registry=r
        )
        self.alerts = Counter(f"{p}_alerts", "Alerts raised and cleared", ["rule", "severity", "state"], registry=r)
        self.event_lag = BulkHistogram(
            f"{p}_event_lag_seconds", "Processing time minus fix time (event-time lag)", LAG_BUCKETS_S, r
        )
        self.processing_latency = BulkHistogram(
            f"{p}_processing_latency_seconds",
            "From the input record's Kafka timestamp to its output being acknowledged", LAG_BUCKETS_S, r,
        )
        self.batch_size = Histogram(
            f"{p}_batch_size_messages", "Kafka messages per processed batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            f"{p}_batch_duration_seconds", "Time to process and flush one batch",
            buckets=BATCH_SECONDS_BUCKETS, registry=r,
        )
        self.devices = Gauge(f"{p}_devices_tracked", "Devices with state on this worker", registry=r)
        self.geofences = Gauge(f"{p}_geofences_loaded", "Geofences in this worker's index", registry=r)
        self.geofences_rejected = Counter(
            f"{p}_geofences_rejected", "Geofence definitions refused (invalid)", registry=r
        )
        self.index_rebuild_seconds = Gauge(
            f"{p}_geofence_index_rebuild_seconds", "Duration of the last geofence index rebuild", registry=r
        )
        self.active_alerts = Gauge(f"{p}_active_alerts", "Alerts raised and not cleared", ["severity"], registry=r)
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag_records", "Records behind the partition end (highwater)", ["topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            f"{p}_assigned_partitions", "Input partitions assigned to this worker", ["topic"], registry=r
        )
        self.last_input_timestamp = Gauge(
            f"{p}_last_input_timestamp_seconds", "Wall time when the last input batch was processed", registry=r
        )
        self.assets = Gauge(f"{p}_assets_tracked", "RFID-tagged assets with state on this worker", registry=r)
        self.late_records = Counter(
            f"{p}_late_records", "Fixes that arrived after their aggregation window closed (left out of it)",
            ["aggregate"], registry=r,
        )
        self.table_recovery_remaining = Gauge(
            f"{p}_table_recovery_remaining_records",
            "Changelog records still to restore before this worker's tables are recovered", ["role"], registry=r,
        )
        self.build_info = Gauge(f"{p}_build_info", "Always 1; the version label says which build runs",
                                ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self._prime()

    def _prime(self) -> None:
        """Create the series whose label values are known in advance, at zero."""
        for reason in FilterReason:
            self.filtered.labels(reason.value)
        for kind in GeofenceEventType:
            self.geofence_transitions.labels(kind.value)
        for severity in SEVERITIES:
            self.active_alerts.labels(severity)
        for role in RECOVERY_ROLES:
            self.table_recovery_remaining.labels(role)

    def prime_inputs(self, topics: Iterable[str]) -> None:
        """Create the per-input-topic series at zero: messages, records and every dead-letter reason."""
        for topic in topics:
            self.input_messages.labels(topic)
            self.input_records.labels(topic)
            for reason in DEADLETTER_REASONS:
                self.deadlettered.labels(topic, reason)

    def prime_outputs(self, topics: Iterable[str]) -> None:
        """Create the per-output-topic series at zero."""
        for topic in topics:
            self.output_records.labels(topic)

    def set_consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace the lag series with ``{(topic, partition): records}``, so partitions this worker no
        longer holds stop reporting their last lag (a stale series would double-count after a rebalance)."""
        self.consumer_lag.clear()
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic, str(partition)).set(lag)

    def observe_recovery(self, active_remaining: int, standby_remaining: int) -> None:
        """Table recovery progress: changelog records left to restore (0 once recovered)."""
        self.table_recovery_remaining.labels("active").set(active_remaining)
        self.table_recovery_remaining.labels("standby").set(standby_remaining)
