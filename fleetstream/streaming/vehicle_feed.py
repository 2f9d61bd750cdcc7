"""Where the vehicles that carry RFID readers are: a replicated view of their latest enriched fix, in every worker.

Asset states are partitioned by tag, vehicle states by device, so the worker resolving a tag read by a truck's
reader does not own the truck's state. Every worker therefore follows ``fleet.positions.enriched`` with a
group-less consumer over all partitions, and decodes only the records whose key is a vehicle that carries a
reader (a set lookup on the raw key: every other fix costs the fetch and nothing more). It keeps, per vehicle, the
newest accepted fix: position, motion and the geofences it is in. At start it re-reads the last
``rfid_vehicle_lookback`` records of each partition, so a restarted worker knows where the trucks are; a vehicle
not seen in that window is unknown until it reports (its load stays where it was: ``domain.assets``).

Chosen over a Faust GlobalTable fed by an agent on the enriched topic: that pays Faust's per-message cost (~200 us,
FIELD-NOTES) for every fix of every vehicle, and a GlobalTable spans workers only with one partition. While no
reader sits on a vehicle, the feed fetches nothing. ``benchmarks/rfid.py`` measures its cost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from fleetstream.codecs import parse_ts
from fleetstream.config import Settings
from fleetstream.domain.assets import VehicleFix
from fleetstream.streaming.kafka import client_security

log = logging.getLogger("fleetstream.vehicles")


class VehicleView(Mapping[str, VehicleFix]):
    """``vehicle_id -> VehicleFix`` (what ``domain.assets`` reads), plus each fix's time; newer fixes win."""

    def __init__(self) -> None:
        self._fixes: dict[str, VehicleFix] = {}
        self._ts: dict[str, int] = {}
        self.updates = 0

    def update(self, vehicle_id: str, ts_ms: int, fix: VehicleFix) -> bool:
        if ts_ms < self._ts.get(vehicle_id, -1):
            return False
        self._fixes[vehicle_id] = fix
        self._ts[vehicle_id] = ts_ms
        self.updates += 1
        return True

    def ts_ms(self, vehicle_id: str) -> int | None:
        return self._ts.get(vehicle_id)

    def get(self, vehicle_id: str, default: VehicleFix | None = None) -> VehicleFix | None:  # type: ignore[override]
        return self._fixes.get(vehicle_id, default)

    def __getitem__(self, vehicle_id: str) -> VehicleFix:
        return self._fixes[vehicle_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fixes)

    def __len__(self) -> int:
        return len(self._fixes)


def apply_enriched(view: VehicleView, wanted: frozenset[bytes], key: bytes | None, value: bytes | None) -> bool:
    """One enriched-position record into the view if its key is a wanted vehicle; filtered fixes are skipped."""
    if key not in wanted or value is None:
        return False
    try:
        doc = orjson.loads(value)
        if doc.get("filtered") is not None:
            return False
        fix = VehicleFix(float(doc["lat"]), float(doc["lon"]), str(doc.get("motion") or "unknown"),
                         tuple(doc.get("geofences") or ()))
        return view.update(key.decode(), parse_ts(doc["ts"]), fix)
    except Exception:  # a record we cannot read is not ours to dead-letter: skip it, say so
        log.warning("enriched record of %r not understood; skipped", key)
        return False


class VehicleFeed:
    """Follows the enriched positions topic for the vehicles ``wanted()`` names (see the module doc).

    ``ready`` is set once the lookback has been read (at once while no vehicle carries a reader)."""

    name = "vehicle-feed"

    def __init__(self, settings: Settings, wanted: Callable[[], frozenset[bytes]],
                 changed: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.topic = settings.enriched_topic
        self.wanted = wanted
        self.changed = changed or asyncio.Event()  # set when the wanted set may have grown
        self.view = VehicleView()
        self.ready = asyncio.Event()
        self.skimmed = 0  # records fetched (decoded or not)
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers, enable_auto_commit=False,
            auto_offset_reset="latest", max_partition_fetch_bytes=4 * 1024 * 1024,
            **client_security(self.settings),
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; retrying in 1 s", self.name)
                await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self.wanted():  # no reader on a vehicle: nothing to follow
            self.ready.set()
            self.changed.clear()
            await self.changed.wait()
        partitions = consumer.partitions_for_topic(self.topic)
        while not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                await asyncio.sleep(0.5)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)  # under-reported by Tansu: the lookback then starts a little earlier
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - self.settings.rfid_vehicle_lookback))
        view = self.view
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            wanted = self.wanted()
            for messages in batch.values():
                self.skimmed += len(messages)
                for m in messages:
                    if m.key in wanted:
                        apply_enriched(view, wanted, m.key, m.value)
            if not self.ready.is_set() and await self._caught_up(consumer, ends):
                self.ready.set()
                log.info("vehicle positions loaded: %d vehicles", len(view))

    @staticmethod
    async def _caught_up(consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return False
        return True
