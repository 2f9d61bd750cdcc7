"""RFID readers and asset metadata for every worker: compacted topics read in full (``CompactedFeed``).

``fleet.readers`` (key reader_id) becomes the current :class:`ReaderRegistry`; ``fleet.asset.registry`` (key
tag_id) the current :class:`AssetRegistry`. Each is swapped whole with one assignment, so a batch of reads is
resolved against one consistent registry. A definition that does not parse is refused with its reason in the log
and counted; the previous version of that reader or asset (if any) stays, so a typo never silently removes one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import orjson

from fleetstream.config import Settings
from fleetstream.domain.assets import AssetError, AssetProfile, AssetRegistry, parse_asset
from fleetstream.domain.readers import ReaderError, ReaderRegistry, parse_reader
from fleetstream.streaming.geofence_feed import CompactedFeed, read_compacted, send_records
from fleetstream.streaming.output import OutRecord

log = logging.getLogger("fleetstream.readers")


class ReadersFeed(CompactedFeed):
    """Holds the current :class:`ReaderRegistry` and the ids of the vehicles that carry readers."""

    name = "readers-feed"

    def __init__(self, settings: Settings, *, debounce_s: float = 0.2) -> None:
        super().__init__(settings, settings.readers_topic, debounce_s=debounce_s)
        self.registry = ReaderRegistry()
        self.vehicle_ids: frozenset[bytes] = frozenset()  # keys of the enriched positions worth decoding
        self.vehicles_changed = asyncio.Event()  # set when vehicle_ids changes (wakes the vehicle feed)
        self.rejected = 0
        self.updates = 0

    def current(self) -> ReaderRegistry:
        return self.registry

    async def apply(self, changes: Mapping[str, bytes | None]) -> None:
        readers = dict(self.registry.items())
        for reader_id, value in changes.items():
            if value is None:
                readers.pop(reader_id, None)
                continue
            try:
                readers[reader_id] = parse_reader(orjson.loads(value), reader_id)
            except (ReaderError, orjson.JSONDecodeError) as exc:
                self.rejected += 1
                log.error("reader %r refused (the previous version, if any, stays): %s", reader_id, exc)
        self.registry = ReaderRegistry(readers.values())
        vehicle_ids = frozenset(r.vehicle_id.encode() for r in readers.values() if r.vehicle_id is not None)
        if vehicle_ids != self.vehicle_ids:
            self.vehicle_ids = vehicle_ids
            self.vehicles_changed.set()
        self.updates += 1
        log.info("readers updated: %d readers, %d on vehicles", len(readers), len(self.vehicle_ids))


class AssetRegistryFeed(CompactedFeed):
    """Holds the current :class:`AssetRegistry` (tags it does not list get the defaults)."""

    name = "asset-registry-feed"

    def __init__(self, settings: Settings, *, debounce_s: float = 0.2) -> None:
        super().__init__(settings, settings.asset_registry_topic, debounce_s=debounce_s)
        self.registry = AssetRegistry()
        self.rejected = 0

    def current(self) -> AssetRegistry:
        return self.registry

    async def apply(self, changes: Mapping[str, bytes | None]) -> None:
        assets: dict[str, AssetProfile] = dict(self.registry.items())
        for tag_id, value in changes.items():
            if value is None:
                assets.pop(tag_id, None)
                continue
            try:
                assets[tag_id] = parse_asset(tag_id, orjson.loads(value))
            except (AssetError, orjson.JSONDecodeError) as exc:
                self.rejected += 1
                log.error("asset %r refused (the previous version, if any, stays): %s", tag_id, exc)
        self.registry = AssetRegistry(assets)


async def publish_readers(settings: Settings, registry: ReaderRegistry) -> int:
    """Publish every reader of a validated registry, keyed by reader id (``fleetstream readers load``)."""
    records = [OutRecord(settings.readers_topic, reader_id.encode(), orjson.dumps(reader.to_dict()))
               for reader_id, reader in registry.items()]
    return await send_records(settings, records)


async def delete_readers(settings: Settings, ids: list[str]) -> int:
    """Tombstones: reads from these readers become unknown (dead-lettered or held, by setting)."""
    return await send_records(settings, [OutRecord(settings.readers_topic, i.encode(), None) for i in ids])


async def read_readers(settings: Settings) -> dict[str, dict]:
    return await read_compacted(settings, settings.readers_topic)


async def publish_assets(settings: Settings, registry: AssetRegistry) -> int:
    """Publish every asset's metadata of a validated registry, keyed by tag id (``fleetstream assets load``)."""
    records = [OutRecord(settings.asset_registry_topic, tag_id.encode(), orjson.dumps(profile.to_dict()))
               for tag_id, profile in registry.items()]
    return await send_records(settings, records)


async def delete_assets(settings: Settings, ids: list[str]) -> int:
    return await send_records(settings, [OutRecord(settings.asset_registry_topic, i.encode(), None) for i in ids])


async def read_assets(settings: Settings) -> dict[str, dict]:
    return await read_compacted(settings, settings.asset_registry_topic)
