"""The Faust application: built by :func:`create_app` from Settings (no module-level app singleton).

Faust gives us the consumer group, partition assignment, offsets, table changelogs, recovery and the web
server. The per-fix work happens in :class:`~fleetstream.streaming.pipeline.PositionPipeline` over whole
batches, and outputs leave through :class:`~fleetstream.streaming.output.BatchProducer`, so Faust's
per-message costs are paid once per Kafka message, not once per fix or per output.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import socket
import time
from collections import ChainMap, Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faust
import numpy as np
import orjson
from faust.types import TP, EventT
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleetstream.config import Settings
from fleetstream.domain.alerts import AlertEngine
from fleetstream.domain.eventclock import EventClock, pop_due
from fleetstream.domain.models import DeviceState
from fleetstream.domain.nearby import NearbyIndex
from fleetstream.domain.signals import DeviceSignals, active_alerts
from fleetstream.observability.metrics import Metrics
from fleetstream.streaming import faust_fixes
from fleetstream.streaming.aggregates import AGGREGATES_TABLE, CELL_STATS_TABLE, Aggregation
from fleetstream.streaming.api import register_api
from fleetstream.streaming.geofence_feed import GeofenceFeed
from fleetstream.streaming.kafka import ssl_context
from fleetstream.streaming.output import BatchProducer
from fleetstream.streaming.pipeline import BatchOutput, InRecord, PipelineStats, PositionPipeline
from fleetstream.streaming.rules_feed import RulesFeed

log = logging.getLogger("fleetstream.worker")

DEVICE_STATE_TABLE = "device-state"
DEVICE_SIGNALS_TABLE = "device-signals"  # latest telemetry and alert-engine state per device


def _speed_limits(index: Any) -> dict[str, float]:
    """Per-geofence speed limits (``properties.speed_limit_kmh``) for overspeed rules."""
    if index is None:
        return {}
    limits = {}
    for fence in index.fences:
        limit = (fence.properties or {}).get("speed_limit_kmh")
        if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
            limits[fence.id] = float(limit)
    return limits


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """SASL / TLS settings for the Kafka client, or None for PLAINTEXT."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    credentials = faust.SASLCredentials(
        username=settings.sasl_username, password=settings.sasl_password,
        mechanism=settings.sasl_mechanism, ssl_context=context,
    )
    credentials.protocol = faust.types.auth.AuthProtocol(protocol)
    return credentials


def store_url(settings: Settings) -> str:
    if settings.table_store == "memory":
        return "memory://"
    if settings.table_store == "rocksdb":
        return "rocksdb://"
    try:
        import rocksdict  # noqa: F401
    except ImportError:
        return "memory://"
    return "rocksdb://"


@dataclass(slots=True)
class _ChangelogMessage:
    key: bytes
    value: bytes
    partition: int
    offset: int
    tp: TP


@dataclass(slots=True)
class _ChangelogEvent:
    """The shape ``Table.apply_changelog_batch`` reads during recovery: we apply our own writes the same way."""

    key: bytes
    value: bytes
    message: _ChangelogMessage


class TableState:
    """Reads and writes a raw-bytes Faust table by explicit partition.

    Faust's stores pick the partition from the *current event*, which inside a batch is not the record being
    handled; reading by partition directly keeps each device's state in its own partition's store.
    """

    def __init__(self, table: faust.Table) -> None:
        self.table = table

    def get(self, partition: int, key: bytes) -> bytes | None:
        store = self.table.data
        db_for_partition = getattr(store, "_db_for_partition", None)
        if db_for_partition is not None:  # RocksDB store: one database per partition
            return db_for_partition(partition).get(key)
        return store.data.get(key)

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        """Raw (key, value) pairs of the local store: active partitions, and standbys for the memory store."""
        store = self.table.data
        dbs_for_actives = getattr(store, "_dbs_for_actives", None)
        if dbs_for_actives is not None:  # RocksDB: only the active partitions' databases
            for db in dbs_for_actives():
                yield from store._visible_items(db)
        else:
            yield from list(store.data.items())

    def apply(self, writes: Sequence[tuple[int, bytes, bytes]], offsets: dict[int, list[int]]) -> None:
        """Apply acknowledged changelog writes to the local store, as recovery would (persisted offsets too)."""
        if not writes:
            return
        topic = self.table.changelog_topic_name
        cursor: dict[int, int] = {}
        events = []
        for partition, key, value in writes:
            i = cursor.get(partition, 0)
            cursor[partition] = i + 1
            offset = offsets[partition][i]
            message = _ChangelogMessage(key, value, partition, offset, TP(topic, partition))
            events.append(_ChangelogEvent(key, value, message))
        self.table.apply_changelog_batch(events)


class PositionWorker:
    """Glue between the Faust agent and the pipeline: decode batch, flush outputs, apply state."""

    def __init__(
        self, app: faust.App, settings: Settings, table: faust.Table, metrics: Metrics | None = None,
        signals_table: faust.Table | None = None,
        aggregate_tables: tuple[faust.Table, faust.Table] | None = None,
    ) -> None:
        self.app = app
        self.aggregate_tables = tuple(TableState(t) for t in aggregate_tables) if aggregate_tables else None
        self.aggregation: Aggregation | None = None
        self.metrics = metrics
        self.settings = settings
        self.state = TableState(table)
        self.signals = TableState(signals_table) if signals_table is not None else None
        self.rules: RulesFeed | None = None
        self._engine: AlertEngine | None = None
        self._engine_index: Any = None
        self._rejected_reported = 0
        self._pending_signals: dict[str, tuple[int, DeviceSignals]] = {}
        self._pending_signal_seq: dict[str, int] = {}
        # alert-engine deadlines of this worker's devices: (due_ms, device, partition), stale entries skipped
        self._deadlines: list[tuple[int, str, int]] = []
        self._deadlines_stale = True
        # the deadlines are event times: they fire when the partition's event time has passed them (by
        # alert_lateness_s), not the wall clock, which is far ahead on a replay or backlog (see EventClock)
        self.clock = EventClock(round(settings.alert_lateness_s * 1000), round(settings.alert_idle_s * 1000))
        # with a reorder window: when each device's held fixes have waited the whole window
        self._held_deadlines: list[tuple[int, str, int]] = []
        self.stats = PipelineStats()
        self.pipeline: PositionPipeline | None = None
        self.output: BatchProducer | None = None
        self.geofences: GeofenceFeed | None = None
        self._next_offsets: dict[tuple[str, int], int] = {}
        self.max_inflight = 2
        self._inflight: set[asyncio.Future[None]] = set()
        self._pending_states: dict[str, tuple[int, DeviceState]] = {}
        self._pending_seq: dict[str, int] = {}
        self._seq = 0
        self._start_lock = asyncio.Lock()
        # latest applied state of every device in this worker's active partitions, for the query API
        self.directory: dict[str, tuple[int, DeviceState]] = {}
        self._directory_stale = True
        self.nearby_index = NearbyIndex(
            resolution=min(8, settings.h3_resolution), cell_resolution=settings.h3_resolution
        )

    async def ensure_started(self) -> None:
        """Start once, from the app's startup task or the first batch, whichever comes first."""
        async with self._start_lock:
            if self.pipeline is None:
                await self.start()

    async def start(self) -> None:
        producer = self.app.producer._ensure_producer()  # the aiokafka producer Faust started for us
        self.output = BatchProducer(producer, tail_single_record=self.settings.tail_single_record)
        n_in = await self.output.partitions_for(self.settings.positions_topic)
        n_out = await self.output.partitions_for(self.settings.enriched_topic)
        if n_in != n_out:
            log.warning(
                "%s has %d partitions and %s has %d: enriched records are partitioned by key instead of "
                "following their input partition", self.settings.positions_topic, n_in,
                self.settings.enriched_topic, n_out,
            )
        self.geofences = GeofenceFeed(self.settings)
        await self.geofences.start()
        waited_s = 0  # a fix matched against a half-loaded geofence set would give false transitions: wait
        while not self.geofences.ready.is_set():
            try:
                await asyncio.wait_for(self.geofences.ready.wait(), timeout=30)
            except TimeoutError:
                waited_s += 30
                log.warning("still loading geofences after %d s before the first batch", waited_s)
        self.rules = RulesFeed(self.settings)
        await self.rules.start()
        while not self.rules.ready.is_set():  # likewise: rules half-loaded would miss alerts
            try:
                await asyncio.wait_for(self.rules.ready.wait(), timeout=30)
            except TimeoutError:
                log.warning("still loading alert rules before the first batch")
        if self.aggregate_tables is not None:
            rows, cells = self.aggregate_tables
            self.aggregation = Aggregation(
                self.settings, items=self._aggregate_items, sources=n_in,
                active=lambda: self._active_partitions() if self.recovered() else (),
            )
            self.aggregation.changelogs = {AGGREGATES_TABLE: rows.table.changelog_topic_name,
                                           CELL_STATS_TABLE: cells.table.changelog_topic_name}
        self.pipeline = PositionPipeline(
            self.settings, self.state, changelog_topic=self.state.table.changelog_topic_name,
            copartitioned=n_in == n_out, stats=self.stats, geofences=self.geofences.current,
            signals=self.signals,
            signals_changelog_topic=self.signals.table.changelog_topic_name if self.signals is not None else "",
            alert_engine=self.alert_engine, aggregation=self.aggregation, applied_states=lambda: self.directory,
        )

    def alert_engine(self) -> AlertEngine | None:
        """The engine for the current rules (rebuilt when the rules feed swaps in a new RuleSet)."""
        if self.rules is None:
            return None
        ruleset = self.rules.ruleset
        index = self.geofences.index if self.geofences is not None else None
        if self._engine is None or self._engine.ruleset is not ruleset or self._engine_index is not index:
            self._engine = AlertEngine(ruleset, _speed_limits(index))  # speed limits follow the geofences
            self._engine_index = index
        return self._engine

    async def handle(self, events: Sequence[EventT]) -> None:
        """Process one batch and put its outputs on the wire; do not wait for them.

        Each input message gets one extra reference (``incref``) that is released only once every output of
        its batch, changelog included, is acknowledged: Faust commits an offset only when all references are
        released, so offsets never run ahead of outputs (at-least-once) while the next batch is processed
        during this one's round trip. States of batches in flight stay readable in ``self._pending_states``.
        """
        await self.ensure_started()
        assert self.pipeline is not None and self.output is not None
        while len(self._inflight) >= self.max_inflight:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
        started = time.perf_counter()
        self.stats.mark_batch_start()
        messages = [event.message for event in events]
        records = [InRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in messages]
        for record in records:
            self._next_offsets[(record.topic, record.partition)] = record.offset + 1
        output = self._process(records)
        wall_ms = int(time.time() * 1000)
        for partition, ts in output.newest_ts.items():
            self.clock.observe(partition, min(ts, wall_ms), wall_ms)  # a clock running ahead would fire early
        await self._emit(output, events, started)

    async def on_timer(self) -> None:
        """Timers: devices gone silent, held fixes whose reorder window passed, timed alert conditions.

        Runs on the event loop between batches, so its state changes go through the same pending-state,
        send, acknowledge, apply path as a batch of input (with no input offsets to commit)."""
        if self.pipeline is None:
            return
        while len(self._inflight) >= self.max_inflight:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
        started = time.perf_counter()
        watermark = self.clock.watermarks(int(time.time() * 1000))
        output = self.pipeline.tick(  # no await until its states are registered
            self._due_now(watermark), self._pending_signals, held_due=self._held_due_now(),
            pending=self._pending_states, watermark=watermark,
        )
        if self.aggregation is not None and self.recovered():
            self.aggregation.on_timer(self._active_partitions(), output.records, output.agg_writes, output.on_acked)
        if output.records or output.state_writes:
            await self._emit(output, (), started)

    async def _emit(self, output: BatchOutput, events: Sequence[EventT], started: float) -> None:
        """Register the batch's states as pending, put its outputs on the wire, and acknowledge its inputs
        once they are all acknowledged. Callers compute ``output`` with no await in between, so a concurrent
        batch never reads states older than this one's."""
        assert self.output is not None
        self._seq += 1
        seq = self._seq
        nearby_index = self.nearby_index
        window_ms = self.pipeline.filters.reorder_window_ms if self.pipeline is not None else 0
        for device_id, entry in output.new_states.items():
            self._pending_states[device_id] = entry
            self._pending_seq[device_id] = seq
            state = entry[1]
            if state.accepted:
                nearby_index.update(device_id, state.lat, state.lon, state.ts_ms, state.h3)
            if state.held is not None and window_ms:
                held_due = state.held.due_ms(window_ms)
                if held_due is not None:
                    heapq.heappush(self._held_deadlines, (held_due, device_id, entry[0]))
        for device_id, signal_entry in output.new_signals.items():
            self._pending_signals[device_id] = signal_entry
            self._pending_signal_seq[device_id] = seq
            due = signal_entry[1].alerts.due_ms if signal_entry[1].alerts is not None else None
            if due is not None:
                heapq.heappush(self._deadlines, (due, device_id, signal_entry[0]))
        messages = [event.message for event in events]
        for message in messages:
            message.incref()
        # in flight from here: drain() (before a rebalance) must wait for a batch still being put on the wire too,
        # or it would clear the pending states and reset the aggregation under it
        sending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight.add(sending)
        try:
            acknowledged = await self.output.send(output.records)
        finally:
            self._inflight.discard(sending)
            sending.set_result(None)
        task = asyncio.ensure_future(self._complete(seq, output, acknowledged, events, started))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _complete(
        self, seq: int, output: BatchOutput, acknowledged: Awaitable[dict[tuple[str, int], list[int]]],
        events: Sequence[EventT], started: float,
    ) -> None:
        try:
            offsets = await acknowledged
        except Exception as exc:  # the broker refused our outputs: do not ack, let the worker stop and retry
            log.exception("outputs of a batch were not acknowledged; stopping without committing its offsets")
            await self.app.crash(exc)
            return
        changelog = self.state.table.changelog_topic_name
        self.state.apply(
            output.state_writes,
            {partition: found for (topic, partition), found in offsets.items() if topic == changelog},
        )
        if self.signals is not None and output.signal_writes:
            signals_changelog = self.signals.table.changelog_topic_name
            self.signals.apply(
                output.signal_writes,
                {partition: found for (topic, partition), found in offsets.items() if topic == signals_changelog},
            )
            if self.pipeline is not None:
                self.pipeline.signals_applied(output.new_signals)
        if self.aggregate_tables is not None:
            for writes, table_state in zip((output.agg_writes, output.cell_writes), self.aggregate_tables,
                                           strict=True):
                if writes:
                    changelog_topic = table_state.table.changelog_topic_name
                    table_state.apply(writes, {partition: found for (topic, partition), found in offsets.items()
                                               if topic == changelog_topic})
        for acknowledge in output.on_acked:
            acknowledge()
        for device_id in output.new_signals:
            if self._pending_signal_seq.get(device_id) == seq:
                del self._pending_signal_seq[device_id]
                del self._pending_signals[device_id]
        directory = self.directory
        for device_id, entry in output.new_states.items():
            if entry[1].accepted:  # not a device whose first fixes are still held for reordering
                directory[device_id] = entry
            if self._pending_seq.get(device_id) == seq:  # no later batch changed it: the store has it now
                del self._pending_seq[device_id]
                del self._pending_states[device_id]
        for event in events:
            event.ack()
        self.stats.add(output)
        self.stats.mark_flushed()
        self._observe(output, offsets, [event.message for event in events], started)

    async def drain(self) -> None:
        """Wait for every batch in flight (before a rebalance hands partitions to another worker)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        self._pending_states.clear()
        self._pending_seq.clear()
        self._pending_signals.clear()
        self._pending_signal_seq.clear()

    def on_assignment_changed(self) -> None:
        """Partitions moved: the directory is rebuilt from the store once recovery completes."""
        self.directory.clear()
        self._directory_stale = True
        self.nearby_index = NearbyIndex(
            resolution=min(8, self.settings.h3_resolution), cell_resolution=self.settings.h3_resolution
        )
        self._deadlines.clear()
        self._deadlines_stale = True
        self.clock.forget()
        if self.pipeline is not None:
            self.pipeline.forget_applied_signals()
        if self.aggregation is not None:
            self.aggregation.reset()

    def recovered(self) -> bool:
        """Whether the assigned partitions' tables have been recovered (their stores are complete)."""
        recovery = self.app.tables.recovery
        return recovery.completed.is_set() and not recovery.in_recovery

    def _active_partitions(self) -> set[int]:
        topic = self.settings.positions_topic
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == topic}

    def _aggregate_items(self, table_name: str) -> Iterator[tuple[int, bytes, bytes]]:
        """(partition, key, value) of an aggregate table's records in the active partitions: their keys start
        with the partition (``3/...``), not hashed to it."""
        assert self.aggregate_tables is not None
        table = self.aggregate_tables[0 if table_name == AGGREGATES_TABLE else 1]
        active = self._active_partitions()
        for key, value in table.items():
            if value:
                partition = int(key.split(b"/", 1)[0])
                if partition in active:
                    yield partition, key, value

    def _active_items(self, table: TableState) -> Iterator[tuple[int, bytes, bytes]]:
        """(partition, key, value) of a table's records in this worker's active partitions (a memory store also
        holds standby partitions: filtered out by the key's partition)."""
        topic = self.settings.positions_topic
        active = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == topic}
        key_partition = self.app.producer.key_partition
        for key, value in table.items():
            if value:
                partition = key_partition(topic, key).partition
                if partition in active:
                    yield partition, key, value

    @staticmethod
    def _pop_due(heap: list[tuple[int, str, int]], now_ms: int) -> list[tuple[int, str]]:
        """(partition, device) of the heap's entries due by ``now_ms``, once per device; the pipeline re-reads
        each state and skips ones no longer due (entries go stale when a deadline moves)."""
        due: dict[str, int] = {}
        while heap and heap[0][0] <= now_ms:
            _, device_id, partition = heapq.heappop(heap)
            due[device_id] = partition
        return [(partition, device_id) for device_id, partition in due.items()]

    def _ensure_directory(self) -> None:
        if not self._directory_stale or not self.recovered():
            return
        directory: dict[str, tuple[int, DeviceState]] = {}
        for partition, _, value in self._active_items(self.state):
            state = DeviceState.from_dict(orjson.loads(value))
            if state.accepted:
                directory[state.device_id] = (partition, state)
        directory.update(self.directory)  # states applied since the scan started are newer
        self.directory = directory
        self._directory_stale = False
        for device_id, (_, state) in {**directory, **self._pending_states}.items():
            if state.accepted:
                self.nearby_index.update(device_id, state.lat, state.lon, state.ts_ms, state.h3)

    def _due_now(self, watermark: Callable[[int], int | None]) -> list[tuple[int, str]]:
        """(partition, device) pairs whose alert deadline the partition's watermark has passed; rebuilt from the
        store after a rebalance."""
        if self.signals is None or not self.recovered():
            return []
        if self._deadlines_stale:
            self._rebuild_deadlines()
        return pop_due(self._deadlines, watermark, self._active_partitions())

    def _held_due_now(self) -> list[tuple[int, str]]:
        """(partition, device) pairs whose held fixes have waited the reorder window (rebuilt with the alert
        deadlines after a rebalance)."""
        if self.pipeline is None or not self.pipeline.filters.reorder_window_ms:
            return []
        if not self.recovered():
            return []
        if self._deadlines_stale:
            self._rebuild_deadlines()
        return self._pop_due(self._held_deadlines, int(time.time() * 1000))

    def _rebuild_deadlines(self) -> None:
        """The deadline heaps from the stores, and the event clock from the times they hold (a restarted worker
        whose devices are all silent still has a clock to fire their deadlines by)."""
        assert self.signals is not None
        deadlines = []
        wall_ms = int(time.time() * 1000)
        clock = self.clock
        self._ensure_directory()
        for partition, state in self.directory.values():
            clock.restore(partition, min(state.ts_ms, wall_ms), wall_ms)
        for partition, _, value in self._active_items(self.signals):
            signal = DeviceSignals.from_json(orjson.loads(value))
            if signal.telemetry_ts_ms is not None:
                clock.restore(partition, min(signal.telemetry_ts_ms, wall_ms), wall_ms)
            if signal.alerts is not None and signal.alerts.due_ms is not None:
                deadlines.append((signal.alerts.due_ms, signal.device_id, partition))
        for device_id, (partition, signal) in self._pending_signals.items():
            if signal.alerts is not None and signal.alerts.due_ms is not None:
                deadlines.append((signal.alerts.due_ms, device_id, partition))
        heapq.heapify(deadlines)
        self._deadlines = deadlines
        self._held_deadlines = []
        window_ms = self.pipeline.filters.reorder_window_ms if self.pipeline is not None else 0
        if window_ms:
            held: list[tuple[int, str, int]] = []
            for partition, _, value in self._active_items(self.state):
                if b'"held"' in value:
                    state = DeviceState.from_dict(orjson.loads(value))
                    due = state.held.due_ms(window_ms) if state.held is not None else None
                    if due is not None:
                        held.append((due, state.device_id, partition))
            heapq.heapify(held)
            self._held_deadlines = held
        self._deadlines_stale = False

    def device_signals(self, device_id: str) -> DeviceSignals | None:
        """Latest telemetry and alert state of a device this worker owns, or None."""
        entry = self._pending_signals.get(device_id)
        if entry is not None:
            return entry[1]
        if self.signals is None:
            return None
        partition = self.app.producer.key_partition(self.settings.positions_topic, device_id.encode()).partition
        raw = self.signals.get(partition, device_id.encode())
        return DeviceSignals.from_json(orjson.loads(raw)) if raw else None

    def local_signals(self) -> list[DeviceSignals]:
        """Telemetry and alert state of every device in this worker's active partitions. Devices whose applied
        signals the pipeline still holds as objects are not decoded again (a metrics scrape reads them all)."""
        if self.signals is None:
            return []
        applied = self.pipeline.applied_signals if self.pipeline is not None else {}
        found: dict[str, DeviceSignals] = {}
        for _, key, value in self._active_items(self.signals):
            signal = applied.get(key.decode("utf-8", "replace"))
            if signal is None:
                signal = DeviceSignals.from_json(orjson.loads(value))
            found[signal.device_id] = signal
        found.update({device_id: entry[1] for device_id, entry in self._pending_signals.items()})
        return list(found.values())

    def device_state(self, device_id: str) -> DeviceState | None:
        """The newest state of a device this worker owns (in flight included), or None."""
        self._ensure_directory()
        entry = self._pending_states.get(device_id) or self.directory.get(device_id)
        return entry[1] if entry is not None and entry[1].accepted else None

    def local_states(self) -> list[DeviceState]:
        self._ensure_directory()
        merged = {**self.directory, **self._pending_states}
        return [state for _, state in merged.values() if state.accepted]

    def nearby(self, lat: float, lon: float, radius_m: float, limit: int) -> list[tuple[DeviceState, float]]:
        """Local devices within ``radius_m`` of a point, nearest first, ties by id (exact haversine over the
        candidates of an H3 grid disk; see domain/nearby.py)."""
        self._ensure_directory()
        out = []
        for device_id, distance in self.nearby_index.nearby(lat, lon, radius_m, limit):
            state = self.device_state(device_id)
            if state is not None:
                out.append((state, distance))
        return out

    def refresh_gauges(self) -> None:
        """Gauges read at scrape time: assigned partitions and consumer lag (highwater minus next offset).

        On the embedded broker highwater is under-reported (FIELD-NOTES), so lag there reads low."""
        m = self.metrics
        if m is None:
            return
        consumer = self.app.consumer
        inputs = (self.settings.positions_topic, self.settings.telemetry_topic)
        assigned = [tp for tp in consumer.assignment() if tp.topic in inputs]
        for topic in inputs:
            m.assigned_partitions.labels(topic).set(sum(1 for tp in assigned if tp.topic == topic))
        if self.geofences is not None:
            index = self.geofences.index
            m.geofences.set(len(index) if index is not None else 0)
            m.index_rebuild_seconds.set(self.geofences.last_rebuild_s)
            rejected = self.geofences.rejected
            if rejected > self._rejected_reported:
                m.geofences_rejected.inc(rejected - self._rejected_reported)
                self._rejected_reported = rejected
        lags = {}
        for tp in assigned:
            highwater = consumer.highwater(tp)
            next_offset = self._next_offsets.get((tp.topic, tp.partition))
            if highwater is not None and next_offset is not None:
                lags[(tp.topic, tp.partition)] = max(0, highwater - next_offset)
        m.set_consumer_lag(lags)  # partitions no longer held drop out
        recovery = self.app.tables.recovery
        m.observe_recovery(recovery.active_remaining_total(), recovery.standby_remaining_total())
        self._ensure_directory()
        m.devices.set(len(self.directory))
        if self.rules is not None and len(self.rules.ruleset):
            by_severity: Counter[str] = Counter()
            for signals in self.local_signals():
                for rule_id, _, _ in active_alerts(signals.alerts, signals.device_id):
                    rule = self.rules.ruleset.get(rule_id)
                    by_severity[str(rule.severity) if rule is not None else "info"] += 1
            for severity in ("critical", "major", "minor", "warning", "info"):
                m.active_alerts.labels(severity).set(by_severity[severity])

    def _process(self, records: list[InRecord]) -> BatchOutput:
        """Never let one record stop the worker: on an unexpected error, retry one record at a time and
        dead-letter the ones that still fail, with reason ``internal_error``."""
        assert self.pipeline is not None
        try:
            return self.pipeline.process(records, self._pending_states, self._pending_signals)
        except Exception:
            log.exception("batch of %d records failed; retrying record by record", len(records))
        merged = BatchOutput(messages=len(records))
        # later records of a device must see the states earlier ones produced
        pending = ChainMap(merged.new_states, self._pending_states)
        pending_signals = ChainMap(merged.new_signals, self._pending_signals)
        for record in records:
            try:
                single = self.pipeline.process([record], pending, pending_signals)
            except Exception as exc:
                log.exception("record %s/%d@%d failed", record.topic, record.partition, record.offset)
                single = self.pipeline.internal_error(record, exc)
            merged.merge(single)
        return merged

    def _observe(self, output: BatchOutput, offsets: dict[tuple[str, int], list[int]],
                 messages: list[Any], started: float) -> None:
        m = self.metrics
        if m is None:
            return
        now = time.time()
        topic = self.settings.positions_topic
        if messages:
            for message_topic, count in Counter(msg.topic for msg in messages).items():
                m.input_messages.labels(message_topic).inc(count)
            m.input_records.labels(topic).inc(output.fixes)
        for kind, count in output.transitions.items():
            m.geofence_transitions.labels(kind).inc(count)
        for (out_topic, _), found in offsets.items():
            m.output_records.labels(out_topic).inc(len(found))
        for (source_topic, reason), count in output.deadlettered_by_topic.items():
            m.deadlettered.labels(source_topic, reason).inc(count)
        for (rule, severity, state), count in output.alerts.items():
            m.alerts.labels(rule, severity, state).inc(count)
        if output.telemetry:
            m.input_records.labels(self.settings.telemetry_topic).inc(output.telemetry)
        for reason, count in output.filtered.items():
            m.filtered.labels(reason).inc(count)
        if output.fix_ts_ms:
            m.event_lag.observe_many(now - np.asarray(output.fix_ts_ms, dtype=np.float64) / 1000.0)
        if messages:
            kafka_ts = np.fromiter((msg.timestamp for msg in messages), dtype=np.float64, count=len(messages))
            m.processing_latency.observe_many(now - kafka_ts)  # Faust's Message.timestamp is in seconds
            m.batch_size.observe(output.messages)
            m.batch_seconds.observe(time.perf_counter() - started)
            if output.fixes or output.telemetry:  # (the workers' own partials keep coming when devices do not)
                m.last_input_timestamp.set(now)
        if output.late_aggregate:
            m.late_records.labels("cells").inc(output.late_aggregate)
        m.devices.set(len(self.directory) if not self._directory_stale else len(self.stats.devices))


def create_app(
    settings: Settings, registry: CollectorRegistry | None = None, **faust_overrides: Any
) -> faust.App:
    """Build a Faust app for these settings, with its topics, table, agent and web views."""
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=broker_credentials(settings),
        store=store_url(settings),
        datadir=settings.data_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_session_timeout=settings.session_timeout_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        producer_max_batch_size=512 * 1024,
        producer_linger_ms=0,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_enabled=True,
        canonical_url=settings.advertised_url or f"http://{socket.gethostname()}:{settings.web_port}",
        autodiscover=False,
        **faust_overrides,
    )
    # one agent reads positions and telemetry (co-partitioned by device): one writer per device's state
    # (and the cell partials: stage 2 of the cell statistics, keyed by cell, co-partitioned like the tables)
    input_topics = [settings.positions_topic, settings.telemetry_topic]
    if settings.aggregation_enabled:
        input_topics.append(settings.cell_partials_topic)
    # Faust 0.15 resumes input partitions before seeking them after recovery, and may count records never
    # processed as done: both fixed for this app and its own input topics (see faust_fixes)
    faust_fixes.install(app, [*input_topics, settings.rfid_topic])
    inputs = app.topic(
        *input_topics, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=settings.partitions,
    )
    table = app.Table(
        DEVICE_STATE_TABLE, default=None, partitions=settings.partitions,
        # raw bytes: a Table derives its changelog serializers from key_type/value_type (json unless bytes),
        # and those win over a schema's in its changelog topic
        key_type=bytes, value_type=bytes,
        schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    )
    signals_table = app.Table(
        DEVICE_SIGNALS_TABLE, default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes,
        schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    )
    aggregate_tables = None
    if settings.aggregation_enabled:  # stage-1 checkpoints per input partition, stage-2 cell windows per cell
        aggregate_tables = tuple(app.Table(
            name, default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes,
            schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
        ) for name in (AGGREGATES_TABLE, CELL_STATS_TABLE))
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    # every series exists at zero before the first batch, so rate() and increase() see the first one
    metrics.prime_inputs((settings.positions_topic, settings.telemetry_topic))
    metrics.prime_outputs((settings.enriched_topic, settings.deadletter_topic, settings.geofence_events_topic,
                           settings.alerts_topic, settings.cells_topic))
    worker = PositionWorker(app, settings, table, metrics if settings.metrics_enabled else None, signals_table,
                            aggregate_tables)
    app.fleetstream_worker = worker  # type: ignore[attr-defined]

    @app.task
    async def start_worker() -> None:  # load geofences while the group forms, not on the first batch
        await worker.ensure_started()

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: faust.App, revoked: set[TP], **kwargs: Any) -> None:
        await worker.drain()
        worker.on_assignment_changed()

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: faust.App, assigned: set[TP], **kwargs: Any) -> None:
        await worker.drain()
        worker.on_assignment_changed()

    register_api(app, worker, settings, table, aggregate_tables[1] if aggregate_tables else None)
    from fleetstream.streaming.rfid import register_rfid  # (imports this module) RFID agent, table, timer, routes

    register_rfid(app, settings, metrics if settings.metrics_enabled else None)

    @app.timer(settings.timer_interval_s)
    async def timers() -> None:
        await worker.on_timer()

    @app.agent(inputs, name="positions")
    async def process_positions(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            await worker.handle(events)

    @app.page("/status")
    async def status(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        feed = worker.geofences
        return web.json({
            "app_id": settings.app_id, **worker.stats.as_dict(),
            "geofences": len(feed.index) if feed is not None and feed.index is not None else 0,
            "geofences_rejected": feed.rejected if feed is not None else 0,
            "geofence_rebuilds": feed.rebuilds if feed is not None else 0,
        })

    @app.page("/health")
    async def health(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json({"status": "ok"})

    @app.page("/ready")
    async def ready(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        """Ready once the worker has started (geofences loaded) and its tables have recovered."""
        recovered = worker.recovered()
        started = worker.pipeline is not None
        body = {"status": "ready" if started and recovered else "starting", "started": started,
                "tables_recovered": recovered}
        return web.json(body, status=200 if started and recovered else 503)

    @app.page("/metrics")
    async def metrics_page(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        worker.refresh_gauges()
        return web.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app
