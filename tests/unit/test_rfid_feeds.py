"""The RFID feeds' apply steps without a broker: readers and asset metadata (a refused definition keeps the
previous one, tombstones delete) and the vehicle view (only wanted vehicles, newest accepted fix wins)."""

from __future__ import annotations

import asyncio

import orjson

from fleetstream.codecs import format_ts
from fleetstream.config import Settings
from fleetstream.domain.assets import VehicleFix
from fleetstream.streaming.readers_feed import AssetRegistryFeed, ReadersFeed
from fleetstream.streaming.vehicle_feed import VehicleView, apply_enriched

T0 = 1_795_600_800_000
DOCK = {"reader_id": "dock", "lat": 53.4, "lon": -2.98, "zone_id": "dock-1", "role": "dock"}
TRUCK = {"reader_id": "truck", "lat": 53.4, "lon": -2.98, "vehicle_id": "veh-1"}


def test_readers_feed_keeps_the_previous_version_of_a_refused_reader_and_follows_vehicles():
    feed = ReadersFeed(Settings.load(env={}))
    asyncio.run(feed.apply({"dock": orjson.dumps(DOCK), "truck": orjson.dumps(TRUCK)}))
    assert sorted(feed.registry) == ["dock", "truck"] and feed.vehicle_ids == {b"veh-1"}
    assert feed.vehicles_changed.is_set()
    feed.vehicles_changed.clear()
    asyncio.run(feed.apply({"dock": orjson.dumps({**DOCK, "lat": 95}), "gate": b"{not json"}))
    assert feed.registry["dock"].lat == 53.4 and "gate" not in feed.registry and feed.rejected == 2
    assert not feed.vehicles_changed.is_set()  # no vehicle changed: the vehicle feed is not woken
    asyncio.run(feed.apply({"truck": None}))
    assert sorted(feed.registry) == ["dock"] and feed.vehicle_ids == frozenset() and feed.vehicles_changed.is_set()


def test_asset_registry_feed():
    feed = AssetRegistryFeed(Settings.load(env={}))
    asyncio.run(feed.apply({"p": orjson.dumps({"keep_inside": True, "authorised_vehicles": ["veh-1"]})}))
    assert feed.registry.get("p").keep_inside and feed.registry.get("p").authorised_vehicles == {"veh-1"}
    asyncio.run(feed.apply({"p": orjson.dumps({"keep_inside": "yes"})}))
    assert feed.registry.get("p").keep_inside and feed.rejected == 1
    asyncio.run(feed.apply({"p": None}))
    assert not feed.registry.get("p").keep_inside  # back to the defaults


def enriched(device: str, seconds: float, lat: float, **extra: object) -> bytes:
    return orjson.dumps({"device_id": device, "ts": format_ts(T0 + round(seconds * 1000)), "lat": lat, "lon": -2.98,
                         "motion": "moving", "geofences": ["depot"], **extra})


def test_vehicle_view_takes_the_newest_accepted_fix_of_wanted_vehicles_only():
    view, wanted = VehicleView(), frozenset({b"veh-1"})
    assert apply_enriched(view, wanted, b"veh-1", enriched("veh-1", 10, 53.41))
    assert not apply_enriched(view, wanted, b"veh-2", enriched("veh-2", 10, 53.42))  # carries no reader
    assert not apply_enriched(view, wanted, b"veh-1", enriched("veh-1", 5, 53.43))  # older
    assert not apply_enriched(view, wanted, b"veh-1", enriched("veh-1", 20, 53.44, filtered="max_speed"))
    assert not apply_enriched(view, wanted, b"veh-1", b"{broken")  # skipped, never raises
    assert dict(view) == {"veh-1": VehicleFix(53.41, -2.98, "moving", ("depot",))}
    assert view.ts_ms("veh-1") == T0 + 10_000
