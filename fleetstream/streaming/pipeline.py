"""The position hot path, one batch of Kafka records at a time. CPU only: no Faust, no awaits.

The Faust agent hands a batch of raw records here, flushes what comes back (outputs, dead letters and the
state changelog) in one go, waits for the acknowledgements, and only then applies the state and lets Faust
commit the input offsets. Every input fix ends in exactly one output: ``fleet.positions.enriched`` (possibly
flagged ``filtered``) or ``fleet.deadletter``.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple, Protocol

import numpy as np
import orjson

from fleetstream.codecs import (
    CodecLimits,
    DecodeError,
    deadletter_record,
    decode_positions,
    decode_telemetry,
    dumps,
    format_ts,
)
from fleetstream.config import Settings
from fleetstream.domain.alerts import Alert, AlertEngine, DeviceAlertState
from fleetstream.domain.filters import FilterConfig, Held, ReorderBuffer, batch_order, intrinsic_reason
from fleetstream.domain.geoindex import GeofenceIndex
from fleetstream.domain.models import DeviceState, FilterReason, Position, Telemetry
from fleetstream.domain.signals import DeviceSignals
from fleetstream.domain.tracking import Enrichment, TrackingConfig, filtered_enrichment, step_position
from fleetstream.domain.transitions import (
    GeofenceEvent,
    Membership,
    TransitionDefaults,
    memberships_from_json,
    step_settled,
)
from fleetstream.domain.trips import TrackEvent
from fleetstream.streaming.aggregates import Aggregation, BatchRows
from fleetstream.streaming.output import OutRecord

_third, _lat, _lon = itemgetter(2), attrgetter("lat"), attrgetter("lon")
_new = tuple.__new__  # a NamedTuple from all its fields, without its constructor's argument handling (2x cheaper)
SETTLED_DEVICES_LIMIT = 1_000_000  # devices remembered as settled inside geofences (then forgotten at once)


class InRecord(NamedTuple):
    """One consumed Kafka record, as the pipeline needs it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class StateReader(Protocol):
    def get(self, partition: int, key: bytes) -> bytes | None: ...




@dataclass(slots=True)
class BatchOutput:
    records: list[OutRecord] = field(default_factory=list)
    # (partition, key, value) of the changelog records, applied to the local store once acknowledged
    state_writes: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    messages: int = 0
    fixes: int = 0
    enriched: int = 0
    deadlettered: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    fix_ts_ms: list[int] = field(default_factory=list)  # accepted fixes' event times, for the lag histogram
    # input partition -> newest event time among its fixes and readings (the worker's alert timer runs on it)
    newest_ts: dict[int, int] = field(default_factory=dict)
    new_states: dict[str, tuple[int, DeviceState]] = field(default_factory=dict)  # device -> (partition, state)
    transitions: Counter[str] = field(default_factory=Counter)  # geofence events by type
    telemetry: int = 0  # telemetry readings in (accepted or dead-lettered)
    # latest telemetry + alert state per device (the device-signals table), like new_states / state_writes
    new_signals: dict[str, tuple[int, DeviceSignals]] = field(default_factory=dict)
    signal_writes: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    alerts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (rule, severity, state)
    deadlettered_by_topic: Counter[tuple[str, str]] = field(default_factory=Counter)  # (source topic, reason)
    trips: Counter[str] = field(default_factory=Counter)  # TripEvent / StopEvent closed
    # aggregation: this batch's rows per input partition, the two aggregate tables' changelog writes, what to
    # call once everything is acknowledged, late fixes/events and cell windows published
    agg_rows: dict[int, BatchRows] = field(default_factory=dict)
    agg_writes: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    cell_writes: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    on_acked: list[Callable[[], None]] = field(default_factory=list)
    late_aggregate: int = 0
    cells_published: int = 0

    def merge(self, other: BatchOutput) -> None:
        self.records.extend(other.records)
        self.state_writes.extend(other.state_writes)
        self.fixes += other.fixes
        self.enriched += other.enriched
        self.deadlettered.update(other.deadlettered)
        self.filtered.update(other.filtered)
        self.fix_ts_ms.extend(other.fix_ts_ms)
        for partition, ts in other.newest_ts.items():
            self.saw(partition, ts)
        self.new_states.update(other.new_states)
        self.transitions.update(other.transitions)
        self.telemetry += other.telemetry
        self.new_signals.update(other.new_signals)
        self.signal_writes.extend(other.signal_writes)
        self.alerts.update(other.alerts)
        self.deadlettered_by_topic.update(other.deadlettered_by_topic)
        self.trips.update(other.trips)
        self.agg_writes.extend(other.agg_writes)
        self.cell_writes.extend(other.cell_writes)
        self.on_acked.extend(other.on_acked)
        self.late_aggregate += other.late_aggregate
        self.cells_published += other.cells_published

    def saw(self, partition: int, ts_ms: int) -> None:
        """An input of ``partition`` with event time ``ts_ms`` (see ``newest_ts``)."""
        newest = self.newest_ts.get(partition)
        if newest is None or ts_ms > newest:
            self.newest_ts[partition] = ts_ms


@dataclass(slots=True)
class PipelineStats:
    """Counters the status line, /status and the metrics read. Reasons are bounded sets (codes, not text)."""

    messages_in: int = 0
    fixes_in: int = 0
    enriched: int = 0
    deadlettered: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    transitions: Counter[str] = field(default_factory=Counter)
    telemetry_in: int = 0
    alerts: Counter[str] = field(default_factory=Counter)  # by state: raised, cleared
    batches: int = 0
    devices: set[str] = field(default_factory=set)
    # wall clock (time.time) and process CPU (time.process_time) at the first batch and after the last flush:
    # what benchmarks/throughput.py measures a worker's rate and CPU per event from
    first_batch_wall_s: float | None = None
    first_batch_cpu_s: float | None = None
    last_flush_wall_s: float | None = None
    last_flush_cpu_s: float | None = None

    def add(self, out: BatchOutput) -> None:
        self.batches += 1
        self.messages_in += out.messages
        self.fixes_in += out.fixes
        self.enriched += out.enriched
        self.deadlettered.update(out.deadlettered)
        self.filtered.update(out.filtered)
        self.transitions.update(out.transitions)
        self.telemetry_in += out.telemetry
        for (_, _, state), count in out.alerts.items():
            self.alerts[state] += count

    def mark_batch_start(self) -> None:
        if self.first_batch_wall_s is None:
            self.first_batch_wall_s = time.time()
            self.first_batch_cpu_s = time.process_time()

    def mark_flushed(self) -> None:
        self.last_flush_wall_s = time.time()
        self.last_flush_cpu_s = time.process_time()

    def as_dict(self) -> dict[str, object]:
        return {
            "messages_in": self.messages_in, "fixes_in": self.fixes_in, "enriched": self.enriched,
            "deadlettered": sum(self.deadlettered.values()), "deadlettered_by_reason": dict(self.deadlettered),
            "filtered_by_reason": dict(self.filtered), "geofence_events": dict(self.transitions),
            "telemetry_in": self.telemetry_in, "alerts": dict(self.alerts),
            "batches": self.batches,
            "devices_seen": len(self.devices),
            "first_batch_wall_s": self.first_batch_wall_s, "first_batch_cpu_s": self.first_batch_cpu_s,
            "last_flush_wall_s": self.last_flush_wall_s, "last_flush_cpu_s": self.last_flush_cpu_s,
        }


class PositionPipeline:
    """Decode, validate, enrich and account for a batch of ``fleet.positions`` records."""

    def __init__(
        self,
        settings: Settings,
        state: StateReader,
        *,
        changelog_topic: str,
        copartitioned: bool = True,
        geofences: Callable[[], GeofenceIndex | None] = lambda: None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        stats: PipelineStats | None = None,
        signals: StateReader | None = None,
        signals_changelog_topic: str = "",
        alert_engine: Callable[[], AlertEngine | None] = lambda: None,
        aggregation: Aggregation | None = None,
        applied_states: Callable[[], Mapping[str, tuple[int, DeviceState]]] = dict,
    ) -> None:
        """``applied_states``: the owner's states that are in the store (their changelog acknowledged), as the
        objects it applied, by device: read before decoding the store (the worker's directory)."""
        self.settings = settings
        self.applied_states = applied_states
        self.aggregation = aggregation
        self.state = state
        self.signals = signals
        self.signals_changelog_topic = signals_changelog_topic
        self.alert_engine = alert_engine
        self.changelog_topic = changelog_topic
        self.copartitioned = copartitioned
        self.geofences = geofences
        self.clock_ms = clock_ms
        self.stats = stats or PipelineStats()
        # device -> the signals its store holds, as decoded objects (see signals_applied)
        self.applied_signals: dict[str, DeviceSignals] = {}
        self.filters = FilterConfig(
            reject_null_island=settings.filter_null_island, max_future_s=settings.filter_max_future_s,
            max_age_s=settings.filter_max_age_s, max_accuracy_m=settings.max_accuracy_m,
            max_speed_kmh=settings.max_speed_kmh, min_interval_s=settings.min_interval_s,
            min_distance_m=settings.min_distance_m, reorder_window_s=settings.reorder_window_s,
        )
        self.tracking = TrackingConfig(
            h3_resolution=settings.h3_resolution,
            extra_resolutions=tuple(r for r in settings.h3_extra_resolutions if r != settings.h3_resolution),
            stop_speed_kmh=settings.stop_speed_kmh, start_speed_kmh=max(settings.start_speed_kmh,
                                                                         settings.stop_speed_kmh),
            stop_after_s=settings.stop_after_s, start_distance_m=settings.start_distance_m,
            trips=settings.trips_enabled, filters=self.filters,
        )
        self.publish_filtered = settings.filtered_output == "publish"
        # device -> (memberships, answer) of devices settled inside geofences under ``_settled_index`` (see
        # _transitions); holds no index of its own, so a replaced index is not kept alive by devices gone quiet
        self._settled: dict[str, tuple[dict[str, Membership], tuple[str, ...]]] = {}
        self._settled_index: GeofenceIndex | None = None
        self.transition_defaults = TransitionDefaults(
            dwell_s=settings.geofence_dwell_s, enter_after_s=settings.geofence_enter_after_s,
            exit_after_s=settings.geofence_exit_after_s, exit_buffer_m=settings.geofence_exit_buffer_m,
            min_accuracy_m=settings.geofence_min_accuracy_m,
        )
        self.limits = CodecLimits(
            max_message_bytes=settings.max_message_bytes,
            max_batch_items=settings.max_batch_items,
            max_future_skew_ms=int(settings.max_future_skew_s * 1000),
        )

    def process(
        self, records: Sequence[InRecord], pending: Mapping[str, tuple[int, DeviceState]] | None = None,
        pending_signals: Mapping[str, tuple[int, DeviceSignals]] | None = None,
    ) -> BatchOutput:
        """``pending``/``pending_signals``: states of earlier batches whose changelog is not acknowledged yet (so
        not in the store); read before the store, never modified here. This batch's states come back in
        ``new_states``/``new_signals``. Records are positions or telemetry (one agent reads both topics, so one
        writer owns each device)."""
        with collector_paused():
            return self._process(records, pending, pending_signals)

    def _process(
        self, records: Sequence[InRecord], pending: Mapping[str, tuple[int, DeviceState]] | None,
        pending_signals: Mapping[str, tuple[int, DeviceSignals]] | None,
    ) -> BatchOutput:
        now_ms = self.clock_ms()
        out = BatchOutput(messages=len(records))
        telemetry_topic, partials_topic = self.settings.telemetry_topic, self.settings.cell_partials_topic
        positions = [r for r in records if r.topic != telemetry_topic and r.topic != partials_topic]
        engine = self.alert_engine()
        if engine is not None and not len(engine.ruleset):
            engine = None
        signals = _SignalsCursor(self, out, pending_signals or {}, engine)
        if len(positions) != len(records):
            self._telemetry([r for r in records if r.topic == telemetry_topic], out, engine, signals, now_ms)
            self._partials([r for r in records if r.topic == partials_topic], out, now_ms)
        if positions:
            self._positions(positions, out, pending or {}, engine, signals, now_ms)
        signals.flush()
        self._write_signals(out)
        if self.aggregation is not None and out.agg_rows:
            out.late_aggregate += self.aggregation.on_batch(out.agg_rows, out.records, out.agg_writes, out.on_acked)
        return out

    def _partials(self, records: Sequence[InRecord], out: BatchOutput, now_ms: int) -> None:
        """Stage 2 of the cell statistics (see :mod:`fleetstream.streaming.aggregates`)."""
        if not records or self.aggregation is None:
            return
        by_partition: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            try:
                value = orjson.loads(record.value) if record.value else None
                check_partial(value)
            except ValueError as exc:  # written by workers, so a bug or a foreign producer: keep it, say why
                error = DecodeError("internal_error", f"not an aggregation partial: {exc}"[:300])
                out.records.append(self._deadletter(out, record, 0, error, now_ms))
                continue
            by_partition.setdefault(record.partition, []).append(value)
        for partition, values in by_partition.items():
            out.cells_published += self.aggregation.on_partials(partition, values, out.records, out.cell_writes)

    def _positions(
        self, records: Sequence[InRecord], out: BatchOutput, pending: Mapping[str, tuple[int, DeviceState]],
        engine: AlertEngine | None, signals: _SignalsCursor, now_ms: int,
    ) -> None:
        deadletters_before = len(out.records)
        accepted: list[tuple[InRecord, int, Position]] = []
        for record in records:
            newest = None
            for index, item in enumerate(decode_positions(record.key, record.value, now_ms=now_ms, limits=self.limits)):
                if isinstance(item, DecodeError):
                    out.records.append(self._deadletter(out, record, index, item, now_ms))
                else:
                    accepted.append((record, index, item))
                    if newest is None or item.ts_ms > newest:
                        newest = item.ts_ms
            if newest is not None:
                out.saw(record.partition, newest)
        out.fixes = len(accepted) + len(out.records) - deadletters_before
        if not accepted:
            return
        order = batch_order([fix for _, _, fix in accepted])  # each device's fixes in time order (within the batch)
        if order is not None:
            accepted = [accepted[i] for i in order]

        index = self.geofences()
        if index is not None and len(index):
            fixes = list(map(_third, accepted))  # (C-level getters: a generator per array cost ~0.1 us per fix)
            lats = np.fromiter(map(_lat, fixes), dtype=np.float64, count=len(fixes))
            lons = np.fromiter(map(_lon, fixes), dtype=np.float64, count=len(fixes))
            inside: Sequence[tuple[str, ...]] = index.lookup(lats, lons)
        else:
            index = None
            inside = [()] * len(accepted)
        self._settle_under(index)

        states = out.new_states
        step_one = self._step_one
        window_ms = self.filters.reorder_window_ms
        looked_up = {(r.partition, r.offset, i): f for (r, i, _), f in zip(accepted, inside, strict=True)} \
            if window_ms else None
        for (record, item_index, fix), fences in zip(accepted, inside, strict=True):
            device_id = fix.device_id
            cached = states.get(device_id) or pending.get(device_id)
            previous = cached[1] if cached is not None else self._stored_state(record.partition, device_id)
            if not window_ms:
                new_state = step_one(out, record, item_index, fix, fences, previous, index, engine, signals, now_ms)
                if new_state is not None:
                    states[device_id] = (record.partition, new_state)
                continue
            self._reorder(out, record, item_index, fix, previous, index, engine, signals, now_ms, looked_up)
        out.fix_ts_ms = [fix.ts_ms for _, _, fix in accepted]
        self._write_states(out)

    def _stored_state(self, partition: int, device_id: str) -> DeviceState | None:
        """A device's state as the table's store holds it (states in flight are the caller's to check first):
        the object the owner applied when it has one (no decode, and the geofence memberships keep their
        identity for the settled-devices memo), else decoded from the store."""
        applied = self.applied_states().get(device_id)
        if applied is not None and applied[0] == partition:
            return applied[1]
        raw = self.state.get(partition, device_id.encode())
        return DeviceState.from_dict(orjson.loads(raw)) if raw else None

    def _write_signals(self, out: BatchOutput) -> None:
        """The batch's new signals as changelog records (applied to the store once acknowledged)."""
        for device_id, (partition, signal) in out.new_signals.items():
            key = device_id.encode()
            value = dumps(signal.to_json())
            out.signal_writes.append((partition, key, value))
            out.records.append(OutRecord(self.signals_changelog_topic, key, value, partition))

    MAX_APPLIED_SIGNALS = 200_000  # beyond this many devices the mirror starts over (reads fall back to the store)

    def signals_applied(self, new_signals: Mapping[str, tuple[int, DeviceSignals]]) -> None:
        """The owner applied these signals to the store (their changelog is acknowledged): keep the objects, so
        the device's next batch neither decodes its alert state nor rebuilds the engine's watch intervals for it
        (per device and batch, that was most of what the rules cost beyond the engine itself)."""
        applied = self.applied_signals
        if len(applied) + len(new_signals) > self.MAX_APPLIED_SIGNALS:
            applied.clear()
        for device_id, (_, signals) in new_signals.items():
            applied[device_id] = signals

    def forget_applied_signals(self) -> None:
        """Partitions moved (the store is being recovered from the changelog): read it again."""
        self.applied_signals.clear()

    def _write_states(self, out: BatchOutput) -> None:
        for device_id, (partition, state) in out.new_states.items():
            key = device_id.encode()
            value = dumps(state.to_dict())
            out.state_writes.append((partition, key, value))
            out.records.append(OutRecord(self.changelog_topic, key, value, partition))
            if state.accepted:
                self.stats.devices.add(device_id)

    def _step_one(
        self, out: BatchOutput, record: InRecord, item_index: int, fix: Position, fences: tuple[str, ...],
        previous: DeviceState | None, index: GeofenceIndex | None, engine: AlertEngine | None,
        signals: _SignalsCursor, now_ms: int,
    ) -> DeviceState | None:
        """One fix through the filters, tracking, geofence transitions, alerts and trips; its enriched record out.
        Returns the device's new state, or None when the fix changed nothing."""
        accepted_previous = previous if previous is not None and previous.accepted else None
        new_state, enrichment = step_position(accepted_previous, fix, self.tracking, now_ms, fences)
        stored = None
        if enrichment.filtered is None:
            assert new_state is not None
            if fences != new_state.geofences:
                new_state = new_state.with_geofences(fences)
            if previous is not None and previous.held is not None and new_state.held is not previous.held:
                new_state = new_state._replace(held=previous.held)
            events: Sequence[GeofenceEvent] = ()
            if index is not None or new_state.fences:
                # the settled-devices memo (see _transitions), checked here: most fixes with geofences stop there
                memberships = accepted_previous.fences if accepted_previous is not None else None
                settled = self._settled.get(fix.device_id) if memberships is not None else None
                if settled is None or settled[0] is not memberships or settled[1] != fences:
                    new_state, events = self._transitions(
                        out, record, accepted_previous, new_state, fix, fences, index,
                        self.settings.geofence_events_topic,
                    )
            stored = new_state
            if self.aggregation is not None:
                rows = out.agg_rows.get(record.partition)
                if rows is None:
                    rows = out.agg_rows[record.partition] = BatchRows()
                rows.fixes.append((enrichment.h3, fix.device_id, fix.ts_ms, enrichment.speed_kmh, enrichment.motion,
                                   enrichment.distance_m, record.offset))
                if events:
                    rows.events.extend(events)
                    rows.event_offsets.extend([record.offset] * len(events))
            if engine is not None:
                self._alerts_on_position(record, signals, new_state, enrichment, fix, events)
            if enrichment.closed:
                self._emit_trips(out, record, enrichment.closed)
        else:
            out.filtered[enrichment.filtered] += 1
            if not self.publish_filtered:
                return None
        out.enriched += 1
        value = dumps(enriched_dict(record, item_index, fix, enrichment, fences))
        out.records.append(OutRecord(self.settings.enriched_topic, record.key, value,
                                     record.partition if self.copartitioned else None))
        return stored

    def _reorder(
        self, out: BatchOutput, record: InRecord, item_index: int, fix: Position, previous: DeviceState | None,
        index: GeofenceIndex | None, engine: AlertEngine | None, signals: _SignalsCursor, now_ms: int,
        looked_up: dict[tuple[int, int, int], tuple[str, ...]] | None,
    ) -> None:
        """``reorder_window_s`` > 0: hold the fix in the device's buffer (kept in its changelogged state) and step
        what the buffer releases, in time order; fixes older than one already released are ``late``."""
        window_ms = self.filters.reorder_window_ms
        reason = intrinsic_reason(fix, self.filters, now_ms)  # a future fix must not become the buffer's watermark
        if reason is not None:
            self._emit_filtered(out, record, item_index, fix, previous, reason)
            return
        buffer = previous.held if previous is not None and previous.held is not None else ReorderBuffer()
        buffer, released, late = buffer.push(fix, now_ms, window_ms, [record.partition, record.offset, item_index])
        for held in late:
            self._emit_filtered(out, record, item_index, held.fix, previous, FilterReason.LATE.value)
        self._release(out, fix.device_id, record.partition, previous, buffer, released, index, engine, signals,
                      now_ms, looked_up)

    def _release(
        self, out: BatchOutput, device_id: str, partition: int, previous: DeviceState | None, buffer: ReorderBuffer,
        released: Sequence[Held], index: GeofenceIndex | None, engine: AlertEngine | None, signals: _SignalsCursor,
        now_ms: int, looked_up: dict[tuple[int, int, int], tuple[str, ...]] | None,
    ) -> None:
        state = previous
        for held in released:
            src_partition, offset, item_index = held.source
            source = InRecord(self.settings.positions_topic, src_partition, offset, device_id.encode(), None)
            fences = looked_up.get((src_partition, offset, item_index)) if looked_up is not None else None
            if fences is None:  # held over from an earlier batch
                fences = index.lookup_one(held.fix.lat, held.fix.lon) if index is not None else ()
            new_state = self._step_one(out, source, item_index, held.fix, fences, state, index, engine, signals,
                                       now_ms)
            if new_state is not None:
                state = new_state
        if state is None or not state.accepted:
            state = DeviceState.holding(device_id, buffer) if state is None else state._replace(held=buffer)
        else:
            state = state._replace(held=buffer if buffer.held or buffer.max_ts is not None else None)
        out.new_states[device_id] = (partition, state)

    def _emit_filtered(self, out: BatchOutput, record: InRecord, item_index: int, fix: Position,
                       state: DeviceState | None, reason: str) -> None:
        out.filtered[reason] += 1
        if not self.publish_filtered:
            return
        accepted = state if state is not None and state.accepted else None
        enrichment = filtered_enrichment(accepted, fix, reason, self.tracking)
        out.enriched += 1
        value = dumps(enriched_dict(record, item_index, fix, enrichment, ()))
        out.records.append(OutRecord(self.settings.enriched_topic, record.key, value,
                                     record.partition if self.copartitioned else None))

    def _alerts_on_position(
        self, record: InRecord, signals: _SignalsCursor, state: DeviceState, enrichment: Enrichment, fix: Position,
        events: Sequence[GeofenceEvent],
    ) -> None:
        """Queue the fix for the alert engine: a device's fixes of one batch go to it as one run (see
        ``AlertEngine.on_positions``), when something reads the device's alert state or at the batch's end."""
        values = {
            "lat": fix.lat, "lon": fix.lon, "speed_kmh": enrichment.speed_kmh, "heading_deg": enrichment.heading_deg,
            "odometer_m": enrichment.odometer_m, "motion": enrichment.motion, "accuracy_m": fix.accuracy_m,
            "altitude_m": fix.altitude_m,
        }
        # the geofences the device is confirmed inside (anti-flapping applied), not the raw index answer
        memberships = state.fences
        confirmed = tuple(sorted(f for f, m in memberships.items() if m.inside)) if memberships else ()
        signals.add_fix(record.partition, fix.device_id, (fix.ts_ms, values, confirmed, events))

    def _telemetry(
        self, records: Sequence[InRecord], out: BatchOutput, engine: AlertEngine | None, signals: _SignalsCursor,
        now_ms: int,
    ) -> None:
        readings = 0
        for record in records:
            for index, item in enumerate(decode_telemetry(record.key, record.value, now_ms=now_ms, limits=self.limits)):
                readings += 1
                if isinstance(item, DecodeError):
                    out.records.append(self._deadletter(out, record, index, item, now_ms))
                    continue
                reading: Telemetry = item
                out.saw(record.partition, reading.ts_ms)
                current = signals.get(record.partition, reading.device_id)
                base = current if current is not None else DeviceSignals(reading.device_id)
                updated = base.with_telemetry(reading.ts_ms, reading.metrics)
                alerts: list[Alert] = []
                if engine is not None:
                    after, alerts = engine.on_telemetry(updated.alerts, reading.device_id, reading.ts_ms,
                                                        reading.metrics)
                    updated = updated._replace(alerts=after)
                signals.put(record.partition, reading.device_id, updated)
                self._emit_alerts(out, record.partition, alerts)
        out.telemetry = readings

    def tick(
        self, due: Sequence[tuple[int, str]], pending_signals: Mapping[str, tuple[int, DeviceSignals]] | None = None,
        now_ms: int | None = None, held_due: Sequence[tuple[int, str]] = (),
        pending: Mapping[str, tuple[int, DeviceState]] | None = None,
        watermark: Callable[[int], int | None] | None = None,
    ) -> BatchOutput:
        """Timer work for the ``(partition, device)`` pairs due by now: the alert engine's deadlines (offline
        devices, durations met on held values, schedule boundaries) and, with a reorder window, fixes held for
        the whole window (a device gone silent must not keep them forever).

        ``watermark(partition)``: the event time the partition's alert deadlines may fire up to (None: not
        known yet, nothing fires); without it, ``now_ms``. Held fixes wait on ``now_ms`` (the reorder window is
        wall time: how long to wait for stragglers)."""
        out = BatchOutput()
        engine = self.alert_engine()
        if engine is not None and not len(engine.ruleset):
            engine = None
        if not due and not held_due:
            return out
        now_ms = self.clock_ms() if now_ms is None else now_ms
        signals = _SignalsCursor(self, out, pending_signals or {}, engine)
        window_ms = self.filters.reorder_window_ms
        if held_due and window_ms:
            index = self.geofences()
            index = index if index is not None and len(index) else None
            self._settle_under(index)
            pending = pending or {}
            for partition, device_id in held_due:
                cached = pending.get(device_id)
                previous = cached[1] if cached is not None else self._stored_state(partition, device_id)
                if previous is None or previous.held is None:
                    continue
                buffer, released = previous.held.flush(now_ms, window_ms)
                if released:
                    self._release(out, device_id, partition, previous, buffer, released, index, engine, signals,
                                  now_ms, None)
            self._write_states(out)
        if engine is not None:
            for partition, device_id in due:
                fire_to = now_ms if watermark is None else watermark(partition)
                if fire_to is None:
                    continue
                current = signals.get(partition, device_id)
                if current is None or current.alerts is None:
                    continue
                after, alerts = engine.tick(current.alerts, device_id, fire_to)
                if after is not current.alerts:
                    signals.put(partition, device_id, current, alerts=after)
                self._emit_alerts(out, partition, alerts)
        signals.flush()
        self._write_signals(out)
        return out

    def _emit_trips(self, out: BatchOutput, record: InRecord, closed: Sequence[TrackEvent]) -> None:
        """Trips and stops that closed on this fix, to ``fleet.trips`` keyed by device."""
        topic = self.settings.trips_topic
        partition = record.partition if self.copartitioned else None
        for event in closed:
            out.trips[type(event).__name__] += 1
            out.records.append(OutRecord(topic, record.key, dumps(event.to_message(format_ts)), partition))

    def _emit_alerts(self, out: BatchOutput, partition: int, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        topic = self.settings.alerts_topic
        target = partition if self.copartitioned else None
        for alert in alerts:
            out.alerts[(alert.rule, alert.severity.value, alert.state.value)] += 1
            out.records.append(OutRecord(topic, alert.subject_id.encode(), dumps(alert_dict(alert)), target))

    def _settle_under(self, index: GeofenceIndex | None) -> None:
        """Called with the index a batch or a timer tick steps its fixes against: the settled-devices memo holds
        for one index, so another one clears it (and lets the old index go)."""
        index = index if index is not None else _NO_GEOFENCES
        if self._settled_index is not index:
            self._settled.clear()
            self._settled_index = index

    def _transitions(
        self, out: BatchOutput, record: InRecord, previous: DeviceState | None, state: DeviceState, fix: Position,
        fences: tuple[str, ...], index: GeofenceIndex | None, events_topic: str,
    ) -> tuple[DeviceState, list[GeofenceEvent]]:
        """Geofence enter/exit/dwell/cross for one accepted fix; events go out keyed by device.

        Most fixes change nothing: a device outside every geofence, or one that ``steady_inside`` found settled
        inside the same geofences at its last step (same index, same memberships object, same answer) keeps
        its memberships (``state`` carries them over from ``previous``) without a call to ``step``: the caller,
        ``_step_one``, checks that memo first; ``_settle_under`` clears it whenever the index changes."""
        if index is None:
            index = _NO_GEOFENCES
        memberships = previous.fences if previous is not None else None
        if memberships is None and not fences and (previous is None or not index.has_cross):
            return state, []
        new_memberships, events, inside = step_settled(
            memberships_from_json(memberships), previous, fix, fences, index, self.transition_defaults
        )
        if inside is not None:
            if len(self._settled) >= SETTLED_DEVICES_LIMIT:
                self._settled.clear()
            self._settled[fix.device_id] = (new_memberships, inside)
        else:
            self._settled.pop(fix.device_id, None)
        partition = record.partition if self.copartitioned else None
        for event in events:
            out.transitions[event.type._value_] += 1
            out.records.append(_new(OutRecord, (events_topic, record.key, dumps(geofence_event_dict(event)),
                                                partition)))
        # kept as Membership objects while in memory; DeviceState.to_dict writes them as lists
        return state.with_fences(new_memberships or None), events

    def internal_error(self, record: InRecord, exc: Exception) -> BatchOutput:
        """The output for a record the pipeline failed on: one dead letter naming the error."""
        telemetry = record.topic == self.settings.telemetry_topic
        out = BatchOutput(fixes=0 if telemetry else 1, telemetry=1 if telemetry else 0)
        error = DecodeError("internal_error", f"{type(exc).__name__}: {exc}"[:500])
        out.records.append(self._deadletter(out, record, 0, error, self.clock_ms()))
        return out

    def _deadletter(self, out: BatchOutput, record: InRecord, index: int, error: DecodeError, now_ms: int) -> OutRecord:
        out.deadlettered[error.reason] += 1
        out.deadlettered_by_topic[(record.topic, error.reason)] += 1
        value = deadletter_record(
            source_topic=record.topic, partition=record.partition, offset=record.offset, index=index,
            key=record.key, raw=record.value, error=error, now_ms=now_ms, limits=self.limits,
        )
        return OutRecord(self.settings.deadletter_topic, record.key, value, None)


# (ts_ms, values, confirmed geofences, geofence events): one fix as AlertEngine.on_positions takes it
_QueuedFix = tuple[int, dict[str, Any], tuple[str, ...], Sequence[GeofenceEvent]]


class _SignalsCursor:
    """Reads a device's signals (this batch's, then in flight, then the store) and records new ones.

    Alert states that change on every fix (an offline rule's last-seen time) are kept aside per device and folded
    into the device's signals once, at the end of the batch (``flush``). A device's fixes wait in a run for the
    alert engine until its alert state is read (``get``, ``put``) or the batch ends: one engine call per device
    and batch instead of one per fix, in the same order as one per fix."""

    def __init__(self, pipeline: PositionPipeline, out: BatchOutput,
                 pending: Mapping[str, tuple[int, DeviceSignals]], engine: AlertEngine | None = None) -> None:
        self.pipeline = pipeline
        self.reader = pipeline.signals
        self.applied = pipeline.applied_signals
        self.out = out
        self.new = out.new_signals
        self.pending = pending
        self.engine = engine
        self.alerts: dict[str, tuple[int, DeviceAlertState | None]] = {}
        self.changed: set[str] = set()
        self.runs: dict[str, tuple[int, list[_QueuedFix]]] = {}

    def add_fix(self, partition: int, device_id: str, item: _QueuedFix) -> None:
        run = self.runs.get(device_id)
        if run is None:
            self.runs[device_id] = (partition, [item])
        else:
            run[1].append(item)

    def _settle(self, device_id: str) -> None:
        """Run the device's queued fixes through the engine."""
        partition, items = self.runs.pop(device_id)
        held = self.alerts.get(device_id)
        if held is not None:
            before = held[1]
        else:
            signals = self.get(partition, device_id)
            before = signals.alerts if signals is not None else None
        after, alerts = self.engine.on_positions(before, device_id, items)  # type: ignore[union-attr]
        self.alerts[device_id] = (partition, after)
        if after is not before:
            self.changed.add(device_id)
        self.pipeline._emit_alerts(self.out, partition, alerts)

    def get(self, partition: int, device_id: str) -> DeviceSignals | None:
        if device_id in self.runs:
            self._settle(device_id)
        cached = self.new.get(device_id) or self.pending.get(device_id)
        signals = cached[1] if cached is not None else self._stored(partition, device_id)
        held = self.alerts.get(device_id)
        if held is not None:
            base = signals if signals is not None else DeviceSignals(device_id)
            return base._replace(alerts=held[1])
        return signals

    def _stored(self, partition: int, device_id: str) -> DeviceSignals | None:
        applied = self.applied.get(device_id)
        if applied is not None:  # what the store holds, not decoded again
            return applied
        if self.reader is None:
            return None
        raw = self.reader.get(partition, device_id.encode())
        return DeviceSignals.from_json(orjson.loads(raw)) if raw else None

    def put(self, partition: int, device_id: str, current: DeviceSignals | None, **changes: object) -> None:
        """``current`` must have been read with ``get`` (which settled the device's queued fixes)."""
        base = current if current is not None else DeviceSignals(device_id)
        self.new[device_id] = (partition, base._replace(**changes) if changes else base)
        self.alerts.pop(device_id, None)
        self.changed.discard(device_id)

    def flush(self) -> None:
        for device_id in list(self.runs):
            self._settle(device_id)
        for device_id in self.changed:
            partition, state = self.alerts[device_id]
            cached = self.new.get(device_id) or self.pending.get(device_id)
            base = cached[1] if cached is not None else self._stored(partition, device_id) or DeviceSignals(device_id)
            self.new[device_id] = (partition, base._replace(alerts=state))
        self.changed.clear()


def check_partial(value: Any) -> None:
    """Raise ValueError unless ``value`` is a stage-1 partials message (see aggregates.py)."""
    if not isinstance(value, dict) or value.get("type") != "partials" or not isinstance(value.get("source"), int):
        raise ValueError("expected {type: partials, source: int, ...}")
    if not (value.get("watermark_ms") is None or isinstance(value.get("watermark_ms"), int)) \
            or not isinstance(value.get("idle"), bool):
        raise ValueError("watermark_ms must be an integer or null and idle a boolean")
    stats = value.get("stats")
    if not isinstance(stats, list) or not all(isinstance(s, list) and len(s) == 14 and isinstance(s[0], str)
                                              for s in stats):
        raise ValueError("stats must be a list of cell statistics")


def alert_dict(alert: Alert) -> dict[str, object]:
    """The ``fleet.alerts`` message (schemas/alert.json)."""
    return {
        "alert_id": alert.alert_id, "rule": alert.rule, "severity": alert.severity.value,
        "state": alert.state.value, "subject_id": alert.subject_id, "ts": format_ts(alert.ts_ms),
        "details": alert.details,
    }


def event_id(record: InRecord, index: int) -> str:
    """Stable across replays: the same input record and array index always give the same id."""
    return f"{record.partition}-{record.offset}-{index}"


def geofence_event_dict(event: GeofenceEvent) -> dict[str, object]:
    """The ``fleet.geofence.events`` message (schemas/geofence_event.json). The type as its plain string, read
    once (``_value_``: Enum's ``value`` property costs 5x more, and orjson writes a str faster than an enum)."""
    kind = event.type._value_
    out: dict[str, object] = {
        "event_id": f"{event.device_id}:{event.geofence_id}:{kind}:{event.ts_ms}",  # == event.event_id
        "type": kind, "device_id": event.device_id,
        "geofence_id": event.geofence_id, "ts": format_ts(event.ts_ms), "lat": event.lat, "lon": event.lon,
    }
    if event.dwell_s is not None:
        out["dwell_s"] = event.dwell_s
    if event.reason is not None:
        out["reason"] = event.reason
    return out


_NO_GEOFENCES = GeofenceIndex.empty()


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch runs; the collector catches up once it is over.

    A batch allocates hundreds of thousands of objects that live until its outputs are flushed (decoded fixes,
    enriched records, states, alert watches). Young-generation collections inside the batch scanned them again and
    again (they are young until the batch ends): 2.0-2.5 µs per fix with the alert rules on, ~1 with them off
    (benchmarks/pipeline_cpu.py's worker loop, GC callbacks timed); paused, the one collection after each batch
    costs 1.1-1.3 and ~0.5. The batch is synchronous (no other coroutine runs meanwhile), and its cyclic garbage is
    bounded by the batch size."""
    if not gc.isenabled():  # someone else owns the collector (a test, a profiler): leave it as it is
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def enriched_dict(
    record: InRecord, index: int, fix: Position, enrichment: Enrichment, fences: tuple[str, ...]
) -> dict[str, object]:
    """The ``fleet.positions.enriched`` message (schemas/enriched_position.json)."""
    out: dict[str, object] = {
        "event_id": f"{record.partition}-{record.offset}-{index}",  # == event_id(record, index)
        "device_id": fix.device_id,
        "ts": format_ts(fix.ts_ms),
        "lat": fix.lat,
        "lon": fix.lon,
        "h3": enrichment.h3,
        "geofences": fences,
        "speed_kmh": enrichment.speed_kmh,
        "speed_source": enrichment.speed_source,
        "heading_deg": enrichment.heading_deg,
        "heading_source": enrichment.heading_source,
        "distance_m": enrichment.distance_m,
        "odometer_m": enrichment.odometer_m,
        "motion": enrichment.motion,  # a StrEnum: orjson writes its value
        "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset, "index": index},
    }
    if enrichment.h3_cells:
        out["h3_cells"] = enrichment.h3_cells
    if fix.accuracy_m is not None:
        out["accuracy_m"] = fix.accuracy_m
    if fix.altitude_m is not None:
        out["altitude_m"] = fix.altitude_m
    if fix.attributes:
        out["attributes"] = fix.attributes
    if enrichment.filtered is not None:
        out["filtered"] = enrichment.filtered
    return out

