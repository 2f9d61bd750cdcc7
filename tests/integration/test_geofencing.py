"""Geofencing on a real broker: the CLI loads geofences, a real GeoLife trace streams through a worker, and every
enriched record's geofences and every transition match a brute-force reference; then a geofence is moved
and another deleted while the worker runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import shapely

from fleetstream.codecs import parse_ts, validate_output
from fleetstream.simulate import trace_records
from tests.integration.helpers import WorkerProcess, produce, read_topic, settings_env, wait_for_count, worker_settings

pytestmark = pytest.mark.integration


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run([sys.executable, "-m", "fleetstream", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def campus_features(shared_data: Path) -> list[dict]:
    campus = orjson.loads((shared_data / "geolife" / "tsinghua_wgs84.geojson").read_bytes())["features"][0]
    west_half = shapely.box(116.28, 39.95, 116.3225, 40.05)
    return [
        {**campus, "id": "campus"},
        {"type": "Feature", "id": "west",
         "geometry": shapely.geometry.mapping(shapely.box(116.30, 39.98, 116.3225, 40.01)),
         "properties": {"name": "west of the campus centre"}},
        {"type": "Feature", "id": "gate", "geometry": {"type": "Point", "coordinates": [116.3265, 40.0030]},
         "properties": {"radius_m": 150}},
    ], west_half


def reference_memberships(features: list[dict], lat: float, lon: float) -> list[str]:
    out = []
    for feature in features:
        geom = shapely.geometry.shape(feature["geometry"])
        if feature["geometry"]["type"] == "Point":
            from fleetstream.domain.geo import haversine_m

            if haversine_m(geom.y, geom.x, lat, lon) <= feature["properties"]["radius_m"]:
                out.append(feature["id"])
        elif geom.covers(shapely.Point(lon, lat)):
            out.append(feature["id"])
    return sorted(out)


def test_geofences_on_a_real_trace(broker, prefix, tmp_path: Path, shared_data: Path):
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=2)
    features, _ = campus_features(shared_data)
    path = tmp_path / "fences.geojson"
    path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": features}))
    loaded = cli(settings, "geofences", "load", str(path))
    assert loaded.returncode == 0, loaded.stderr
    bad = tmp_path / "bad.geojson"
    bad.write_bytes(orjson.dumps({"type": "Feature", "id": "x", "geometry": {"type": "Point", "coordinates": [1, 2]}}))
    refused = cli(settings, "geofences", "load", str(bad))
    assert refused.returncode == 2 and "radius_m" in refused.stderr
    listed = cli(settings, "geofences", "list")
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["campus", "gate", "west"]

    records = trace_records(shared_data / "geolife" / "geolife_sample.txt.gz", batch_size=20)[:600]
    n_fixes = sum(r.fixes for r in records)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, [(r.key, r.value) for r in records]))
        enriched = asyncio.run(wait_for_count(broker.bootstrap, settings.enriched_topic, n_fixes))
        events = asyncio.run(read_topic(broker.bootstrap, settings.geofence_events_topic, idle_s=3))
    finally:
        worker.stop()
    assert len(enriched) == n_fixes, worker.log_tail()

    by_device: dict[str, list[dict]] = defaultdict(list)
    for record in enriched:
        fix = record.json()
        assert fix["geofences"] == reference_memberships(features, fix["lat"], fix["lon"]), fix
        by_device[fix["device_id"]].append(fix)
    expected = []
    for device, fixes in by_device.items():
        fixes.sort(key=lambda f: (parse_ts(f["ts"]), f["source"]["offset"], f["source"]["index"]))
        previous: set[str] = set()
        for fix in fixes:
            if "filtered" in fix:
                continue
            now = set(fix["geofences"])
            expected += [(device, fix["ts"], g, "enter") for g in now - previous]
            expected += [(device, fix["ts"], g, "exit") for g in previous - now]
            previous = now
    got = [(e["device_id"], e["ts"], e["geofence_id"], e["type"]) for e in (r.json() for r in events)]
    for r in events:
        validate_output("geofence_event", r.json())
    assert sorted(got) == sorted(expected)
    assert len(expected) > 10  # the trace really goes in and out


def test_geofence_update_and_delete_mid_stream(broker, prefix, tmp_path: Path):
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=2)
    lat, lon = 53.40, -2.98
    square = lambda fid, d: {"type": "Feature", "id": fid, "properties": {},  # noqa: E731
                             "geometry": shapely.geometry.mapping(shapely.box(lon - d, lat - d, lon + d, lat + d))}
    path = tmp_path / "fences.geojson"
    path.write_bytes(orjson.dumps({"type": "FeatureCollection",
                                   "features": [square("keep", 0.01), square("gone", 0.01)]}))
    assert cli(settings, "geofences", "load", str(path)).returncode == 0
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    start = int(time.time() * 1000) - 60_000

    def fix(i: int) -> tuple[bytes, bytes]:
        return b"veh-1", orjson.dumps({"device_id": "veh-1", "ts": start + i * 1000, "lat": lat, "lon": lon})

    try:
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, [fix(0)]))
        asyncio.run(wait_for_count(broker.bootstrap, settings.geofence_events_topic, 2))
        # move "keep" away from the device and delete "gone"
        moved = tmp_path / "moved.geojson"
        far = square("keep", 0.01)
        far["geometry"] = shapely.geometry.mapping(shapely.box(lon + 0.1, lat, lon + 0.2, lat + 0.1))
        moved.write_bytes(orjson.dumps(far))
        assert cli(settings, "geofences", "load", str(moved)).returncode == 0
        assert cli(settings, "geofences", "delete", "gone").returncode == 0
        deadline = time.monotonic() + 30
        while worker.status()["geofence_rebuilds"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, [fix(1)]))
        events = asyncio.run(wait_for_count(broker.bootstrap, settings.geofence_events_topic, 4))
        enriched = asyncio.run(wait_for_count(broker.bootstrap, settings.enriched_topic, 2))
    finally:
        worker.stop()
    got = sorted((e["geofence_id"], e["type"], e.get("reason")) for e in (r.json() for r in events))
    assert got == [("gone", "enter", None), ("gone", "exit", "geofence_deleted"), ("keep", "enter", None),
                   ("keep", "exit", None)]
    assert sorted(r.json()["geofences"] for r in enriched) == [[], ["gone", "keep"]]
