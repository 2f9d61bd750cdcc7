"""Geofences for every worker: the compacted ``fleet.geofences`` topic read in full into an index.

Every worker needs every geofence, so this is a group-less consumer over all partitions of the topic (what a
Faust GlobalTable is underneath, without its one-partition caveats across workers). Changes are collected and
the index is rebuilt off the event loop, then swapped in with one reference assignment: a batch of fixes is
looked up against one consistent index, never a half-updated one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fleetstream.config import Settings
from fleetstream.domain.geofences import Geofence, GeofenceError, geofence_to_feature, parse_geofence
from fleetstream.domain.geoindex import GeofenceIndex
from fleetstream.streaming.kafka import client_security
from fleetstream.streaming.output import BatchProducer, OutRecord

log = logging.getLogger("fleetstream.geofences")


class CompactedFeed:
    """Follows a compacted topic from its beginning, for every worker (no consumer group), and hands each
    burst of changes (latest value per key, None for a tombstone) to :meth:`apply`.

    Every worker needs all of it (geofences, rules, readers), so this is a group-less consumer over all
    partitions (what a Faust GlobalTable is underneath, without its one-partition caveats across workers).
    Bursts are debounced so a bulk load is applied once. ``ready`` is set once the topic has been read to its end.
    """

    name = "compacted-feed"

    def __init__(self, settings: Settings, topic: str, *, debounce_s: float = 0.2) -> None:
        self.settings = settings
        self.topic = topic
        self.debounce_s = debounce_s
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers, enable_auto_commit=False,
            auto_offset_reset="earliest", **client_security(self.settings),
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def apply(self, changes: Mapping[str, bytes | None]) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:  # a broker hiccup must not leave the worker with a frozen copy
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; retrying in 1 s", self.name)
                await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        assert self._consumer is not None
        partitions = self._consumer.partitions_for_topic(self.topic)
        while not partitions:
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(self.topic)
            if not partitions:
                await asyncio.sleep(0.5)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        while True:
            pending: dict[str, bytes | None] = {}
            batch = await self._consumer.getmany(timeout_ms=int(self.debounce_s * 1000), max_records=50_000)
            while batch:  # keep collecting while updates stream in, then apply once
                for messages in batch.values():
                    for message in messages:
                        if message.key is not None:
                            pending[message.key.decode("utf-8", "replace")] = message.value
                batch = await self._consumer.getmany(timeout_ms=int(self.debounce_s * 1000), max_records=50_000)
            if pending:
                await self.apply(pending)
            if not self.ready.is_set() and await self._caught_up(tps):
                self.ready.set()

    async def _caught_up(self, tps: list[TopicPartition]) -> bool:
        assert self._consumer is not None
        ends = await self._consumer.end_offsets(tps)
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True


class GeofenceFeed(CompactedFeed):
    """Holds the current :class:`GeofenceIndex`; ``index`` is swapped whole when the topic changes.

    The index is rebuilt off the event loop, then swapped in with one reference assignment: a batch of fixes
    is looked up against one consistent index, never a half-updated one.
    """

    name = "geofence-feed"

    def __init__(self, settings: Settings, *, debounce_s: float = 0.2) -> None:
        super().__init__(settings, settings.geofences_topic, debounce_s=debounce_s)
        self._fences: dict[str, Geofence] = {}
        self.index: GeofenceIndex | None = None
        self.rejected = 0
        self.rebuilds = 0
        self.last_rebuild_s = 0.0

    def current(self) -> GeofenceIndex | None:
        return self.index

    async def apply(self, changes: Mapping[str, bytes | None]) -> None:
        upserts: list[Geofence] = []
        deletes: list[str] = []
        for fence_id, value in changes.items():
            if value is None:
                deletes.append(fence_id)
                continue
            try:
                fence = parse_geofence(orjson.loads(value), max_vertices=self.settings.max_geofence_vertices)
                if fence.id != fence_id:
                    raise GeofenceError(f"geofence {fence.id!r}: message key {fence_id!r} differs from its id")
            except (GeofenceError, ValueError, orjson.JSONDecodeError) as exc:
                self.rejected += 1
                log.error("geofence %r refused: %s", fence_id, exc)
                continue
            upserts.append(fence)
        for fence in upserts:
            self._fences[fence.id] = fence
        for fence_id in deletes:
            self._fences.pop(fence_id, None)
        started = time.perf_counter()
        previous = self.index
        if previous is None or not len(previous):
            fresh = await asyncio.to_thread(GeofenceIndex.build, list(self._fences.values()))
        else:
            fresh = await asyncio.to_thread(previous.with_changes, upserts, deletes)
        self.index = fresh if len(fresh) else None
        self.rebuilds += 1
        self.last_rebuild_s = time.perf_counter() - started
        log.info("geofence index rebuilt: %d geofences in %.3fs", len(fresh), self.last_rebuild_s)


async def publish_geofences(settings: Settings, fences: list[Geofence]) -> int:
    """Publish features keyed by id to the compacted topic (the CLI's ``geofences load``)."""
    records = [
        OutRecord(settings.geofences_topic, fence.id.encode(), orjson.dumps(geofence_to_feature(fence)))
        for fence in fences
    ]
    return await send_records(settings, records)


async def delete_geofences(settings: Settings, ids: list[str]) -> int:
    """Publish tombstones: every worker drops the geofence and devices inside get an exit."""
    return await send_records(settings, [OutRecord(settings.geofences_topic, i.encode(), None) for i in ids])


async def read_geofences(settings: Settings, idle_s: float = 1.0) -> dict[str, dict]:
    """What the cluster holds now: the compacted topic read to the end (latest value per id, tombstones removed)."""
    return await read_compacted(settings, settings.geofences_topic, idle_s)


async def read_compacted(settings: Settings, topic: str, idle_s: float = 1.0) -> dict[str, dict]:
    """A compacted topic of JSON values read to the end: the latest value per key, tombstones removed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, **client_security(settings)
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        latest: dict[str, dict | None] = {}
        while batch := await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=50_000):
            for messages in batch.values():
                for m in messages:
                    if m.key is not None:
                        latest[m.key.decode()] = orjson.loads(m.value) if m.value is not None else None
        return {k: v for k, v in latest.items() if v is not None}
    finally:
        await consumer.stop()


async def send_records(settings: Settings, records: list[OutRecord]) -> int:
    """Publish records with a short-lived producer, acknowledged by all replicas (CLI loaders)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", max_batch_size=1024 * 1024,
        **client_security(settings),
    )
    await producer.start()
    try:
        await BatchProducer(producer, tail_single_record=settings.tail_single_record).flush(records)
        return len(records)
    finally:
        await producer.stop()
