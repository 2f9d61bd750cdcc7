"""The RFID agent: ``fleet.rfid`` -> asset states (a changelogged table by tag), ``fleet.assets``, ``fleet.alerts``.

Built like the position worker (``app.PositionWorker``): batches from ``take_events``, the CPU work in
:class:`~fleetstream.streaming.rfid_pipeline.RfidPipeline`, outputs and changelog sent with ``send_batch`` and
acknowledged before the input offsets may be committed, states applied to the store through the recovery path,
at most two batches in flight, a timer for deadlines kept in a heap that is rebuilt from the store after every
rebalance. What is RFID-specific:

- every worker follows the readers and asset-metadata topics in full (``readers_feed``) and the positions of
  the vehicles that carry readers (``vehicle_feed``);
- deadlines are in event time: each partition's watermark comes from an :class:`EventClock` (idle partitions
  follow the worker's clock, which runs on with the wall clock once input stops);
- an :class:`Inventory` of this worker's active partitions (zone -> tags, vehicle -> tags), kept from the
  acknowledged states and rebuilt from the store after a rebalance; the API gathers it across workers.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import ChainMap
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

import faust
from faust.types import TP, EventT

from fleetstream.config import Settings
from fleetstream.domain.alerts import make_alert_id
from fleetstream.domain.assets import AssetState, Inventory, next_deadline
from fleetstream.domain.eventclock import EventClock, pop_due
from fleetstream.observability.metrics import Metrics
from fleetstream.streaming.app import TableState
from fleetstream.streaming.output import BatchProducer
from fleetstream.streaming.pipeline import InRecord
from fleetstream.streaming.readers_feed import AssetRegistryFeed, ReadersFeed
from fleetstream.streaming.rfid_pipeline import (
    UNKNOWN_READER,
    RfidOutput,
    RfidPipeline,
    RfidStats,
    TagEntry,
    decode_entry,
)
from fleetstream.streaming.vehicle_feed import VehicleFeed

log = logging.getLogger("fleetstream.rfid")

ASSET_STATE_TABLE = "asset-state"


class RfidWorker:
    """Glue between the Faust agent, the timer and :class:`RfidPipeline`."""

    def __init__(self, app: faust.App, settings: Settings, table: faust.Table, metrics: Metrics | None = None) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.state = TableState(table)
        self.stats = RfidStats()
        self.pipeline: RfidPipeline | None = None
        self.output: BatchProducer | None = None
        self.readers: ReadersFeed | None = None
        self.assets: AssetRegistryFeed | None = None
        self.vehicles: VehicleFeed | None = None
        self.clock = EventClock(round(settings.rfid_lateness_s * 1000), round(settings.rfid_idle_s * 1000))
        self.max_inflight = 2
        self._inflight: set[asyncio.Future[None]] = set()
        self._pending: dict[str, tuple[int, TagEntry]] = {}
        self._pending_seq: dict[str, int] = {}
        self._seq = 0
        self._start_lock = asyncio.Lock()
        self._deadlines: list[tuple[int, str, int]] = []  # (due event time, tag, partition); stale ones skipped
        self._held: dict[str, int] = {}  # tags with held reads -> partition
        self._stale = True  # heap, inventory and event clock to rebuild from the store (after a rebalance)
        self.placed: dict[str, AssetState] = {}  # acknowledged states of this worker's active partitions
        self.inventory = Inventory()

    # -- start

    async def ensure_started(self) -> None:
        async with self._start_lock:
            if self.pipeline is None:
                await self.start()

    async def start(self) -> None:
        self.output = BatchProducer(self.app.producer._ensure_producer(),
                                    tail_single_record=self.settings.tail_single_record)
        n_in = await self.output.partitions_for(self.settings.rfid_topic)
        n_assets = await self.output.partitions_for(self.settings.assets_topic)
        n_alerts = await self.output.partitions_for(self.settings.alerts_topic)
        self.readers = ReadersFeed(self.settings)
        self.assets = AssetRegistryFeed(self.settings)
        self.vehicles = VehicleFeed(self.settings, lambda: self.readers.vehicle_ids if self.readers else frozenset(),
                                    self.readers.vehicles_changed)
        for feed in (self.readers, self.assets):
            await feed.start()
        await self._wait_ready(self.readers.ready, "readers")
        await self._wait_ready(self.assets.ready, "asset metadata")
        await self.vehicles.start()
        await self._wait_ready(self.vehicles.ready, "vehicle positions")
        self.pipeline = RfidPipeline(
            self.settings, self.state, changelog_topic=self.state.table.changelog_topic_name,
            readers=self.readers.current, assets=self.assets.current, vehicles=lambda: self.vehicles.view,  # type: ignore[union-attr]
            copartitioned=n_in == n_assets == n_alerts,
        )

    @staticmethod
    async def _wait_ready(ready: asyncio.Event, what: str) -> None:
        """A read resolved against half-loaded readers or assets would be dead-lettered or misjudged: wait."""
        waited_s = 0
        while not ready.is_set():
            try:
                await asyncio.wait_for(ready.wait(), timeout=30)
            except TimeoutError:
                waited_s += 30
                log.warning("still loading %s after %d s before the first RFID batch", what, waited_s)

    # -- batches and timer

    async def handle(self, events: Sequence[EventT]) -> None:
        """One batch: process, put the outputs on the wire, ack the inputs once everything is acknowledged."""
        await self.ensure_started()
        assert self.pipeline is not None
        while len(self._inflight) >= self.max_inflight:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
        started = time.perf_counter()
        self.stats.mark_batch_start()
        records = [InRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in (e.message for e in events)]
        output = self._process(records)
        wall_ms = int(time.time() * 1000)
        for partition, ts in output.newest_ts.items():
            self.clock.observe(partition, ts, wall_ms)
        await self._emit(output, events, started)

    async def on_timer(self) -> None:
        """Deadlines whose event time the partition's watermark has passed, and held reads to release."""
        if self.pipeline is None or not self.recovered():
            return
        while len(self._inflight) >= self.max_inflight:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
        if self._stale:
            self._rebuild()
        started = time.perf_counter()
        watermark = self.clock.watermarks(int(time.time() * 1000))
        due = self._pop_due(watermark)
        due.extend((partition, tag) for tag, partition in self._held.items())
        if not due:
            return
        try:
            output = self.pipeline.tick(due, self._pending, watermark)  # no await until its states are registered
        except Exception:  # a timer must not stop the worker; these deadlines come back with the tags' next reads
            log.exception("RFID timer failed for %d tags; their deadlines wait for their next reads", len(due))
            return
        if output.records or output.state_writes:
            await self._emit(output, (), started)

    def _pop_due(self, watermark: Any) -> list[tuple[int, str]]:
        return pop_due(self._deadlines, watermark, self._partitions())

    def _process(self, records: list[InRecord]) -> RfidOutput:
        """A record that breaks the pipeline is retried alone and dead-lettered (``internal_error``) if it still
        does: one bad read never stops the worker."""
        assert self.pipeline is not None
        try:
            return self.pipeline.process(records, self._pending)
        except Exception:
            log.exception("RFID batch of %d records failed; retrying record by record", len(records))
        merged = RfidOutput(messages=len(records))
        pending = ChainMap(merged.new_entries, self._pending)
        for record in records:
            try:
                single = self.pipeline.process([record], pending)
            except Exception as exc:
                log.exception("record %s/%d@%d failed", record.topic, record.partition, record.offset)
                single = self.pipeline.internal_error(record, exc)
            merged.merge(single)
        return merged

    async def _emit(self, output: RfidOutput, events: Sequence[EventT], started: float) -> None:
        assert self.output is not None
        self._seq += 1
        seq = self._seq
        for tag, entry in output.new_entries.items():
            self._pending[tag] = entry
            self._pending_seq[tag] = seq
            partition, (state, held) = entry
            due = next_deadline(state) if state is not None else None
            if due is not None:
                heapq.heappush(self._deadlines, (due, tag, partition))
            if held:
                self._held[tag] = partition
            else:
                self._held.pop(tag, None)
        for event in events:
            event.message.incref()
        acknowledged = await self.output.send(output.records)
        task = asyncio.ensure_future(self._complete(seq, output, acknowledged, events, started))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _complete(self, seq: int, output: RfidOutput,
                        acknowledged: Awaitable[dict[tuple[str, int], list[int]]], events: Sequence[EventT],
                        started: float) -> None:
        try:
            offsets = await acknowledged
        except Exception as exc:  # the broker refused our outputs: do not ack, let the worker stop and retry
            log.exception("outputs of an RFID batch were not acknowledged; stopping without committing its offsets")
            await self.app.crash(exc)
            return
        changelog = self.state.table.changelog_topic_name
        self.state.apply(output.state_writes,
                         {partition: found for (topic, partition), found in offsets.items() if topic == changelog})
        for tag, (_, (state, _)) in output.new_entries.items():
            if state is not None and not self._stale:
                self._place(tag, state)
            if self._pending_seq.get(tag) == seq:  # no later batch changed it: the store has it now
                del self._pending_seq[tag]
                del self._pending[tag]
        for event in events:
            event.ack()
        self.stats.add(output)
        self._observe(output, offsets, events, started)

    def _place(self, tag: str, state: AssetState) -> None:
        """Keep the inventory in step with an acknowledged state (only a change of zones or vehicle touches it)."""
        old = self.placed.get(tag)
        self.placed[tag] = state
        if old is not None:
            if old.zones == state.zones and old.vehicle_id == state.vehicle_id:
                return
            self.inventory.remove(old)
        self.inventory.add(state)

    # -- rebalances

    async def drain(self) -> None:
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        self._pending.clear()
        self._pending_seq.clear()

    def on_assignment_changed(self) -> None:
        """Partitions moved: heap, held index, inventory and event clock come back from the store."""
        self._deadlines.clear()
        self._held.clear()
        self.placed.clear()
        self.inventory = Inventory()
        self.clock.forget()
        self._stale = True

    def recovered(self) -> bool:
        recovery = self.app.tables.recovery
        return recovery.completed.is_set() and not recovery.in_recovery

    def _partitions(self) -> set[int]:
        topic = self.settings.rfid_topic
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == topic}

    def _active_items(self) -> Iterator[tuple[int, bytes, bytes]]:
        topic = self.settings.rfid_topic
        active = self._partitions()
        key_partition = self.app.producer.key_partition
        for key, value in self.state.items():
            if value:
                partition = key_partition(topic, key).partition
                if partition in active:
                    yield partition, key, value

    def _rebuild(self) -> None:
        """Deadlines, held reads, inventory and each partition's event time, from the store (after recovery)."""
        deadlines = []
        placed: dict[str, AssetState] = {}
        held: dict[str, int] = {}
        wall_ms = int(time.time() * 1000)
        for partition, key, value in self._active_items():
            state, reads = decode_entry(value)
            tag = key.decode()
            if reads:
                held[tag] = partition
            if state is None:
                continue
            placed[tag] = state
            self.clock.restore(partition, state.clock_ms, wall_ms)
            due = next_deadline(state)
            if due is not None:
                deadlines.append((due, tag, partition))
        for tag, (partition, (state, reads)) in self._pending.items():
            if state is not None and (due := next_deadline(state)) is not None:
                deadlines.append((due, tag, partition))
            if reads:
                held[tag] = partition
        heapq.heapify(deadlines)
        self._deadlines = deadlines
        self._held = held
        self.placed = placed
        self.inventory = Inventory.from_states(placed.values())
        self._stale = False
        self.refresh_gauges()

    # -- queries (the API)

    def ensure_current(self) -> None:
        if self._stale and self.recovered() and self.pipeline is not None:
            self._rebuild()

    def asset_state(self, tag_id: str) -> AssetState | None:
        """The newest state of a tag this worker owns (in flight included), or None."""
        entry = self._pending.get(tag_id)
        if entry is not None:
            return entry[1].state
        partition = self.app.producer.key_partition(self.settings.rfid_topic, tag_id.encode()).partition
        raw = self.state.get(partition, tag_id.encode())
        if not raw:
            return None
        return decode_entry(raw).state

    def local_inventory(self) -> Inventory:
        self.ensure_current()
        return self.inventory

    def local_alerts(self) -> list[tuple[str, str, int, str, str | None]]:
        """The active alerts of the tags this worker owns (in flight included): (rule, alert id, raise time,
        tag, severity), for ``GET /alerts`` beside the vehicles' alerts."""
        self.ensure_current()
        if self.pipeline is None:
            return []
        states = dict(self.placed)
        states.update((tag, entry[1].state) for tag, entry in self._pending.items() if entry[1].state is not None)
        severities = self.pipeline.config.severities
        return [(rule, make_alert_id(rule, tag, raised_ms), raised_ms, tag, severities.get(rule))
                for tag, state in states.items() for rule, raised_ms in state.alerts.items()]

    def known_zone(self, zone_id: str) -> bool:
        """A zone some reader covers, or a geofence (where assets on vehicles can be)."""
        if self.readers is not None and any(r.zone_id == zone_id for r in self.readers.registry.values()):
            return True
        positions = getattr(self.app, "fleetstream_worker", None)
        feed = positions.geofences if positions is not None else None
        index = feed.index if feed is not None else None
        return (index is not None and index.get(zone_id) is not None) or zone_id in self.inventory.zones

    # -- metrics

    def _observe(self, output: RfidOutput, offsets: dict[tuple[str, int], list[int]], events: Sequence[EventT],
                 started: float) -> None:
        m = self.metrics
        if m is None:
            return
        topic = self.settings.rfid_topic
        if events:
            m.input_messages.labels(topic).inc(len(events))
            m.batch_size.observe(len(events))
            m.batch_seconds.observe(time.perf_counter() - started)
        m.input_records.labels(topic).inc(output.reads)
        for reason, count in output.deadlettered.items():
            m.deadlettered.labels(topic, reason).inc(count)
        for (rule, severity, state), count in output.alerts.items():
            m.alerts.labels(rule, severity, state).inc(count)
        for (out_topic, _), found in offsets.items():
            m.output_records.labels(out_topic).inc(len(found))
        m.assets.set(len(self.placed))

    def refresh_gauges(self) -> None:
        if self.metrics is not None and not self._stale:
            self.metrics.assets.set(len(self.placed))


def register_rfid(app: faust.App, settings: Settings, metrics: Metrics | None) -> RfidWorker:
    """Add the RFID agent, its table, timer, rebalance hooks, status page and API routes to ``app``."""
    from fleetstream.streaming.assets_api import register_assets_api

    source = app.topic(settings.rfid_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=settings.partitions)
    table = app.Table(
        ASSET_STATE_TABLE, default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes,
        schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    )
    if metrics is not None:
        metrics.prime_inputs((settings.rfid_topic,))
        metrics.prime_outputs((settings.assets_topic,))
        metrics.deadlettered.labels(settings.rfid_topic, UNKNOWN_READER)
    worker = RfidWorker(app, settings, table, metrics)
    app.fleetstream_rfid = worker  # type: ignore[attr-defined]

    @app.task
    async def start_rfid() -> None:  # load readers, assets and vehicle positions while the group forms
        await worker.ensure_started()

    @app.on_partitions_revoked.connect
    async def on_rfid_revoked(sender: faust.App, revoked: set[TP], **kwargs: Any) -> None:
        await worker.drain()
        worker.on_assignment_changed()

    @app.on_partitions_assigned.connect
    async def on_rfid_assigned(sender: faust.App, assigned: set[TP], **kwargs: Any) -> None:
        await worker.drain()
        worker.on_assignment_changed()

    @app.timer(settings.timer_interval_s)
    async def rfid_timers() -> None:
        await worker.on_timer()

    @app.agent(source, name="rfid")
    async def process_reads(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            await worker.handle(events)

    register_assets_api(app, worker, settings, table)
    return worker
